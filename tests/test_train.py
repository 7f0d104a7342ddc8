"""dllm.train end to end: data and tensor parallel follow the one-rank loss curve, the
gradient payloads move the bytes of their formula, a killed run continues bit-identically,
the trained model generates, and bad input is one error line. Tiny models, few steps."""
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import WORLD, all_ranks, random_weights
from dllm.comm import Comm
from dllm.config import ModelConfig
from dllm import demo_model
from dllm.modelfile import ModelFile, write_model
from dllm.train import data
from dllm.train.gradsync import GradSync, bytes_per_step, make_buckets, parse_grad_sync
from dllm.train.optim import AdamW
from dllm.train.run import train
from test_cli import mpirun_command
from test_faults import strike_when

# 4 kv heads: tensor parallel splits it over 1, 2 and 4 ranks. The demo's tokenizer (512).
CONFIG = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=4,
                     vocab_size=512, max_seq_len=64)
WORDS = ("the cat dog sun tree ran jumped saw a big little happy sad park ball friend "
         "mom said played with and to was in").split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model file, training text, validation text), written by root, paths on every rank."""
    folder = WORLD.bcast(str(tmp_path_factory.mktemp("train")) if WORLD.is_root else None)
    paths = [f"{folder}/tiny-f32.h5", f"{folder}/train.txt", f"{folder}/val.txt"]
    if WORLD.is_root:
        with ModelFile(demo_model()) as demo:
            tokenizer = demo.tokenizer()
        weights = {k: v * (0.3 if v.ndim > 1 else 1) for k, v in random_weights(CONFIG, 2).items()}
        write_model(paths[0], CONFIG, weights.items(), quant="f32", tokenizer=tokenizer)
        rng = np.random.default_rng(0)
        for path, stories in ((paths[1], 120), (paths[2], 20)):
            text = "\n\n".join(" ".join(rng.choice(WORDS, 40)) + "." for _ in range(stories))
            with open(path, "w") as f:
                f.write(text)
    WORLD.barrier()
    return paths


def argv(files, out, *extra, steps=20, checkpoint_every=0):
    """The command line of a small run writing `out` and its metrics beside it."""
    model, text, val = files
    return ["--model", model, "--text", text, "--val", val, "--steps", str(steps),
            "--batch", "4", "--seq-len", "16", "--lr", "3e-3", "--seed", "3",
            "--out", str(out), "--metrics", str(out) + ".jsonl",
            "--checkpoint-every", str(checkpoint_every), "--log-every", "100", *extra]


def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


def shared_dir(tmp_path):
    return WORLD.bcast(str(tmp_path) if WORLD.is_root else None)


def one_rank_curve(files, tmp_path, *extra):
    """The loss curve of the same command on one rank: root runs it alone while the others
    sleep in a barrier (spinning ones would take its cores), then tells them."""
    curve = None
    if WORLD.is_root:
        out = tmp_path / "one-rank.h5"
        train(Comm.self_comm(), argv(files, out, *extra))
        curve = losses(str(out) + ".jsonl")
    WORLD.idle_barrier()
    return WORLD.bcast(curve)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["data", "tensor"])
def test_parallel_f32_follows_the_one_rank_loss_curve(files, tmp_path, mode):
    reference = one_rank_curve(files, tmp_path, "--parallel", mode)
    out = f"{shared_dir(tmp_path)}/{mode}.h5"
    trainer = train(WORLD, argv(files, out, "--parallel", mode))
    ok = True
    if WORLD.is_root:
        got = losses(out + ".jsonl")
        worst = max(abs(a - b) / b for a, b in zip(got, reference))
        ok = len(got) == 20 and worst <= 1e-5 and reference[-1] < reference[0] - 0.3
    # Replicated tensors stay bit-identical on every rank.
    digest = [float(trainer.params["norm"].sum()), float(trainer.params["tok_embeddings"].sum())]
    assert all_ranks(ok and len({tuple(d) for d in WORLD.allgather(digest)}) == 1)


@pytest.mark.mpi
@pytest.mark.parametrize("grad_sync", ["f32", "q80", "topk:0.1"])
def test_gradient_bytes_per_step_equal_the_formula(files, tmp_path, grad_sync):
    out = f"{shared_dir(tmp_path)}/{grad_sync}.h5"
    trainer = train(WORLD, argv(files, out, "--grad-sync", grad_sync, "--bucket-kb", "64",
                                steps=3))
    sync = trainer.sync
    payload, fraction = parse_grad_sync(grad_sync)
    expected = bytes_per_step(payload, fraction, [b.n for b in sync.buckets], WORLD.size,
                              WORLD.rank)
    ok = len(sync.buckets) > 1
    if WORLD.is_root:
        got = [r["grad_bytes"] for r in map(json.loads, open(out + ".jsonl")) if "loss" in r]
        ok = ok and got == [expected] * 3
        f32 = bytes_per_step("f32", None, [b.n for b in sync.buckets], WORLD.size)
        if payload == "q80" and WORLD.size > 1:
            ok = ok and expected <= 0.27 * f32
    assert all_ranks(ok)


@pytest.mark.mpi
@pytest.mark.parametrize("grad_sync", ["f32", "q80", "topk:1"])
def test_buckets_sum_alike_on_every_rank_whatever_the_timing(comm, grad_sync):
    """Many buckets, ranks handing gradients out at different moments: every rank gets the
    same sum, that of the float gradients to the payload's rounding (a rank starting its
    collectives in another order than the others corrupted q80's exchanges)."""
    import time
    shapes = {f"t{i}": (64 + 32 * i, 8) for i in range(8)}
    rng = np.random.default_rng(comm.rank)
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    sync = GradSync(comm, list(shapes), shapes, grad_sync, bucket_bytes=4096)
    for name in shapes:     # rank 0 hands all out at once, the others late and later
        time.sleep(0.003 * comm.rank)
        sync.ready([name], grads)
    got = sync.finish()
    everyone = comm.allgather({k: grads[k] for k in shapes})
    exact = {k: sum(g[k] for g in everyone) for k in shapes}
    worst = max(float(np.abs(got[k] - exact[k]).max() / np.abs(exact[k]).max()) for k in shapes)
    digests = comm.allgather(b"".join(got[k].tobytes() for k in shapes))
    assert all_ranks(len(set(digests)) == 1 and worst < (0.03 if grad_sync == "q80" else 1e-5)), \
        worst


def test_q80_and_topk_sums_on_one_rank():
    """On one rank q80 is the Q8_0 round trip (twice) and top-k keeps K of the entries and
    the rest in the residual: the sent values and the residual add up to the gradient."""
    shapes = {"a": (40, 8), "b": (33,)}
    rng = np.random.default_rng(1)
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    q80 = GradSync(Comm.self_comm(), ["a", "b"], shapes, "q80", bucket_bytes=1)
    q80.ready(["a", "b"], grads)
    got = q80.finish()
    assert all(np.abs(got[k] - grads[k]).max() <= 2 * np.abs(grads[k]).max() / 127 for k in grads)
    topk = GradSync(Comm.self_comm(), ["a", "b"], shapes, "topk:0.25", bucket_bytes=1 << 20)
    topk.ready(["a", "b"], grads)
    sent = topk.finish()
    flat = np.concatenate([grads["a"].ravel(), grads["b"].ravel()])
    dense = np.concatenate([sent["a"].ravel(), sent["b"].ravel()])
    assert np.count_nonzero(dense) == math.ceil(0.25 * flat.size)
    assert np.array_equal(dense + topk.residuals[0], flat)
    assert np.abs(dense).min(initial=np.inf, where=dense != 0) >= np.abs(topk.residuals[0]).max()


def test_schedule_clipping_and_one_adamw_step():
    opt = AdamW(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1, clip=1.0)
    assert opt.lr_at(5) == pytest.approx(5e-4) and opt.lr_at(10) == pytest.approx(1e-3)
    assert opt.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert opt.lr_at(110) == pytest.approx(1e-4)
    assert opt.clip_scale(0.5) == 1.0 and opt.clip_scale(4.0) == pytest.approx(0.25)
    p, g = np.full((2, 2), 2.0, np.float32), np.full((2, 2), 0.5, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    opt.update(p, g, m, v, 1, 1e-3)
    # Step 1: m_hat = g, v_hat = g^2, so the step is lr * sign(g), after decay 1 - lr wd.
    assert np.allclose(p, 2.0 * (1 - 1e-4) - 1e-3 / (1 + 2e-8), atol=1e-7)


def test_batches_are_a_function_of_seed_and_step():
    stream = np.arange(1000, dtype=np.int32)
    a, b = data.batch(stream, 1, 7, 8, 16), data.batch(stream, 1, 7, 8, 16)
    assert np.array_equal(a, b) and a.shape == (8, 17)
    assert np.array_equal(a[:, 1:], a[:, :-1] + 1)          # consecutive windows
    assert not np.array_equal(a, data.batch(stream, 1, 8, 8, 16))
    halves = [a[data.rank_rows(8, r, 2)] for r in range(2)]
    assert np.array_equal(np.concatenate(halves), a)
    assert make_buckets(["x", "y", "z"], {"x": (10,), "y": (300,), "z": (5,)}, 1000) == \
        [["x", "y"], ["z"]]


# --- the command under mpirun ---------------------------------------------------------------
def train_cmd(n, *args):
    return [*mpirun_command(n), sys.executable, "-m", "dllm.train", *map(str, args)]


def final_state(out):
    with h5py.File(str(out) + ".ckpt", "r") as f:
        return {k: f[k][()] for g in ("params", "m", "v") for k in
                [f"{g}/{n}" for n in _names(f[g])]}


def _names(group):
    found = []
    group.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
    return found


@pytest.fixture(scope="module")
def killed_and_uninterrupted(files, tmp_path_factory):
    """The same 2-rank command twice: once uninterrupted, once with rank 1 killed after a
    checkpoint and rerun. Returns both outputs."""
    folder = tmp_path_factory.mktemp("resume")
    clean, killed = folder / "clean.h5", folder / "killed.h5"
    # top-k: its per-rank residuals are part of the state a resume must restore.
    result = subprocess.run(train_cmd(2, *argv(files, clean, "--grad-sync", "topk:0.2",
                                                steps=30, checkpoint_every=5)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cmd = train_cmd(2, *argv(files, killed, "--grad-sync", "topk:0.2", steps=30,
                             checkpoint_every=5))

    def past_a_checkpoint():
        try:
            return len(open(f"{killed}.jsonl").read().splitlines()) >= 12
        except OSError:
            return False
    struck, _ = strike_when(cmd, past_a_checkpoint, rank=1, marker=str(killed))
    assert struck.returncode != 0 and not killed.exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "continuing from" in again.stderr
    return clean, killed


def test_killed_rank_rerun_gives_the_uninterrupted_weights(killed_and_uninterrupted):
    clean, killed = killed_and_uninterrupted
    a, b = final_state(clean), final_state(killed)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(f"{killed}.jsonl") == losses(f"{clean}.jsonl")   # no step twice, none lost


def test_trained_model_generates_at_any_rank_count(killed_and_uninterrupted):
    out = killed_and_uninterrupted[0]
    texts = []
    for n in (1, 2):
        result = subprocess.run([*mpirun_command(n), sys.executable, "-m", "dllm.generate",
                                 "--model", str(out), "--prompt", "the cat", "--steps", "12",
                                 "--sync", "f32", "--quiet", "--no-stop"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        texts.append(result.stdout)
    assert texts[0] == texts[1] and len(texts[0].split()) > 3


def test_bad_input_is_one_error_line(files, tmp_path):
    result = subprocess.run(train_cmd(2, *argv(files, tmp_path / "x.h5"), "--batch", "3"),
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.startswith("dllm.")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--batch 3 is not divisible by 2 ranks" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("extra,message", [
    (("--grad-sync", "topk:2"), "kept fraction"),
    (("--grad-sync", "q8"), "--grad-sync must be f32, q80 or topk:K"),
    (("--parallel", "tensor", "--grad-sync", "q80"), "--grad-sync applies to --parallel data"),
    (("--lr", "0"), "--lr must be positive"),
    (("--seq-len", "65"), "exceeds the model's context of 64"),
])
def test_bad_settings_are_refused_before_any_step(files, tmp_path, extra, message):
    from dllm.errors import DllmError
    with pytest.raises(DllmError, match=message):
        train(Comm.self_comm(), argv(files, tmp_path / "x.h5", *extra))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.jsonl").exists()


def test_checkpoint_of_another_run_is_refused(files, tmp_path):
    out = tmp_path / "y.h5"
    train(Comm.self_comm(), argv(files, out, steps=2))
    from dllm.errors import DllmError
    with pytest.raises(DllmError, match="is of another run"):
        train(Comm.self_comm(), argv(files, out, "--lr", "1e-3", steps=2))


def test_study_tables_a_run_and_plots_into_a_new_folder(files, tmp_path, capsys):
    """python -m dllm.train.study on a run's --metrics file: its table, and the plots in a
    --plot-dir that does not exist yet (created, as dllm.bench table does)."""
    pytest.importorskip("matplotlib")
    from dllm.train import study
    out = tmp_path / "run.h5"
    train(Comm.self_comm(), argv(files, out, steps=6))
    plots = tmp_path / "new" / "plots"
    assert study.main([str(out) + ".jsonl", "--plot-dir", str(plots), "--skip", "1"]) == 0
    assert "run" in capsys.readouterr().out
    pngs = list(plots.iterdir())
    assert pngs and all(p.suffix == ".png" for p in pngs)
