"""The model configuration: one frozen record, read from the model file's attributes."""
from dataclasses import MISSING, asdict, dataclass, fields

from .errors import ModelFileError

ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    Weight matrices are stored [out, in] (y = W x), as in llama2.c and GGML.
    """
    dim: int                 # residual stream width
    hidden_dim: int          # FFN width (w1/w3 rows, w2 columns)
    n_layers: int
    n_heads: int             # query heads
    n_kv_heads: int          # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int
    max_seq_len: int         # the context length the model was trained for
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False   # classifier shares the token embedding matrix
    bos_id: int = 1
    eos_id: int = 2
    # RoPE frequency scaling (docs/format.md): "none"; "linear" (every frequency divided by
    # rope_factor); "llama3" (Llama 3.1: long wavelengths divided by rope_factor, short ones
    # kept, a smooth blend between, set by the low/high frequency factors and the original
    # context length; Meta's apply_scaling).
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @property
    def rope_scaling_args(self):
        """Keyword arguments of kernels.rope_tables for this model's RoPE scaling."""
        return {"scaling": self.rope_scaling, "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_seq_len": self.rope_original_max_seq_len}

    @property
    def q_per_kv(self):
        """Query heads sharing one kv head: head h reads kv head h // q_per_kv."""
        return self.n_heads // self.n_kv_heads

    def check(self):
        """Raise ModelFileError naming the first inconsistent field."""
        for f in fields(self):
            if f.type is int and getattr(self, f.name) < (0 if f.name.endswith("_id") else 1):
                raise ModelFileError(f"config {f.name} = {getattr(self, f.name)} must be positive")
        for name in ("bos_id", "eos_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ModelFileError(f"config {name} = {getattr(self, name)} is outside the "
                                     f"vocabulary of {self.vocab_size} tokens")
        if self.dim % self.n_heads:
            raise ModelFileError(f"config dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"config n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelFileError(f"config head_dim {self.head_dim} must be even for RoPE")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ModelFileError("config norm_eps and rope_theta must be positive")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ModelFileError(f"config rope_scaling {self.rope_scaling!r} is not one of "
                                 f"{', '.join(ROPE_SCALINGS)}")
        if not self.rope_factor > 0 or not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ModelFileError("config rope_factor must be positive and 0 < "
                                 "rope_low_freq_factor < rope_high_freq_factor")
        return self

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a mapping (HDF5 attributes), ignoring unknown keys; checks the result."""
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items() if name not in values and f.default is MISSING]
        if missing:
            raise ModelFileError(f"model config lacks {', '.join(missing)}")
        kwargs = {}
        for name, f in known.items():
            if name in values:
                caster, value = f.type, values[name]
                if isinstance(value, bytes):   # HDF5 fixed-length strings come back as bytes
                    value = value.decode()
                try:
                    kwargs[name] = caster(value)
                except (TypeError, ValueError):
                    raise ModelFileError(f"config {name} = {value!r} is not of type {caster.__name__}")
        return cls(**kwargs).check()
