"""python -m dllm.plan: choose a pipeline for a heterogeneous cluster, and check the choice.

    mpirun -n 2 python -m dllm.plan calibrate --model m.h5 -o cluster.json   # measure
    python -m dllm.plan search --profile cluster.json --model m.h5 -o plans.json
    mpirun -n 2 python -m dllm.plan check plans.json --model m.h5             # predicted vs measured

A plan is a chain of devices starting at root (device 0, which holds the embedding and the
classifier) and the number of layers each holds. search runs NSGA-II (Deb et al. 2002) over
rank orders and layer counts for the Pareto front of three objectives: per-token latency of
one sequence, throughput with k sequences in flight, and memory headroom (the smallest free
fraction of any device's memory). It compares the front with two baselines: the greedy split
in proportion to memory in the profile's order (as the Petals laptop study assigned layers),
and the minimum-latency chain a Petals client routes (Dijkstra over (devices used, last
device) states, fastest devices filled first).

The cost model (CostModel) is calibrated from measurements: per-layer decode time of every
device, root's time outside the layers, and link latency and bandwidth between every pair.
"""
import heapq
import json
import math
import time
from dataclasses import dataclass

import numpy as np

from .atomic import append_line, write_json
from .checks import check_paths, read_json
from .cli import (ArgumentParser, add_fault_options, add_kernel_options, entry, run,
                  use_fault_options)
from .errors import DllmError
from .pipeline import HEADER_BYTES
from .placement import stage_bytes
from .weight_types import describe_types
from .profile import Device, Link, Profile, as_profile, check_layers_fit, layer_caps
from .shard import proportional_counts

PROG = "dllm.plan"
DROP = 0.1   # a non-root device whose layer weight in the genome is below this is left out
TARGET = 0.25   # the bound on |predicted - measured| / measured latency (plan check)
INF = 1e300  # stands for an infeasible plan's infinite objectives inside the search


# --- the cost model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """order: device indices in chain order (order[0] == 0, root); layers: per device in
    that order. latency: seconds per token of one sequence; seconds_per_token: 1/throughput
    with k sequences in flight; headroom: the smallest free fraction of a used device's
    memory."""
    order: tuple
    layers: tuple
    latency: float = float("inf")
    seconds_per_token: float = float("inf")
    headroom: float = -float("inf")
    source: str = ""

    @property
    def objectives(self):
        """Minimized by the search."""
        return (self.latency, self.seconds_per_token, -self.headroom)

    @property
    def feasible(self):
        return np.isfinite(self.latency)

    def dominates(self, other, tolerance=1e-9):
        """No worse in every objective and better in one (beyond float rounding); a
        feasible plan dominates every infeasible one."""
        a, b = self.objectives, other.objectives
        slack = [tolerance * abs(y) if math.isfinite(y) else 0.0 for y in b]
        return all(x <= y + s for x, y, s in zip(a, b, slack)) and \
            any(x < y - s for x, y, s in zip(a, b, slack))


class CostModel:
    """Predicted latency, throughput and memory of a pipeline plan (module docstring).

    One token of one sequence: root's own work (embedding, final norm, classifier, sampling:
    classifier_ms), every device's layers (layer_ms / speed each), and one hop per link of the
    chain root -> ... -> last -> root (latency + message bytes / bandwidth). With k sequences
    in flight a device works on one while the others travel: throughput is the smaller of
    k / latency and 1 / (the busiest device's time per token, or the slowest link's transfer).
    """

    def __init__(self, config, quant, profile, sync="q80", sequences=1, max_seq_len=None):
        if profile.layer_ms is None or profile.classifier_ms is None:
            raise DllmError("the profile has no layer_ms / classifier_ms: measure them with "
                            "python -m dllm.plan calibrate, or add them")
        self.config, self.quant, self.profile, self.sequences = config, quant, profile, sequences
        self.max_seq_len = max_seq_len or config.max_seq_len
        self.layer_s = [profile.layer_ms / 1e3 / d.speed for d in profile.devices]
        self.head_s = profile.classifier_ms / 1e3 / profile.devices[0].speed
        row = config.dim // 32 * 34 if sync == "q80" else config.dim * 4
        self.message_bytes = HEADER_BYTES + row
        self.caps = layer_caps(config, quant, profile, self.max_seq_len, sequences)
        self.per_layer_bytes = stage_bytes(config, quant, 1, False, self.max_seq_len, sequences)
        self.root_bytes = stage_bytes(config, quant, 0, True, self.max_seq_len, sequences)
        n = profile.size
        self.hop_s = np.array([[profile.link(i, j).seconds(self.message_bytes) if i != j else 0.0
                                for j in range(n)] for i in range(n)])
        self.wire_s = np.array([[self.message_bytes / profile.link(i, j).bandwidth if i != j
                                 else 0.0 for j in range(n)] for i in range(n)])

    def chain_hops(self, order):
        """Seconds on the wire for one token around the chain (none on root alone)."""
        if len(order) == 1:
            return 0.0
        ring = list(order) + [order[0]]
        return float(sum(self.hop_s[a, b] for a, b in zip(ring, ring[1:])))

    def evaluate(self, order, layers, source=""):
        """The Plan with its predictions; infinite objectives when a device's memory is short
        or a device after root holds no layer (the pipeline refuses such a rank)."""
        order, layers = tuple(int(i) for i in order), tuple(int(n) for n in layers)
        if order[0] != 0 or sum(layers) != self.config.n_layers or min(layers[1:], default=1) < 1 \
                or any(n > self.caps[d] for d, n in zip(order, layers)):
            return Plan(order, layers, source=source)
        busy = [n * self.layer_s[d] for d, n in zip(order, layers)]
        busy[0] += self.head_s
        latency = sum(busy) + self.chain_hops(order)
        ring = list(order) + [order[0]]
        wire = max([self.wire_s[a, b] for a, b in zip(ring, ring[1:])] if len(order) > 1 else [0])
        per_token = max(latency / self.sequences, max(busy), wire)
        headroom = min(1 - (n * self.per_layer_bytes + (self.root_bytes if d == 0 else 0)) /
                       self.profile.devices[d].memory for d, n in zip(order, layers))
        return Plan(order, layers, latency, per_token, headroom, source)

    # --- genome: random keys in [0, 1]^(2n), so standard real-valued operators apply ---------
    def decode(self, x, source="nsga2"):
        """x[:n]: order keys of devices 1..n-1; x[n:]: layer weights (below DROP: unused)."""
        n = self.profile.size
        keys, weights = x[:n], x[n:]
        used = [0] + sorted((d for d in range(1, n) if weights[d] >= DROP), key=lambda d: keys[d])
        try:
            counts = proportional_counts(self.config.n_layers, [weights[d] for d in used],
                                         [self.caps[d] for d in used])
        except DllmError:      # the devices used cannot hold the model
            return Plan(tuple(used), tuple([0] * len(used)), source=source)
        keep = [i for i, c in enumerate(counts) if i == 0 or c > 0]
        return self.evaluate([used[i] for i in keep], [counts[i] for i in keep], source)

    def encode(self, plan):
        """A genome that decodes to `plan` (to seed the search with the baselines)."""
        n = self.profile.size
        x = np.zeros(2 * n)
        for position, (d, count) in enumerate(zip(plan.order, plan.layers)):
            x[d] = position / n
            x[n + d] = max(count / self.config.n_layers, DROP if d else 0.0)
        return x


# --- baselines ----------------------------------------------------------------------------------
def greedy_memory_plan(model):
    """Layers in proportion to each device's free memory, in the profile's order: the
    Petals laptop study's assignment. A device after root whose share rounds to no layer
    is left out of the chain."""
    p = model.profile
    free = [max(d.memory - (stage_bytes(model.config, model.quant, 0, i == 0, model.max_seq_len)
                            if i == 0 else 0), 0) for i, d in enumerate(p.devices)]
    try:
        counts = proportional_counts(model.config.n_layers, free, model.caps)
    except DllmError:
        return Plan(tuple(range(p.size)), (0,) * p.size, source="greedy-memory")
    used = [d for d in range(p.size) if d == 0 or counts[d] > 0]
    return model.evaluate(used, [counts[d] for d in used], "greedy-memory")


def fastest_fill(model, devices):
    """Layers on `devices` filling the fastest first, up to each one's memory; None when
    they cannot hold the model. Minimizes the compute part of the latency."""
    counts, left = {d: 0 for d in devices}, model.config.n_layers
    for d in sorted(devices, key=lambda d: (model.layer_s[d], d)):
        counts[d] = min(model.caps[d], left)
        left -= counts[d]
    return None if left else counts


def min_latency_plan(model, max_devices=14):
    """The chain of least per-token latency, as a Petals client routes: Dijkstra over states
    (set of devices used, last device), an edge adding one device at the cost of the hop to
    it; a state's total adds the hop back to root and the compute of its devices filled
    fastest-first (the order does not change the compute, the hops do)."""
    n = model.profile.size
    if n > max_devices:
        raise DllmError(f"the min-latency chain searches all device subsets: at most "
                        f"{max_devices} devices, the profile has {n}")
    best, best_path, best_total = None, None, float("inf")
    heap, settled = [(0.0, 1, 0, (0,))], set()
    while heap:
        cost, mask, last, path = heapq.heappop(heap)
        if (mask, last) in settled:
            continue
        settled.add((mask, last))
        fill = fastest_fill(model, path)
        if fill is not None and all(fill[d] > 0 for d in path[1:]):
            total = cost + (model.hop_s[last, 0] if last else 0.0) + model.head_s + sum(
                fill[d] * model.layer_s[d] for d in path)
            if total < best_total:
                best, best_total = [fill[d] for d in path], total
                best_path = path
        for d in range(1, n):
            if not mask >> d & 1:
                heapq.heappush(heap, (cost + model.hop_s[last, d], mask | 1 << d, d, path + (d,)))
    if best is None:
        return Plan(tuple(range(n)), (0,) * n, source="min-latency")
    return model.evaluate(best_path, best, "min-latency")


# --- NSGA-II ------------------------------------------------------------------------------------
def nondominated_sort(F):
    """Front index of every row of F (n, m), minimizing; 0 = the Pareto front."""
    F = np.asarray(F, dtype=np.float64)
    n = len(F)
    better = np.all(F[:, None] <= F[None], axis=2) & np.any(F[:, None] < F[None], axis=2)
    dominated_by = better.sum(axis=0)          # how many rows dominate each row
    rank, front, current = np.full(n, -1), 0, np.flatnonzero(dominated_by == 0)
    while len(current):
        rank[current] = front
        dominated_by = dominated_by - better[current].sum(axis=0)
        dominated_by[rank >= 0] = -1
        current, front = np.flatnonzero(dominated_by == 0), front + 1
    return rank


def crowding_distance(F):
    """Crowding distance of each row of one front (boundary rows: infinite). Infinite
    objectives count as INF, so that no span is inf - inf."""
    F = _finite(F)
    n, m = F.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(F[:, j], kind="stable")
        span = F[order[-1], j] - F[order[0], j]
        distance[order[[0, -1]]] = np.inf
        if span > 0 and np.isfinite(span):
            distance[order[1:-1]] += (F[order[2:], j] - F[order[:-2], j]) / span
    return distance


def _finite(F):
    """F as float64 with +-inf replaced by +-INF and NaN by INF (an infeasible point)."""
    return np.nan_to_num(np.asarray(F, dtype=np.float64), nan=INF, posinf=INF, neginf=-INF)


def _survivors(F, count):
    """Indices of the `count` best rows: by front, then by crowding distance."""
    rank = nondominated_sort(F)
    chosen = []
    for front in range(rank.max() + 1):
        members = np.flatnonzero(rank == front)
        if len(chosen) + len(members) <= count:
            chosen += members.tolist()
        else:
            crowd = crowding_distance(F[members])
            chosen += members[np.argsort(-crowd, kind="stable")[:count - len(chosen)]].tolist()
            break
    return np.array(chosen)


def nsga2(evaluate, n_var, pop_size=40, generations=50, seed=0, initial=None, eta_c=15.0,
          eta_m=20.0):
    """Minimize evaluate(x) -> objective tuple over x in [0, 1]^n_var. Binary tournaments on
    (front, crowding), simulated binary crossover and polynomial mutation (Deb et al. 2002);
    infeasible points should evaluate to inf. Returns (X, F) of the final population."""
    rng = np.random.default_rng(seed)
    X = rng.random((pop_size, n_var))
    if initial is not None and len(initial):
        X[:len(initial)] = np.clip(np.asarray(initial)[:pop_size], 0, 1)
    F = np.array([evaluate(x) for x in X], dtype=np.float64)
    for _ in range(generations):
        finite = _finite(F)
        rank = nondominated_sort(finite)
        crowd = np.zeros(len(F))
        for front in range(rank.max() + 1):
            members = np.flatnonzero(rank == front)
            crowd[members] = crowding_distance(finite[members])
        a, b = rng.integers(0, len(X), (2, pop_size))
        wins = (rank[a] < rank[b]) | ((rank[a] == rank[b]) & (crowd[a] >= crowd[b]))
        parents = X[np.where(wins, a, b)]
        children = _mutate(_crossover(parents, rng, eta_c), rng, eta_m)
        Fc = np.array([evaluate(x) for x in children], dtype=np.float64)
        X, F = np.vstack([X, children]), np.vstack([F, Fc])
        keep = _survivors(_finite(F), pop_size)
        X, F = X[keep], F[keep]
    return X, F


def _crossover(parents, rng, eta):
    """Simulated binary crossover of consecutive pairs, each variable with probability 0.5."""
    children = parents.copy()
    for i in range(0, len(parents) - 1, 2):
        p1, p2 = parents[i], parents[i + 1]
        u = rng.random(len(p1))
        beta = np.where(u <= 0.5, (2 * u) ** (1 / (eta + 1)), (1 / (2 * (1 - u))) ** (1 / (eta + 1)))
        swap = rng.random(len(p1)) < 0.5
        c1 = 0.5 * ((1 + beta) * p1 + (1 - beta) * p2)
        c2 = 0.5 * ((1 - beta) * p1 + (1 + beta) * p2)
        children[i] = np.where(swap, c1, p1)
        children[i + 1] = np.where(swap, c2, p2)
    return np.clip(children, 0, 1)


def _mutate(X, rng, eta):
    """Polynomial mutation, each variable with probability 1 / n_var."""
    mask = rng.random(X.shape) < 1.0 / X.shape[1]
    u = rng.random(X.shape)
    delta = np.where(u < 0.5, (2 * u) ** (1 / (eta + 1)) - 1, 1 - (2 * (1 - u)) ** (1 / (eta + 1)))
    return np.clip(np.where(mask, X + delta, X), 0, 1)


def pymoo_nsga2(evaluate, n_var, pop_size=40, generations=50, seed=0, initial=None):
    """The same search with pymoo's NSGA2 (pip install 'dllm[plan]')."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize
    except ImportError:
        raise DllmError("--engine pymoo needs pymoo: pip install 'dllm[plan]'") from None

    class Pipeline(Problem):
        def _evaluate(self, X, out, *args, **kwargs):
            out["F"] = _finite([evaluate(x) for x in X])

    sampling = np.random.default_rng(seed).random((pop_size, n_var))
    if initial is not None and len(initial):
        sampling[:len(initial)] = np.asarray(initial)[:pop_size]
    result = minimize(Pipeline(n_var=n_var, n_obj=3, xl=0.0, xu=1.0),
                      NSGA2(pop_size=pop_size, sampling=sampling), ("n_gen", generations),
                      seed=seed, verbose=False)
    X = np.atleast_2d(result.pop.get("X"))
    return X, np.array([evaluate(x) for x in X])


def search(model, pop_size=40, generations=50, seed=0, engine="builtin"):
    """The Pareto front of plans (deduplicated, sorted by latency) and the baselines.
    Raises DllmError when the devices cannot hold the model in any plan."""
    check_layers_fit(model.config, model.caps, model.max_seq_len, model.sequences)
    baselines = [greedy_memory_plan(model), min_latency_plan(model)]
    seeds = [model.encode(p) for p in baselines if p.feasible]
    cache = {}

    def objectives(x):
        plan = model.decode(x)
        cache[(plan.order, plan.layers)] = plan
        return plan.objectives

    run_search = {"builtin": nsga2, "pymoo": pymoo_nsga2}[engine]
    X, _ = run_search(objectives, 2 * model.profile.size, pop_size, generations, seed, seeds)
    plans = {(p.order, p.layers): p for p in (model.decode(x) for x in X) if p.feasible}
    plans.update({(p.order, p.layers): p for p in baselines if p.feasible})
    candidates = list(plans.values())
    front = []
    for p in candidates:     # non-dominated, and one plan per point of objective space
        if not any(q.dominates(p) for q in candidates) and not any(
                np.allclose(p.objectives, q.objectives, rtol=1e-9) for q in front):
            front.append(p)
    if not front:
        raise DllmError(f"the model's {model.config.n_layers} layers fit no plan of the "
                        f"profile's {model.profile.size} devices")
    return sorted(front, key=lambda p: (p.latency, p.seconds_per_token)), baselines


def recommend(front):
    """The front's extremes (least latency, most throughput, most headroom) and its knee (the
    plan nearest the ideal point, objectives scaled to [0, 1])."""
    if not front:
        return []
    F = np.array([p.objectives for p in front])
    span = np.where(F.max(0) > F.min(0), F.max(0) - F.min(0), 1.0)
    knee = int(np.argmin(np.linalg.norm((F - F.min(0)) / span, axis=1)))
    picks = [int(np.argmin(F[:, 0])), int(np.argmin(F[:, 1])), int(np.argmin(F[:, 2])), knee]
    return [front[i] for i in dict.fromkeys(picks)]


# --- files --------------------------------------------------------------------------------------
def plan_record(model, plan):
    p = model.profile
    devices = tuple(p.devices[d] for d in plan.order)
    names = {d.name for d in devices}
    profile = Profile(devices, tuple(link for link in p.links if {link[0], link[1]} <= names),
                      p.default_link, p.local_link, p.layer_ms, p.classifier_ms, plan.layers)
    return {"source": plan.source, "order": [p.devices[d].name for d in plan.order],
            "ranks": list(plan.order), "layers": list(plan.layers),
            "predicted": {"ms_per_token": 1e3 * plan.latency,
                          "tokens_per_s": 1 / plan.seconds_per_token,
                          "headroom": plan.headroom},
            "profile": profile.to_dict()}


def baseline_note(plan, front):
    """How a baseline compares with the front: never "on the front" unless it fits."""
    if not plan.feasible:
        return ""          # plan_line already says "does not fit"
    better = [p for p in front if p.dominates(plan)]
    return f"   dominated by {len(better)} front plan(s)" if better else "   on the front"


def plan_line(model, plan, mark=""):
    names = " > ".join(f"{model.profile.devices[d].name}:{n}" for d, n in zip(plan.order, plan.layers))
    if not plan.feasible:
        return f"{mark:1} {plan.source:14} does not fit: {names}"
    return (f"{mark:1} {plan.source:14} {1e3 * plan.latency:9.1f} "
            f"{1 / plan.seconds_per_token:9.2f} {100 * plan.headroom:8.1f}%  {names}")


# --- entry point --------------------------------------------------------------------------------
def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="measure every rank's layer time and every link "
                       "(collective: run under mpirun on the cluster)")
    _model_args(c)
    c.add_argument("-o", "--output", required=True, help="profile JSON to write")
    c.add_argument("--memory", default=None, help="memory per device instead of the host's "
                   "available memory divided by its ranks (e.g. 4GB)")
    c.add_argument("--context", type=int, default=16,
                   help="cached positions while timing a layer (default 16)")
    c.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    s = sub.add_parser("search", help="NSGA-II Pareto front of plans for a profile")
    _model_args(s)
    s.add_argument("--profile", required=True, help="device and link profile (JSON)")
    s.add_argument("--population", type=int, default=40, help="NSGA-II population (40)")
    s.add_argument("--generations", type=int, default=50, help="NSGA-II generations (50)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the search (0)")
    s.add_argument("--engine", default="builtin", choices=("builtin", "pymoo"),
                   help="dllm's NSGA-II (default) or pymoo's (pip install 'dllm[plan]')")
    s.add_argument("-o", "--output", default=None, help="write the plans as JSON here")
    k = sub.add_parser("check", help="run plans and compare measured with predicted "
                       "(collective: the ranks of the calibration)")
    k.add_argument("plans", help="JSON written by search -o")
    k.add_argument("--model", required=True, help="dllm HDF5 model file")
    k.add_argument("--which", default="recommended",
                   choices=("recommended", "front", "baselines", "all"),
                   help="plans to run (default recommended)")
    k.add_argument("--decode-tokens", type=int, default=8, help="timed steps per sequence (8)")
    k.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (8)")
    k.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    k.add_argument("--out", default=None, help="append the comparison as a JSON line")
    for collective in (c, k):   # ranks wait while others are timed: --load-timeout holds
        add_kernel_options(collective)
        add_fault_options(collective)
    return p


def _model_args(p):
    p.add_argument("--model", default=None, help="dllm HDF5 model file (its header)")
    p.add_argument("--preset", default=None,
                   help="instead of --model, a synthetic preset's shape (search only; "
                        "calibrate and check run the model itself)")
    p.add_argument("--layers", type=int, default=None, help="layers of the preset")
    p.add_argument("--sync", default="q80", choices=("q80", "f32"), help="payload (q80)")
    p.add_argument("--sequences", type=int, default=4,
                   help="sequences in flight k: throughput and KV cache (default 4)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context of every KV cache (default: the model's)")


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    args = build_parser(comm.is_root).parse_args(argv)
    comm.from_root(check_paths, args)
    if args.command != "search":
        use_fault_options(comm, args)
    if args.command == "calibrate":
        return calibrate_main(comm, args)
    if args.command == "check":
        return check_main(comm, args)
    return comm.from_root(search_main, args) or 0


def model_shape(args):
    """(config, weight types: {tensor: type} or one type) from --model's header or --preset."""
    if (args.model is None) == (args.preset is None):
        raise DllmError("give exactly one of --model and --preset")
    if args.model is not None:
        from .modelfile import ModelFile
        with ModelFile(args.model) as mf:
            return mf.config, mf.types()
    from .converters.synthetic import synthetic_config
    return synthetic_config(args.preset, args.layers), "q40"


def search_main(args):
    """Root: search, print the front and the baselines, write the JSON."""
    config, quant = model_shape(args)
    profile = as_profile(args.profile)
    model = CostModel(config, quant, profile, args.sync, args.sequences, args.max_seq_len)
    started = time.perf_counter()
    front, baselines = search(model, args.population, args.generations, args.seed, args.engine)
    chosen = recommend(front)
    print(f"--- {PROG}: {config.n_layers} layers over {profile.size} devices, k = "
          f"{args.sequences} sequences, {args.engine} NSGA-II "
          f"({args.population} x {args.generations}, {time.perf_counter() - started:.1f} s)")
    print(f"  {'plan':14} {'ms/token':>9} {'tok/s':>9} {'headroom':>9}  chain (device:layers)")
    for plan in front:
        print(plan_line(model, plan, "*" if plan in chosen else ""))
    print("baselines:")
    for plan in baselines:
        print(plan_line(model, plan) + baseline_note(plan, front))
    print("* recommended: least latency, most throughput, most headroom, knee")
    if args.output:
        record = {"kind": "plans", "model": args.model or f"preset:{args.preset}",
                  "config": config.to_dict(), "quant": quant if isinstance(quant, str) else describe_types(quant), "sync": args.sync,
                  "sequences": args.sequences, "max_seq_len": model.max_seq_len,
                  "engine": args.engine, "front": [plan_record(model, p) for p in front],
                  "recommended": [front.index(p) for p in chosen],
                  "baselines": [plan_record(model, p) for p in baselines if p.feasible]}
        write_json(args.output, record)
    return 0


# --- calibrate and check (collective) -------------------------------------------------------------
def on_ranks(comm, ranks, fn):
    """Run fn(sub) on a communicator of `ranks` (in that order; ranks[0] becomes its root)
    while the other ranks sleep; a DllmError on any rank is raised on every rank."""
    inside = comm.rank in ranks
    sub = comm.split(0 if inside else None, ranks.index(comm.rank) if inside else 0)
    result, error = None, None
    if sub is not None:
        try:
            result = fn(sub)
        except DllmError as exc:
            error = str(exc)
    comm.idle_barrier()
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            raise DllmError(message if rank == 0 else f"rank {rank}: {message}")
    return result


def time_layers(model, pos, repeats):
    """Median ms of one of this rank's layers for one token at position pos."""
    x = np.random.default_rng(model.comm.rank).standard_normal((1, model.config.dim))
    x = x.astype(np.float32)
    model.run_stage(x, 0, pos)                   # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.run_stage(x, 0, pos)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times)) / len(model.layers)


def time_root(model, repeats):
    """Median ms of root's work outside the layers for one token: embedding, final norm,
    classifier, greedy sampling."""
    x = np.zeros((1, model.config.dim), np.float32)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        model.embed([3])
        int(np.argmax(model.classify(x)[-1]))
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times[1:]))


def ping_pong(comm, a, b, payload, rows, repeats):
    """One-way seconds of a pipeline message of `rows` rows from rank a to rank b, packed and
    unpacked as the engine does (median of round trips / 2, the first left out). Called by
    ranks a and b only: each round trip synchronizes the pair."""
    nbytes = HEADER_BYTES + rows * payload.row_bytes[0]
    buf = np.zeros(nbytes, np.uint8)
    x = np.ones((rows, payload.total), np.float32)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for sender, receiver in ((a, b), (b, a)):
            if comm.rank == sender:
                buf[HEADER_BYTES:] = payload.pack(x, 0)
                comm.send_bytes(buf, receiver, 62)
            elif comm.rank == receiver:
                comm.recv_bytes(buf, sender, 62)
                payload.unpack(buf[HEADER_BYTES:], rows)
        times.append((time.perf_counter() - started) / 2)
    return float(np.median(times[1:])), nbytes


def measure_link(comm, a, b, payload, repeats):
    """Link(latency, bandwidth) between ranks a and b, on every rank: a one-row message gives
    the latency, a 64-row one the bandwidth. The other ranks sleep meanwhile, so that they
    take no core from the pair (ranks sharing a host's cores)."""
    link = None
    if comm.rank in (a, b):
        small, small_bytes = ping_pong(comm, a, b, payload, 1, repeats)
        large, large_bytes = ping_pong(comm, a, b, payload, 64, repeats)
        extra = large - small
        bandwidth = (large_bytes - small_bytes) / extra if extra > 0 else large_bytes / large
        link = Link(max(small - small_bytes / bandwidth, 0.0), bandwidth)
    comm.idle_barrier()
    return comm.allgather(link)[a]


def available_memory(comm):
    """This host's available memory divided by the ranks on it (bytes)."""
    import os
    import socket
    host = socket.gethostname()
    per_host = comm.allgather(host).count(host)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        total = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return total // per_host


def calibrate_main(comm, args):
    """Collective: every rank times its layers alone, root its own work, every pair of ranks
    its link; root writes the profile (device i = rank i; speed relative to root)."""
    import socket
    from .loading import load
    from .profile import parse_bytes
    from .sync import SliceExchange
    if args.model is None:
        raise DllmError("calibrate runs the model: give --model")
    memory = parse_bytes(args.memory) if args.memory else available_memory(comm)
    model = load(args.model, comm, parallel="pipeline", sync=args.sync,
                 max_seq_len=args.context + 1, prefill_chunk=args.context,
                 kernels=args.kernels, threads=args.threads)
    if comm.size > model.config.n_layers:
        raise DllmError(f"every rank needs a layer to time: at most {model.config.n_layers} "
                        f"ranks for this model, the job has {comm.size}")
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, args.context).tolist()
    model.logits(ids)                                       # fill the KV caches
    mine = None
    for rank in range(comm.size):                          # one rank at a time
        if comm.rank == rank:
            mine = time_layers(model, args.context, args.repeats)
        comm.idle_barrier()
    layer_ms = comm.allgather(mine)
    root_ms = time_root(model, args.repeats) if comm.is_root else None
    comm.idle_barrier()                                    # the others sleep meanwhile
    payload = SliceExchange([model.config.dim], args.sync)
    links = []
    for a in range(comm.size):
        for b in range(a + 1, comm.size):
            links.append((a, b, measure_link(comm, a, b, payload, 4 * args.repeats)))
    hosts = comm.allgather(socket.gethostname())
    memories = comm.allgather(memory)
    if comm.is_root:
        names = [f"rank{r}" for r in range(comm.size)]
        devices = tuple(Device(names[r], hosts[r], memories[r], layer_ms[0] / layer_ms[r])
                        for r in range(comm.size))
        profile = Profile(devices, tuple((names[a], names[b], link) for a, b, link in links),
                          layer_ms=layer_ms[0], classifier_ms=root_ms)
        write_json(args.output, profile.to_dict())
        print(f"--- {PROG} calibrate: {comm.size} rank(s), {args.model}, position "
              f"{args.context}")
        for r, d in enumerate(devices):
            print(f"rank {r} ({d.host}): {layer_ms[r]:.2f} ms per layer, speed {d.speed:.2f}, "
                  f"memory {d.memory / 1e9:.1f} GB")
        print(f"root outside the layers: {root_ms:.2f} ms per token")
        for a, b, link in links:
            print(f"link {a}-{b}: {1e3 * link.latency:.3f} ms + "
                  f"{link.bandwidth * 8 / 1e6:.0f} Mbit/s")
        print(f"wrote {args.output}")
    return 0


def check_main(comm, args):
    """Collective: run each chosen plan on its ranks (plan["ranks"] are the calibration's
    ranks) and compare measured latency and throughput with the predictions."""
    from .bench import timed_sequences
    from .loading import load
    record = comm.from_root(_read_plans, args.plans)
    picks = {"recommended": [("front", i) for i in record["recommended"]],
             "front": [("front", i) for i in range(len(record["front"]))],
             "baselines": [("baselines", i) for i in range(len(record["baselines"]))]}
    picks["all"] = picks["front"] + picks["baselines"]
    k, steps = record["sequences"], args.warmup + args.decode_tokens + 1
    rows = []
    for group, index in picks[args.which]:
        plan = record[group][index]
        if max(plan["ranks"]) >= comm.size:
            raise DllmError(f"plan {plan['order']} needs rank {max(plan['ranks'])}: run check "
                            f"with the calibration's {len(plan['profile']['devices'])} ranks")

        def measure(sub, plan=plan):
            model = load(args.model, sub, parallel="pipeline", sync=record["sync"],
                         profile=plan["profile"], max_seq_len=args.prompt_len + steps,
                         prefill_chunk=args.prompt_len, kernels=args.kernels,
                         threads=args.threads)
            rng = np.random.default_rng(0)
            prompts = rng.integers(3, model.config.vocab_size, (k, args.prompt_len)).tolist()
            one = timed_sequences(model, prompts[:1], steps, args.warmup)
            many = timed_sequences(model, prompts, steps, args.warmup)
            return one["ms_per_token"], many["tokens_per_s"]

        measured = on_ranks(comm, plan["ranks"], measure)
        if comm.is_root:
            row = {"plan": plan, "group": group, "measured_ms_per_token": measured[0],
                   "measured_tokens_per_s": measured[1]}
            row["latency_error"] = latency_error(row)
            row["within_target"] = abs(row["latency_error"]) <= TARGET
            rows.append(row)
    if comm.is_root:
        print(check_table(rows, k))
        if args.out:
            append_line(args.out, json.dumps({"kind": "plan-check", "plans": args.plans,
                                              "sequences": k, "rows": rows,
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return 0


def _read_plans(path):
    """Root: a plans file of search -o, checked so far as check reads it (every plan's
    profile is checked again when loaded)."""
    record = read_json(path, "plans file")
    if not isinstance(record, dict) or record.get("kind") != "plans":
        raise DllmError(f"{path} is not written by python -m {PROG} search -o")
    try:
        plans = record["front"] + record["baselines"]
        ok = (isinstance(record["sequences"], int) and record["sequences"] >= 1
              and record["sync"] in ("q80", "f32")
              and all(0 <= i < len(record["front"]) for i in record["recommended"])
              and all(isinstance(p["ranks"], list) and p["ranks"]
                      and all(isinstance(r, int) and r >= 0 for r in p["ranks"])
                      and isinstance(p["profile"], dict)
                      and isinstance(p["predicted"]["ms_per_token"], (int, float))
                      for p in plans))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise DllmError(f"plans file {path} is incomplete or damaged (rewrite it with "
                        f"python -m {PROG} search -o)")
    return record


def latency_error(row):
    """(predicted - measured) / measured per-token latency of a check row."""
    measured = row["measured_ms_per_token"]
    return (row["plan"]["predicted"]["ms_per_token"] - measured) / measured


def check_table(rows, k):
    """Predicted against measured, each row marked within or outside the TARGET on latency
    (the issue's bound), with a count of the rows within it."""
    bound = f"{100 * TARGET:.0f}%"
    lines = [f"{'plan':14} {'chain (device:layers)':28} {'ms/token':>9} {'measured':>9} "
             f"{'error':>7} {f'tok/s k={k}':>10} {'measured':>9} {'error':>7}  latency"]
    for r in rows:
        plan, predicted = r["plan"], r["plan"]["predicted"]
        chain = " > ".join(f"{d}:{n}" for d, n in zip(plan["order"], plan["layers"]))
        ms, tps, error = r["measured_ms_per_token"], r["measured_tokens_per_s"], latency_error(r)
        verdict = "within" if abs(error) <= TARGET else "OUTSIDE"
        lines.append(f"{plan['source']:14} {chain:28} {predicted['ms_per_token']:9.1f} {ms:9.1f} "
                     f"{100 * error:6.1f}% "
                     f"{predicted['tokens_per_s']:10.2f} {tps:9.2f} "
                     f"{100 * (predicted['tokens_per_s'] - tps) / tps:6.1f}%  {verdict} {bound}")
    within = sum(abs(latency_error(r)) <= TARGET for r in rows)
    lines.append(f"predicted latency within {bound} of measured for {within} of {len(rows)} "
                 f"plan(s)")
    return "\n".join(lines)


if __name__ == "__main__":
    entry(_main, PROG)
