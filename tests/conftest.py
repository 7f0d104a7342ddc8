"""Shared fixtures: the communicator, tiny random models written once per session, shared data.

Collective tests are marked ``mpi``; the serial run (pytest --with-mpi) runs them on a world
of one rank, and ``mpirun -n N python -m pytest --with-mpi -m mpi`` runs them on N ranks.
"""
import os
from pathlib import Path

import numpy as np
import pytest

import dllm  # noqa: F401  (pins threads before numpy does real work)
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm.modelfile import tensor_shapes, write_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WORLD = Comm()

# Tiny configurations of the three attention shapes the engine must handle.
CONFIGS = {
    "mha": ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                       vocab_size=80, max_seq_len=48),
    "gqa": ModelConfig(dim=128, hidden_dim=160, n_layers=2, n_heads=8, n_kv_heads=2,
                       vocab_size=96, max_seq_len=48, rope_theta=500000.0),
    "tied": ModelConfig(dim=64, hidden_dim=128, n_layers=3, n_heads=4, n_kv_heads=2,
                        vocab_size=64, max_seq_len=48, tie_embeddings=True),
}


def pytest_configure(config):
    # Ranks of one mpirun must not share pytest's numbered temporary directories.
    if WORLD.size > 1 and not config.option.basetemp:
        config.option.basetemp = f"/tmp/dllm-pytest-{os.getppid()}-rank{WORLD.rank}"


def random_weights(config, seed):
    """Float32 weights with sane activations: rows of unit-scale inputs stay O(1)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1:
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            scale = 1.0 if name == "tok_embeddings" else 1.0 / np.sqrt(shape[1])
            weights[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return weights


@pytest.fixture(scope="session")
def comm():
    return WORLD


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models")) if WORLD.is_root else None
    return Path(WORLD.bcast(path))


def make_model(model_dir, name, quant, seed=0, configs=CONFIGS, tag=""):
    """Write configs[name] with random weights (root only, once); every rank gets the path.
    tag tells the files of other config tables apart."""
    path = model_dir / f"{name}{tag}-{quant}-{seed}.h5"
    if WORLD.is_root and not path.exists():
        write_model(path, configs[name], random_weights(configs[name], seed).items(), quant=quant)
    WORLD.barrier()
    return path


def all_ranks(ok):
    """Agree on a test condition across ranks before asserting, so no rank hangs."""
    return all(WORLD.allgather(bool(ok)))
