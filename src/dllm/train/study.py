"""python -m dllm.train.study: the table and plots of docs/training.md from --metrics files.

    python -m dllm.train.study runs/*.jsonl [--plot-dir docs/plots] [--skip 3]

One row per run: its mode, ranks and gradient payload, the median step split into compute,
communication and idle ms (after --skip warm-up steps), gradient bytes per step and in all,
tokens/s, the parallel efficiency against the one-rank run of the same model (tokens/s over
n times its tokens/s), and the last validation loss. Plots (matplotlib, pip install
'dllm[bench]'): loss curves, final validation loss against bytes moved, the step time split.
"""
import sys
from pathlib import Path

import numpy as np

from ..atomic import replacing
from ..checks import parse_json, read_file
from ..cli import ArgumentParser
from ..errors import DllmError


def read_run(path):
    """(header settings, step records, validation records) of one metrics file."""
    lines = [line for line in read_file(path, "metrics file").splitlines() if line.strip()]
    records = [parse_json(line, f"{path} line {i + 1}") for i, line in enumerate(lines)]
    if not records or "run" not in records[0]:
        raise DllmError(f"{path} is not a dllm.train --metrics file (no header line)")
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    return records[0]["run"], steps, vals


def summarize(path, skip):
    run, steps, vals = read_run(path)
    timed = steps[skip:] or steps
    med = {k: float(np.median([r[k] for r in timed]))
           for k in ("step_ms", "compute_ms", "comm_ms", "idle_ms", "tokens_per_s")}
    return {"name": Path(path).stem, "source": run["model"] or f"init {run['init']}",
            "parallel": run["parallel"], "ranks": run["world_size"],
            "grad_sync": run["grad_sync"] if run["parallel"] == "data" else "-",
            **med, "grad_bytes": steps[-1]["grad_bytes"],
            "grad_bytes_total": sum(r["grad_bytes"] for r in steps),
            "final_loss": steps[-1]["loss"], "val_loss": vals[-1]["val_loss"] if vals else None,
            "steps": steps, "vals": vals}


def table(rows):
    """Markdown table of the summaries, with parallel efficiency per source model."""
    base = {r["source"]: r["tokens_per_s"] for r in rows if r["ranks"] == 1
            and r["grad_sync"] in ("f32", "-")}
    out = ["| run | mode | ranks | grad sync | step ms | compute | comm | idle | grad bytes/step "
           "| tokens/s | efficiency | val loss |", "|" + "---|" * 12]
    for r in rows:
        eff = r["tokens_per_s"] / (r["ranks"] * base[r["source"]]) if r["source"] in base else None
        out.append(f"| {r['name']} | {r['parallel']} | {r['ranks']} | {r['grad_sync']} | "
                   f"{r['step_ms']:.0f} | {r['compute_ms']:.0f} | {r['comm_ms']:.0f} | "
                   f"{r['idle_ms']:.0f} | {r['grad_bytes']:,} | {r['tokens_per_s']:.0f} | "
                   f"{_number(eff, '.2f')} | "
                   f"{_number(r['val_loss'], '.4f')} |")
    return "\n".join(out)


def _number(value, spec):
    return "-" if value is None else format(value, spec)


def plot(rows, folder):
    from ..benchplots import plot_folder, pyplot
    plt = pyplot()
    folder = plot_folder(folder)
    for source in sorted({r["source"] for r in rows}):
        group = [r for r in rows if r["source"] == source]
        tag = Path(source).stem.replace(" ", "-")
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in group:
            ax.plot([s["step"] for s in r["steps"]], [s["loss"] for s in r["steps"]],
                    label=r["name"], lw=1)
        ax.set(xlabel="step", ylabel="training loss", title=f"loss curves: {source}")
        ax.legend(fontsize=6)
        _save(fig, folder / f"train-{tag}-loss.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in group:
            if r["val_loss"] is not None and r["ranks"] > 1:
                ax.scatter(r["grad_bytes_total"] / 1e6, r["val_loss"])
                ax.annotate(r["name"], (r["grad_bytes_total"] / 1e6, r["val_loss"]), fontsize=6)
        ax.set(xscale="log", xlabel="gradient MB sent per rank, whole run",
               ylabel="final validation loss", title=f"loss against bytes: {source}")
        _save(fig, folder / f"train-{tag}-bytes.png")
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [r["name"] for r in group]
        bottom = np.zeros(len(group))
        for key in ("compute_ms", "comm_ms", "idle_ms"):
            values = np.array([r[key] for r in group])
            ax.bar(names, values, bottom=bottom, label=key[:-3])
            bottom += values
        ax.set(ylabel="median ms per step", title=f"step time: {source}")
        ax.tick_params(axis="x", labelrotation=60, labelsize=6)
        ax.legend()
        _save(fig, folder / f"train-{tag}-time.png")


def _save(fig, path):
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(prog="python -m dllm.train.study", description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", help="--metrics files of dllm.train runs")
    p.add_argument("--plot-dir", default=None, help="write PNG plots here")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    try:
        args = p.parse_args(argv)
        rows = [summarize(path, args.skip) for path in args.metrics]
        print(table(rows))
        if args.plot_dir:
            plot(rows, args.plot_dir)
    except DllmError as exc:
        print(f"dllm.train.study: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
