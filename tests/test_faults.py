"""Faults on a flaky cluster, for real: ranks killed (SIGKILL) and stalled (SIGSTOP) under
mpirun mid-generation, the watchdog's report and abort, --resume giving the uninterrupted
text, the SLURM job script requeueing itself, and malformed model files rejected at load.

Serial suite: each test launches mpirun itself and acts on the rank processes it finds in
/proc (by the PMI_RANK that the launcher gives each rank). The model is "deep": 48 small
layers and the demo's tokenizer, so that a token takes long enough (~50 collectives) for a
test to strike mid-generation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import random_weights
from dllm.config import ModelConfig
from dllm import demo_model
from dllm.modelfile import ModelFile, write_model
from test_cli import assert_one_clear_error, mpirun_command

ROOT = Path(__file__).resolve().parents[1]
DEEP = ModelConfig(dim=64, hidden_dim=128, n_layers=48, n_heads=4, n_kv_heads=2,
                   vocab_size=512, max_seq_len=256)
STEPS = 100          # room to strike after 30 tokens, before the end
TIMEOUT = 4          # --timeout of the runs that the tests stall
SLACK = 10           # the bound: the job ends within timeout + 10 s


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "deep-q40.h5"
    with ModelFile(demo_model()) as demo:
        tokenizer = demo.tokenizer()
    write_model(path, DEEP, random_weights(DEEP, seed=5).items(), quant="q40",
                tokenizer=tokenizer)
    return path


def launcher_is_hydra():
    cmd = mpirun_command(1)[0]
    out = subprocess.run([cmd, "--version"], capture_output=True, text=True).stdout
    return "HYDRA" in out


def generate_cmd(n, *args, mpirun_flags=()):
    launcher = mpirun_command(n)
    return ([launcher[0], *mpirun_flags, *launcher[1:], sys.executable, "-m", "dllm.generate",
             *map(str, args)])


def run(cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rank_pid(marker, rank):
    """The pid of the python process of `rank` whose command line holds `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() not in cmdline or b"python" not in cmdline.split(b"\0")[0]:
            continue
        variables = environ.split(b"\0")
        if (f"PMI_RANK={rank}".encode() in variables
                or f"OMPI_COMM_WORLD_RANK={rank}".encode() in variables):
            return int(entry.name)
    return None


def wait_for_tokens(transcript, count, process, timeout=60):
    """Wait until the transcript holds `count` tokens (the run is mid-generation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            if len(json.loads(transcript.read_text())["token_ids"]) >= count:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{transcript} never reached {count} tokens")


def strike(cmd, transcript, rank, sig, after_tokens=30):
    """Start cmd, send `sig` to `rank` mid-generation; returns (result, seconds from the
    signal to the end of the job). A stopped rank is killed afterwards, whatever happened."""
    # A session of its own, as from a shell: with the job in the process group of this test
    # (an MPI singleton), MPICH's mpirun was seen to kill the whole job at once when a rank
    # died, even under -disable-auto-cleanup.
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)
    pid = None
    try:
        wait_for_tokens(transcript, after_tokens, process)
        pid = rank_pid(str(transcript), rank)
        assert pid is not None, f"rank {rank}'s process not found"
        os.kill(pid, sig)
        struck = time.monotonic()
        stdout, stderr = process.communicate(timeout=TIMEOUT + SLACK + 30)
        seconds = time.monotonic() - struck
    finally:
        if process.poll() is None:
            process.kill()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr), seconds


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("dllm.")]
    assert len(lines) == 1, (result.returncode, result.stderr, result.stdout[-600:])
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def sampled(*extra):
    return ("--steps", STEPS, "--no-stop", "--temperature", 0.9, "--seed", 11, "--quiet", *extra)


# --- a rank killed mid-generation -----------------------------------------------------------
def test_killed_rank_is_named_and_resume_gives_the_uninterrupted_text(deep_model, tmp_path):
    if not launcher_is_hydra():
        pytest.skip("needs MPICH's mpirun (hydra) for -disable-auto-cleanup")
    full = tmp_path / "full.json"
    reference = run(generate_cmd(2, "--model", deep_model, *sampled("--transcript", full)))
    assert reference.returncode == 0, reference.stderr
    part = tmp_path / "part.json"
    # Without auto-cleanup hydra lets the survivors live and sends them SIGUSR1: the
    # watchdog names the lost rank and aborts (by default hydra kills them all at once).
    cmd = generate_cmd(3, "--model", deep_model, "--timeout", TIMEOUT,
                       *sampled("--transcript", part), mpirun_flags=["-disable-auto-cleanup"])
    result, seconds = strike(cmd, part, rank=1, sig=signal.SIGKILL)
    assert result.returncode != 0
    assert seconds < TIMEOUT + SLACK, f"the job took {seconds:.1f} s to end"
    assert "Traceback" not in result.stderr + result.stdout
    if "TERMINATED WITH THE EXIT STRING" in result.stdout + result.stderr and not any(
            line.startswith("dllm.") for line in result.stderr.splitlines()):
        # MPICH itself aborts the job at once when the dead rank was mid-transfer with a
        # survivor (seen on a loaded machine, docs/faults.md): its banner is the message.
        assert result.returncode == 9
    else:
        line = one_error_line(result)
        assert "rank 1" in line and "died" in line and f"--resume {part}" in line, line
    saved = json.loads(part.read_text())
    done = saved["token_ids"]
    assert 30 <= len(done) < STEPS and not saved["finished"]
    # 3 ranks then 2: the text is the same at any world size up to Q80 rounding, and the
    # 2-rank resume must give exactly the 2-rank uninterrupted run from where it stopped.
    resumed = run(generate_cmd(2, "--resume", part, "--quiet"))
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(part.read_text())
    expected = json.loads(full.read_text())
    assert final["finished"] and len(final["token_ids"]) == STEPS
    assert final["token_ids"][:len(done)] == done            # nothing written was lost
    if done == expected["token_ids"][:len(done)]:            # same tokens so far: same text
        assert final["token_ids"] == expected["token_ids"]
        assert resumed.stdout == reference.stdout


def test_resume_on_another_world_size_gives_the_same_text_with_f32_sync(deep_model, tmp_path):
    full = tmp_path / "full.json"
    reference = run(generate_cmd(1, "--model", deep_model, "--sync", "f32",
                                 *sampled("--transcript", full)))
    assert reference.returncode == 0, reference.stderr
    part = tmp_path / "part.json"
    cmd = generate_cmd(2, "--model", deep_model, "--sync", "f32", "--timeout", TIMEOUT,
                       *sampled("--transcript", part))
    result, seconds = strike(cmd, part, rank=1, sig=signal.SIGKILL)
    assert result.returncode != 0 and seconds < TIMEOUT + SLACK   # the launcher ends the job
    done = json.loads(part.read_text())["token_ids"]
    resumed = run(generate_cmd(1, "--resume", part, "--quiet"))
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(part.read_text())
    assert final["token_ids"][:len(done)] == done
    assert final["token_ids"] == json.loads(full.read_text())["token_ids"]
    assert resumed.stdout == reference.stdout


# --- a rank stalled mid-generation ----------------------------------------------------------
def test_stalled_rank_watchdog_reports_and_aborts(deep_model, tmp_path):
    transcript = tmp_path / "stall.json"
    cmd = generate_cmd(2, "--model", deep_model, "--timeout", TIMEOUT,
                       *sampled("--transcript", transcript))
    result, seconds = strike(cmd, transcript, rank=1, sig=signal.SIGSTOP)
    assert result.returncode != 0
    assert TIMEOUT <= seconds < TIMEOUT + SLACK, f"the job took {seconds:.1f} s to end"
    line = one_error_line(result)
    assert "rank 1" in line and "stopped" in line and "--timeout" in line, line
    assert "rank 0 waited in MPI" in line, line
    assert len(json.loads(transcript.read_text())["token_ids"]) >= 30   # kept, whole


# --- a rank killed mid-evaluation -----------------------------------------------------------
def eval_cmd(n, *args):
    launcher = mpirun_command(n)
    return [*launcher, sys.executable, "-m", "dllm.eval", *map(str, args)]


def strike_when(cmd, ready, rank, sig=signal.SIGKILL, marker=None, timeout=60):
    """Start cmd, send `sig` to `rank` once ready() holds; returns (result, seconds from the
    signal to the end of the job)."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)   # see strike()
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "the run never got far enough"
            time.sleep(0.01)
        os.kill(rank_pid(marker, rank), sig)
        struck = time.monotonic()
        stdout, stderr = process.communicate(timeout=TIMEOUT + SLACK + 30)
        return (subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr),
                time.monotonic() - struck)
    finally:
        if process.poll() is None:
            process.kill()


def saved(path, *keys):
    """len() of a nested entry of a JSON file being checkpointed; 0 while absent or mid-write."""
    try:
        data = json.loads(path.read_text())
        for key in keys:
            data = data[key]
        return len(data)
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_rank_mid_perplexity_rerun_gives_the_uninterrupted_result(deep_model, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, a little fox found a red ball in the park. " * 150)
    flags = ("perplexity", "--model", deep_model, "--text", text, "--window", 64,
             "--no-progress", "--checkpoint-every", 0, "--timeout", TIMEOUT)
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert run(eval_cmd(2, *flags, "--out", full)).returncode == 0
    result, seconds = strike_when(eval_cmd(2, *flags, "--out", part),
                                  lambda: saved(part, "window_nll") >= 20, rank=1,
                                  marker=str(part))
    assert result.returncode != 0 and seconds < TIMEOUT + SLACK
    done = json.loads(part.read_text())["window_nll"]
    assert 20 <= len(done) < len(json.loads(full.read_text())["window_nll"])
    rerun = run(eval_cmd(2, *flags, "--out", part))
    assert rerun.returncode == 0, rerun.stderr
    final, expected = json.loads(part.read_text()), json.loads(full.read_text())
    assert final["window_nll"][:len(done)] == done                  # nothing written was lost
    assert final["window_nll"] == expected["window_nll"]
    assert final["perplexity"] == expected["perplexity"]
    assert [r["windows_run"][0] for r in final["runs"]] == [0, len(done)]   # skipped the rest


def test_killed_rank_mid_mmlu_rerun_gives_the_uninterrupted_result(deep_model, tmp_path):
    from test_eval import without_timings, write_toy_mmlu
    data = write_toy_mmlu(tmp_path / "mmlu")
    flags = ("mmlu", "--model", deep_model, "--data", data, "--no-progress",
             "--checkpoint-every", 0, "--timeout", TIMEOUT)
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert run(eval_cmd(2, *flags, "--out", full)).returncode == 0
    result, seconds = strike_when(
        eval_cmd(2, *flags, "--out", part),
        lambda: saved(part, "in_progress", "toy_arithmetic", "questions") >= 2, rank=1,
        marker=str(part))
    assert result.returncode != 0 and seconds < TIMEOUT + SLACK
    interrupted = json.loads(part.read_text())
    scored = interrupted["in_progress"]["toy_arithmetic"]["questions"]
    rerun = run(eval_cmd(2, *flags, "--out", part))
    assert rerun.returncode == 0, rerun.stderr
    final, expected = json.loads(part.read_text()), json.loads(full.read_text())
    assert final["subjects"]["toy_arithmetic"]["questions"][:len(scored)] == scored
    assert without_timings(final) == without_timings(expected)


# --- the watchdog's report, line by line ------------------------------------------------------
def test_watchdog_report_says_what_each_lost_rank_is():
    """The report from the states an inquiry collects (no MPI needed): a stopped process, a
    gone one, one on another host; who waited, who computed."""
    from dllm.comm import Comm
    from dllm.watchdog import Watchdog
    stopped = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(0.2)
        dog = Watchdog(Comm.self_comm(), "dllm.test", timeout=60)
        dog.peers = [(dog.host, os.getpid()), (dog.host, stopped.pid), (dog.host, gone.pid),
                     ("pi7", 4242), (dog.host, os.getpid())]
        dog.loaded()
        dog.hint = "continue with --resume run.json"
        replies = {0: {"waiting": ("Allgatherv", 61.2), "since_last_call": 61.2},
                   4: {"waiting": None, "since_last_call": 75.0}}
        line = dog.report("timeout", replies, silent=[1, 2, 3])
    finally:
        stopped.kill()
    assert f"rank 1 (pid {stopped.pid} on {dog.host}) is stopped" in line, line
    assert f"rank 2 (pid {gone.pid} on {dog.host}) died (its process is gone)" in line, line
    assert "rank 3 (pid 4242 on pi7) does not answer within 3 s" in line, line
    assert "rank 0 waited in MPI (Allgatherv) for up to 61.2 s (limit 60 s, --timeout)" in line
    assert "rank 4 was computing, 75 s after its last call" in line, line
    assert line.endswith("aborting every rank; continue with --resume run.json"), line
    assert "pi7) died (the MPI launcher reported" in dog.report("signal", replies, [3])


# --- the SLURM job resumes after a requeue --------------------------------------------------
def fake_slurm(tmp_path):
    """srun that runs the step with this machine's mpirun on 2 ranks, and scontrol that
    records a requeue request: enough to run jobs/*.sbatch without SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = mpirun_command(2)[0]
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
        f"exec {launcher} -n 2 \"$@\"\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_generate_job_requeues_itself_and_resumes(deep_model, tmp_path):
    bin_dir = fake_slurm(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "DLLM_VENV": str(Path(sys.executable).parents[1]), "MODEL": str(deep_model),
           "STEPS": str(STEPS), "TEMPERATURE": "0.9", "SEED": "11", "NO_STOP": "1",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(tmp_path)}
    transcript = tmp_path / "dllm-generate-4242.transcript.json"
    process = subprocess.Popen(["bash", str(ROOT / "jobs" / "generate.sbatch")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for_tokens(transcript, 30, process)
        os.kill(rank_pid(str(transcript), 1), signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()   # asked SLURM to rerun it
    done = json.loads(transcript.read_text())["token_ids"]
    again = subprocess.run(["bash", str(ROOT / "jobs" / "generate.sbatch")], timeout=120,
                           env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout + again.stderr
    final = json.loads(transcript.read_text())
    assert final["finished"] and final["token_ids"][:len(done)] == done
    stats = json.loads((tmp_path / "dllm-generate-4242.json").read_text())
    assert stats["token_ids"] == final["token_ids"]


# --- --resume's own bad input ---------------------------------------------------------------
def test_resume_bad_input(deep_model, tmp_path):
    assert_one_clear_error(run(generate_cmd(2, "--resume", tmp_path / "none.json")),
                           "not found")
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"kind": "dllm-transcript", "version": 1, "settings": {}}')
    assert_one_clear_error(run(generate_cmd(2, "--resume", damaged)), "damaged")
    good = tmp_path / "good.json"
    assert run(generate_cmd(1, "--model", deep_model, "--steps", 3, "--transcript",
                            good)).returncode == 0
    assert_one_clear_error(run(generate_cmd(2, "--resume", good, "--steps", 7)),
                           "--steps 7 differs")
    assert_one_clear_error(run(generate_cmd(2, "--resume", good, "--model", demo_model())),
                           "not the model the transcript was made with")


# --- malformed model files ------------------------------------------------------------------
def _nan_scale(f):
    ds = f["layers/1/w1"]
    rows = ds[()]
    rows[3, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    ds[...] = rows


def _inf_scale(f):
    ds = f["layers/2/wo"]
    rows = ds[()]
    rows[5, 18:20] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    ds[...] = rows


def _inf_norm(f):
    ds = f["layers/0/ffn_norm"]
    values = ds[()]
    values[3] = np.inf
    ds[...] = values


def _wrong_shape(f):
    del f["layers/0/wq"]
    f.create_dataset("layers/0/wq", data=np.zeros((128, 36), np.uint8))
    f["layers/0/wq"].attrs["quant"] = "q40"


def _garbage_tokenizer(f):
    del f["tokenizer"]
    f.create_dataset("tokenizer", data=np.frombuffer(b"not a tokenizer" * 50, np.uint8))
    f["tokenizer"].attrs["kind"] = "sentencepiece"


def _other_vocabulary(f):
    path = ROOT.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared holds the Llama 2 tokenizer)")
    del f["tokenizer"]
    f.create_dataset("tokenizer", data=np.frombuffer(path.read_bytes(), np.uint8))
    f["tokenizer"].attrs["kind"] = "sentencepiece"


CORRUPTIONS = {
    "nan Q4_0 scale": (_nan_scale, "NaN or infinite Q4_0 block scales"),
    "infinite Q4_0 scale": (_inf_scale, "NaN or infinite Q4_0 block scales"),
    "infinite norm weight": (_inf_norm, "NaN or infinite values"),
    "wrong shape": (_wrong_shape, "expected uint8[128, 72]"),
    "huge context": (lambda f: f.attrs.__setitem__("max_seq_len", 1 << 40), "available"),
    "huge layer count": (lambda f: f.attrs.__setitem__("n_layers", 10 ** 8),
                         "declares 100000000 layers but the file holds 4"),
    "huge vocabulary": (lambda f: f.attrs.__setitem__("vocab_size", 10 ** 12),
                        "bytes of weights but the file has"),
    "garbage tokenizer": (_garbage_tokenizer, "not a valid SentencePiece model"),
    "tokenizer of another vocabulary": (_other_vocabulary, "tokenizer has 32000 tokens"),
    "truncated": (None, "truncated"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_malformed_model_rejected_at_load(case, tmp_path):
    corrupt, fragment = CORRUPTIONS[case]
    path = tmp_path / "bad.h5"
    shutil.copy(demo_model(), path)
    if corrupt is None:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size * 2 // 3)
    else:
        with h5py.File(path, "r+") as f:
            corrupt(f)
    started = time.monotonic()
    result = run(generate_cmd(2, "--model", path, "--steps", 4), timeout=60)
    assert time.monotonic() - started < 30
    assert_one_clear_error(result, fragment)
    assert result.stdout == ""          # rejected before a single token
