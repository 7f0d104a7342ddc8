"""Per-token timing and traffic of a run: laps on every rank, summarized on root.

Sync time is the time a rank spends inside collectives (Comm.stats); inference time is the
rest of the lap. Each rank's per-token means are gathered to root and reported as the median
over ranks, with min/median/max beside it.
"""
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import numpy as np


class StepTimer:
    """Laps of wall time and collective statistics on this rank."""

    def __init__(self, comm):
        self.comm, self.laps = comm, {}
        self.mark()

    def mark(self):
        """Restart the lap clock (so that e.g. printing is left out of the next lap)."""
        self._t, self._s = time.perf_counter(), self.comm.stats.snapshot()

    def lap(self, kind, tokens=1):
        spent = self.comm.stats.since(self._s)
        seconds = time.perf_counter() - self._t
        self.laps.setdefault(kind, []).append(
            (tokens, seconds, spent.sync_seconds, spent.bytes_sent, spent.bytes_received))
        self.mark()

    def per_token(self, kind):
        """Mean per token of this rank's laps of `kind`: dict or None when there are none."""
        laps = np.array(self.laps.get(kind, []), dtype=np.float64).reshape(-1, 5)
        tokens = laps[:, 0].sum()
        if tokens == 0:
            return None
        total, sync, sent, received = laps[:, 1:].sum(axis=0) / tokens
        return {"tokens": int(tokens), "seconds": float(laps[:, 1].sum()),
                "total_ms": 1e3 * total, "sync_ms": 1e3 * sync,
                "inference_ms": 1e3 * (total - sync), "sent": sent, "received": received}


def spread(values):
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(values.min()), "median": float(np.median(values)),
            "max": float(values.max())}


def conditions(comm, model, **extra):
    """The run's conditions, gathered from every rank (collective)."""
    hosts = comm.gather(socket.gethostname())
    return {"world_size": comm.size, "hosts": sorted(set(hosts)) if hosts else None,
            "threads_per_rank": model.kernels.threads, "kernels": model.kernels.name,
            "gemm": model.kernels.gemm, "model": model.path,
            "quant": model.quant,
            "sync": model.sync, "sync_scheme": model.scheme, "max_seq_len": model.max_seq_len,
            "prefill_chunk": model.prefill_chunk, "layout": layout(comm, model),
            "python": platform.python_version(), "git_revision": git_revision(),
            "link": link_name(), "cpus_per_host": os.cpu_count(), **extra}


def link_name():
    """The emulated network the job runs on (python -m dllm.link), else None."""
    from .link import current_link
    link = current_link()
    return link.name if link else None


def layout(comm, model):
    """How the model is split over the ranks (even, or as a device profile chose): the
    model's own `layout` (a pipeline's layers per rank), else every rank's query heads and
    hidden rows of its tensor-parallel slices, gathered to root (None elsewhere).
    Collective."""
    if hasattr(model, "layout"):
        return model.layout
    shard = model.shard
    sizes = comm.gather((shard.n_heads, shard.hidden_rows[1] - shard.hidden_rows[0]))
    if sizes is None:
        return None
    return {"heads_per_rank": [h for h, _ in sizes], "hidden_rows_per_rank": [r for _, r in sizes]}


def summarize(comm, timer):
    """Collective. Root gets the figures of the prefill and decode laps; others None."""
    mine = {kind: timer.per_token(kind) for kind in ("prefill", "decode")}
    everyone = comm.gather(mine)
    if not comm.is_root:
        return None
    prefill, decode = mine["prefill"], mine["decode"]
    summary = {
        "prompt_tokens": prefill["tokens"] if prefill else 0,
        "generated_tokens": (1 if prefill else 0) + (decode["tokens"] if decode else 0),
        "prefill_tokens_per_s": prefill["tokens"] / prefill["seconds"] if prefill else None,
        "decode_tokens_per_s": decode["tokens"] / decode["seconds"] if decode else None,
    }
    ranks = [r["decode"] for r in everyone if r["decode"]]
    if len(ranks) == comm.size:
        summary["ms_per_token"] = {k: float(np.median([r[f"{k}_ms"] for r in ranks]))
                                   for k in ("total", "inference", "sync")}
        summary["bytes_per_token"] = {k: float(np.median([r[k] for r in ranks]))
                                      for k in ("sent", "received")}
        summary["over_ranks"] = {
            **{f"{k}_ms": spread([r[f"{k}_ms"] for r in ranks]) for k in ("total", "inference", "sync")},
            **{f"bytes_{k}": spread([r[k] for r in ranks]) for k in ("sent", "received")}}
        # Root's link (a star's carries every byte: Figure 6 counts its sent + received)
        # and the total over the links.
        summary["root_bytes_per_token"] = {k: float(ranks[0][k]) for k in ("sent", "received")}
        summary["total_bytes_sent_per_token"] = float(sum(r["sent"] for r in ranks))
    return summary


def git_revision():
    """The dllm checkout's commit, when running from one."""
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
