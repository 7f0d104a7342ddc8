"""The one module that imports mpi4py.MPI: collectives, timing and byte counting.

Bulk data moves through buffer-based (upper-case) collectives; pickled calls carry only small
control messages. Every call that moves activations adds the seconds it spent and the payload
bytes it moved to ``self.stats``, which is how per-token sync time and bytes are measured.
On ``COMM_SELF`` every collective is an identity, so the whole engine runs in plain pytest.

Every call that can wait on other ranks records what it waits in (``Comm.waiting``: a
sequence number, the MPI call and since when), so that the watchdog thread (dllm.watchdog)
can tell a hang from a slow step; the watchdog talks to the other ranks' watchdogs over a
duplicate communicator of its own (the control channel), never on the engine's.
"""
import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .errors import DllmError
from .sync import displacements

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


@dataclass(frozen=True)
class Waiting:
    """What a rank's main thread is blocked in: replaced whole, so another thread reads it
    consistently. bounded=False: the wait may legitimately last forever (a chat turn)."""
    seq: int          # calls that could wait, counted on this rank (the same on every rank
    what: str         # of a tensor-parallel run: they all make the same calls)
    since: float      # time.monotonic() when the call began
    bounded: bool = True


class Activity:
    """What the main thread of this rank is doing, as the watchdog thread reads it."""

    def __init__(self):
        self.seq = 0
        self.waiting = None           # a Waiting while inside a call that can wait, else None
        self.last_return = time.monotonic()
        self.unbounded = 0


class Comm:
    """A communicator with the handful of collectives the engine needs.

    `mpi_comm` is an mpi4py communicator (default COMM_WORLD). Rank 0 is root.
    """

    def __init__(self, mpi_comm=None):
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.stats = CommStats()
        self.activity = Activity()    # shared with communicators split from this one
        self.watchdog = None          # a dllm.watchdog.Watchdog when an entry point runs one
        self._control = None          # the watchdogs' communicator (open_control)
        self._control_sends = []

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

    def _begin(self, what):
        """Mark the start of a call that waits on other ranks; returns perf_counter()."""
        a = self.activity
        a.seq += 1
        a.waiting = Waiting(a.seq, what, time.monotonic(), not a.unbounded)
        return time.perf_counter()

    def _end(self):
        self.activity.waiting = None
        self.activity.last_return = time.monotonic()

    @contextmanager
    def unbounded(self):
        """Calls inside may wait without limit (root waiting for a person to type)."""
        self.activity.unbounded += 1
        try:
            yield
        finally:
            self.activity.unbounded -= 1

    def _count(self, seconds, sent, received):
        self._end()
        self.stats.sync_seconds += seconds
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        self.stats.calls += 1

    # --- activations -------------------------------------------------------------------
    def allgather_slices(self, local, exchange, out=None, as_input=None):
        """Every rank passes its (T, width) float32 slice; every rank gets (T, total)
        float32, or, given as_input (a kernels object), that kernels' matmul input of it
        (exchange.unpack_input)."""
        T = local.shape[0]
        sendbuf = exchange.pack(local, self.rank)
        counts, displs = exchange.counts(T)
        received = np.empty(sum(counts), dtype=np.uint8)
        start = self._begin("Allgatherv")
        self.mpi.Allgatherv(sendbuf, [received, counts, displs, MPI.BYTE])
        self._count(time.perf_counter() - start,
                    exchange.bytes_sent(self.rank, T), exchange.bytes_received(self.rank, T))
        if as_input is not None:
            return exchange.unpack_input(received, T, as_input)
        return exchange.unpack(received, T, out)

    def alltoall_chunks(self, full, exchange):
        """Reduce-scatter's first half: column chunk c of every rank's (T, total) array goes
        to rank c. Returns (size, T, width of this rank's chunk) float32, in rank order."""
        T = full.shape[0]
        pieces = [exchange.pack(full[:, exchange.offsets[c]:exchange.offsets[c + 1]], c)
                  for c in range(self.size)]
        send_counts = [len(p) for p in pieces]
        send_displs = displacements(send_counts)
        mine = T * exchange.row_bytes[self.rank]
        recv_counts = [mine] * self.size
        recv_displs = [r * mine for r in range(self.size)]
        received = np.empty(mine * self.size, dtype=np.uint8)
        sendbuf = np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
        start = self._begin("Alltoallv")
        self.mpi.Alltoallv([sendbuf, send_counts, send_displs, MPI.BYTE],
                           [received, recv_counts, recv_displs, MPI.BYTE])
        self._count(time.perf_counter() - start, sum(send_counts) - send_counts[self.rank],
                    mine * (self.size - 1))
        width = exchange.widths[self.rank]
        one = type(exchange)([width] * self.size, exchange.payload, exchange.codec)
        return one.unpack(received, T).reshape(T, self.size, width).transpose(1, 0, 2)

    # --- the star around root (scheme "star": Distributed Llama 0.1) -----------------
    def bcast_rows(self, x, exchange, T):
        """Root's (T, width) float32 x -> every rank, rounded to the payload (root too).
        exchange: a SliceExchange of one slice, [width]; x is ignored off root. Root sends
        each rank its own copy (a Scatterv of copies, not MPI's Bcast tree, whose inner
        ranks would pass it on), so that every byte crosses root's link, as in the paper's
        star; counted as root sending the payload to each other rank."""
        n = T * exchange.row_bytes[0]
        counts = [0] + [n] * (self.size - 1)
        sendbuf = None
        if self.is_root:
            payload = exchange.pack(x, 0)
            sendbuf = [np.tile(payload, self.size - 1), counts, displacements(counts), MPI.BYTE]
        received = np.empty(0 if self.is_root else n, dtype=np.uint8)
        start = self._begin("Scatterv")
        self.mpi.Scatterv(sendbuf, received, root=0)
        self._count(time.perf_counter() - start, sum(counts) if self.is_root else 0,
                    0 if self.is_root else n)
        return exchange.unpack(payload if self.is_root else received, T)

    def gather_slices(self, local, exchange):
        """Every rank's (T, widths[rank]) float32 slice -> (T, total) on root, rounded to
        the payload (root's own slice too); None elsewhere."""
        received, _ = self._gather_payloads(local, exchange)
        return exchange.unpack(received, local.shape[0]) if self.is_root else None

    def allgather_through_root(self, local, exchange):
        """An Allgather of (T, widths[rank]) slices relayed by root: Gatherv of every slice
        to root, then Scatterv to each other rank of the slices of every rank but its own.
        Every rank gets (T, total), decoded from the same bytes."""
        received, mine = self._gather_payloads(local, exchange)
        T = local.shape[0]
        counts, displs = exchange.counts(T)
        total = sum(counts)
        others = [total - counts[r] for r in range(self.size)]      # bytes rank r lacks
        others[0] = 0
        if self.is_root:    # for rank r: the payload buffer without rank r's segment
            sendbuf = np.concatenate(
                [np.delete(received, np.s_[displs[r]:displs[r] + counts[r]])
                 for r in range(1, self.size)] or [np.empty(0, np.uint8)])
        else:
            sendbuf = None
        lacking = np.empty(others[self.rank], dtype=np.uint8)
        start = self._begin("Scatterv")
        self.mpi.Scatterv([sendbuf, others, displacements(others), MPI.BYTE] if self.is_root
                          else None, lacking, root=0)
        self._count(time.perf_counter() - start, sum(others) if self.is_root else 0,
                    others[self.rank])
        if not self.is_root:
            a = displs[self.rank]
            received = np.concatenate([lacking[:a], mine, lacking[a:]])
        return exchange.unpack(received, T)

    def _gather_payloads(self, local, exchange):
        """Gatherv of every rank's payload of (T, width) `local`: root gets the payloads in
        rank order (its own included), the others an empty buffer. Returns (that buffer,
        this rank's payload)."""
        T = local.shape[0]
        sendbuf = exchange.pack(local, self.rank)
        counts, displs = exchange.counts(T)
        received = np.empty(sum(counts) if self.is_root else 0, dtype=np.uint8)
        start = self._begin("Gatherv")
        self.mpi.Gatherv(sendbuf, [received, counts, displs, MPI.BYTE] if self.is_root
                         else None, root=0)
        self._count(time.perf_counter() - start, 0 if self.is_root else counts[self.rank],
                    sum(counts) - counts[0] if self.is_root else 0)
        return received, sendbuf

    def bcast_array(self, array):
        """Root's array -> every rank (same shape and dtype preallocated on all ranks)."""
        start = self._begin("Bcast")
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
        displs = displacements(counts)
        received = np.empty(sum(counts) if self.is_root else 0, dtype=np.float32)
        start = self._begin("Gatherv")
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

    # --- sums over the ranks, for training (dllm.train) ----------------------------------
    def allreduce_sum(self, array):
        """Every rank's float array summed elementwise, on every rank (a new array).

        Bytes are counted as a ring all-reduce moves them (reduce-scatter then allgather):
        2 (n-1)/n of the array sent and as much received by each rank (ring_bytes)."""
        out = np.ascontiguousarray(array).copy()
        if self.size == 1:
            return out
        start = self._begin("Allreduce")
        self.mpi.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        moved = ring_bytes(out.nbytes, self.size)
        self._count(time.perf_counter() - start, moved, moved)
        return out

    def iallreduce_sum(self, buf):
        """Start summing the contiguous float array `buf` over the ranks, in place; returns
        the request (None on one rank). Bytes counted as allreduce_sum counts them."""
        if self.size == 1:
            return None
        start = self._begin("Iallreduce")
        request = self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        moved = ring_bytes(buf.nbytes, self.size)
        self._count(time.perf_counter() - start, moved, moved)
        return request

    def ialltoallv_bytes(self, sendbuf, send_counts, recvbuf, recv_counts):
        """Start an Alltoallv of uint8 buffers: send_counts[c] bytes of sendbuf (in rank
        order) to rank c, recv_counts[c] bytes from rank c into recvbuf. Counts the bytes
        leaving and arriving from other ranks."""
        send_displs, recv_displs = displacements(send_counts), displacements(recv_counts)
        start = self._begin("Ialltoallv")
        request = self.mpi.Ialltoallv([sendbuf, send_counts, send_displs, MPI.BYTE],
                                      [recvbuf, recv_counts, recv_displs, MPI.BYTE])
        self._count(time.perf_counter() - start, sum(send_counts) - send_counts[self.rank],
                    sum(recv_counts) - recv_counts[self.rank])
        return request

    def iallgatherv_bytes(self, sendbuf, recvbuf, counts):
        """Start an Allgatherv of uint8 buffers: rank r's counts[r] bytes to every rank, in
        rank order in recvbuf. Bytes counted as allgather_slices counts them (a rank's payload
        once per receiver)."""
        start = self._begin("Iallgatherv")
        request = self.mpi.Iallgatherv(sendbuf, [recvbuf, counts, displacements(counts), MPI.BYTE])
        mine = counts[self.rank]
        self._count(time.perf_counter() - start, mine * (self.size - 1), sum(counts) - mine)
        return request

    def wait_all(self, requests, what="Waitall"):
        """Complete the non-blocking collectives `requests` (None entries are done)."""
        pending = [r for r in requests if r is not None]
        if pending:
            start = self._begin(what)
            MPI.Request.Waitall(pending)
            self._count(time.perf_counter() - start, 0, 0)

    def test_all(self, requests):
        """True when every request has completed; drives MPI's progress (never blocks)."""
        pending = [r for r in requests if r is not None]
        if not pending:
            return True
        start = self._begin("Testall")
        done = MPI.Request.Testall(pending)
        self._count(time.perf_counter() - start, 0, 0)
        return done

    # --- point to point, for the pipeline (activations rank to rank) --------------------
    def isend_bytes(self, buf, dest, tag=0):
        """Start sending uint8 `buf` to `dest`; returns the request (pass it to wait before
        touching buf again). Counts buf's bytes as sent."""
        start = self._begin(f"Isend to rank {dest}")
        request = self.mpi.Isend(buf, dest=dest, tag=tag)
        self._count(time.perf_counter() - start, buf.nbytes, 0)
        return request

    def send_bytes(self, buf, dest, tag=0):
        """Blocking send of uint8 `buf` to `dest`; counts its bytes as sent."""
        start = self._begin(f"Send to rank {dest}")
        self.mpi.Send(buf, dest=dest, tag=tag)
        self._count(time.perf_counter() - start, buf.nbytes, 0)

    def recv_bytes(self, buf, source, tag=0, spin=None):
        """Receive one message from `source` into uint8 `buf` (at least the message's size);
        returns its size in bytes, counted as received. The seconds include waiting for it.

        spin: None waits in MPI's Recv (which polls a core at full speed); else poll that
        many seconds, then sleep between polls, so that a rank with nothing to do leaves the
        core to ranks that work (pipeline stages waiting for their turn on shared cores)."""
        status = MPI.Status()
        start = self._begin(f"Recv from rank {source}")
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
            start = self._begin("Wait for a send")
            request.Wait()
            self._count(time.perf_counter() - start, 0, 0)

    def test(self, request):
        """True when a request from isend_bytes has completed (never blocks)."""
        return request.Test()

    def split(self, color, key):
        """A Comm of the ranks passing the same color, ordered by key; None for color None
        (collective over this communicator)."""
        self._begin("Split")
        sub = self.mpi.Split(MPI.UNDEFINED if color is None else color, key)
        self._end()
        if sub == MPI.COMM_NULL:
            return None
        child = Comm(sub)
        child.activity = self.activity   # one main thread: one record for the watchdog
        return child

    # --- point to point, for --weights-from root ---------------------------------------
    def send_array(self, array, dest, tag=0):
        self._begin(f"Send to rank {dest}")
        self.mpi.Send(np.ascontiguousarray(array), dest=dest, tag=tag)
        self._end()

    def recv_array(self, shape, dtype, source=0, tag=0):
        array = np.empty(shape, dtype=dtype)
        self._begin(f"Recv from rank {source}")
        self.mpi.Recv(array, source=source, tag=tag)
        self._end()
        return array

    def send_obj(self, obj, dest, tag=0):
        """A small picklable object to `dest` (a control message)."""
        self._begin(f"send to rank {dest}")
        self.mpi.send(obj, dest=dest, tag=tag)
        self._end()

    def recv_obj(self, source=0, tag=0):
        self._begin(f"recv from rank {source}")
        obj = self.mpi.recv(source=source, tag=tag)
        self._end()
        return obj

    # --- control messages --------------------------------------------------------------
    def bcast(self, obj):
        self._begin("bcast")
        obj = self.mpi.bcast(obj, root=0)
        self._end()
        return obj

    def bcast_when_ready(self, obj, spin=1e-3, poll=5e-4):
        """bcast of a small object that the other ranks may wait for a long time (a server's
        next plan, while root waits for requests): after `spin` seconds they sleep `poll`
        between tests instead of spinning a core that root's HTTP thread needs."""
        size = np.zeros(1, np.int64)
        blob = pickle.dumps(obj) if self.is_root else None
        if self.is_root:
            size[0] = len(blob)
        start = self._begin("Ibcast")
        request = self.mpi.Ibcast(size, root=0)
        while not request.Test():
            if time.perf_counter() - start > spin:
                time.sleep(poll)
        data = (np.frombuffer(blob, np.uint8).copy() if self.is_root
                else np.empty(int(size[0]), np.uint8))
        self.mpi.Bcast(data, root=0)
        self._end()
        return obj if self.is_root else pickle.loads(data.tobytes())

    def gather(self, obj):
        self._begin("gather")
        obj = self.mpi.gather(obj, root=0)
        self._end()
        return obj

    def allgather(self, obj):
        self._begin("allgather")
        obj = self.mpi.allgather(obj)
        self._end()
        return obj

    def barrier(self):
        self._begin("Barrier")
        self.mpi.Barrier()
        self._end()

    def idle_barrier(self, poll=0.005):
        """A barrier that sleeps while it waits (MPI's spins), leaving the cores to the ranks
        that work, e.g. to root while it runs a model alone."""
        self._begin("Ibarrier")
        request = self.mpi.Ibarrier()
        while not request.Test():
            time.sleep(poll)
        self._end()

    # --- the watchdogs' control channel (dllm.watchdog) ---------------------------------
    @staticmethod
    def threads_supported():
        """True when MPI lets a second thread (the watchdog) call it while the main thread
        is inside a collective: MPI_THREAD_MULTIPLE, which mpi4py asks for by default."""
        return MPI.Query_thread() >= MPI.THREAD_MULTIPLE

    def open_control(self):
        """Collective: a duplicate communicator for the watchdog threads' messages."""
        if self._control is None:
            self._control = self.mpi.Dup()

    def control_send(self, obj, dest, tag):
        """Post a small message to `dest` without waiting for it to be delivered (the
        destination may be dead): completed sends are dropped at the next call."""
        self._control_sends = [r for r in self._control_sends if not r.Test()]
        self._control_sends.append(self._control.isend(obj, dest=dest, tag=tag))

    def control_receive(self):
        """Every control message that has arrived: [(source, tag, obj)]; never blocks."""
        messages, status = [], MPI.Status()
        while self._control.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            messages.append((source, tag, self._control.recv(source=source, tag=tag)))
        return messages

    def agree(self, fn, *args, **kwargs):
        """Run fn on every rank; if it raises DllmError on any rank, raise on all ranks
        (root's message first, else the lowest failing rank's, named)."""
        try:
            result, error = fn(*args, **kwargs), None
        except DllmError as exc:
            result, error = None, str(exc)
        errors = self.allgather(error)
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
        error, shared = self.bcast((error, result if share else None))
        if error is not None:
            raise DllmError(error)
        return result if self.is_root else shared

    def processor_name(self):
        return MPI.Get_processor_name()

    def abort(self, code=1):
        self.mpi.Abort(code)


def ring_bytes(nbytes, size):
    """Bytes a ring all-reduce of an nbytes array sends (and receives) on each of `size`
    ranks: 2 (size-1)/size of it, the bandwidth-optimal algorithm's traffic."""
    return 2 * (size - 1) * nbytes // size

