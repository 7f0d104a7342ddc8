"""What every source format shares: lazy tensors, the checkpoint record, the writing driver
with its hidden-size padding, progress bar and closing error table."""
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import DllmError
from ..modelfile import QuantizeTo, StoredTensor, count_non_finite, tensor_shapes, write_model
from ..tokenizer import CHAT_TEMPLATES, Tokenizer, read_tokenizer_file
from ..weight_types import NAMES, TYPES

BLOCK = 32


class LazyTensor:
    """A checkpoint tensor read on demand, a block of rows at a time (write_model slices it).

    shape: (rows, cols) or (n,); read(start, stop) returns rows [start, stop) as an array of
    `dtype` (float32 for weights, uint8 for stored Q4_0 bytes); source: the type name for
    the conversion report ("BF16", "Q8_0")."""

    def __init__(self, shape, read, source, dtype=np.float32):
        self.shape, self._read, self.source = tuple(shape), read, source
        self.dtype = np.dtype(dtype)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("a LazyTensor is read by row slices")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise TypeError("a LazyTensor is read by contiguous row slices")
        return np.asarray(self._read(start, max(start, stop)), dtype=self.dtype)

    @classmethod
    def of(cls, array, source=None, dtype=np.float32):
        """A LazyTensor over an array or memory map (converted block by block)."""
        return cls(array.shape, lambda a, b: array[a:b], source or _type_name(array.dtype),
                   dtype)


def _type_name(dtype):
    return np.dtype(dtype).name.upper().replace("FLOAT", "F")


def expand_names(table, config, classifier):
    """{source name: dllm name} of every tensor the config implies, from a format's table
    whose per-layer entries hold "{i}"; the classifier's entry is dropped when the
    embedding is tied."""
    names = {src: ours for src, ours in table.items() if "{i}" not in src}
    if config.tie_embeddings:
        names.pop(classifier)
    for i in range(config.n_layers):
        names.update({src.format(i=i): ours.format(i=i) for src, ours in table.items()
                      if "{i}" in src})
    return names


def permute_rows(tensor, order):
    """The tensor with row i taken from source row order[i] (the HF -> interleaved RoPE
    permutation stays inside a head, so a block of rows reads a narrow band of source rows)."""
    order = np.asarray(order)

    def read(a, b):
        want = order[a:b]
        if not len(want):
            return tensor[0:0]
        lo, hi = int(want.min()), int(want.max()) + 1
        return tensor[lo:hi][want - lo]
    return LazyTensor(tensor.shape, read, tensor.source, tensor.dtype)


def zero_padded(tensor, shape):
    """The tensor grown to `shape` with zero rows and columns after its own (exact for the
    FFN: a zero row of w1/w3 gives a zero hidden unit, a zero column of w2 ignores it)."""
    rows = tensor.shape[0]

    def read(a, b):
        out = np.zeros((b - a,) + tuple(shape[1:]), dtype=tensor.dtype)
        if a < rows:
            block = tensor[a:min(b, rows)]
            out[:len(block), :block.shape[-1]] = block
        return out
    return LazyTensor(shape, read, tensor.source, tensor.dtype)


@dataclass
class Checkpoint:
    """A source checkpoint opened for conversion.

    tensors(): yields (dllm name, tensor) one at a time; a tensor is a LazyTensor of floats or
    a StoredTensor (Q4_0 bytes copied as they are). tokenizer: (kind, bytes) or None.
    config_origin: where the config came from, for errors ("config.json"); source_names:
    dllm name -> the source's own tensor name, for errors."""
    config: object
    tensors: object
    tokenizer: tuple = None
    chat_template: str = None
    chat_template_jinja: str = None
    metadata: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    close: object = None
    config_origin: str = "the checkpoint's config"
    source_names: dict = field(default_factory=dict)
    source_types: dict = field(default_factory=dict)   # dllm name -> source type, if known


def hidden_padding(config):
    """hidden_dim rounded up to whole 32-value blocks (stories260K: 172 -> 192)."""
    return -(-config.hidden_dim // BLOCK) * BLOCK


def pad_hidden(ckpt):
    """Zero-pad the FFN hidden size to a multiple of 32 so w2 rows split into Q4_0 and Q8_0
    blocks; the file's hidden_dim is the padded size, hidden_dim_unpadded the source's."""
    c = ckpt.config
    padded = hidden_padding(c)
    if padded == c.hidden_dim:
        return ckpt
    new = replace(c, hidden_dim=padded)
    source_tensors = ckpt.tensors

    def tensors():
        for name, tensor in source_tensors():
            kind = name.rsplit("/", 1)[-1]
            if kind in ("w1", "w3", "w2"):
                shape = (padded, c.dim) if kind != "w2" else (c.dim, padded)
                tensor = _pad_any(tensor, shape)
            yield name, tensor
    return replace(ckpt, config=new, tensors=tensors,
                   attrs={**ckpt.attrs, "hidden_dim_unpadded": c.hidden_dim},
                   warnings=ckpt.warnings + [
                       f"hidden_dim {c.hidden_dim} is not a multiple of {BLOCK}: w1/w3/w2 "
                       f"zero-padded to {padded} hidden units (exact)"])


def _pad_any(tensor, shape):
    """Zero-padded in its stored form: zero bytes are zero values in every weight type
    (a block's scale 0). A block type pads whole rows only (w1, w3: a source in blocks has
    whole-block columns, so its w2 needs no padding)."""
    if isinstance(tensor, StoredTensor):
        stored = TYPES[tensor.quant].stored_shape(shape)
        return StoredTensor(zero_padded(_lazy(tensor.data), stored), tensor.quant,
                            tensor.source)
    return zero_padded(tensor, shape)


def _lazy(array):
    return array if isinstance(array, LazyTensor) else LazyTensor.of(array, dtype=array.dtype)


QUANT_CHOICES = NAMES + ("keep",)
# Source type names (GGUF's, safetensors') of the types the table has.
SOURCE_TYPES = {t.ggml: t.name for t in TYPES.values()}


@dataclass(frozen=True)
class TypePolicy:
    """The weight type each matrix is stored as: `quant` for the layers' matrices, `output`
    for the classifier and `embedding` for the token embedding. "keep"
    stores a tensor in its source type when the table has it (a GGUF Q4_0, Q8_0, F16,
    BF16 or F32 tensor copied byte for byte; an HF BF16 weight as bf16), else as `other`
    (K-quants and other types the table lacks: dequantized by gguf-py, requantized).
    Matrices whose rows are not whole blocks of the chosen type stay f32. The classifier's
    q80 default (`defaulted`) never requantizes a source stored in fewer bytes: that adds
    bytes, not precision (a GGUF's Q4_0 classifier stays Q4_0)."""
    quant: str = "q40"
    output: str = "q80"
    embedding: str = "q40"
    other: str = "q80"
    defaulted: tuple = ()

    @classmethod
    def of(cls, quant=None, output=None, embedding=None, other=None, fmt=None):
        """The policy of convert's options; None takes the defaults: "keep" for GGUF files
        and q40 for the others; the classifier q80 when the layers are q40 (as llama.cpp
        keeps it more precise, docs/conversion.md: perplexity), except for synthetic
        weights, which match the peer's all-Q4_0 files; the embedding as the layers."""
        quant = quant or ("keep" if fmt == "gguf" else "q40")
        for option, value in (("--quant", quant), ("--output-quant", output),
                              ("--embedding-quant", embedding), ("--other-quant", other)):
            allowed = NAMES if option == "--other-quant" else QUANT_CHOICES
            if value is not None and value not in allowed:
                raise DllmError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
        defaulted = ()
        if output is None and quant == "q40" and fmt != "synthetic":
            output, defaulted = "q80", ("output",)
        output = output or quant
        return cls(quant, output, embedding or quant, other or "q80", defaulted)

    def target(self, name, source):
        """The type tensor `name` (of source type `source`) is stored as."""
        wanted = {"output": self.output, "tok_embeddings": self.embedding}.get(name, self.quant)
        kept = SOURCE_TYPES.get(source)
        if wanted == "keep":
            return kept or self.other
        if name in self.defaulted and kept and \
                TYPES[kept].bytes_per_weight < TYPES[wanted].bytes_per_weight:
            return kept
        return wanted

    def describe(self):
        parts = [self.quant] + [f"{what} {t}" for what, t in (("output", self.output),
                                                              ("embedding", self.embedding))
                                if t != self.quant]
        return ", ".join(parts)


def assign_types(ckpt, policy):
    """Every matrix wrapped for the writer in its policy's type: a StoredTensor already of
    that type is copied byte for byte; anything else becomes a QuantizeTo of its float
    values (a stored tensor of another type dequantized first). Warns once for the source
    types the table lacks and for matrices that cannot be blocked."""
    source_tensors = ckpt.tensors
    warnings = list(ckpt.warnings)
    foreign = sorted({t for t in ckpt.source_types.values() if t not in SOURCE_TYPES})
    if foreign and "keep" in (policy.quant, policy.output, policy.embedding):
        count = sum(t in foreign for t in ckpt.source_types.values())
        warnings.append(f"{count} tensors are {'/'.join(foreign)}, types dllm does not have: "
                        f"dequantized and requantized to {policy.other} (--other-quant; their "
                        f"errors are in the table below)")
    if ckpt.config.dim % BLOCK and any(TYPES[t].block > 1 for t in (policy.quant, policy.output)
                                       if t in TYPES):
        warnings.append(f"dim {ckpt.config.dim} is not a multiple of {BLOCK}: matrices over "
                        f"dim stay f32")

    def tensors():
        for name, tensor in source_tensors():
            shape = _logical_shape(tensor)
            if len(shape) == 1:
                yield name, tensor                       # a norm: always f32
                continue
            target = policy.target(name, tensor.source)
            if not TYPES[target].fits(shape[-1]):
                target = "f32"
            if isinstance(tensor, StoredTensor):
                if tensor.quant == target:
                    yield name, tensor
                    continue
                tensor = _dequantized(tensor)
            yield name, QuantizeTo(tensor, target, tensor.source)
    return replace(ckpt, tensors=tensors, warnings=warnings)


def _dequantized(tensor):
    """A StoredTensor's float values, read by row blocks."""
    data, wtype = _lazy(tensor.data), TYPES[tensor.quant]
    shape = _logical_shape(tensor)
    return LazyTensor(shape, lambda a, b: wtype.dequantize(data[a:b]), tensor.source)


def with_tokenizer(ckpt, tokenizer_path=None, chat_template=None):
    """Apply the --tokenizer and --chat-template options and check the tokenizer against
    the model's vocabulary (a mismatch would make the engine refuse it) and against the
    chat template (llama3 needs its header tokens)."""
    if tokenizer_path is not None:
        ckpt = replace(ckpt, tokenizer=read_tokenizer_file(tokenizer_path))
    if chat_template is not None:
        if chat_template not in CHAT_TEMPLATES + ("none",):
            raise DllmError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, "
                            f"none; got {chat_template!r}")
        ckpt = replace(ckpt, chat_template=None if chat_template == "none" else chat_template)
    if ckpt.tokenizer is None:
        if ckpt.chat_template is not None and chat_template is not None:
            raise DllmError(f"--chat-template {chat_template} needs a tokenizer and this "
                            f"checkpoint has none: add --tokenizer PATH")
        return replace(ckpt, chat_template=None, warnings=ckpt.warnings + [
            "no tokenizer found: the model serves logits and token ids; text generation "
            "needs --tokenizer (or reconvert with --tokenizer PATH)"])
    vocab_size, has_token, unchecked = tokenizer_facts(*ckpt.tokenizer)
    if vocab_size != ckpt.config.vocab_size:
        if tokenizer_path is not None:
            raise DllmError(f"{tokenizer_path} has {vocab_size} tokens but the model's "
                            f"vocabulary is {ckpt.config.vocab_size}")
        return replace(ckpt, tokenizer=None, warnings=ckpt.warnings + [
            f"the checkpoint's tokenizer has {vocab_size} tokens but the model's "
            f"vocabulary is {ckpt.config.vocab_size}; not embedded (the engine would refuse "
            f"it): convert with --tokenizer PATH"])
    if unchecked:
        ckpt = replace(ckpt, warnings=ckpt.warnings + [unchecked])
    return _check_chat_template(ckpt, has_token, explicit=chat_template is not None)


# Tokens dllm's llama3 chat prompt is built from (tokenizer.chat_prompt_ids).
LLAMA3_CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>")


def _check_chat_template(ckpt, has_token, explicit):
    """A llama3 template with a tokenizer that lacks its header tokens: an error when asked
    for (--chat-template), else the detected template is dropped with a warning."""
    if ckpt.chat_template != "llama3":
        return ckpt
    missing = [t for t in LLAMA3_CHAT_TOKENS if not has_token(t)]
    if not missing:
        return ckpt
    if explicit:
        raise DllmError(f"--chat-template llama3 needs the token {missing[0]}, which this "
                        f"tokenizer lacks (it is not a Llama 3 tokenizer)")
    return replace(ckpt, chat_template=None, warnings=ckpt.warnings + [
        f"the checkpoint's chat template is Llama 3's, but its tokenizer lacks {missing[0]}; "
        f"no chat template stored"])


def tokenizer_facts(kind, blob):
    """(vocab size, has_token(text) -> bool, warning or None) of a serialized tokenizer.

    Without the optional `tokenizers` package a tokenizer.json cannot be loaded here; its
    tokens are then counted from the JSON itself (the model's vocabulary plus the added
    tokens, as tokenizers counts them) and the warning says it was not checked."""
    if kind == "tokenizers":
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            tokens = tokenizer_json_tokens(blob)
            return len(tokens), tokens.__contains__, (
                f"tokenizer.json embedded without checking it: the 'tokenizers' package is "
                f"not installed (its {len(tokens)} tokens were counted from the JSON; "
                f"pip install 'dllm[convert]' to check it, and to generate text)")
    tok = Tokenizer(kind, blob)
    return tok.vocab_size, lambda text: tok.piece_to_id(text) is not None, None


def tokenizer_json_tokens(blob):
    """The set of token strings of a Hugging Face tokenizer.json: model.vocab (a dict for
    BPE/WordPiece, a list of [piece, score] for Unigram) and added_tokens."""
    try:
        doc = json.loads(bytes(blob).decode())
        vocab = doc["model"]["vocab"]
        tokens = set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}
        tokens |= {t["content"] for t in doc.get("added_tokens") or []}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DllmError(f"tokenizer.json cannot be read: {exc}") from None
    return tokens


def check_shapes(ckpt):
    """Each tensor checked, as it arrives, against the shape its config implies: a config
    that disagrees with the weights (an edited config.json, GGUF metadata) is the user's
    input, so it is a DllmError, raised before the tensor is read (and before padding,
    which would otherwise hide a short FFN)."""
    shapes = tensor_shapes(ckpt.config)
    source_tensors = ckpt.tensors

    def tensors():
        for name, tensor in source_tensors():
            expected = shapes.get(name)
            got = _logical_shape(tensor)
            if expected is not None and got != expected:
                raise DllmError(f"checkpoint tensor {ckpt.source_names.get(name, name)} has "
                                f"shape {got}, but {ckpt.config_origin} implies {expected}")
            yield name, tensor
    return replace(ckpt, tensors=tensors)


def _logical_shape(tensor):
    """Shape of the values a tensor holds (a Q4_0 StoredTensor's rows are 18-byte blocks)."""
    if not isinstance(tensor, StoredTensor):
        return tuple(int(n) for n in tensor.shape)
    shape = tuple(int(n) for n in tensor.data.shape)
    wtype = TYPES[tensor.quant]
    if len(shape) == 2:
        entries_per_block = wtype.block_bytes // wtype.dtype.itemsize
        if shape[1] % entries_per_block == 0:
            return shape[0], shape[1] // entries_per_block * wtype.block
    return shape


def refuse_nonfinite(ckpt):
    """Each tensor checked, block by block as it is read, for NaN and infinite values (of a
    stored Q4_0 tensor: its scales): Q4_0 would quietly turn a NaN into some finite value,
    and a float32 NaN would be refused only when the model loads. Raises DllmError naming
    the checkpoint's tensor and the row."""
    source_tensors = ckpt.tensors

    def tensors():
        for name, tensor in source_tensors():
            yield name, _finite_checked(tensor, ckpt.source_names.get(name, name))
    return replace(ckpt, tensors=tensors)


def _finite_checked(tensor, source_name):
    stored = isinstance(tensor, StoredTensor)
    lazy = _lazy(tensor.data if stored else tensor if hasattr(tensor, "shape")
                 else np.asarray(tensor))
    kind = tensor.quant if stored else "f32"

    def read(a, b):
        block = lazy[a:b]
        if count_non_finite(block, kind):
            raise DllmError(f"checkpoint tensor {source_name} holds NaN or infinite values "
                            f"in rows {a}..{b - 1}: refusing to convert a damaged "
                            f"checkpoint (--allow-nonfinite converts it anyway)")
        return block
    checked = LazyTensor(lazy.shape, read, lazy.source, lazy.dtype)
    return StoredTensor(checked, tensor.quant, tensor.source) if stored else checked


def prepare(ckpt, policy, allow_nonfinite=False):
    """The checkpoint as it will be written: shapes checked against the config, values
    checked finite (unless allow_nonfinite), hidden size padded, every matrix in the type
    its TypePolicy says."""
    ckpt = check_shapes(ckpt)
    if not allow_nonfinite:
        ckpt = refuse_nonfinite(ckpt)
    return assign_types(pad_hidden(ckpt), policy)


def write_checkpoint(ckpt, out, progress=False):
    """Write a prepared checkpoint atomically (a progress bar on stderr when `progress`);
    returns the TensorReports."""
    progress = ProgressBar(ckpt.config) if progress else None
    tokenizer_attrs = {}
    if ckpt.chat_template:
        tokenizer_attrs["chat_template"] = ckpt.chat_template
    if ckpt.chat_template_jinja:
        tokenizer_attrs["chat_template_jinja"] = ckpt.chat_template_jinja
    try:
        return write_model(out, ckpt.config, ckpt.tensors(), quant="f32",
                           tokenizer=ckpt.tokenizer, metadata=ckpt.metadata, attrs=ckpt.attrs,
                           tokenizer_attrs=tokenizer_attrs if ckpt.tokenizer else None,
                           on_tensor=progress)
    finally:
        if ckpt.close is not None:
            ckpt.close()


class ProgressBar:
    """A one-line progress bar on stderr, weighted by tensor size; redrawn in place on a
    terminal, one line per tenth otherwise (logs stay short)."""

    def __init__(self, config, stream=None, width=30):
        self.stream = stream or sys.stderr
        self.total = sum(math.prod(s) for s in tensor_shapes(config).values())
        self.done, self.width, self.started = 0, width, time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_tenth = -1

    def __call__(self, index, count, report):
        self.done += math.prod(report.shape)
        frac = self.done / self.total
        filled = int(frac * self.width)
        line = (f"converting [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} "
                f"{index}/{count} tensors {time.perf_counter() - self.started:6.1f} s  "
                f"{report.name}")
        if self.tty:
            end = "\n" if index == count else ""
            print(f"\r{line[:110]:110s}", end=end, file=self.stream, flush=True)
        elif int(frac * 10) > self.last_tenth or index == count:
            self.last_tenth = int(frac * 10)
            print(line, file=self.stream, flush=True)


def error_table(reports):
    """The closing table: every tensor's source and stored type, size and the error of the
    stored values (max |error|, rms error, and rms error relative to the tensor's rms)."""
    lines = [f"{'tensor':28s} {'shape':>14s} {'from':>8s} {'to':>4s} {'size':>9s} "
             f"{'max err':>9s} {'rms err':>9s} {'rel rms':>8s}"]
    for r in reports:
        shape = "x".join(map(str, r.shape))
        if r.max_err is None:
            errs = f"{'copied as stored':>28s}"
        elif r.max_err == 0:
            errs = f"{'exact':>28s}"
        else:
            errs = f"{r.max_err:9.2e} {r.rms_err:9.2e} {_relative(r):8.2%}"
        lines.append(f"{r.name:28s} {shape:>14s} {r.source:>8s} {r.quant:>4s} "
                     f"{_size(r.nbytes):>9s} {errs}")
    total = f"{len(reports)} tensors, {_size(sum(r.nbytes for r in reports))}"
    quantized = [r for r in reports if r.max_err]
    if quantized:
        worst = max(quantized, key=_relative)
        total += (f"; {len(quantized)} quantized here, worst relative rms error "
                  f"{_relative(worst):.2%} ({worst.name}, {worst.source} -> {worst.quant})")
    return "\n".join(lines + [total])


def _relative(report):
    return report.rms_err / report.rms if report.rms else 0.0


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
