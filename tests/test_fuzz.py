"""Bad input for every command, from a table: each case asserts the exit code, exactly one
`error:` line naming the problem, no traceback, a time bound, and the state of the files it
involves (an output never half-written, an old file intact, no temporary file left, an
input never destroyed). docs/faults.md lists the contract and the classes covered.

Serial suite. Most cases run the command's main(argv) in this process (one rank), which is
fast; a handful run under `mpirun -n 2`, where the contract is about every rank. A case that
would traceback inside dllm.cli.run aborts the job: here Comm.abort raises Aborted instead,
so the case fails and the suite goes on. Full-disk cases write onto a small tmpfs mounted
for the case (we may be root in CI), and skip with the reason where it cannot be mounted.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import random_weights
from dllm import bench, convert, eval as eval_cli, generate, inspect, plan
from dllm.comm import Comm
from dllm import demo_model
from test_cli import mpirun_command
from test_convert import TINY, write_hf

DEMO = demo_model()
MAINS = {"dllm.generate": generate.main, "dllm.convert": convert.main,
         "dllm.inspect": inspect.main, "dllm.eval": eval_cli.main, "dllm.bench": bench.main,
         "dllm.plan": plan.main}
SECONDS = 20          # every in-process case ends within this (a hang fails it)
MPI_SECONDS = 40      # the same under mpirun -n 2, launch included
NOT_UTF8 = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")   # as argv delivers it


class Aborted(BaseException):
    """Comm.abort in a case: dllm.cli.run met an unexpected exception (a bug)."""


class Hung(BaseException):
    """The case ran past SECONDS."""


@dataclass
class Case:
    """prog's argv ({name} replaced by the path of input `name`, {out}/{old} by the case's
    output folder's files); code and the fragment its one error line must hold (code 0:
    no error line); unchanged: inputs whose bytes must be the same afterwards; absent:
    outputs that must not exist; warning: a fragment of a warning line expected."""
    prog: str
    argv: list
    fragment: str = ""
    code: int = 1
    unchanged: tuple = ()
    absent: tuple = ()
    warning: str = None
    mpi: bool = False
    stdin: bytes = None       # what the command reads on stdin (in process only)
    disk: bool = False        # {out} is on a tmpfs filled to the last byte
    old: dict = field(default_factory=dict)   # output files written before, kept intact


# --- the inputs every case may name ---------------------------------------------------------
def _nan_scale_model(path):
    shutil.copy(DEMO, path)
    with h5py.File(path, "r+") as f:
        ds = f["layers/1/w1"]
        rows = ds[()]
        rows[-1, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
        ds[...] = rows


def _chat_model(path):
    shutil.copy(DEMO, path)
    with h5py.File(path, "r+") as f:
        f["tokenizer"].attrs["chat_template"] = "llama2"


def _truncated_model(path):
    blob = DEMO.read_bytes()
    path.write_bytes(blob[:len(blob) * 2 // 3])


def _hf_with(folder, weights=None, **config):
    write_hf(folder, weights or random_weights(TINY, 3), TINY, extra_config=config)


def _hf_nan(folder):
    weights = random_weights(TINY, 3)
    weights["layers/1/w2"][5, 7] = np.nan
    _hf_with(folder, weights)


def _transcript(path, *flags):
    """A transcript of the demo made by a real run (2 tokens unless flags say otherwise)."""
    args = ["--steps", "2", "--quiet", "--transcript", str(path), *flags]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert generate.main(args) == 0


def _edited_transcript(path, edit):
    _transcript(path)
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _hf_config(folder, blob):
    _hf_with(folder)
    (folder / "config.json").write_bytes(blob)


PROFILE = {"devices": [{"memory": "1GB", "speed": 1.0}], "default_link":
           {"latency_ms": 0.1, "bandwidth_mbit_s": 1000}, "layer_ms": 1.0, "classifier_ms": 1.0}


def _profile(path, **device):
    path.write_text(json.dumps({**PROFILE, "devices": [{**PROFILE["devices"][0], **device}]}))


def _two_device_profile(path, speeds):
    path.write_text(json.dumps({**PROFILE, "devices": [{"memory": "1GB", "speed": s}
                                                       for s in speeds]}))


INPUTS = {
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "latin1": lambda p: p.write_bytes("caf\xe9 na\xefve\n".encode("latin-1")),
    "truncated_json": lambda p: p.write_text('{"kind": "dllm-transcript", "version": 2, "se'),
    "empty": lambda p: p.write_bytes(b""),
    "json_list": lambda p: p.write_text("[1, 2, 3]\n"),
    "folder": lambda p: p.mkdir(),
    "text": lambda p: p.write_text("Once upon a time there was a cat. " * 20),
    "model": lambda p: shutil.copy(DEMO, p),
    "nan_model": _nan_scale_model,
    "chat_model": _chat_model,
    "truncated_model": _truncated_model,
    "hf_nan": _hf_nan,
    "hf_eos": lambda p: _hf_with(p, eos_token_id=TINY.vocab_size),
    "gguf": lambda p: p.write_bytes(b"GGUF" + bytes(60)),
    "transcript": _transcript,
    "pipeline_transcript": lambda p: _transcript(p, "--parallel", "pipeline"),
    "transcript_bad_steps": lambda p: _edited_transcript(
        p, lambda r: r["settings"].update(steps="many")),
    "transcript_negative_steps": lambda p: _edited_transcript(
        p, lambda r: r["settings"].update(steps=-3)),
    "transcript_bad_sampler": lambda p: _edited_transcript(
        p, lambda r: r.update(sampler_state={"bit_generator": "nonsense"})),
    "transcript_v9": lambda p: _edited_transcript(p, lambda r: r.update(version=9)),
    "hf_binary_config": lambda p: _hf_config(p, bytes(range(256))),
    "hf_list_config": lambda p: _hf_config(p, b"[1, 2]"),
    "hf_string_sizes": lambda p: _hf_with(p, hidden_size="sixty-four"),
    "profile": _profile,
    "profile_fast": lambda p: _two_device_profile(p, [1e300, 1e-300]),
    "profile_nan": lambda p: p.write_text(json.dumps(PROFILE).replace('"speed": 1.0',
                                                                      '"speed": NaN')),
    "profile_huge_memory": lambda p: _profile(p, memory="99999999999999999999TB"),
    "profile_slow_link": lambda p: p.write_text(json.dumps(
        {**PROFILE, "default_link": {"latency_ms": 1e300, "bandwidth_mbit_s": 1}})),
    "profile_two": lambda p: _two_device_profile(p, [1.0, 1.0]),
    "bench_short": lambda p: p.write_text('{"kind": "bench"}\n'),
    "bench_truncated": lambda p: p.write_text('{"kind": "bench", "ms_per'),
    "plans_damaged": lambda p: p.write_text('{"kind": "plans", "front": []}'),
    "plans_not": lambda p: p.write_text('{"kind": "bench"}'),
    "results_damaged": lambda p: p.write_text('{"kind": "dllm-mmlu-res'),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every input of INPUTS, made once, by name -> path."""
    folder = tmp_path_factory.mktemp("fuzz-inputs")
    paths = {}
    for name, make in INPUTS.items():
        paths[name] = folder / name
        make(paths[name])
    return paths


def G(*argv, **kw):
    return Case("dllm.generate", list(argv), **kw)


def C(*argv, **kw):
    return Case("dllm.convert", list(argv), **kw)


def I(*argv, **kw):   # noqa: E743
    return Case("dllm.inspect", list(argv), **kw)


def E(*argv, **kw):
    return Case("dllm.eval", list(argv), **kw)


def B(*argv, **kw):
    return Case("dllm.bench", list(argv), **kw)


def P(*argv, **kw):
    return Case("dllm.plan", list(argv), **kw)


NAN_WEIGHT = "holds NaN or infinite values"
CASES = {
    # numbers: finite, in range, checked when parsed
    "generate --timeout nan": G("--timeout", "nan", fragment="invalid finite number"),
    "generate --timeout inf": G("--timeout", "inf", fragment="invalid finite number"),
    "generate --load-timeout -1": G("--load-timeout", "-1", fragment="--load-timeout must be"),
    "generate --seed -1": G("--seed", "-1", fragment="--seed must be at least 0"),
    "generate --seed 2**64": G("--seed", str(2 ** 64), fragment="--seed must be at most"),
    "generate --steps 0": G("--steps", "0", fragment="--steps must be at least 1"),
    "generate --steps -5": G("--steps", "-5", fragment="--steps must be at least 1"),
    "generate --steps 1.5": G("--steps", "1.5", fragment="invalid int value"),
    "generate --temperature -1": G("--temperature", "-1", fragment="--temperature must be"),
    "generate --temperature nan": G("--temperature", "nan", fragment="invalid finite number"),
    "generate --top-p 0": G("--top-p", "0", fragment="--top-p must be in (0, 1]"),
    "generate --top-p 1.5": G("--top-p", "1.5", fragment="--top-p must be in (0, 1]"),
    "generate --top-p -inf": G("--top-p=-inf", fragment="invalid finite number"),
    "generate --max-seq-len 0": G("--max-seq-len", "0", fragment="--max-seq-len must be"),
    "generate --max-seq-len beyond the model": G("--max-seq-len", "100000",
                                                 fragment="exceeds the model's context"),
    "generate --prefill-chunk 0": G("--prefill-chunk", "0", fragment="--prefill-chunk must"),
    "generate --sync bogus": G("--sync", "bogus", fragment="invalid choice"),
    "generate unknown flag": G("--bogus", fragment="unrecognized arguments"),
    # text that is not UTF-8
    "generate --prompt not UTF-8": G("--prompt", NOT_UTF8, fragment="--prompt is not valid"),
    "generate --system not UTF-8": G("--chat", "--prompt", "hi", "--system", NOT_UTF8,
                                     fragment="--system is not valid UTF-8"),
    # the model and tokenizer files
    "generate --model missing": G("--model", "{none}", fragment="not found"),
    "generate --model a folder": G("--model", "{folder}", fragment="is a directory"),
    "generate --model binary": G("--model", "{binary}", fragment="not an HDF5 model file"),
    "generate --model truncated": G("--model", "{truncated_model}", fragment="truncated"),
    "generate --model NaN scale": G("--model", "{nan_model}", "--steps", "2",
                                    fragment="NaN or infinite"),
    "generate --tokenizer missing": G("--tokenizer", "{none}", fragment="not found"),
    "generate --tokenizer a folder": G("--tokenizer", "{folder}", fragment="is a directory"),
    "generate --tokenizer binary": G("--tokenizer", "{binary}", fragment="tokenizer"),
    # outputs: checked before any work; never an input; never a device
    "generate --stats-json missing folder": G("--stats-json", "{out}/no/s.json",
                                              fragment="does not exist"),
    "generate --stats-json a folder": G("--stats-json", "{out}", fragment="is a directory"),
    "generate --stats-json is the model": G("--model", "{model}", "--stats-json", "{model}",
                                            fragment="would destroy", unchanged=("model",)),
    "generate --transcript is the tokenizer": G("--tokenizer", "{text}", "--transcript",
                                                "{text}", fragment="would destroy",
                                                unchanged=("text",)),
    "generate --transcript a device": G("--transcript", "{device}", "--steps", "2",
                                        fragment="not a regular file"),
    "generate --transcript missing folder": G("--transcript", "{out}/no/t.json",
                                              fragment="does not exist"),
    # resuming: every damaged transcript is one line naming the file
    "generate --resume missing": G("--resume", "{none}", fragment="not found"),
    "generate --resume a folder": G("--resume", "{folder}", fragment="is a directory"),
    "generate --resume binary": G("--resume", "{binary}", fragment="is a binary file"),
    "generate --resume not UTF-8": G("--resume", "{latin1}", fragment="is not UTF-8 text"),
    "generate --resume truncated": G("--resume", "{truncated_json}", fragment="not valid JSON",
                                     unchanged=("truncated_json",)),
    "generate --resume empty": G("--resume", "{empty}", fragment="not valid JSON"),
    "generate --resume a JSON list": G("--resume", "{json_list}",
                                       fragment="not a dllm.generate --transcript"),
    "generate --resume with another --parallel": G(
        "--resume", "{transcript}", "--parallel", "pipeline",
        fragment="--parallel pipeline differs from its tensor", unchanged=("transcript",)),
    "generate --resume with another --profile": G(
        "--resume", "{pipeline_transcript}", "--profile", "{profile}",
        fragment="--profile", unchanged=("pipeline_transcript",)),
    "generate --resume a setting of the wrong type": G(
        "--resume", "{transcript_bad_steps}", fragment="incomplete or damaged"),
    "generate --resume a setting out of range": G(
        "--resume", "{transcript_negative_steps}", fragment="--steps must be at least 1"),
    "generate --resume a damaged sampler state": G(
        "--resume", "{transcript_bad_sampler}", fragment="incomplete or damaged"),
    "generate --resume version 9": G("--resume", "{transcript_v9}",
                                     fragment="transcript version 9"),
    "generate --chat stdin not UTF-8": G("--chat", "--model", "{chat_model}", "--steps", "2", stdin=b"caf\xe9\n",
                                         fragment="stdin is not UTF-8 text"),
    "generate --resume --chat": G("--resume", "{transcript}", "--chat", fragment="--chat"),
    "generate --chat --stats-json": G("--chat", "--model", "{chat_model}", "--stats-json",
                                      "{out}/stats.json", stdin=b"hi\n", fragment="--chat",
                                      absent=("stats.json",)),
    # device profiles: finite, positive, bounded
    "generate --profile missing": G("--profile", "{none}", fragment="not found"),
    "generate --profile binary": G("--profile", "{binary}", fragment="binary file"),
    "generate --profile extreme speeds": G("--parallel", "pipeline", "--profile",
                                           "{profile_fast}", fragment="speed of rank0 must be"),
    "generate --profile NaN speed": G("--profile", "{profile_nan}",
                                      fragment="must be a positive number"),
    "generate --profile huge memory": G("--profile", "{profile_huge_memory}",
                                        fragment="memory of rank0 must be at most"),
    "generate --profile huge latency": G("--profile", "{profile_slow_link}",
                                         fragment="latency_ms must be"),
    "generate --profile of two devices": G("--profile", "{profile_two}",
                                           fragment="lists 2 devices but the job has 1"),
    # the context ends the generation: exit 0, and a word on stderr
    "generate past the context": G("--steps", "40", "--max-seq-len", "8", "--no-stop",
                                   code=0, warning="context of 8 tokens is full"),
    # full disk: one line, the old file intact, no temporary left
    "generate --stats-json on a full disk": G(
        "--steps", "2", "--quiet", "--stats-json", "{out}/s.json", disk=True,
        fragment="No space left on device", old={"s.json": "old stats\n"}),
    "generate --transcript on a full disk": G(
        "--steps", "2", "--quiet", "--transcript", "{out}/t.json", disk=True,
        fragment="No space left on device", old={"t.json": "old transcript\n"}),

    # convert
    "convert X.gguf -o X.gguf": C("{gguf}", "-o", "{gguf}", fragment="would destroy",
                                  unchanged=("gguf",)),
    "convert -o the tokenizer": C("synthetic", "--preset", "tinyllama-1.1b", "--layers", "1",
                                  "--tokenizer", "{text}", "-o", "{text}",
                                  fragment="would destroy", unchanged=("text",)),
    "convert missing source": C("{none}", "-o", "{out}/m.h5", fragment="does not exist",
                                absent=("m.h5",)),
    "convert -o missing folder": C("{gguf}", "-o", "{out}/no/m.h5", fragment="does not exist"),
    "convert -o a folder": C("{gguf}", "-o", "{out}", fragment="is a directory"),
    "convert -o a device": C("{gguf}", "-o", "{device}", fragment="not a regular file"),
    "convert NaN weight": C("{hf_nan}", "-o", "{out}/m.h5", "--quiet", fragment=NAN_WEIGHT,
                            absent=("m.h5",)),
    "convert NaN weight --allow-nonfinite": C("{hf_nan}", "-o", "{out}/m.h5", "--quiet",
                                              "--allow-nonfinite", code=0),
    "convert eos_id outside the vocabulary": C("{hf_eos}", "-o", "{out}/m.h5", "--quiet",
                                               fragment="eos_id = 96 is outside the "
                                                        "vocabulary", absent=("m.h5",)),
    "convert synthetic --layers 0": C("synthetic", "--preset", "llama2-7b", "--layers", "0",
                                      "-o", "{out}/m.h5", fragment="--layers must be at least"),
    "convert synthetic --seed -1": C("synthetic", "--preset", "llama2-7b", "--seed", "-1",
                                     "-o", "{out}/m.h5", fragment="--seed must be at least"),
    "convert config.json binary": C("{hf_binary_config}", "-o", "{out}/m.h5",
                                    fragment="is a binary file", absent=("m.h5",)),
    "convert config.json a list": C("{hf_list_config}", "-o", "{out}/m.h5",
                                    fragment="not a JSON object", absent=("m.h5",)),
    "convert config.json sizes of the wrong type": C("{hf_string_sizes}", "-o", "{out}/m.h5",
                                                     fragment="cannot use",
                                                     absent=("m.h5",)),
    "convert --tokenizer binary": C("{hf_nan}", "--tokenizer", "{binary}", "-o",
                                    "{out}/m.h5", "--quiet", fragment="tokenizer",
                                    absent=("m.h5",)),
    "convert on a full disk": C("{hf_nan}", "--allow-nonfinite", "--quiet", "-o",
                                "{out}/m.h5", disk=True, fragment="No space left on device",
                                old={"m.h5": "an old model\n"}),

    # inspect
    "inspect missing": I("{none}", fragment="not found"),
    "inspect binary": I("{binary}", fragment="not an HDF5 model file"),
    "inspect --ranks 0": I("{model}", "--ranks", "0", fragment="--ranks must be at least 1"),
    "inspect --ranks 10**9": I("{model}", "--ranks", str(10 ** 9), fragment="at most 4096"),
    "inspect --max-seq-len -1": I("{model}", "--max-seq-len", "-1", fragment="--max-seq-len"),

    # eval
    "eval perplexity --text not UTF-8": E("perplexity", "--text", "{latin1}",
                                          fragment="is not UTF-8 text"),
    "eval perplexity --text binary": E("perplexity", "--text", "{binary}",
                                       fragment="is a binary file"),
    "eval perplexity --text missing": E("perplexity", "--text", "{none}", fragment="not found"),
    "eval perplexity --window 1": E("perplexity", "--text", "{text}", "--window", "1",
                                    fragment="--window must be between 2"),
    "eval perplexity --checkpoint-every nan": E("perplexity", "--text", "{text}",
                                                "--checkpoint-every", "nan",
                                                fragment="invalid finite number"),
    "eval perplexity --out damaged": E("perplexity", "--text", "{text}", "--out",
                                       "{results_damaged}", fragment="refusing to overwrite",
                                       unchanged=("results_damaged",)),
    "eval perplexity --out is the text": E("perplexity", "--text", "{text}", "--out",
                                           "{text}", fragment="would destroy",
                                           unchanged=("text",)),
    "eval mmlu --data missing": E("mmlu", "--data", "{none}",
                                  fragment="MMLU data folder not found"),
    "eval compare binary": E("compare", "{binary}", "{text}", fragment="is a binary file"),
    "eval compare --out is an input": E("compare", "{results_damaged}", "{text}", "--out",
                                        "{results_damaged}", fragment="would destroy",
                                        unchanged=("results_damaged",)),
    "eval perplexity --out on a full disk": E(
        "perplexity", "--text", "{text}", "--window", "32", "--no-progress", "--out",
        "{out}/p.json", disk=True, fragment="No space left on device"),

    # bench
    "bench table binary": B("table", "{binary}", fragment="is a binary file"),
    "bench table not UTF-8": B("table", "{latin1}", fragment="is not UTF-8 text"),
    "bench table truncated line": B("table", "{bench_truncated}", fragment="not a JSON line"),
    "bench table line without figures": B("table", "{bench_short}",
                                          fragment="without the figures"),
    "bench table missing": B("table", "{none}", fragment="not found"),
    "bench --out missing folder": B("--model", "{model}", "--out", "{out}/no/r.jsonl",
                                    fragment="does not exist"),
    "bench --out is the model": B("--model", "{model}", "--out", "{model}",
                                  fragment="would destroy", unchanged=("model",)),
    "bench --prompt-len 0": B("--model", "{model}", "--prompt-len", "0",
                              fragment="--prompt-len must be at least 1"),
    "bench --timeout nan": B("--model", "{model}", "--timeout", "nan",
                             fragment="invalid finite number"),
    "bench --model and --preset": B("--model", "{model}", "--preset", "llama2-7b",
                                    fragment="exactly one"),
    "bench compare --sequences abc": B("compare", "--model", "{model}", "--sequences", "abc",
                                       fragment="--sequences must be numbers"),
    "bench --out on a full disk": B("--model", "{model}", "--prompt-len", "4",
                                    "--decode-tokens", "2", "--out", "{out}/r.jsonl",
                                    disk=True, fragment="No space left on device",
                                    old={"r.jsonl": '{"kind": "old"}\n'}),

    # plan
    "plan search extreme speeds": P("search", "--model", "{model}", "--profile",
                                    "{profile_fast}", fragment="speed of rank0 must be"),
    "plan search NaN speed": P("search", "--model", "{model}", "--profile", "{profile_nan}",
                               fragment="must be a positive number"),
    "plan search profile not UTF-8": P("search", "--model", "{model}", "--profile",
                                       "{latin1}", fragment="is not UTF-8 text"),
    "plan search -o missing folder": P("search", "--model", "{model}", "--profile",
                                       "{profile}", "-o", "{out}/no/p.json",
                                       fragment="does not exist"),
    "plan search -o is the profile": P("search", "--model", "{model}", "--profile",
                                       "{profile}", "-o", "{profile}",
                                       fragment="would destroy", unchanged=("profile",)),
    "plan search --population 0": P("search", "--model", "{model}", "--profile", "{profile}",
                                    "--population", "0",
                                    fragment="--population must be at least 1"),
    "plan search --generations 10**9": P("search", "--model", "{model}", "--profile",
                                         "{profile}", "--generations", str(10 ** 9),
                                         fragment="--generations must be at most"),
    "plan search --sequences 0": P("search", "--model", "{model}", "--profile", "{profile}",
                                   "--sequences", "0", fragment="--sequences must be at"),
    "plan check binary": P("check", "{binary}", "--model", "{model}",
                           fragment="is a binary file"),
    "plan check damaged plans": P("check", "{plans_damaged}", "--model", "{model}",
                                  fragment="incomplete or damaged"),
    "plan check not plans": P("check", "{plans_not}", "--model", "{model}",
                              fragment="not written by python -m dllm.plan search"),
    "plan calibrate --context 0": P("calibrate", "--model", "{model}", "-o", "{out}/c.json",
                                    "--context", "0", fragment="--context must be at least"),
    "plan calibrate --repeats nan": P("calibrate", "--model", "{model}", "-o", "{out}/c.json",
                                      "--repeats", "nan", fragment="invalid int value"),
    "plan search -o on a full disk": P("search", "--model", "{model}", "--profile",
                                       "{profile}", "--population", "4", "--generations", "2",
                                       "-o", "{out}/p.json", disk=True,
                                       fragment="No space left on device",
                                       old={"p.json": "old plans\n"}),

    # under mpirun -n 2: the same contract on every rank
    "mpi: --weights-from root, root refuses the model": G(
        "--model", "{nan_model}", "--weights-from", "root", "--steps", "2", mpi=True,
        fragment="NaN or infinite"),
    "mpi: a pipeline with --weights-from root, root refuses the model": G(
        "--model", "{nan_model}", "--parallel", "pipeline", "--weights-from", "root",
        "--steps", "2", mpi=True, fragment="NaN or infinite"),
    "mpi: a rank refuses its own slices": G("--model", "{nan_model}", "--steps", "2",
                                            mpi=True, fragment="rank 1: "),
    "mpi: --timeout nan": G("--timeout", "nan", mpi=True, fragment="invalid finite number"),
    "mpi: --prompt not UTF-8": G("--prompt", NOT_UTF8, mpi=True,
                                 fragment="--prompt is not valid UTF-8"),
    "mpi: --transcript on a full disk": G("--steps", "4", "--transcript", "{out}/t.json",
                                          mpi=True, disk=True,
                                          fragment="No space left on device",
                                          old={"t.json": "old transcript\n"}),
    "mpi: --stats-json missing folder": G("--stats-json", "{out}/no/s.json", mpi=True,
                                          fragment="does not exist"),
}


# --- running a case ---------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(folder):
    """A 4 MiB tmpfs on folder, or a skip saying why there is none."""
    folder.mkdir(exist_ok=True)
    mount = shutil.which("mount")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                            capture_output=True, text=True) if mount else None
    if result is None or result.returncode != 0:
        pytest.skip("full-disk case: cannot mount a tmpfs here ("
                    f"{result.stderr.strip() if result else 'no mount command'}); run as root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder):
    """Write a filler file until the filesystem has no byte left."""
    with open(folder / "filler", "wb", buffering=0) as f:   # unbuffered: close cannot fail
        block = 65536
        while block:
            try:
                f.write(b"\0" * block)
            except OSError:
                block //= 2


def char_device(path):
    """A character device node like /dev/full (1, 7), made in the test's own folder."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc}); run as root")
    return path


def in_process(prog, argv, monkeypatch):
    """(exit code, stdout, stderr) of prog's main(argv) run here, with an abort raised as
    Aborted and a run past SECONDS as Hung."""
    def abort(self, code=1):
        raise Aborted(code)

    def hung(signum, frame):
        raise Hung()
    monkeypatch.setattr(Comm, "abort", abort)
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = MAINS[prog](argv)
            except SystemExit as exc:
                code = exc.code
            except Aborted:
                code = "aborted"
            except Exception:     # out of a main that has no dllm.cli.run around it
                traceback.print_exc()
                code = "traceback"
    except Hung:
        code = "hung"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def under_mpirun(prog, argv):
    cmd = mpirun_command(2) + [sys.executable, "-m", prog, *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run([os.fsencode(a) for a in cmd], capture_output=True,
                                timeout=MPI_SECONDS, env=env)
    except subprocess.TimeoutExpired:
        return "hung", "", ""
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"))


def digest(path):
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, inputs, tmp_path, monkeypatch):
    case = CASES[name]
    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        if case.disk:
            stack.enter_context(tmpfs(out))
        else:
            out.mkdir()
        for file, text in case.old.items():
            (out / file).write_text(text)
        paths = {**{k: str(v) for k, v in inputs.items()}, "out": str(out),
                 "none": str(tmp_path / "missing.json")}
        if any("{device}" in a for a in case.argv):
            paths["device"] = str(char_device(tmp_path / "full"))
        argv = [a.format(**paths) for a in case.argv]
        before = {k: digest(inputs[k]) for k in case.unchanged}
        if case.disk:
            fill(out)
        started = time.monotonic()
        if case.mpi:
            code, stdout, stderr = under_mpirun(case.prog, argv)
        else:
            if case.stdin is not None:
                monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin),
                                                                   encoding="utf-8"))
            code, stdout, stderr = in_process(case.prog, argv, monkeypatch)
        seconds = time.monotonic() - started
        if case.disk:
            (out / "filler").unlink()
        problems = outcome_problems(case, code, stdout, stderr, seconds)
        for file, text in case.old.items():
            if (out / file).read_text() != text:
                problems.append(f"files: the old {file} was changed")
        if [p.name for p in out.rglob("*.tmp-*")]:
            problems.append("files: a temporary file is left")
        problems += [f"files: {file} was written" for file in case.absent
                     if (out / file).exists()]
        problems += [f"files: the input {key} was changed" for key, blob in before.items()
                     if digest(inputs[key]) != blob]
        if "device" in paths and not stat.S_ISCHR(os.stat(paths["device"]).st_mode):
            problems.append("files: the device node was replaced by a file")
        # The classes first, on the line pytest's summary shows; the details below.
        assert not problems, (f"[{', '.join(p.split(':')[0] for p in problems)}]\n"
                              + "\n".join(problems))


def outcome_problems(case, code, stdout, stderr, seconds):
    """What breaks the contract, each named by its class (the closing note counts them):
    traceback, hang, exit code, error line (not exactly one), wording (the one line lacks
    the fragment), warning."""
    problems = []
    errors = [line for line in stderr.splitlines() if "error:" in line]
    # a command line that does not parse exits 2 (argparse's convention), other errors 1
    usage = case.code == 1 and len(errors) == 1 and errors[0].endswith("(see --help)")
    expected = 2 if usage else case.code
    if "Traceback" in stdout + stderr or code in ("aborted", "traceback"):
        problems.append(f"traceback: {stderr[-800:]}")
    if code == "hung" or seconds >= (MPI_SECONDS if case.mpi else SECONDS):
        problems.append(f"hang: {seconds:.1f} s")
    elif code != expected and code not in ("aborted", "traceback"):
        problems.append(f"exit code: {code}, expected {expected}: {stderr[-800:]}")
    if case.code == 0 and errors:
        problems.append(f"error line: {errors}")
    elif case.code != 0 and not (len(errors) == 1
                                 and errors[0].startswith(f"{case.prog}: error: ")):
        problems.append(f"error line: {errors}")
    elif case.code != 0 and case.fragment not in errors[0]:
        problems.append(f"wording: {errors[0]!r} lacks {case.fragment!r}")
    if case.warning and case.warning not in stderr:
        problems.append(f"warning: {stderr[-800:]}")
    return problems


def test_resume_adopts_the_recorded_parallel_mode(tmp_path):
    """A pipeline run cut after 2 of 6 tokens and resumed without --parallel continues as a
    pipeline (the issue: it went on tensor-parallel and the text differed) and gives the
    uninterrupted run's tokens."""
    full, cut, stats = tmp_path / "full.json", tmp_path / "cut.json", tmp_path / "stats.json"
    _transcript(full, "--parallel", "pipeline", "--steps", "6", "--no-stop")
    record = json.loads(full.read_text())
    assert record["settings"]["parallel"] == "pipeline" and record["version"] == 2
    record.update(token_ids=record["token_ids"][:2], finished=False)
    cut.write_text(json.dumps(record))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert generate.main(["--resume", str(cut), "--quiet", "--stats-json", str(stats)]) == 0
    assert json.loads(stats.read_text())["conditions"]["sync_scheme"] == "pipeline"
    assert json.loads(cut.read_text())["token_ids"] == json.loads(full.read_text())["token_ids"]
