"""The model configuration: one frozen record, read from the model file's attributes."""
from dataclasses import MISSING, asdict, dataclass, fields

from .errors import ModelFileError


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

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @property
    def q_per_kv(self):
        """Query heads sharing one kv head: head h reads kv head h // q_per_kv."""
        return self.n_heads // self.n_kv_heads

    def check(self):
        """Raise ModelFileError naming the first inconsistent field."""
        for f in fields(self):
            if f.type is int and getattr(self, f.name) < (0 if f.name.endswith("_id") else 1):
                raise ModelFileError(f"config {f.name} = {getattr(self, f.name)} must be positive")
        if self.dim % self.n_heads:
            raise ModelFileError(f"config dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"config n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelFileError(f"config head_dim {self.head_dim} must be even for RoPE")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ModelFileError("config norm_eps and rope_theta must be positive")
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
                caster = f.type
                try:
                    kwargs[name] = caster(values[name])
                except (TypeError, ValueError):
                    raise ModelFileError(f"config {name} = {values[name]!r} is not a {caster.__name__}")
        return cls(**kwargs).check()
