"""python -m dllm.reproduction: bench runs of reduced-depth models as the paper's full-depth table.

    python -m dllm.reproduction runs.jsonl [--markdown]

Reads dllm.bench JSON lines (jobs/paper-figures.sh writes them), recognizes each model's shape
(a dllm.convert synthetic preset, from its dimensions; the depth may be reduced), and groups the
runs by shape, sync scheme, ranks, sync payload and link. Per group the figures per decoded
token (total, inference and sync ms; bytes received by the busiest rank; root's bytes sent
and received, Figure 6's count for the star scheme, in KiB: the paper's kB read as KiB) are
scaled to the preset's full depth: with runs at two or more depths, by the straight line through them
(value = fixed + per-layer x layers: the classifier, embedding and logits gather are the fixed
part), with one depth in proportion to the layers (which overstates the fixed part's share).
Beside each full-depth figure stands the paper's (Tadych 2024, Figures 3-5: 8 x Raspberry Pi 4B
on a Gigabit switch, Q40 weights, Q80 sync; the measurements table of Distributed Llama's README
at the commit the paper cites, 7eb77ca).
"""
import sys
from collections import defaultdict

import numpy as np

from .checks import parse_json, read_file
from .cli import ArgumentParser, entry, run
from .errors import DllmError

PROG = "dllm.reproduction"

# ms per token: (total, inference, transfer) at 1, 2, 4, 8 devices; None: did not fit in RAM.
PAPER_MS = {
    "llama2-7b": {1: (1312.50, 1307.94, 1.81), 2: (793.69, 739.00, 52.50),
                  4: (494.00, 458.81, 34.06), 8: (588.19, 296.69, 289.75)},
    "llama2-13b": {1: None, 2: (1497.19, 1465.06, 30.88), 4: (848.19, 746.88, 99.50),
                   8: (1114.88, 460.8, 652.88)},
    "llama2-70b": {1: None, 2: None, 4: None, 8: (4842.81, 2121.94, 2719.62)},
}
# kB per token, all links together (Figure 6; S + R at root, Q80 buffer).
PAPER_KB = {"llama2-7b": {2: 1112, 4: 2830, 8: 6008}, "llama2-13b": {2: 1742, 4: 4430, 8: 9407},
            "llama2-70b": {2: 5525, 4: 14917, 8: 32873}}
SHAPE_KEYS = ("dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")
FIGURES = ("total", "inference", "sync", "received_kb", "root_link_kib")


def shape_of(model_config):
    """The synthetic preset whose shape (all but the depth) the model has, else None."""
    from .converters.synthetic import PRESETS
    for name, preset in PRESETS.items():
        if all(model_config.get(k) == getattr(preset, k) for k in SHAPE_KEYS):
            return name
    return None


def figures(record):
    """Per decoded token: ms, the busiest receiver's kB, and root's sent + received in KiB
    (Figure 6's count for the star, whose every byte crosses root's link; None in records
    written before dllm.bench recorded root's bytes)."""
    ms, root = record["ms_per_token"], record.get("root_bytes_per_token")
    return {"total": ms["total"], "inference": ms["inference"], "sync": ms["sync"],
            "received_kb": record["over_ranks"]["bytes_received"]["max"] / 1e3,
            "root_link_kib": (root["sent"] + root["received"]) / 1024 if root else None}


def full_depth(points, layers):
    """Scale {depth: value} to `layers`: the line through two or more depths, else the ratio."""
    depths = sorted(points)
    if len(depths) == 1:
        return points[depths[0]] * layers / depths[0]
    slope, intercept = np.polyfit(depths, [points[d] for d in depths], 1)
    return float(intercept + slope * layers)


def group(records):
    """{(shape, scheme, ranks, sync, link): {depth: figures}} of the recognized records; a
    1-rank run stands for every scheme (it exchanges nothing)."""
    groups = defaultdict(dict)
    schemes = sorted({r["conditions"]["sync_scheme"] for r in records})
    for r in records:
        c, shape = r["conditions"], shape_of(r["model_config"])
        if shape is None:
            continue
        for scheme in (schemes if c["world_size"] == 1 else [c["sync_scheme"]]):
            key = (shape, scheme, c["world_size"], c["sync"], c.get("link"))
            groups[key][r["model_config"]["n_layers"]] = figures(r)
    return groups


def rows(records):
    from .converters.synthetic import PRESETS
    out = []
    for key, by_depth in sorted(group(records).items()):
        shape, scheme, n, sync, link = key
        layers = PRESETS[shape].n_layers
        full = {f: full_depth({d: v[f] for d, v in by_depth.items()}, layers)
                if all(v[f] is not None for v in by_depth.values()) else None for f in FIGURES}
        out.append({"shape": shape, "scheme": scheme, "ranks": n, "sync": sync, "link": link,
                    "depths": sorted(by_depth), "full_layers": layers, **full,
                    "paper": PAPER_MS.get(shape, {}).get(n), "paper_kb": PAPER_KB.get(shape, {}).get(n)})
    return out


def table(out, markdown=False):
    head = ["model", "scheme", "ranks", "link", "depths run", "total ms", "inference ms",
            "sync ms", "recv kB (busiest rank)", "root S+R KiB", "paper total / inference / "
            "transfer ms", "paper kB (Fig. 6)"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append("  ".join(head))
    for r in out:
        paper = ("/".join(f"{x:g}" for x in r["paper"]) if r["paper"] else
                 ("did not fit" if r["ranks"] in PAPER_MS.get(r["shape"], {}) else "-"))
        cells = [r["shape"], r["scheme"], str(r["ranks"]), str(r["link"]),
                 ",".join(map(str, r["depths"])) + f" -> {r['full_layers']}",
                 f"{r['total']:.0f}", f"{r['inference']:.0f}", f"{r['sync']:.0f}",
                 f"{r['received_kb']:.0f}",
                 "-" if r["root_link_kib"] is None else f"{r['root_link_kib']:.1f}", paper,
                 "-" if r["paper_kb"] is None else str(r["paper_kb"])]
        lines.append(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=comm.is_root,
                       description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="dllm.bench JSON-lines files")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not comm.is_root:
        return 0
    records = []
    for name in args.results:
        for n, line in enumerate(read_file(name, "results file").splitlines(), 1):
            record = parse_json(line, f"{name}:{n}")
            if isinstance(record, dict) and record.get("kind") == "bench":
                records.append(record)
    out = rows(records)
    if not out:
        raise DllmError("no bench run of a recognized model shape (a dllm.convert synthetic "
                        "preset's dimensions) in " + ", ".join(args.results))
    print(table(out, args.markdown))
    return 0


if __name__ == "__main__":
    entry(_main, PROG)
