"""The one way dllm writes a file: whole or not at all.

Every output (transcripts, results and stats JSON, bench and plan records, profiles, plans,
model files) is written to a temporary file beside its target, flushed to disk (fsync),
renamed over the target and the folder synced: a crash, a power loss, a full disk or an I/O
error at any moment leaves the old file or the new one whole, never half of one, and the
temporary file is removed on every way out but SIGKILL (remove_stale_temporaries cleans up
after that). A write that fails is one DllmError line saying the old file is unchanged.
"""
import json
import os
import re
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import DllmError


# Interrupts whose exception may have been swallowed: a signal handler's raise that lands in
# a weakref callback or a __del__ is only printed by Python, and the write would go on to its
# rename. replacing checks here before it renames (and raises it then).
_pending_interrupts = []


def _unraisable_unless_recorded(unraisable):
    """sys.unraisablehook while interrupts are recorded: a recorded interrupt swallowed in a
    finalizer is raised again where the write checks, so Python's "Exception ignored" and
    its traceback are not printed for it; anything else is printed as always."""
    if not any(unraisable.exc_value is exc for exc in _pending_interrupts):
        _hook_before[-1](unraisable)


_hook_before = []       # the unraisablehook that _unraisable_unless_recorded stands in for


def interrupted(exc):
    """Record an interrupt (a signal handler calls this, then raises exc itself); None forgets
    those recorded (when the command that caught them has ended)."""
    if exc is None:
        _pending_interrupts.clear()
        if sys.unraisablehook is _unraisable_unless_recorded:
            sys.unraisablehook = _hook_before.pop()
    else:
        _pending_interrupts.append(exc)
        if sys.unraisablehook is not _unraisable_unless_recorded:
            _hook_before.append(sys.unraisablehook)
            sys.unraisablehook = _unraisable_unless_recorded


def temporary_path(path, pid=None):
    """Where `path` is written before the rename: .NAME.tmp-PID beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


@contextmanager
def replacing(path):
    """Yield the temporary path to write the new contents of `path` to (by any means: open,
    h5py); when the block ends, make it durable and rename it over `path`.

    A symbolic link is followed (its target is replaced, the link kept). An existing target
    that is not a regular file (/dev/full, a pipe) is refused: a rename would replace the
    device node itself. OSError (ENOSPC, EIO, EACCES) becomes a DllmError."""
    target, exists = replaceable(path, f"cannot write {path}:")
    tmp = temporary_path(target)
    try:
        yield tmp
        if _pending_interrupts:
            raise _pending_interrupts[0]
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise DllmError(f"cannot write {path}: {reason(exc)}; "
                        f"{'the old file is unchanged' if exists else 'nothing written'}") from None
    finally:
        _remove(tmp)
    _fsync_folder(target.parent)


def replaceable(path, what):
    """(the file a write of `path` replaces, whether it exists): a symbolic link's target.
    DllmError, beginning with `what`, when it exists and is not a regular file."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target, False
    except OSError as exc:
        raise DllmError(f"{what} {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DllmError(f"{what} it is not a regular file (a device, pipe, socket or folder); "
                        f"dllm writes its outputs as files")
    return target, True


def write_bytes(path, data):
    """Replace `path` with `data` (bytes) atomically."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, data):
    """Replace `path` with `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def append_line(path, line):
    """Add one line to a JSON-lines file, atomically: the file is rewritten whole, because
    an append that hits a full disk leaves half a line that spoils the file."""
    append_lines(path, [line])


def append_lines(path, lines):
    """Add lines to a JSON-lines file in one atomic rewrite (one fsync for all of them)."""
    try:
        old = Path(path).read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as exc:
        raise DllmError(f"cannot append to {path}: {reason(exc)}") from None
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes(path, old + "".join(line + "\n" for line in lines).encode("utf-8"))


def reason(exc):
    """One line for an OSError: its errno's text (HDF5 puts the errno inside a message of
    several lines), else the message's first line."""
    number = exc.errno
    if number is None:
        found = re.search(r"errno = (\d+)", str(exc))
        number = int(found.group(1)) if found else None
    if number:
        return os.strerror(number)
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_folder(folder):
    """Make a rename in `folder` durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Delete the .NAME.tmp-PID files beside `path` whose process no longer runs (a writer
    killed with SIGKILL, or a machine that went down, cannot clean up after itself);
    returns the paths removed. A file of a running process (this one included) is kept."""
    path = Path(os.path.realpath(path))
    prefix = temporary_path(path, "")
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix.name):]
        if tmp.name.startswith(prefix.name) and pid.isdigit() and not _running(int(pid)):
            try:
                tmp.unlink()
            except FileNotFoundError:   # another writer removed it first
                continue
            removed.append(tmp)
    return removed


def _running(pid):
    try:
        os.kill(pid, 0)                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):   # another user's process; not a PID at all
        return True
    return True
