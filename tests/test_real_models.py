"""Golden outputs of real trained models from ../shared (skipped when it is absent).

tinystories-1m and -6m are Hugging Face checkpoints with reference.json figures made with
transformers: dllm's converted f32 model must give their greedy continuation exactly, and
logits equal to an independent forward over the raw HF weights (rotate-half RoPE, no
permutation), at whatever world size the suite runs with.
"""
import json
import struct

import numpy as np
import pytest

import dllm
from dllm.config import ModelConfig
from dllm.convert import convert_hf
from dllm.sampler import Sampler

from conftest import SHARED, WORLD, all_ranks
from reference import reference_logits, relative_error

pytestmark = pytest.mark.mpi
MODELS = ["tinystories-1m", "tinystories-6m"]

HF_TO_DLLM = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
              "lm_head.weight": "output"}
HF_LAYER = {"input_layernorm": "attention_norm", "self_attn.q_proj": "wq",
            "self_attn.k_proj": "wk", "self_attn.v_proj": "wv", "self_attn.o_proj": "wo",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "w1",
            "mlp.down_proj": "w2", "mlp.up_proj": "w3"}


def hf_folder(name):
    folder = SHARED / "models" / name / "hf"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (../shared holds the real models)")
    return folder


def raw_hf_weights(folder):
    """The float32 safetensors tensors under dllm names, unpermuted (read independently)."""
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    weights = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        a, b = info["data_offsets"]
        array = np.frombuffer(blob[8 + n + a:8 + n + b], np.float32).reshape(info["shape"])
        if name in HF_TO_DLLM:
            weights[HF_TO_DLLM[name]] = array
        else:
            _, _, layer, rest = name.split(".", 3)
            weights[f"layers/{layer}/{HF_LAYER[rest.rsplit('.', 1)[0]]}"] = array
    return weights


@pytest.fixture(scope="module")
def converted(model_dir):
    paths = {}
    for name in MODELS:
        folder = SHARED / "models" / name / "hf"
        path = model_dir / f"{name}-f32.h5"
        if WORLD.is_root and folder.is_dir() and not path.exists():
            convert_hf(folder, path, quant="f32", log=lambda m: None)
        paths[name] = path
    WORLD.barrier()
    return paths


@pytest.mark.parametrize("name", MODELS)
def test_greedy_continuation_equals_transformers(name, converted):
    folder = hf_folder(name)
    greedy = json.loads((folder.parent / "reference.json").read_text())["greedy"]
    model = dllm.load(converted[name], sync="f32")
    tokens = list(model.generate(greedy["prompt_ids"], greedy["new_tokens"], Sampler(0.0),
                                 stop_at_eos=False))
    assert all_ranks(tokens == greedy["continuation_ids"])
    if WORLD.is_root:
        assert model.tokenizer.encode(greedy["prompt"]) == greedy["prompt_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_independent_forward_over_hf_weights(name, converted):
    folder = hf_folder(name)
    model = dllm.load(converted[name], sync="f32")
    tokens = [1, 393, 413, 261, 375, 478, 379, 281, 261, 373, 427, 437, 333, 472]
    logits = model.logits(tokens)
    ok = True
    if WORLD.is_root:
        cfg = ModelConfig.from_dict(model.config.to_dict())
        expected = reference_logits(raw_hf_weights(folder), cfg, tokens, rope_style="half")
        ok = relative_error(logits, expected) <= 1e-5
    assert all_ranks(ok)


def test_demo_model_greedy_matches_f32_for_its_first_tokens(converted):
    """The shipped Q40 demo model stays close to the f32 model: same first greedy words."""
    hf_folder("tinystories-1m")
    from dllm import demo_model
    prompt = [1, 393, 413, 261, 375]
    runs = [list(dllm.load(path, sync=sync).generate(prompt, 8, Sampler(0.0), stop_at_eos=False))
            for path, sync in ((converted["tinystories-1m"], "f32"), (demo_model(), "q80"))]
    assert all_ranks(runs[0] == runs[1])
