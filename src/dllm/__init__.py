"""dllm: tensor-parallel Llama inference over MPI for clusters of small machines.

    import dllm
    model = dllm.load(dllm.demo_model())        # collective: every rank calls it
    logits = model.logits([1, 393, 413])        # (T, vocab) float32 on root, None elsewhere
"""
from importlib import resources
from pathlib import Path

from .config import ModelConfig
from .errors import DllmError, ModelFileError

__version__ = "0.1.0"
__all__ = ["load", "demo_model", "ModelConfig", "DllmError", "ModelFileError", "Sampler"]


def demo_model():
    """Path of the demo model shipped inside the package: tinystories-1m, converted to Q40
    by dllm.convert (context 256 tokens, with its tokenizer)."""
    return Path(str(resources.files("dllm") / "data" / "tinystories-1m-q40.h5"))


def load(path, comm=None, **options):
    """Load a model over the ranks of `comm` (default COMM_WORLD); see dllm.loading.load."""
    from .loading import load as _load
    return _load(path, comm, **options)


def __getattr__(name):
    if name == "Sampler":
        from .sampler import Sampler
        return Sampler
    raise AttributeError(name)
