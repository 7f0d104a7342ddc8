"""Training checkpoints: the whole state of a run at the end of a step, in one HDF5 file
written atomically (dllm.atomic), and the export of the trained weights as a model file.

A checkpoint holds the full float32 weights and AdamW moments (gathered from the tensor-
parallel ranks), the step, the run's settings, the model config and tokenizer, and each
rank's top-k residuals. Batches are a function of (seed, step) (dllm.train.data), so this is
everything a rerun of the same command needs to continue bit-identically.
"""
import json

import h5py
import numpy as np

from ..atomic import replacing
from ..config import ModelConfig
from ..converters.common import Checkpoint, TypePolicy, prepare, write_checkpoint
from ..errors import DllmError

KIND, VERSION = "dllm-train-checkpoint", 1


def write(path, step, settings, config, tokenizer, params, moments, residuals):
    """Root: write the state after `step`. params, moments ({"m": {...}, "v": {...}}): full
    float32 arrays by tensor name; residuals: (ranks, values) float32 or None."""
    with replacing(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["kind"], f.attrs["version"], f.attrs["step"] = KIND, VERSION, step
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["config"] = json.dumps(config.to_dict())
            f.attrs["tokenizer_kind"] = tokenizer[0]
            f.create_dataset("tokenizer", data=np.frombuffer(tokenizer[1], np.uint8))
            for group, arrays in (("params", params), *moments.items()):
                for name, array in arrays.items():
                    f.create_dataset(f"{group}/{name}", data=array)
            if residuals is not None:
                f.create_dataset("residuals", data=residuals)


def read(path):
    """Root: the state of a checkpoint file, as a dict (step, settings, config, tokenizer,
    params, m, v, residuals); DllmError naming the file when it is not one."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("kind") != KIND or f.attrs.get("version") != VERSION:
                raise DllmError(f"{path} is not a dllm.train checkpoint of version {VERSION}")
            config = ModelConfig.from_dict(json.loads(f.attrs["config"]))
            state = {"step": int(f.attrs["step"]), "settings": json.loads(f.attrs["settings"]),
                     "config": config,
                     "tokenizer": (str(f.attrs["tokenizer_kind"]), f["tokenizer"][()].tobytes())}
            for group in ("params", "m", "v"):
                state[group] = _read_group(f[group])
            state["residuals"] = f["residuals"][()] if "residuals" in f else None
    except (OSError, KeyError, ValueError) as exc:
        raise DllmError(f"checkpoint {path} is damaged ({str(exc).splitlines()[0]}); "
                        f"remove it to start the run afresh") from None
    return state


def _read_group(group):
    out = {}
    group.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def export(path, config, params, tokenizer, quant, metadata):
    """Root: the trained weights as a dllm model file, through the converter's writer:
    matrices stored as `quant` (a weight type) with the classifier and embedding in the
    types dllm.convert --quant QUANT gives them (converters.common.TypePolicy)."""
    ckpt = Checkpoint(config, lambda: iter(params.items()), tokenizer=tokenizer,
                      metadata=metadata)
    return write_checkpoint(prepare(ckpt, TypePolicy.of(quant)), path)
