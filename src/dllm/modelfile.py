"""HDF5 model format v2 (specified in docs/format.md): writing (converters) and reading (ranks).

Layout:
    /                     attrs: format="dllm", format_version=2, quant (a summary of the
                          tensors' types), and every ModelConfig field
    /tokenizer            uint8 [n] serialized tokenizer, optional (attr kind: "sentencepiece"
                          or "tokenizers"; optional attr chat_template)
    /tok_embeddings       [vocab, dim]          (root only)
    /output               [vocab, dim]          absent when tie_embeddings (tok_embeddings serves)
    /norm                 [dim] float32
    /layers/<i>/attention_norm, ffn_norm        [dim] float32
    /layers/<i>/wq [dim, dim]  wk, wv [kv_dim, dim]  wo [dim, dim]
    /layers/<i>/w1, w3 [hidden, dim]  w2 [dim, hidden]

Every tensor has its own type, attr ``quant``: one of dllm.weight_types (q40, q80, f16, bf16,
f32; norms are always f32), stored as that table says (Q4_0 bytes uint8 [rows, cols/32*18],
Q8_0 bytes [rows, cols/32*34], float16, bf16 bits uint16, float32); attr ``shape`` keeps the
logical shape. Version 1 files (q40 and f32 only, the same layout) still load.
Datasets are contiguous (no chunks, no filters), so a rank reads rows [a, b) of a matrix with
one contiguous hyperslab read and gets exactly the bytes its kernel consumes.
Only converters write; ranks open the file read-only.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import replacing
from .config import ModelConfig
from .errors import ModelFileError
from .weight_types import NAMES as QUANTS
from .weight_types import TYPES, describe_types

FORMAT_NAME = "dllm"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
V1_QUANTS = ("q40", "f32")
NORMS = ("attention_norm", "ffn_norm")
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def layer_name(layer, name):
    return f"layers/{layer}/{name}"


def tensor_shapes(config):
    """Logical float shape of every tensor the file must hold, keyed by dataset name."""
    c = config
    shapes = {"tok_embeddings": (c.vocab_size, c.dim), "norm": (c.dim,)}
    if not c.tie_embeddings:
        shapes["output"] = (c.vocab_size, c.dim)
    per_layer = {"attention_norm": (c.dim,), "ffn_norm": (c.dim,),
                 "wq": (c.dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
                 "wo": (c.dim, c.dim), "w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim),
                 "w3": (c.hidden_dim, c.dim)}
    for layer in range(c.n_layers):
        for name, shape in per_layer.items():
            shapes[layer_name(layer, name)] = shape
    return shapes


def stored_shape(shape, quant):
    """Shape and dtype of a tensor of weight type `quant` as stored (Q4_0 rows become
    cols/32*18 bytes, ...; dllm.weight_types)."""
    wtype = TYPES[quant]
    if len(shape) == 1:
        return tuple(shape), wtype.dtype
    return wtype.stored_shape(shape), wtype.dtype


def tensor_quant(shape, quant):
    """Norm vectors are always float32; matrices take the type given."""
    return "f32" if len(shape) == 1 else quant


@dataclass(frozen=True)
class StoredTensor:
    """A tensor handed to write_model already in its stored form, written byte for byte:
    the stored array of weight type `quant` (a GGUF Q4_0, Q8_0, F16, BF16 or F32 tensor,
    synthetic Q4_0 weights, a float32 matrix that cannot be blocked).
    data: an array or anything sliceable by rows with a .shape (a memory map)."""
    data: object
    quant: str
    source: str = ""


@dataclass(frozen=True)
class QuantizeTo:
    """A tensor of float values (an array, or a LazyTensor read by row blocks) that
    write_model stores as weight type `quant`, whatever the file's default; source: the
    type it came from, for the report ("BF16", "Q6_K")."""
    data: object
    quant: str
    source: str = ""


@dataclass(frozen=True)
class TensorReport:
    """What write_model did with one tensor: stored type, source type and the error of the
    stored values against the source's (max |error| and rms error; None when copied)."""
    name: str
    shape: tuple
    quant: str
    source: str
    nbytes: int
    max_err: float = None
    rms_err: float = None
    rms: float = None          # rms of the source values, to read rms_err against


def write_model(path, config, tensors, quant="q40", tokenizer=None, metadata=None,
                attrs=None, tokenizer_attrs=None, on_tensor=None):
    """Write a model file atomically (dllm.atomic.replacing: the old file or the new one, whole).

    tensors: iterable of (name, tensor), each name of ``tensor_shapes(config)`` exactly once,
    in any order; a tensor is a float array of the logical shape (or any object with .shape
    that returns float rows when sliced, read a block of rows at a time) quantized to
    `quant`, a QuantizeTo stored as its own type, or a StoredTensor written as is. Tensors are consumed one at a time and
    read in row blocks, so memory stays bounded. tokenizer: (kind, bytes) or None;
    tokenizer_attrs: extra attributes of the tokenizer dataset (chat_template).
    metadata: extra string attributes (source, converter options), stored as meta_<key>;
    attrs: extra root attributes (hidden_dim_unpadded). on_tensor(index, total, report) is
    called after each tensor. Returns the TensorReport of every tensor, in writing order.
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; use one of {QUANTS}")
    config.check()
    path = Path(path)
    shapes = tensor_shapes(config)
    reports = []
    with replacing(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["quant"] = quant
            for key, value in config.to_dict().items():
                f.attrs[key] = value
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for key, value in (metadata or {}).items():
                f.attrs[f"meta_{key}"] = str(value)
            if tokenizer is not None:
                kind, blob = tokenizer
                ds = f.create_dataset("tokenizer", data=np.frombuffer(blob, dtype=np.uint8))
                ds.attrs["kind"] = kind
                for key, value in (tokenizer_attrs or {}).items():
                    ds.attrs[key] = value
            written = set()
            for name, array in tensors:
                if name not in shapes:
                    raise ValueError(f"unexpected tensor {name}")
                if name in written:
                    raise ValueError(f"tensor {name} given twice")
                reports.append(_write_tensor(f, name, array, shapes[name], quant))
                written.add(name)
                if on_tensor is not None:
                    on_tensor(len(reports), len(shapes), reports[-1])
            missing = sorted(set(shapes) - written)
            if missing:
                raise ValueError(f"tensors missing: {', '.join(missing[:5])}")
            f.attrs["quant"] = describe_types({r.name: r.quant for r in reports})
    return reports


def _write_tensor(f, name, array, shape, quant):
    if isinstance(array, StoredTensor):
        return _write_stored(f, name, array, shape)
    source = None
    if isinstance(array, QuantizeTo):
        array, quant, source = array.data, array.quant, array.source or None
    if not hasattr(array, "shape") or not hasattr(array, "__getitem__"):
        array = np.asarray(array)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {shape}")
    kind = tensor_quant(shape, quant)
    wtype = TYPES[kind]
    if len(shape) == 2 and not wtype.fits(shape[1]):
        raise ValueError(f"{name}: {shape[1]} columns are not whole {wtype.block}-value "
                         f"{wtype.ggml} blocks")
    sshape, dtype = stored_shape(shape, kind)
    ds = f.create_dataset(name, shape=sshape, dtype=dtype)  # contiguous, unfiltered
    rows_per_step = max(1, (1 << 22) // max(1, shape[-1]))  # quantize ~4M values at a time
    max_err = sq_err = sq_sum = 0.0
    for r0 in range(0, shape[0], rows_per_step):
        chunk = np.asarray(array[r0:r0 + rows_per_step], dtype=np.float32)
        sq_sum += float(np.dot(chunk.ravel(), chunk.ravel()))
        if kind != "f32":
            stored = wtype.quantize(chunk)
            err = wtype.dequantize(stored) - chunk
            max_err = max(max_err, float(np.abs(err).max(initial=0.0)))
            sq_err += float(np.dot(err.ravel(), err.ravel()))
            ds[r0:r0 + rows_per_step] = stored
        else:
            ds[r0:r0 + rows_per_step] = chunk
    _tensor_attrs(ds, kind, shape)
    size = math.prod(shape)
    source = source or getattr(array, "source", None) or \
        array.dtype.name.upper().replace("FLOAT", "F")
    report = TensorReport(name, shape, kind, source, ds.id.get_storage_size(), max_err,
                          math.sqrt(sq_err / size), math.sqrt(sq_sum / size))
    if kind != "f32":
        ds.attrs["quant_max_err"], ds.attrs["quant_rms_err"] = report.max_err, report.rms_err
    ds.attrs["source_type"] = source
    return report


def _write_stored(f, name, tensor, shape):
    if tensor.quant not in QUANTS or (tensor.quant != "f32" and len(shape) == 1):
        raise ValueError(f"{name}: cannot store a {len(shape)}-D tensor as {tensor.quant}")
    wtype = TYPES[tensor.quant]
    if len(shape) == 2 and not wtype.fits(shape[1]):
        raise ValueError(f"{name}: {shape[1]} columns are not whole {wtype.block}-value "
                         f"{wtype.ggml} blocks")
    sshape, dtype = stored_shape(shape, tensor.quant)
    data = tensor.data
    if tuple(data.shape) != sshape or np.dtype(data.dtype) != dtype:
        raise ValueError(f"{name} is stored as {data.dtype}{list(data.shape)}, "
                         f"expected {dtype}{list(sshape)}")
    ds = f.create_dataset(name, shape=sshape, dtype=dtype)
    rows_per_step = max(1, (1 << 24) // max(1, sshape[-1] * dtype.itemsize))  # ~16 MB
    for r0 in range(0, sshape[0], rows_per_step):
        ds[r0:r0 + rows_per_step] = np.asarray(data[r0:r0 + rows_per_step])
    _tensor_attrs(ds, tensor.quant, shape)
    source = tensor.source or tensor.quant.upper()
    ds.attrs["source_type"] = source
    return TensorReport(name, shape, tensor.quant, source, ds.id.get_storage_size())


def _tensor_attrs(ds, kind, shape):
    ds.attrs["quant"] = kind
    ds.attrs["shape"] = shape


class ModelFile:
    """A model file opened read-only and validated before anyone reads a weight.

    Every check that can fail raises ModelFileError with one clear line: missing file, not
    HDF5, truncated, wrong format name or version, bad config, missing or misshapen tensor.
    """

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ModelFileError(f"{self.path} is a directory, not a model file")
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as exc:
            reason = str(exc).split("(")[-1].rstrip(")")
            if "truncated" in str(exc):
                raise ModelFileError(f"model file is truncated: {self.path} ({reason})") from None
            raise ModelFileError(f"not an HDF5 model file: {self.path} ({reason})") from None
        try:
            self._validate()
        except BaseException:
            self.h5.close()
            raise

    def _validate(self):
        attrs = self.h5.attrs
        if _text(attrs.get("format")) != FORMAT_NAME:
            raise ModelFileError(f"{self.path} is HDF5 but not a dllm model file "
                                 f"(format attribute {_text(attrs.get('format'))!r})")
        version = attrs.get("format_version")
        if version not in READS_VERSIONS:
            raise ModelFileError(f"{self.path} has model format version {version}; this dllm "
                                 f"reads versions {', '.join(map(str, READS_VERSIONS))}: "
                                 f"reconvert it with dllm.convert")
        self.version = int(version)
        allowed = V1_QUANTS if self.version == 1 else QUANTS
        if self.version == 1 and _text(attrs.get("quant")) not in V1_QUANTS:
            raise ModelFileError(f"{self.path}: unknown quant {_text(attrs.get('quant'))!r}")
        self.config = ModelConfig.from_dict(dict(attrs))
        file_size = os.path.getsize(self.path)
        # Cheap checks first, so that absurd declared sizes fail at once, not after a walk
        # over a hundred million layers or an allocation of a terabyte.
        layers = self.h5.get("layers")
        held = len(layers) if isinstance(layers, h5py.Group) else 0
        if held != self.config.n_layers:
            raise ModelFileError(f"{self.path}: the config declares {self.config.n_layers} "
                                 f"layers but the file holds {held}")
        least = minimum_weight_bytes(self.config)
        if least > file_size:
            raise ModelFileError(f"{self.path}: the config declares at least {least:,} bytes "
                                 f"of weights but the file has {file_size:,} bytes")
        for name, shape in tensor_shapes(self.config).items():
            if name not in self.h5:
                raise ModelFileError(f"{self.path}: tensor {name} is missing")
            ds = self.h5[name]
            kind = _text(ds.attrs.get("quant"))
            if kind not in allowed or (len(shape) == 2 and not TYPES[kind].fits(shape[1])) \
                    or (len(shape) == 1 and kind != "f32"):
                raise ModelFileError(f"{self.path}: tensor {name} has bad quant {kind!r}")
            sshape, dtype = stored_shape(shape, kind)
            if ds.shape != sshape or ds.dtype != dtype:
                raise ModelFileError(f"{self.path}: tensor {name} is {ds.dtype}{list(ds.shape)}, "
                                     f"expected {dtype}{list(sshape)} for this config")
            offset = ds.id.get_offset()
            if ds.chunks is not None or offset is None:
                raise ModelFileError(f"{self.path}: tensor {name} is not stored contiguously")
            if offset + ds.id.get_storage_size() > file_size:
                raise ModelFileError(f"model file is truncated: {self.path} "
                                     f"(tensor {name} ends past the end of the file)")
        if "tokenizer" in self.h5:
            ds = self.h5["tokenizer"]
            offset = ds.id.get_offset()
            if (not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim != 1
                    or (offset is not None and offset + ds.id.get_storage_size() > file_size)):
                raise ModelFileError(f"{self.path}: the tokenizer dataset is damaged "
                                     f"(not uint8 bytes within the file)")

    def tensor_quant(self, name):
        """The weight type of tensor `name`, as its quant attribute says."""
        return _text(self.h5[name].attrs["quant"])

    def types(self):
        """{dataset name: weight type} of every tensor the config implies."""
        return {name: self.tensor_quant(name) for name in tensor_shapes(self.config)}

    @property
    def quant(self):
        """The tensors' types in a few words ("q40"; "q40, output q80, tok_embeddings f32")."""
        return describe_types(self.types())

    def read(self, name, rows=None, cols=None):
        """Stored array of `name` (as weight_types says for its type): rows [a, b) if given
        (one contiguous hyperslab), columns [c, d) of the logical matrix if given (whole
        blocks for Q4_0 / Q8_0: bytes c/32*18 to d/32*18 of each Q4_0 row). Raises
        ModelFileError when the part read holds a NaN or infinite value (a float, or a
        block's scale)."""
        ds = self.h5[name]
        wtype = TYPES[self.tensor_quant(name)]
        r = slice(None) if rows is None else slice(*rows)
        if cols is None:
            array = ds[r]
        else:
            if cols[0] % wtype.block or (cols[1] % wtype.block and
                                         cols[1] != self.h5[name].attrs["shape"][1]):
                raise ModelFileError(f"columns {cols} of {name} are not whole "
                                     f"{wtype.ggml} blocks")
            a, b = wtype.stored_col_range(cols)
            array = ds[r, a:b]
        bad = count_non_finite(array, wtype.name)
        if bad:
            what = f"{wtype.ggml} block scales" if wtype.block > 1 else "values"
            where = "" if rows is None else f" (rows {rows[0]}..{rows[1]})"
            raise ModelFileError(f"{self.path}: tensor {name}{where} holds {bad} NaN or "
                                 f"infinite {what}: the file is corrupt")
        return array

    def tokenizer(self):
        """(kind, bytes) of the embedded tokenizer, or None."""
        if "tokenizer" not in self.h5:
            return None
        ds = self.h5["tokenizer"]
        return _text(ds.attrs.get("kind")), ds[()].tobytes()

    def chat_template(self):
        """Name of the chat template stored with the tokenizer ("llama2", "llama3"), or None."""
        if "tokenizer" not in self.h5:
            return None
        return _text(self.h5["tokenizer"].attrs.get("chat_template")) or None

    def metadata(self):
        return {k[5:]: _text(v) for k, v in self.h5.attrs.items() if k.startswith("meta_")}

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def count_non_finite(array, quant):
    """NaN or infinite entries of a stored array of weight type `quant`: float values, or
    the f16 scales that start Q4_0 / Q8_0 blocks (their integer codes are always finite)."""
    return TYPES[quant].nonfinite(array)


def minimum_weight_bytes(config):
    """A lower bound of the bytes a file of this config holds: every matrix at Q4_0's
    18 bytes per 32 weights, norms float32 (closed form: no loop over the layers)."""
    c = config
    q40 = TYPES["q40"].bytes_per_weight
    per_layer = 2 * c.dim * 4 + q40 * (2 * c.dim * c.dim + 2 * c.kv_dim * c.dim
                                       + 3 * c.hidden_dim * c.dim)
    embeddings = q40 * c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return int(c.n_layers * per_layer + embeddings + c.dim * 4)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
