"""The watchdog: one thread per rank that turns a hang into a named report and an abort.

With plain MPI a rank that stops (SIGSTOP, a laptop asleep, a hung NFS read) or dies leaves
the others blocked in a collective forever. Each rank's watchdog thread wakes every PERIOD
seconds and looks at what the main thread waits in (``Comm.activity``):

- a wait longer than the limit (``--load-timeout`` while the model loads, ``--timeout``
  after), or
- SIGUSR1, which MPICH's launcher sends to the survivors when a process of the job dies
  (under ``mpirun -disable-auto-cleanup``; by default it kills them at once instead)

starts an inquiry: the watchdog pings every other rank over the control channel (a duplicate
communicator, so the engine's messages are never touched) and collects answers for GRACE
seconds. A live rank answers even while its main thread computes or waits (the thread runs
beside it). The lowest rank that inquires (root, when it waits too) prints one line naming the ranks that did not answer, with what their host says of them when they run
on its host (stopped, process gone), and what the others were doing; it then kills the silent
processes on its own host and calls MPI_Abort, which ends every rank with EXIT_CODE. After a
SIGUSR1 that every rank answers (not a failure: SLURM's warning signal, say) nothing happens.

The wait limits bound one call, not a token: in a tensor-parallel step every rank makes the
same calls, so a healthy wait lasts as long as the slowest rank's share of one layer.
"""
import os
import select
import signal
import socket
import sys
import threading
import time

from .output import FLUSH_SECONDS, end_output

EXIT_CODE = 75          # EX_TEMPFAIL: the job may succeed if run again (resume it)
PERIOD = 0.2            # seconds between looks at the main thread
GRACE = 3.0             # seconds to wait for the other ranks' answers
PING, PONG = 1, 2       # control-channel tags
DEFAULT_TIMEOUT = 60.0
DEFAULT_LOAD_TIMEOUT = 600.0


class Watchdog:
    """Watch `comm` (a dllm Comm of more than one rank) on behalf of the entry point `prog`.

    Collective to create (it opens the control channel and learns every rank's host and
    pid); start() from the main thread (it installs the SIGUSR1 handler); stop() before MPI
    is finalized. `hint` (set by the entry point) ends the report: how to continue the work.
    """

    def __init__(self, comm, prog, timeout=DEFAULT_TIMEOUT, load_timeout=DEFAULT_LOAD_TIMEOUT):
        self.comm, self.prog = comm, prog
        self.timeout, self.load_timeout = timeout, load_timeout
        self.loading = True
        self.hint = None
        self.host = socket.gethostname()
        self.peers = comm.allgather((self.host, os.getpid()))     # [(host, pid)] by rank
        comm.open_control()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dllm-watchdog", daemon=True)
        self._wake_read, self._wake_write = socket.socketpair()
        self._previous = None
        self.inquiring = False

    # --- the entry point's side ---------------------------------------------------------
    def start(self):
        for end in (self._wake_read, self._wake_write):
            end.setblocking(False)
        if threading.current_thread() is threading.main_thread():
            # A Python handler of its own makes the C handler write the signal number to the
            # wakeup socket at once, even while the main thread is blocked inside MPI.
            self._previous = (signal.signal(signal.SIGUSR1, _ignore),
                              signal.set_wakeup_fd(self._wake_write.fileno(),
                                                   warn_on_full_buffer=False))
        self._thread.start()
        return self

    def loaded(self):
        """The model is loaded: waits are held to --timeout from now on."""
        self.loading = False

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._previous is not None:
            handler, fd = self._previous
            signal.signal(signal.SIGUSR1, handler)
            signal.set_wakeup_fd(fd)
            self._previous = None
        self._wake_read.close()
        self._wake_write.close()

    @property
    def limit(self):
        return self.load_timeout if self.loading else self.timeout

    # --- the thread -----------------------------------------------------------------------
    def _run(self):
        while not self._stop.is_set():
            readable, _, _ = select.select([self._wake_read], [], [], PERIOD)
            failure_signal = readable and signal.SIGUSR1 in self._drain_wakeups()
            self._answer(self.comm.control_receive())
            waiting = self.comm.activity.waiting
            overdue = (waiting is not None and waiting.bounded and self.limit is not None
                       and time.monotonic() - waiting.since > self.limit)
            if failure_signal or overdue:
                self._inquire("signal" if failure_signal else "timeout")

    def _drain_wakeups(self):
        numbers = b""
        try:
            while True:
                numbers += self._wake_read.recv(64)
        except BlockingIOError:
            pass
        return set(numbers)

    def _answer(self, messages, replies=None):
        """Answer pings with this rank's state; record every message's state in replies
        (a ping carries its sender's state too)."""
        for source, tag, state in messages:
            if tag == PING:
                self.comm.control_send(self._state(), source, PONG)
            if replies is not None:
                replies[source] = state

    def _state(self):
        a, now = self.comm.activity, time.monotonic()
        waiting = a.waiting
        return {"seq": a.seq, "inquiring": self.inquiring,
                "waiting": None if waiting is None else (waiting.what, now - waiting.since),
                "since_last_call": now - a.last_return}

    def _inquire(self, cause):
        """Ask every rank how it is; if some are lost (or a wait is overdue), report and
        abort the job. Returns only when nothing is wrong."""
        comm = self.comm
        self.inquiring = True
        mine = self._state()
        replies = {comm.rank: mine}
        for rank in range(comm.size):
            if rank != comm.rank:
                comm.control_send(mine, rank, PING)
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and len(replies) < comm.size:
            self._answer(comm.control_receive(), replies)
            time.sleep(0.02)
        silent = [r for r in range(comm.size) if r not in replies]
        overdue = any(s["waiting"] is not None and s["waiting"][1] > self.limit
                      for s in replies.values()) if self.limit is not None else False
        if not silent and not overdue:
            self.inquiring = False   # a false alarm: everyone answers, nobody waits too long
            return
        reporter = min(r for r, s in replies.items() if s["inquiring"])
        end_output()             # root's text ends its line before any report or banner
        if comm.rank == reporter:
            print(f"{self.prog}: error: {self.report(cause, replies, silent)}",
                  file=sys.stderr, flush=True)
            # The launcher forwards our stderr asynchronously and an abort tears the job down
            # at once: give it a moment, or the line is lost (seen under load).
            time.sleep(FLUSH_SECONDS)
            self._kill_local(silent)
            comm.abort(EXIT_CODE)
        time.sleep(2 * GRACE)    # the reporter's abort ends this process; if it does not:
        end_output()
        comm.abort(EXIT_CODE)

    def report(self, cause, replies, silent):
        """The one line that says what happened (see module docstring)."""
        parts = []
        for rank in silent:
            host, pid = self.peers[rank]
            parts.append(f"rank {rank} (pid {pid} on {host}) {self._fate(host, pid, cause)}")
        waiting = sorted(r for r, s in replies.items() if s["waiting"] is not None)
        busy = sorted(r for r, s in replies.items() if s["waiting"] is None)
        if waiting:
            longest = max(replies[r]["waiting"][1] for r in waiting)
            what = replies[waiting[0]]["waiting"][0]
            if cause == "timeout":
                parts.append(f"{_ranks(waiting)} waited in MPI ({what}) for up to "
                             f"{longest:.1f} s (limit {self.limit:g} s, "
                             f"--{'load-' if self.loading else ''}timeout)")
            else:
                parts.append(f"{_ranks(waiting)} {'was' if len(waiting) == 1 else 'were'} "
                             f"waiting in MPI ({what})")
        for rank in busy:
            parts.append(f"rank {rank} was computing, {replies[rank]['since_last_call']:.0f} s "
                         f"after its last call")
        message = "; ".join(parts) + "; aborting every rank"
        if self.hint:
            message += f"; {self.hint}"
        return message

    def _fate(self, host, pid, cause):
        if host == self.host:
            state = _process_state(pid)
            if state is None or state == "Z":
                return "died (its process is gone)"
            if state in "Tt":
                return "is stopped (SIGSTOP or a debugger) and does not answer"
            return f"is alive (state {state}) but does not answer"
        if cause == "signal":
            return "died (the MPI launcher reported a failed process; it does not answer)"
        return f"does not answer within {GRACE:.0f} s (stopped, dead, or its host unreachable)"

    def _kill_local(self, ranks):
        """SIGKILL silent ranks on this host: a launcher that does not clean up after an
        abort (mpirun -disable-auto-cleanup) would otherwise wait for them forever."""
        for rank in ranks:
            host, pid = self.peers[rank]
            if host == self.host and pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _ignore(signum, frame):
    """SIGUSR1's Python handler: the watchdog reads the signal from its wakeup socket."""


def _process_state(pid):
    """The state letter of a local process (R, S, D, T, t, Z...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"


def _ranks(ranks):
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
