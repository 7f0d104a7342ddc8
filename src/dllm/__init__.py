"""dllm: tensor-parallel Llama inference over MPI for clusters of small machines.

    import dllm
    model = dllm.load("model.h5")               # collective: every rank calls it
    logits = model.logits([1, 393, 413])        # (T, vocab) float32 on root, None elsewhere
"""
from . import _threads  # noqa: F401  (first: pins BLAS threads before numpy loads)
from .config import ModelConfig
from .errors import DllmError, ModelFileError

__version__ = "0.1.0"
__all__ = ["load", "ModelConfig", "DllmError", "ModelFileError", "Sampler"]


def load(path, comm=None, **options):
    """Load a model over the ranks of `comm` (default COMM_WORLD); see dllm.loading.load."""
    from .loading import load as _load
    return _load(path, comm, **options)


def __getattr__(name):
    if name == "Sampler":
        from .sampler import Sampler
        return Sampler
    raise AttributeError(name)
