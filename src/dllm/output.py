"""Root's output on the terminal: everything user-facing is printed through root_print, so
that before an abort end_output can finish root's line of generated text and flush both
streams (the watchdog and the entry points both abort)."""
import sys

FLUSH_SECONDS = 1.0     # between the last line and an abort (cli.abort_job, the watchdog)

_stdout_mid_line = False   # root's text on stdout does not end with a newline yet


def root_print(comm, *args, **kwargs):
    """Print on root only (all user-facing output goes through here)."""
    global _stdout_mid_line
    if comm.is_root:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
        text = kwargs.get("sep", " ").join(map(str, args)) + kwargs.get("end", "\n")
        if kwargs.get("file") in (None, sys.stdout) and text:
            _stdout_mid_line = not text.endswith("\n")


def end_output():
    """Before an abort: end root's text with a newline and flush both streams, so that the
    error line arrives (MPI_Abort kills the process with whatever is still buffered) and
    the launcher's own banner does not land inside the generated text."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is sys.stdout and _stdout_mid_line:
                stream.write("\n")
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can arrive anyway
            pass
