"""HDF5 model format v1 (specified in docs/format.md): writing (converters) and reading (ranks).

Layout:
    /                     attrs: format="dllm", format_version=1, quant, and every ModelConfig field
    /tokenizer            uint8 [n] serialized tokenizer, optional (attr kind: "sentencepiece"
                          or "tokenizers"; optional attr chat_template)
    /tok_embeddings       [vocab, dim]          (root only)
    /output               [vocab, dim]          absent when tie_embeddings (tok_embeddings serves)
    /norm                 [dim] float32
    /layers/<i>/attention_norm, ffn_norm        [dim] float32
    /layers/<i>/wq [dim, dim]  wk, wv [kv_dim, dim]  wo [dim, dim]
    /layers/<i>/w1, w3 [hidden, dim]  w2 [dim, hidden]

A matrix [rows, cols] is stored either as float32 [rows, cols] (attr quant="f32") or as Q4_0
bytes uint8 [rows, cols/32*18] (attr quant="q40"); attr ``shape`` keeps the logical shape.
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
from .quant import Q40_BLOCK_BYTES, dequantize_q40, quantize_q40

FORMAT_NAME = "dllm"
FORMAT_VERSION = 1
QUANTS = ("q40", "f32")
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
    """Shape and dtype of a tensor as stored: Q4_0 rows become cols/32*18 bytes."""
    if quant == "q40":
        return (shape[0], shape[1] // 32 * Q40_BLOCK_BYTES), np.dtype(np.uint8)
    return tuple(shape), np.dtype(np.float32)


def tensor_quant(shape, quant):
    """Norm vectors are always float32; matrices take the model's quant."""
    return "f32" if len(shape) == 1 else quant


@dataclass(frozen=True)
class StoredTensor:
    """A tensor handed to write_model already in its stored form, written byte for byte:
    Q4_0 bytes uint8 [rows, cols/32*18] (quant "q40"; a GGUF Q4_0 tensor, synthetic weights)
    or float32 of the logical shape (quant "f32"; a matrix that cannot be Q4_0).
    data: an array or anything sliceable by rows with a .shape (a memory map)."""
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
    that returns float rows when sliced, read a block of rows at a time) quantized to the
    file's `quant`, or a StoredTensor written as is. Tensors are consumed one at a time and
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
    return reports


def _write_tensor(f, name, array, shape, quant):
    if isinstance(array, StoredTensor):
        return _write_stored(f, name, array, shape)
    if not hasattr(array, "shape") or not hasattr(array, "__getitem__"):
        array = np.asarray(array)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {shape}")
    kind = tensor_quant(shape, quant)
    if kind == "q40" and shape[1] % 32:
        raise ValueError(f"{name}: {shape[1]} columns are not whole 32-value Q4_0 blocks")
    sshape, dtype = stored_shape(shape, kind)
    ds = f.create_dataset(name, shape=sshape, dtype=dtype)  # contiguous, unfiltered
    rows_per_step = max(1, (1 << 22) // max(1, shape[-1]))  # quantize ~4M values at a time
    max_err = sq_err = sq_sum = 0.0
    for r0 in range(0, shape[0], rows_per_step):
        chunk = np.asarray(array[r0:r0 + rows_per_step], dtype=np.float32)
        sq_sum += float(np.dot(chunk.ravel(), chunk.ravel()))
        if kind == "q40":
            stored = quantize_q40(chunk)
            err = dequantize_q40(stored) - chunk
            max_err = max(max_err, float(np.abs(err).max(initial=0.0)))
            sq_err += float(np.dot(err.ravel(), err.ravel()))
            ds[r0:r0 + rows_per_step] = stored
        else:
            ds[r0:r0 + rows_per_step] = chunk
    _tensor_attrs(ds, kind, shape)
    size = math.prod(shape)
    source = getattr(array, "source", None) or array.dtype.name.upper().replace("FLOAT", "F")
    report = TensorReport(name, shape, kind, source, ds.id.get_storage_size(), max_err,
                          math.sqrt(sq_err / size), math.sqrt(sq_sum / size))
    if kind == "q40":
        ds.attrs["quant_max_err"], ds.attrs["quant_rms_err"] = report.max_err, report.rms_err
    ds.attrs["source_type"] = source
    return report


def _write_stored(f, name, tensor, shape):
    if tensor.quant not in QUANTS or (tensor.quant == "q40" and len(shape) == 1):
        raise ValueError(f"{name}: cannot store a {len(shape)}-D tensor as {tensor.quant}")
    if tensor.quant == "q40" and shape[1] % 32:
        raise ValueError(f"{name}: {shape[1]} columns are not whole 32-value Q4_0 blocks")
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
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{self.path} has model format version {version}; this dllm "
                                 f"reads version {FORMAT_VERSION}: reconvert it with dllm.convert")
        self.quant = _text(attrs.get("quant"))
        if self.quant not in QUANTS:
            raise ModelFileError(f"{self.path}: unknown quant {self.quant!r}")
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
            if kind not in QUANTS or (len(shape) == 2 and kind == "q40" and shape[1] % 32):
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
        return _text(self.h5[name].attrs["quant"])

    def read(self, name, rows=None, cols=None):
        """Stored array of `name` (uint8 Q4_0 bytes or float32): rows [a, b) if given (one
        contiguous hyperslab), columns [c, d) of the logical matrix if given (whole 32-value
        blocks for Q4_0: bytes c/32*18 to d/32*18 of each row). Raises ModelFileError when
        the part read holds a NaN or infinite value (a float, or a Q4_0 block's scale)."""
        ds = self.h5[name]
        r = slice(None) if rows is None else slice(*rows)
        if cols is None:
            array = ds[r]
        else:
            if self.tensor_quant(name) == "q40":
                if cols[0] % 32 or (cols[1] % 32 and cols[1] != self.h5[name].attrs["shape"][1]):
                    raise ModelFileError(f"columns {cols} of {name} are not whole Q4_0 blocks")
                cols = (cols[0] // 32 * Q40_BLOCK_BYTES, -(-cols[1] // 32) * Q40_BLOCK_BYTES)
            array = ds[r, cols[0]:cols[1]]
        bad = count_non_finite(array)
        if bad:
            what = "Q4_0 block scales" if array.dtype == np.uint8 else "values"
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


def count_non_finite(array):
    """NaN or infinite entries of a stored array: float32 values, or the float16 scales of
    Q4_0 blocks (uint8 rows of 18-byte blocks, the scale first). The 4-bit codes of a block
    are always finite, so its scale is all there is to check."""
    if array.dtype == np.uint8:
        blocks = np.ascontiguousarray(array).reshape(-1, Q40_BLOCK_BYTES)
        values = blocks[:, :2].copy().view(np.float16)
    else:
        values = array
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def minimum_weight_bytes(config):
    """A lower bound of the bytes a file of this config holds: every matrix at Q4_0's
    18 bytes per 32 weights, norms float32 (closed form: no loop over the layers)."""
    c = config
    q40 = Q40_BLOCK_BYTES / 32
    per_layer = 2 * c.dim * 4 + q40 * (2 * c.dim * c.dim + 2 * c.kv_dim * c.dim
                                       + 3 * c.hidden_dim * c.dim)
    embeddings = q40 * c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return int(c.n_layers * per_layer + embeddings + c.dim * 4)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
