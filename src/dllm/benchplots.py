"""`python -m dllm.bench table`: many bench runs as the paper's table, and the plots of them.

    python -m dllm.bench table runs.jsonl [more.jsonl] [--plot-dir DIR]

Runs are grouped by what makes their figures comparable: model (file and depth), weights,
sync payload, parallel mode and link; within a group the sync schemes are the series and the
world sizes the x axis. A file mixing groups gets a warning, and every group its own table
block and its own plots (one line through two models would mislead). Plots, per group:

- `*-time.png`: stacked inference + sync ms per token per rank count and scheme (medians over
  ranks), the whisker the min / max of the total over ranks (Figures 3-5);
- `*-bytes.png`: kB received per token by the busiest rank, measured (points) and the
  formula of docs/sync.md (line) (Figure 6);
- `*-speedup.png`: speedup over the 1-rank run and parallel efficiency, with the ideal line;
- `pipeline-throughput.png`: tokens/s against sequences in flight, from `bench compare` lines.

Titles name the model, weights, sync, schemes, link and host; points with more ranks than the
host has cores are drawn hollow and labelled "oversubscribed".
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

from .atomic import reason, replacing
from .checks import parse_json, read_file
from .cli import ArgumentParser
from .errors import DllmError

Q80_BLOCK, Q80_BLOCK_BYTES = 32, 34


def payload_bytes(values, sync):
    """Bytes of `values` activations as the sync payload (dllm.sync's rule)."""
    return Q80_BLOCK_BYTES * -(-values // Q80_BLOCK) if sync == "q80" else 4 * values


def formula_received_max(scheme, sync, config, n):
    """Bytes the busiest receiver receives per decoded token with even splits (docs/sync.md):
    root, the layer terms of the scheme plus the f32 logits of the other ranks; in star (no
    logits, no embedding sent) root or a worker, whichever receives more.
    A new scheme adds its line here. None for a scheme without a formula."""
    if n == 1:
        return 0
    B = lambda values: payload_bytes(values, sync)          # noqa: E731
    dim, hidden = config["dim"], config["hidden_dim"]
    if scheme == "star":    # root's q, k, v, wo, hidden, w2 slices, or a worker's 3 dim + hidden
        kv = config["n_kv_heads"] * dim // config["n_heads"]
        root = (n - 1) * (3 * B(dim // n) + 2 * B(kv // n) + B(hidden // n))
        return config["n_layers"] * max(root, 3 * B(dim) + (n - 1) * B(hidden // n))
    layer = {"slices": (n - 1) * (3 * B(dim // n) + B(hidden // n)),
             "partials": 2 * (n - 1) * B(dim),
             "reduce": 4 * (n - 1) * B(dim // n)}.get(scheme)
    if layer is None:
        return None
    return config["n_layers"] * layer + 4 * (config["vocab_size"] - config["vocab_size"] // n)


def group_key(record):
    c = record["conditions"]
    # A pipeline run records its scheme as "pipeline" (dllm.pipeline.PipelineModel.scheme).
    mode = "pipeline" if c["sync_scheme"] == "pipeline" else "tensor"
    return (Path(str(c["model"])).name, record["model_config"]["n_layers"], c.get("quant"),
            c["sync"], mode, c.get("link"))


def describe(key, records):
    model, layers, quant, sync, mode, link = key
    hosts = sorted({h for r in records for h in (r["conditions"].get("hosts") or [])})
    schemes = sorted({r["conditions"]["sync_scheme"] for r in records})
    return (f"{model} ({layers} layers), weights {quant}, sync {sync}, {mode}, "
            f"scheme{'s' if len(schemes) > 1 else ''} {'/'.join(schemes)}, "
            f"link {link or 'none (shared memory)'}, host {','.join(hosts) or '?'}")


def oversubscribed(record):
    c = record["conditions"]
    cpus = c.get("cpus_per_host")
    hosts = len(c.get("hosts") or [1])
    return bool(cpus) and c["world_size"] * (c.get("threads_per_rank") or 1) > cpus * hosts


HEADER = (f"{'ranks':>5} {'scheme':>8} {'sync':>4} {'total ms':>9} {'infer ms':>9} "
          f"{'sync ms':>8} {'recv kB':>8} {'sent kB':>8} {'dec tok/s':>9} {'pre tok/s':>9} "
          f"{'RSS MB':>8}")


def row(r):
    c, ms, b = r["conditions"], r["ms_per_token"], r["bytes_per_token"]
    line = (f"{c['world_size']:>5} {c['sync_scheme']:>8} {c['sync']:>4} {ms['total']:9.2f} "
            f"{ms['inference']:9.2f} {ms['sync']:8.2f} {b['received'] / 1e3:8.1f} "
            f"{b['sent'] / 1e3:8.1f} {r['decode_tokens_per_s']:9.2f} "
            f"{r['prefill_tokens_per_s']:9.1f} {r['memory_per_rank']['peak_rss']['max'] / 1e6:8.0f}")
    spread = r.get("spread_over_repeats")
    if spread and len(r.get("repeats", ())) > 1:
        t = spread["total"]
        loads = [max(x["load_average_1min"].values()) for x in r["repeats"]]
        line += (f"  total over {len(r['repeats'])} repeats {t['min']:.1f}-{t['max']:.1f}, "
                 f"load {min(loads):.1f}-{max(loads):.1f}")
    if oversubscribed(r):
        line += "  (oversubscribed)"
    return line


def check_record(record, where):
    """A bench line holding what the table reads (a hand-edited or foreign line is named)."""
    try:
        row(record)
        group_key(record)
        ok = isinstance(record["conditions"]["world_size"], int) and isinstance(
            record["conditions"]["sync_scheme"], str)
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DllmError(f"{where} is a bench line without the figures of a run "
                        f"(written by another version, or edited?)")
    return record


def read_records(names):
    """(bench records, compare records) of JSON-lines files."""
    bench, compare = [], []
    for name in names:
        for n, line in enumerate(read_file(name, "results file").splitlines(), 1):
            record = parse_json(line, f"{name}:{n}")
            if isinstance(record, dict) and record.get("kind") == "bench":
                bench.append(check_record(record, f"{name}:{n}"))
            elif isinstance(record, dict) and record.get("kind") == "compare":
                compare.append(record)
    return bench, compare


def table_main(comm, argv):
    p = ArgumentParser(prog="python -m dllm.bench table", is_root=comm.is_root,
                       description="Tabulate (and plot) bench JSON lines, grouped by model, "
                                   "weights, sync, mode and link.")
    p.add_argument("results", nargs="+", help="JSON-lines files written with --out")
    p.add_argument("--plot-dir", help="write the plots (PNG) here")
    args = p.parse_args(argv)
    if not comm.is_root:
        return 0
    records, compares = read_records(args.results)
    groups = defaultdict(list)
    for r in records:
        groups[group_key(r)].append(r)
    if len(groups) > 1:
        print(f"dllm.bench table: warning: the runs are of {len(groups)} different setups "
              f"(model, weights, sync, mode, link); each is tabulated and plotted on its own",
              file=sys.stderr)
    for key, rs in groups.items():
        rs.sort(key=lambda r: (r["conditions"]["sync_scheme"], r["conditions"]["world_size"]))
        if len(groups) > 1:
            print(f"# {describe(key, rs)}")
        print(HEADER)
        for r in rs:
            print(row(r))
    if args.plot_dir:
        written = plot_all(groups, compares, Path(args.plot_dir))
        print(f"dllm.bench table: wrote {len(written)} plot(s) in {args.plot_dir}: "
              + ", ".join(p.name for p in written), file=sys.stderr)
    return 0


def plot_folder(folder):
    """--plot-dir: the folder as a Path, created if missing (DllmError saying why not)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DllmError(f"--plot-dir {folder}: {reason(exc)}") from None
    return folder


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a DllmError naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DllmError("plots need matplotlib: pip install 'dllm[bench]'") from None
    return plt


def plot_all(groups, compares, folder):
    plt = pyplot()
    folder = plot_folder(folder)
    written = []
    for key, rs in groups.items():
        stem = re.sub(r"[^A-Za-z0-9.]+", "-",
                      "-".join(str(k) for k in key if k is not None)).strip("-")
        title = describe(key, rs)
        for suffix, draw in (("time", plot_time), ("bytes", plot_bytes), ("speedup", plot_speedup)):
            fig = draw(plt, rs, title)
            if fig is not None:
                written.append(save_figure(plt, fig, folder / f"{stem}-{suffix}.png"))
    if compares:
        written.append(save_figure(plt, plot_pipeline(plt, compares),
                                   folder / "pipeline-throughput.png"))
    return written


def _schemes(rs):
    by = defaultdict(dict)
    for r in rs:
        by[r["conditions"]["sync_scheme"]][r["conditions"]["world_size"]] = r
    return by


def _title(ax, title):
    ax.set_title("\n".join(_wrap(title, 70)), fontsize=8)


def _finish(fig, ax, title):
    _title(ax, title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _wrap(text, width):
    words, lines, line = text.split(" "), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + [line]


def _mark_oversubscribed(ax, x, y, record, color):
    """A hollow marker: more ranks than the host has cores."""
    if oversubscribed(record):
        ax.plot([x], [y], "o", mfc="white", color=color, zorder=3)


def plot_time(plt, rs, title):
    """Stacked inference + sync bars per rank count, one bar per scheme, min/max whiskers."""
    by = _schemes(rs)
    sizes = sorted({r["conditions"]["world_size"] for r in rs})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(by)
    for i, (scheme, runs) in enumerate(sorted(by.items())):
        xs = [sizes.index(n) + (i - (len(by) - 1) / 2) * width for n in sorted(runs)]
        recs = [runs[n] for n in sorted(runs)]
        inf = [r["ms_per_token"]["inference"] for r in recs]
        syn = [r["ms_per_token"]["sync"] for r in recs]
        lo = [r["over_ranks"]["total_ms"]["min"] for r in recs]
        hi = [r["over_ranks"]["total_ms"]["max"] for r in recs]
        tot = [a + b for a, b in zip(inf, syn)]
        hatch = [("//" if oversubscribed(r) else "") for r in recs]
        ax.bar(xs, inf, width, label=f"{scheme}: inference", color=f"C{i}", alpha=0.9)
        bars = ax.bar(xs, syn, width, bottom=inf, label=f"{scheme}: sync", color=f"C{i}",
                      alpha=0.45)
        for bar, h in zip(bars, hatch):
            bar.set_hatch(h)
        ax.errorbar(xs, tot, yerr=[[max(t - l, 0) for t, l in zip(tot, lo)],
                                   [max(h - t, 0) for t, h in zip(tot, hi)]],
                    fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set(xlabel="ranks (hatched: oversubscribed; whisker: min / max total over ranks)",
           ylabel="ms per decoded token (median over ranks)")
    return _finish(fig, ax, title)


def plot_bytes(plt, rs, title):
    """kB received per token by the busiest rank against ranks, with the formula."""
    by = _schemes(rs)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    config = rs[0]["model_config"]
    for i, (scheme, runs) in enumerate(sorted(by.items())):
        ns = sorted(runs)
        ax.plot(ns, [runs[n]["over_ranks"]["bytes_received"]["max"] / 1e3 for n in ns], "o",
                color=f"C{i}", label=f"{scheme}: measured")
        grid = ns     # the even-split formula is exact at these sizes (powers of two here)
        formula = [formula_received_max(scheme, runs[ns[0]]["conditions"]["sync"], config, n)
                   for n in grid]
        if None not in formula:
            ax.plot(grid, [f / 1e3 for f in formula], "-", color=f"C{i}", lw=0.8,
                    label=f"{scheme}: formula (docs/sync.md)")
        for n in ns:
            _mark_oversubscribed(ax, n, runs[n]["over_ranks"]["bytes_received"]["max"] / 1e3,
                                 runs[n], f"C{i}")
    ax.set(xlabel="ranks (hollow: oversubscribed)", ylabel="kB received per token, busiest rank")
    return _finish(fig, ax, title)


def plot_speedup(plt, rs, title):
    """Speedup over 1 rank and parallel efficiency, against the ideal; None without 1 rank."""
    by = _schemes(rs)
    single = [r for r in rs if r["conditions"]["world_size"] == 1]
    if not single:
        return None
    base = single[0]["ms_per_token"]["total"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    top = max(r["conditions"]["world_size"] for r in rs)
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="ideal")
    ax2.axhline(1.0, color="k", ls="--", lw=0.8, label="ideal")
    for i, (scheme, runs) in enumerate(sorted(by.items())):
        ns = sorted(set(runs) | {1})
        runs = {**runs, 1: runs.get(1, single[0])}
        speed = [base / runs[n]["ms_per_token"]["total"] for n in ns]
        ax.plot(ns, speed, "o-", color=f"C{i}", label=scheme)
        ax2.plot(ns, [s / n for s, n in zip(speed, ns)], "o-", color=f"C{i}", label=scheme)
        for n, s in zip(ns, speed):
            _mark_oversubscribed(ax, n, s, runs[n], f"C{i}")
    ax.set(xlabel="ranks (hollow: oversubscribed)", ylabel="speedup over 1 rank")
    ax2.set(xlabel="ranks", ylabel="parallel efficiency", ylim=(0, 1.2))
    return _finish(fig, ax, title)


def plot_pipeline(plt, compares, title_extra=""):
    """Tokens per second against sequences in flight, per mode, from bench compare lines."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for j, result in enumerate(compares):
        for i, mode in enumerate(result["modes"]):
            ks = sorted(int(k) for k in mode["tokens_per_s"])
            ax.plot(ks, [mode["tokens_per_s"][str(k)] for k in ks], "o-", color=f"C{i}",
                    ls=["-", "--", ":"][j % 3],
                    label=f"{mode['mode']} ({mode['world_size']} ranks)"
                          + (f", run {j + 1}" if len(compares) > 1 else ""))
    c = compares[0]["modes"][0]["conditions"]
    ax.set(xlabel="sequences in flight", ylabel="tokens per second (all sequences)")
    _title(ax, f"{Path(str(compares[0]['model'])).name}, weights {c.get('quant')}, sync "
               f"{c.get('sync')}, link {c.get('link') or 'none'}, host "
               f"{','.join(c.get('hosts') or [])}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(plt, fig, path):
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
