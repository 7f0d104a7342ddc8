"""python -m dllm.linkprobe: time each collective of a decoded token against a Hockney model.

    python -m dllm.link 1gbit -n 4 -- python -m dllm.linkprobe --shape llama2-7b --out probe.json

Runs, on the job's ranks and without a model's weights, exactly the collectives that one
decoded token makes for a model of the given shape (the same `Comm` calls on buffers of the
same byte sizes as `dllm.model` builds from the same `dllm.shard.plan`), each behind a barrier,
and sets the median time of each against the latency-bandwidth (Hockney) prediction

    t = alpha(kind, n) + bytes / beta

alpha(kind, n): the latency of that MPI collective on these n ranks, measured as the time of
the same call with one value (4 bytes) per rank (the intercept of Hockney's line; a 1-byte
ping-pong's one-way time is reported beside it); beta: the link's TCP payload rate (its
nominal rate x 1448/1514, dllm.link), not fitted; bytes: the most any rank sends or receives
in the collective (each rank has its own full-duplex port on a switch), or every rank's bytes
together on a shared medium. It also reads the interface's byte counters, to show that the
payload really crossed the shaped link. `rounds` (message steps of MPICH's algorithm) is what
a modelled per-message delay multiplies (dllm.link: the links add none of their own).

Collective: every rank runs it; root prints the table (and writes --out).
"""
import math
import sys
import time
from pathlib import Path

import numpy as np

from .atomic import write_json
from .cli import ArgumentParser, add_fault_options, entry, model_loaded, run, use_fault_options
from .errors import DllmError
from .link import current_link
from .shard import SCHEMES, plan, slice_sizes
from .sync import SliceExchange

PROG = "dllm.linkprobe"


def rounds(kind, n):
    """Message steps of MPICH's default algorithm for these (small, < 64 kB) messages:
    Allgatherv by recursive doubling and Bcast by a binomial tree (log2 n steps); Gatherv's,
    Scatterv's and Alltoallv's messages all travel at once (one step; star's relay of the
    hidden slices is a Gatherv and a Scatterv, two)."""
    if n == 1:
        return 0
    if kind == "Gatherv+Scatterv":
        return 2
    return math.ceil(math.log2(n)) if kind in ("Allgatherv", "Bcast") else 1


def decode_collectives(comm, config, scheme, sync):
    """[(label, kind, call)] of one decoded token's collectives, in the forward's order, with
    the layer's collectives once (the forward repeats them per layer). The exchanges are
    built as dllm.model builds them. A new scheme adds its layer collectives here."""
    shards = plan(config, comm.size, scheme)
    attention = SliceExchange(slice_sizes(shards, "attention"), sync)
    dim = SliceExchange(slice_sizes(shards, "dim"), sync)
    hidden = SliceExchange(slice_sizes(shards, "hidden"), sync)
    partials = SliceExchange([config.dim] * comm.size, sync)
    kv, root = SliceExchange(slice_sizes(shards, "kv"), sync), SliceExchange([config.dim], sync)
    mine = {"attention": attention, "dim": dim, "hidden": hidden, "partials": partials,
            "kv": kv}

    def gather(name):
        exchange = mine[name]
        local = np.zeros((1, exchange.widths[comm.rank]), np.float32)
        return lambda: comm.allgather_slices(local, exchange)

    def to_root(name):
        exchange = mine[name]
        local = np.zeros((1, exchange.widths[comm.rank]), np.float32)
        return lambda: comm.gather_slices(local, exchange)

    full = np.zeros((1, config.dim), np.float32)
    h = np.zeros((1, hidden.widths[comm.rank]), np.float32)
    from_root = ("Scatterv", lambda: comm.bcast_rows(full, root, 1))
    layer = {
        "slices": [("attention output", "Allgatherv", gather("attention")),
                   ("wo output", "Allgatherv", gather("dim")),
                   ("SwiGLU output", "Allgatherv", gather("hidden")),
                   ("w2 output", "Allgatherv", gather("dim"))],
        "partials": [("wo partial sums", "Allgatherv", gather("partials")),
                     ("w2 partial sums", "Allgatherv", gather("partials"))],
        "reduce": [("wo chunks", "Alltoallv", lambda: comm.alltoall_chunks(full, dim)),
                   ("wo summed chunks", "Allgatherv", gather("dim")),
                   ("w2 chunks", "Alltoallv", lambda: comm.alltoall_chunks(full, dim)),
                   ("w2 summed chunks", "Allgatherv", gather("dim"))],
        "star": [("norm. x from root", *from_root),
                 ("q to root", "Gatherv", to_root("attention")),
                 ("k to root", "Gatherv", to_root("kv")),
                 ("v to root", "Gatherv", to_root("kv")),
                 ("attention from root", *from_root),
                 ("wo output to root", "Gatherv", to_root("dim")),
                 ("norm. x from root", *from_root),
                 ("hidden through root", "Gatherv+Scatterv",
                  lambda: comm.allgather_through_root(h, hidden)),
                 ("w2 output to root", "Gatherv", to_root("dim"))],
    }
    if scheme not in layer:
        raise DllmError(f"{PROG} has no collectives for scheme {scheme!r} yet")
    x = np.zeros((1, config.dim), np.float32)
    vocab = slice_sizes(shards, "vocab")
    logits = np.zeros((1, vocab[comm.rank]), np.float32)
    layers = [(f"layer: {label}", kind, call) for label, kind, call in layer[scheme]]
    if scheme == "star":    # root holds the residual stream and the classifier
        return layers
    return ([("embedded x", "Bcast", lambda: comm.bcast_array(x))] + layers
            + [("logits", "Gatherv", lambda: comm.gather_rows(logits, vocab))])


def link_bytes(kind, n, max_sent, max_received, total_sent, link):
    """Bytes on the busiest port: on a switch, the most one rank sends or receives; on a
    shared medium, everything. dllm counts a Bcast as root sending to every rank (its
    logical payload), but MPICH's binomial tree has root send only ceil(log2 n) copies (the
    ranks that received pass it on), so that is what root's port carries."""
    if link is not None and link.medium == "shared":
        return total_sent
    if kind == "Bcast" and n > 1:
        return max_received * rounds(kind, n)
    return max(max_sent, max_received)


def empty_collectives(comm):
    """{kind: call} of each MPI collective with one value (4 bytes) per rank: its time is
    the latency term alpha of that collective on this communicator."""
    one = SliceExchange([1] * comm.size, "f32")
    value = np.zeros((1, 1), np.float32)
    single = SliceExchange([1], "f32")
    return {"Allgatherv": lambda: comm.allgather_slices(value, one),
            "Alltoallv": lambda: comm.alltoall_chunks(np.zeros((1, comm.size), np.float32), one),
            "Bcast": lambda: comm.bcast_array(np.zeros(1, np.float32)),
            "Gatherv": lambda: comm.gather_rows(value, [1] * comm.size),
            "Scatterv": lambda: comm.bcast_rows(value, single, 1),
            "Gatherv+Scatterv": lambda: comm.allgather_through_root(value, one)}


def interface_bytes(link):
    """(tx, rx) byte counters of the interface the link shapes, or None when not under one."""
    if link is None:
        return None
    iface = "eth0" if link.medium == "switch" else "lo"
    base = Path("/sys/class/net") / iface / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except OSError:
        return None


def ping_pong(comm, nbytes, repeats):
    """Median one-way time (s) of an nbytes message between ranks 0 and 1 (others wait)."""
    buf = np.zeros(max(nbytes, 1), np.uint8)
    times = []
    comm.barrier()
    for _ in range(repeats):
        start = time.perf_counter()
        if comm.rank == 0:
            comm.send_bytes(buf, 1)
            comm.recv_bytes(buf, 1)
        elif comm.rank == 1:
            comm.recv_bytes(buf, 0)
            comm.send_bytes(buf, 0)
        times.append((time.perf_counter() - start) / 2)
    comm.barrier()
    return comm.bcast(float(np.median(times)) if comm.rank == 0 else None)


def time_collective(comm, call, repeats):
    """(median seconds of the slowest rank, max bytes sent, max received, sum sent) of one
    collective run `repeats` times, each behind a barrier."""
    call()                                      # warm: connections, buffers
    times = []
    before = comm.stats.snapshot()
    for _ in range(repeats):
        comm.barrier()
        inside = comm.stats.sync_seconds
        call()
        times.append(comm.stats.sync_seconds - inside)   # the MPI call, not pack/unpack
    spent = comm.stats.since(before)
    mine = (float(np.median(times)), spent.bytes_sent // repeats, spent.bytes_received // repeats)
    everyone = comm.allgather(mine)
    return (max(t for t, _, _ in everyone), max(s for _, s, _ in everyone),
            max(r for _, _, r in everyone), sum(s for _, s, _ in everyone))


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b",
                   help="model shape (a dllm.convert synthetic preset, default llama2-7b)")
    p.add_argument("--schemes", default=",".join(SCHEMES),
                   help=f"comma-separated sync schemes (default {','.join(SCHEMES)})")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"))
    p.add_argument("--repeat", type=int, default=30, help="timed calls per collective (30)")
    p.add_argument("--out", help="write the results as JSON here")
    add_fault_options(p)
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    from .converters.synthetic import synthetic_config
    args = build_parser(comm.is_root).parse_args(sys.argv[1:] if argv is None else argv)
    use_fault_options(comm, args)
    model_loaded(comm)
    config = synthetic_config(args.shape)
    schemes = [s for s in args.schemes.split(",") if s]
    if comm.size < 2:
        raise DllmError(f"{PROG} needs at least 2 ranks (it measures the link between them)")
    link = current_link()
    one_way = ping_pong(comm, 1, 200)
    big = 1 << 20
    beta_measured = big / max(ping_pong(comm, big, 10) - one_way, 1e-9)
    beta = link.payload_bytes_per_s if link else beta_measured
    alpha = {kind: time_collective(comm, call, 4 * args.repeat)[0]
             for kind, call in empty_collectives(comm).items()}
    counters_before = interface_bytes(link)
    sent_before = comm.stats.bytes_sent
    results = []
    for scheme in schemes:
        for label, kind, call in decode_collectives(comm, config, scheme, args.sync):
            seconds, sent, received, total = time_collective(comm, call, args.repeat)
            on_link = link_bytes(kind, comm.size, sent, received, total, link)
            predicted = alpha[kind] + on_link / beta
            # What the token bucket itself should give: a full bucket passes at once.
            bucket = alpha[kind] + max(0, on_link - (link.burst_bytes if link else 0)) / beta
            results.append({"scheme": scheme, "collective": label, "mpi": kind,
                            "rounds": rounds(kind, comm.size), "max_sent": sent,
                            "max_received": received, "link_bytes": on_link,
                            "measured_ms": 1e3 * seconds, "predicted_ms": 1e3 * predicted,
                            "bucket_ms": 1e3 * bucket})
    counters = counted_bytes(comm, link, counters_before, comm.stats.bytes_sent - sent_before)
    if comm.is_root:
        report = {"kind": "linkprobe", "world_size": comm.size, "shape": args.shape,
                  "sync": args.sync, "link": link.__dict__ if link else None,
                  "one_way_ms": 1e3 * one_way,
                  "alpha_ms": {kind: 1e3 * t for kind, t in alpha.items()},
                  "beta_bytes_per_s": beta,
                  "beta_measured_bytes_per_s": beta_measured, "interface": counters,
                  "collectives": results, "per_token": per_token(results, config, link)}
        print_report(report)
        if args.out:
            write_json(args.out, report)
    return 0


def counted_bytes(comm, link, before, payload_sent):
    """Every rank's interface tx bytes in the probe against the payload it sent (collective;
    root gets the sums). On a shared medium one counter sees every rank's traffic."""
    after = interface_bytes(link)
    mine = (after[0] - before[0]) if before and after else None
    everyone = comm.gather((mine, payload_sent))
    if not comm.is_root or any(tx is None for tx, _ in everyone):
        return None
    payload = sum(p for _, p in everyone)
    wire = everyone[0][0] if link.medium == "shared" else sum(tx for tx, _ in everyone)
    return {"tx_bytes": wire, "payload_bytes": payload, "tx_over_payload": wire / payload}


def per_token(results, config, link=None):
    """Sync ms per decoded token of the full-depth model, measured and predicted, per scheme:
    the layer collectives n_layers times, the rest once; and the link's modelled delay
    (message rounds x its one-way delay), which the emulated link does not add."""
    out = {}
    for r in results:
        times = out.setdefault(r["scheme"], {"measured_ms": 0.0, "predicted_ms": 0.0,
                                             "rounds": 0, "modelled_delay_ms": 0.0})
        repeat = config.n_layers if r["collective"].startswith("layer:") else 1
        times["measured_ms"] += repeat * r["measured_ms"]
        times["predicted_ms"] += repeat * r["predicted_ms"]
        times["rounds"] += repeat * r["rounds"]
        times["modelled_delay_ms"] += repeat * r["rounds"] * (link.delay_ms if link else 0.0)
    return out


def print_report(report):
    link = report["link"]
    where = (f"{link['name']} ({link['rate_bits'] / 1e6:g} Mbit/s, {link['medium']})"
             if link else "no emulated link (shared memory or the real network)")
    print(f"{PROG}: {report['world_size']} ranks, {report['shape']} shape, sync "
          f"{report['sync']}, on {where}")
    print("alpha (4 bytes per rank) " + ", ".join(
        f"{kind} {ms:.3f} ms" for kind, ms in report["alpha_ms"].items())
        + f"; 1-byte ping-pong one way {report['one_way_ms']:.3f} ms")
    print(f"beta "
          f"{report['beta_bytes_per_s'] / 1e6:.2f} MB/s (1 MiB ping-pong measured "
          f"{report['beta_measured_bytes_per_s'] / 1e6:.2f} MB/s)")
    if report["interface"]:
        i = report["interface"]
        print(f"interface tx bytes {i['tx_bytes']} for {i['payload_bytes']} payload bytes "
              f"sent ({i['tx_over_payload']:.2f}x: headers, acks, MPI's own messages)")
    print(f"{'scheme':<9} {'collective':<26} {'mpi':<10} {'rounds':>6} {'link B':>8} "
          f"{'measured ms':>11} {'Hockney ms':>10} {'ratio':>6} {'bucket ms':>9}")
    for r in report["collectives"]:
        print(f"{r['scheme']:<9} {r['collective']:<26} {r['mpi']:<10} {r['rounds']:>6} "
              f"{r['link_bytes']:>8} {r['measured_ms']:11.3f} {r['predicted_ms']:10.3f} "
              f"{r['measured_ms'] / r['predicted_ms']:6.2f} {r['bucket_ms']:9.3f}")
    for scheme, t in report["per_token"].items():
        print(f"{scheme}: sync per token (full depth) measured {t['measured_ms']:.2f} ms, "
              f"predicted {t['predicted_ms']:.2f} ms ({t['measured_ms'] / t['predicted_ms']:.2f}x); "
              f"{t['rounds']} message rounds: + {t['modelled_delay_ms']:.1f} ms of modelled delay")


if __name__ == "__main__":
    entry(_main, PROG)
