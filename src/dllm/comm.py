"""The one module that imports mpi4py.MPI: collectives, timing and byte counting.

Bulk data moves through buffer-based (upper-case) collectives; pickled calls carry only small
control messages. Every call that moves activations adds the seconds it spent and the payload
bytes it moved to ``self.stats``, which is how per-token sync time and bytes are measured.
On ``COMM_SELF`` every collective is an identity, so the whole engine runs in plain pytest.
"""
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .errors import DllmError

POLL_SLEEP = 1e-4   # seconds between polls of a patient receive (recv_bytes spin=...)


@dataclass
class CommStats:
    """Running totals on this rank: seconds inside collectives and payload bytes."""
    sync_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def snapshot(self):
        return CommStats(self.sync_seconds, self.bytes_sent, self.bytes_received, self.calls)

    def since(self, earlier):
        return CommStats(self.sync_seconds - earlier.sync_seconds,
                         self.bytes_sent - earlier.bytes_sent,
                         self.bytes_received - earlier.bytes_received,
                         self.calls - earlier.calls)


class Comm:
    """A communicator with the handful of collectives the engine needs.

    `mpi_comm` is an mpi4py communicator (default COMM_WORLD). Rank 0 is root.
    """

    def __init__(self, mpi_comm=None):
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.stats = CommStats()

    @classmethod
    def wrap(cls, comm):
        """Accept None (COMM_WORLD), an mpi4py communicator, or a Comm."""
        return comm if isinstance(comm, Comm) else cls(comm)

    @classmethod
    def self_comm(cls):
        return cls(MPI.COMM_SELF)

    @property
    def is_root(self):
        return self.rank == 0

    def _count(self, seconds, sent, received):
        self.stats.sync_seconds += seconds
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        self.stats.calls += 1

    # --- activations -------------------------------------------------------------------
    def allgather_slices(self, local, exchange, out=None):
        """Every rank passes its (T, width) float32 slice; every rank gets (T, total)."""
        T = local.shape[0]
        sendbuf = exchange.pack(local, self.rank)
        counts, displs = exchange.counts(T)
        received = np.empty(sum(counts), dtype=np.uint8)
        start = time.perf_counter()
        self.mpi.Allgatherv(sendbuf, [received, counts, displs, MPI.BYTE])
        self._count(time.perf_counter() - start,
                    exchange.bytes_sent(self.rank, T), exchange.bytes_received(self.rank, T))
        return exchange.unpack(received, T, out)

    def alltoall_chunks(self, full, exchange):
        """Reduce-scatter's first half: column chunk c of every rank's (T, total) array goes
        to rank c. Returns (size, T, width of this rank's chunk) float32, in rank order."""
        T = full.shape[0]
        pieces = [exchange.pack(full[:, exchange.offsets[c]:exchange.offsets[c + 1]], c)
                  for c in range(self.size)]
        send_counts = [len(p) for p in pieces]
        send_displs = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).astype(int).tolist()
        mine = T * exchange.row_bytes[self.rank]
        recv_counts = [mine] * self.size
        recv_displs = [r * mine for r in range(self.size)]
        received = np.empty(mine * self.size, dtype=np.uint8)
        sendbuf = np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
        start = time.perf_counter()
        self.mpi.Alltoallv([sendbuf, send_counts, send_displs, MPI.BYTE],
                           [received, recv_counts, recv_displs, MPI.BYTE])
        self._count(time.perf_counter() - start, sum(send_counts) - send_counts[self.rank],
                    mine * (self.size - 1))
        width = exchange.widths[self.rank]
        one = type(exchange)([width] * self.size, exchange.payload)
        return one.unpack(received, T).reshape(T, self.size, width).transpose(1, 0, 2)

    def bcast_array(self, array):
        """Root's array -> every rank (same shape and dtype preallocated on all ranks)."""
        start = time.perf_counter()
        self.mpi.Bcast(array, root=0)
        n = array.nbytes
        self._count(time.perf_counter() - start,
                    n * (self.size - 1) if self.is_root else 0, 0 if self.is_root else n)
        return array

    def gather_rows(self, local, widths):
        """(T, widths[rank]) float32 slices -> (T, sum(widths)) on root, None elsewhere."""
        T = local.shape[0]
        local = np.ascontiguousarray(local, dtype=np.float32)
        counts = [T * w for w in widths]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        received = np.empty(sum(counts) if self.is_root else 0, dtype=np.float32)
        start = time.perf_counter()
        self.mpi.Gatherv(local, [received, counts, displs, MPI.FLOAT] if self.is_root else None,
                         root=0)
        mine = local.nbytes
        self._count(time.perf_counter() - start, 0 if self.is_root else mine,
                    4 * sum(counts) - mine if self.is_root else 0)
        if not self.is_root:
            return None
        # Gatherv lays slices out rank after rank; put each rank's columns in place.
        out = np.empty((T, sum(widths)), dtype=np.float32)
        col = 0
        for r, w in enumerate(widths):
            out[:, col:col + w] = received[displs[r]:displs[r] + counts[r]].reshape(T, w)
            col += w
        return out

    # --- point to point, for the pipeline (activations rank to rank) --------------------
    def isend_bytes(self, buf, dest, tag=0):
        """Start sending uint8 `buf` to `dest`; returns the request (pass it to wait before
        touching buf again). Counts buf's bytes as sent."""
        start = time.perf_counter()
        request = self.mpi.Isend(buf, dest=dest, tag=tag)
        self._count(time.perf_counter() - start, buf.nbytes, 0)
        return request

    def send_bytes(self, buf, dest, tag=0):
        """Blocking send of uint8 `buf` to `dest`; counts its bytes as sent."""
        start = time.perf_counter()
        self.mpi.Send(buf, dest=dest, tag=tag)
        self._count(time.perf_counter() - start, buf.nbytes, 0)

    def recv_bytes(self, buf, source, tag=0, spin=None):
        """Receive one message from `source` into uint8 `buf` (at least the message's size);
        returns its size in bytes, counted as received. The seconds include waiting for it.

        spin: None waits in MPI's Recv (which polls a core at full speed); else poll that
        many seconds, then sleep between polls, so that a rank with nothing to do leaves the
        core to ranks that work (pipeline stages waiting for their turn on shared cores)."""
        status = MPI.Status()
        start = time.perf_counter()
        if spin is None:
            self.mpi.Recv(buf, source=source, tag=tag, status=status)
        else:
            request = self.mpi.Irecv(buf, source=source, tag=tag)
            while not request.Test(status):
                if time.perf_counter() - start > spin:
                    time.sleep(POLL_SLEEP)
        n = status.Get_count(MPI.BYTE)
        self._count(time.perf_counter() - start, 0, n)
        return n

    def wait(self, request):
        """Complete a request from isend_bytes (None: nothing to wait for)."""
        if request is not None:
            start = time.perf_counter()
            request.Wait()
            self._count(time.perf_counter() - start, 0, 0)

    def test(self, request):
        """True when a request from isend_bytes has completed (never blocks)."""
        return request.Test()

    def split(self, color, key):
        """A Comm of the ranks passing the same color, ordered by key; None for color None
        (collective over this communicator)."""
        sub = self.mpi.Split(MPI.UNDEFINED if color is None else color, key)
        return None if sub == MPI.COMM_NULL else Comm(sub)

    # --- point to point, for --weights-from root ---------------------------------------
    def send_array(self, array, dest, tag=0):
        self.mpi.Send(np.ascontiguousarray(array), dest=dest, tag=tag)

    def recv_array(self, shape, dtype, source=0, tag=0):
        array = np.empty(shape, dtype=dtype)
        self.mpi.Recv(array, source=source, tag=tag)
        return array

    # --- control messages --------------------------------------------------------------
    def bcast(self, obj):
        return self.mpi.bcast(obj, root=0)

    def gather(self, obj):
        return self.mpi.gather(obj, root=0)

    def allgather(self, obj):
        return self.mpi.allgather(obj)

    def barrier(self):
        self.mpi.Barrier()

    def idle_barrier(self, poll=0.005):
        """A barrier that sleeps while it waits (MPI's spins), leaving the cores to the ranks
        that work, e.g. to root while it runs a model alone."""
        request = self.mpi.Ibarrier()
        while not request.Test():
            time.sleep(poll)

    def agree(self, fn, *args, **kwargs):
        """Run fn on every rank; if it raises DllmError on any rank, raise on all ranks
        (root's message first, else the lowest failing rank's, named)."""
        try:
            result, error = fn(*args, **kwargs), None
        except DllmError as exc:
            result, error = None, str(exc)
        errors = self.mpi.allgather(error)
        for rank, message in enumerate(errors):
            if message is not None:
                raise DllmError(message if rank == 0 else f"rank {rank}: {message}")
        return result

    def from_root(self, fn, *args, **kwargs):
        """Run fn on root only and broadcast its result; a DllmError there is raised on all
        ranks."""
        return self._on_root(True, fn, *args, **kwargs)

    def root_only(self, fn, *args, **kwargs):
        """Run fn on root only; its result stays on root (None elsewhere), a DllmError there
        is raised on all ranks."""
        return self._on_root(False, fn, *args, **kwargs)

    def _on_root(self, share, fn, *args, **kwargs):
        result, error = None, None
        if self.is_root:
            try:
                result = fn(*args, **kwargs)
            except DllmError as exc:
                error = str(exc)
        error, shared = self.mpi.bcast((error, result if share else None), root=0)
        if error is not None:
            raise DllmError(error)
        return result if self.is_root else shared

    def processor_name(self):
        return MPI.Get_processor_name()

    def abort(self, code=1):
        self.mpi.Abort(code)
