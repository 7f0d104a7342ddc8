"""The input contract of every entry point: flags checked when parsed, paths checked before
any work, and every input file read through one error path that names the file.

Flag values (`check_values`) are checked by dllm.cli.ArgumentParser itself, so that every
command applies the same range to a flag of the same name, on every rank alike (each rank
parses the same argv), before a model loads. Paths (`check_paths`) are root's to check: under
MPI a caller runs it through Comm.from_root. docs/faults.md lists the contract.
"""
import json
import math
import os
from pathlib import Path

from .atomic import replaceable
from .errors import DllmError

SEED_MAX = 2 ** 63 - 1   # numpy's seeds are non-negative; one int64 is plenty

# Bounds (low, high; None = no bound) of every numeric flag, by argparse dest. High bounds
# stop a value that would make a command allocate or loop without end (--ranks 10**9 prints
# a billion rows), not a value that is merely large.
RANGES = {
    "steps": (1, None), "max_seq_len": (1, None), "prefill_chunk": (1, None),
    "temperature": (0, None), "seed": (0, SEED_MAX), "timeout": (0, None),
    "load_timeout": (0, None), "checkpoint_every": (0, None), "shots": (0, None),
    "limit": (1, None), "top": (1, None), "ranks": (1, 4096),
    "layers": (1, 10 ** 4), "prompt_len": (1, None), "decode_tokens": (1, None),
    "warmup": (0, None), "population": (1, 10 ** 5), "generations": (1, 10 ** 5),
    "sequences": (1, 4096), "context": (1, None), "repeats": (1, 10 ** 5),
    "port": (0, 65535), "max_running": (1, 4096), "max_queue": (0, None),
    "kv_blocks": (1, None), "prefill_tokens": (1, None), "max_body": (1024, None),
    "repeat": (1, 10 ** 4),
    "batch": (1, 1 << 20), "seq_len": (1, 1 << 20), "bucket_kb": (1, 1 << 22),
    "val_every": (0, None), "val_windows": (1, 1 << 20), "log_every": (1, None),
}
# --top-p is a probability mass: 0 would keep no token at all.
OPEN_BELOW = {"top_p": (0, 1)}
# Flags holding text for the model, which must be valid UTF-8 (argv bytes that are not
# arrive as lone surrogates and would fail deep inside the tokenizer).
TEXT_FLAGS = ("prompt", "system")
# Files a command writes, and the files it reads: an output must never be one of its inputs
# (dllm.convert X.gguf -o X.gguf would destroy its own source).
OUTPUT_FLAGS = ("output", "out", "stats_json", "transcript", "metrics", "checkpoint")
INPUT_FLAGS = ("model", "source", "tokenizer", "profile", "resume", "plans", "results", "a",
               "b", "text", "val")
# (output, input) pairs that may name the same file: a resumed generation records into
# the transcript it continues.
SAME_FILE_ALLOWED = {("transcript", "resume")}


def flag(dest):
    return "--" + dest.replace("_", "-")


def finite_float(text):
    """argparse type of every float flag: a finite number (nan and inf are refused, never
    taken for "no limit")."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite_float.__name__ = "finite number"   # argparse names the type in its message


def check_values(args):
    """Raise DllmError for the first flag of the parsed `args` outside its range, or text
    that is not UTF-8. Deterministic, so every rank raises alike."""
    values = vars(args)
    for dest, (low, high) in RANGES.items():
        value = values.get(dest)
        if not _is_number(value):
            continue
        if low is not None and value < low:
            raise DllmError(f"{flag(dest)} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise DllmError(f"{flag(dest)} must be at most {high}, got {value}")
    for dest, (low, high) in OPEN_BELOW.items():
        value = values.get(dest)
        if _is_number(value) and not low < value <= high:
            raise DllmError(f"{flag(dest)} must be in ({low}, {high}], got {value}")
    for dest in TEXT_FLAGS:
        if isinstance(values.get(dest), str):
            check_utf8(values[dest], flag(dest))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_utf8(text, what):
    """Refuse a str holding lone surrogates (bytes that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DllmError(f"{what} is not valid UTF-8 text (byte "
                        f"{text[exc.start].encode('utf-8', 'surrogateescape')!r} at "
                        f"character {exc.start})") from None


# --- paths --------------------------------------------------------------------------------
def check_paths(args):
    """Root: every output flag of `args` names a file that can be written (check_output)
    and that is none of the input files."""
    values = vars(args)
    for out in OUTPUT_FLAGS:
        path = values.get(out)
        if not isinstance(path, str):
            continue
        check_output(path, flag(out))
        for source in INPUT_FLAGS:
            for given in _paths(values.get(source)):
                if (out, source) not in SAME_FILE_ALLOWED and same_file(path, given):
                    raise DllmError(f"{flag(out)} {path} is the input {flag(source)} "
                                    f"{given}: the output would destroy it; choose another "
                                    f"file")


def _paths(value):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def same_file(a, b):
    """True when paths a and b name one file (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path, what="output"):
    """Fail before the work, not after it, when `path` cannot be written: a folder, a device
    or other non-regular file (dllm replaces its outputs whole, it never writes into a
    device), or a folder that is missing or not writable."""
    if os.path.isdir(path):
        raise DllmError(f"{what} {path} is a directory; give a file name")
    target, _ = replaceable(path, f"{what} {path}:")
    folder = target.parent
    if not folder.is_dir():
        raise DllmError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DllmError(f"{what} {path}: the folder {folder} is not writable")


# --- reading input files ------------------------------------------------------------------
def read_file(path, what="file", text=True):
    """The contents of an input file (str when text, else bytes). DllmError naming the file
    when it is missing, a folder, unreadable, not UTF-8 or binary (text only)."""
    path = Path(path)
    if path.is_dir():
        raise DllmError(f"{what} {path} is a directory, not a file")
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DllmError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise DllmError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if not text:
        return blob
    if b"\0" in blob:
        raise DllmError(f"{what} {path} is a binary file, not text")
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DllmError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None


def read_json(path, what="file"):
    """A JSON input file, through read_file; a truncated or damaged one is named."""
    try:
        return json.loads(read_file(path, what))
    except json.JSONDecodeError as exc:
        raise DllmError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}: "
                        f"truncated or damaged?)") from None


def parse_json(text, where):
    """One JSON document from text read by read_file (a line of a JSON-lines file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DllmError(f"{where} is not a JSON line (truncated or damaged?)") from None
