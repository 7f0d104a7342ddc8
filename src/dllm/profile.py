"""Device and link profiles of a heterogeneous cluster, and the splits they imply.

A profile describes every rank's device (memory it may use, relative speed) and the links
between them; docs/parallelism.md specifies the file. From it:

- pipeline: layers per rank in proportion to speed, never beyond a rank's memory (weights of
  its layers + their KV cache; root also holds the embedding, final norm and classifier);
- tensor: uneven slices, shares in proportion to speed, capped so every slice fits;
- the planner (dllm.plan): per-layer time, classifier time and link costs.

Pure functions of (config, weight types, profile); only use_profile communicates. `types`
is what dllm.placement takes: {tensor: weight type} or one type name.
"""
import math
import re
from dataclasses import asdict, dataclass

from .checks import read_json
from .errors import DllmError
from .placement import (kv_bytes, layer_bytes, root_bytes, shard_bytes, split_layers,
                        stage_bytes, tensor_bytes)
from .shard import counts_to_ranges, plan, proportional_counts

UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
SHARE_UNITS = 10 ** 6   # resolution of tensor-parallel shares


def parse_bytes(value, what="memory"):
    """8000000000, "8GB", "7.5 GiB" -> bytes (int). Decimal kB/MB/GB, binary KiB/MiB/GiB."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in UNITS:
        raise DllmError(f"{what} {value!r} is not a size such as 8GB, 512MiB or 4000000000")
    try:
        return int(float(match.group(1)) * UNITS[match.group(2).lower()])
    except ValueError:
        raise DllmError(f"{what} {value!r} is not a size such as 8GB, 512MiB or 4000000000") from None


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    memory: int          # bytes dllm may use on this rank (weights, KV cache)
    speed: float = 1.0   # relative to the device layer_ms was measured on


@dataclass(frozen=True)
class Link:
    latency: float       # seconds for a message of a few bytes, one way
    bandwidth: float     # bytes per second

    def seconds(self, nbytes):
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Profile:
    """devices in rank order; links: ((name, name, Link), ...) between named devices;
    default_link for other pairs, local_link for devices on the same host (else default).
    layer_ms: decode time of one layer for one token on a speed-1.0 device; classifier_ms:
    root's per-token work outside the layers (embedding, final norm, classifier, sampling).
    layers: a fixed number of layers per rank (a plan), or None to split by speed."""
    devices: tuple
    links: tuple = ()
    default_link: Link = None
    local_link: Link = None
    layer_ms: float = None
    classifier_ms: float = None
    layers: tuple = None

    @property
    def size(self):
        return len(self.devices)

    @property
    def speeds(self):
        return [d.speed for d in self.devices]

    def link(self, i, j):
        """The Link between the devices of ranks i and j."""
        a, b = self.devices[i], self.devices[j]
        for x, y, link in self.links:
            if {x, y} == {a.name, b.name}:
                return link
        if a.host == b.host and self.local_link is not None:
            return self.local_link
        if self.default_link is None:
            raise DllmError(f"profile has no link between {a.name} and {b.name} and no "
                            f"default_link")
        return self.default_link

    def with_layers(self, layers):
        return Profile(self.devices, self.links, self.default_link, self.local_link,
                       self.layer_ms, self.classifier_ms, tuple(layers))

    def to_dict(self):
        def link(k):
            return {"latency_ms": k.latency * 1e3, "bandwidth_mbit_s": k.bandwidth * 8 / 1e6}
        out = {"devices": [asdict(d) for d in self.devices],
               "links": [{"between": [a, b], **link(k)} for a, b, k in self.links]}
        for key in ("default_link", "local_link"):
            if getattr(self, key) is not None:
                out[key] = link(getattr(self, key))
        for key in ("layer_ms", "classifier_ms"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data, source="profile"):
        """Validate a profile read from JSON; DllmError names the field."""
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list) \
                or not data["devices"]:
            raise DllmError(f"{source}: needs a non-empty list \"devices\"")
        if len(data["devices"]) > MAX_DEVICES:
            raise DllmError(f"{source}: at most {MAX_DEVICES} devices, got "
                            f"{len(data['devices'])}")
        devices = tuple(_device(d, i, source) for i, d in enumerate(data["devices"]))
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise DllmError(f"{source}: device names must be unique, got {names}")
        links = []
        for entry in data.get("links", []):
            pair = entry.get("between") if isinstance(entry, dict) else None
            if not (isinstance(pair, list) and len(pair) == 2 and set(pair) <= set(names)):
                raise DllmError(f"{source}: a link needs \"between\": two device names, "
                                f"got {entry!r}")
            links.append((pair[0], pair[1], _link(entry, source)))
        layers = data.get("layers")
        if layers is not None and not (isinstance(layers, list) and len(layers) == len(devices)
                                       and all(isinstance(n, int) and n >= 0 for n in layers)):
            raise DllmError(f"{source}: \"layers\" must list one count >= 0 per device "
                            f"({len(devices)}), got {layers!r}")
        times = {}
        for key in ("layer_ms", "classifier_ms"):
            if data.get(key) is not None:
                times[key] = _positive(data[key], f"{source}: {key}", high=TIME_MS_MAX)
        return cls(devices, tuple(links),
                   _link(data["default_link"], source) if "default_link" in data else None,
                   _link(data["local_link"], source) if "local_link" in data else None,
                   layers=tuple(layers) if layers is not None else None, **times)


# Bounds of a profile's numbers: far beyond any real cluster, close enough that the splits'
# arithmetic stays in floating range (speeds of 1e308 overflowed it to NaN).
SPEED_RANGE = (1e-3, 1e3)            # relative speed: a ratio of a million between devices
MEMORY_MAX = 10 ** 18                # bytes: an exabyte per device
LATENCY_MS_MAX = 1e5                 # 100 s one way
BANDWIDTH_MBIT_RANGE = (1e-3, 1e7)   # 1 kbit/s .. 10 Tbit/s
TIME_MS_MAX = 1e6                    # layer_ms, classifier_ms: 1000 s per token
MAX_DEVICES = 1024                   # the planner's link matrices are devices x devices


def _positive(value, what, low=0.0, high=None):
    """A number in (0, high], or [low, high] when low > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise DllmError(f"{what} must be a positive number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise DllmError(f"{what} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _device(d, rank, source):
    if not isinstance(d, dict) or "memory" not in d:
        raise DllmError(f"{source}: device {rank} needs at least \"memory\", got {d!r}")
    name = str(d.get("name", f"rank{rank}"))
    memory = parse_bytes(d["memory"], f"{source}: memory of {name}")
    if memory > MEMORY_MAX:
        raise DllmError(f"{source}: memory of {name} must be at most {_mb(MEMORY_MAX)}, got "
                        f"{d['memory']!r}")
    return Device(name, str(d.get("host", name)), memory,
                  _positive(d.get("speed", 1.0), f"{source}: speed of {name}", *SPEED_RANGE))


def _link(entry, source):
    if not isinstance(entry, dict):
        raise DllmError(f"{source}: a link must be an object, got {entry!r}")
    latency = entry.get("latency_ms", 0.0)
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) \
            or not 0 <= latency <= LATENCY_MS_MAX:
        raise DllmError(f"{source}: latency_ms must be a number in [0, {LATENCY_MS_MAX:g}], "
                        f"got {latency!r}")
    bandwidth = _positive(entry.get("bandwidth_mbit_s"), f"{source}: bandwidth_mbit_s",
                          *BANDWIDTH_MBIT_RANGE)
    return Link(latency / 1e3, bandwidth * 1e6 / 8)


def read_profile(path):
    """Profile from a JSON file (see docs/parallelism.md): a profile, or the plans file that
    dllm.plan search writes, whose first recommended plan it then is (PLANS.json#N: plan N
    of its front), its devices in the plan's chain order and its layers fixed."""
    path, _, index = str(path).partition("#")
    data = read_json(path, "profile")
    if not (isinstance(data, dict) and data.get("kind") == "plans"):
        if index:
            raise DllmError(f"{path}: #{index} chooses a plan of a plans file (dllm.plan "
                            f"search -o), and this is a profile")
        return Profile.from_dict(data, path)
    front = data.get("front") or []
    try:
        n = int(index) if index else (data.get("recommended") or [0])[0]
        plan = front[n]
    except (ValueError, IndexError, TypeError):
        raise DllmError(f"{path}: no plan {index or 0} among the {len(front)} of its front "
                        f"(PLANS.json#N, N from 0)") from None
    if not isinstance(plan, dict) or "profile" not in plan:
        raise DllmError(f"{path}: plan {n} has no profile: rerun dllm.plan search")
    return Profile.from_dict(plan["profile"], f"{path}#{n}")


def as_profile(profile):
    """None, a path, a dict or a Profile -> Profile or None."""
    if profile is None or isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return Profile.from_dict(profile)
    return read_profile(profile)


def use_profile(comm, profile):
    """Collective: root reads the profile; every rank gets it, checked against the world."""
    profile = comm.from_root(as_profile, profile)
    if profile is not None and profile.size != comm.size:
        raise DllmError(f"the profile lists {profile.size} devices but the job has "
                        f"{comm.size} ranks: one device per rank, in rank order")
    return profile


# --- memory (bytes: dllm.placement) -----------------------------------------------------------
def layer_caps(config, types, profile, max_seq_len, sequences=1):
    """The most layers each rank's memory holds (after root's embedding and classifier)."""
    per_layer = layer_bytes(config, types) + sequences * kv_bytes(config, max_seq_len)
    caps = []
    for rank, device in enumerate(profile.devices):
        free = device.memory - (root_bytes(config, types) if rank == 0 else 0)
        if free < 0:
            raise DllmError(f"rank 0 ({device.name}) cannot hold the embedding and classifier: "
                            f"{_mb(root_bytes(config, types))} needed, {_mb(device.memory)} "
                            f"in the profile")
        caps.append(min(config.n_layers, free // per_layer))
    return caps


def assign_layers(config, types, profile, max_seq_len, sequences=1):
    """Layers per rank: the profile's fixed "layers" if given (checked against memory), else
    in proportion to speed, never beyond a rank's memory (water-filling, largest remainder)."""
    caps = layer_caps(config, types, profile, max_seq_len, sequences)
    if profile.layers is not None:
        layers = list(profile.layers)
        if sum(layers) != config.n_layers:
            raise DllmError(f"the profile assigns {sum(layers)} layers but the model has "
                            f"{config.n_layers}")
        for rank, (n, cap) in enumerate(zip(layers, caps)):
            if n > cap:
                need = stage_bytes(config, types, n, rank == 0, max_seq_len, sequences)
                raise DllmError(f"rank {rank} ({profile.devices[rank].name}) cannot hold {n} "
                                f"layers: {_mb(need)} needed, "
                                f"{_mb(profile.devices[rank].memory)} in the profile")
        return layers
    check_layers_fit(config, caps, max_seq_len, sequences)
    return proportional_counts(config.n_layers, profile.speeds, caps, minimum=1)


def check_layers_fit(config, caps, max_seq_len, sequences=1):
    """Raise DllmError when ranks holding at most caps[r] layers cannot hold the model."""
    if sum(caps) < config.n_layers:
        raise DllmError(f"the model's {config.n_layers} layers do not fit the profile's memory: "
                        f"the ranks hold at most {sum(caps)} ({', '.join(map(str, caps))}) "
                        f"with a context of {max_seq_len} and {sequences} sequence(s)")


class Stages(list):
    """(start, stop) layers of every rank, and the profile they follow (None: the even
    split), so that the pipeline can check later memory demands against it."""

    def __init__(self, ranges, profile=None):
        super().__init__(ranges)
        self.profile = profile


def pipeline_stages(config, types, size, profile, max_seq_len, sequences=1):
    """Stages of every rank: even without a profile, else assign_layers.

    Every rank but root holds at least one layer: one with none would only pass activations
    on, adding a hop and no work. Root may hold none (it still runs the embedding and the
    classifier), as dllm.plan may choose for a slow root."""
    if profile is None:
        if size > config.n_layers:
            raise DllmError(f"{config.n_layers} layers cannot be split over {size} pipeline "
                            f"ranks: every rank needs at least one layer")
        return Stages(split_layers(config.n_layers, size))
    counts = assign_layers(config, types, profile, max_seq_len, sequences)
    idle = [rank for rank, n in enumerate(counts) if rank > 0 and n == 0]
    if idle:
        raise DllmError(f"rank {idle[0]} ({profile.devices[idle[0]].name}) would hold none of "
                        f"the model's {config.n_layers} layers over {size} pipeline ranks "
                        f"(layers {counts}): every rank but root needs at least one")
    return Stages(counts_to_ranges(counts), profile)


def check_stage_memory(config, types, profile, stages, max_seq_len, sequences):
    """Raise DllmError when a pipeline rank's layers with KV caches for `sequences`
    sequences in flight (root: also the embedding and classifier) exceed its memory in the
    profile. A pure function, so every rank raises the same error."""
    for rank, ((start, stop), device) in enumerate(zip(stages, profile.devices)):
        need = stage_bytes(config, types, stop - start, rank == 0, max_seq_len, sequences)
        if need > device.memory:
            raise DllmError(f"{sequences} sequences in flight need {_mb(need)} on rank {rank} "
                            f"({device.name}: {stop - start} layers with their KV caches), more "
                            f"than the {_mb(device.memory)} in the profile")


def tensor_shares(config, types, profile, max_seq_len, scheme="slices"):
    """Shares of every rank's tensor-parallel slices: in proportion to speed, capped so that
    a rank's fraction of the split bytes (and root's embedding) fits its memory. Slices are
    whole heads and blocks, so a cap is lowered by what rounding (and, in scheme star, root's
    whole classifier and KV cache) added until every rank fits (check_tensor_memory has the
    last word)."""
    one = plan(config, 1)[0]
    split = shard_bytes(config, types, one, False, max_seq_len)   # everything that is split
    embedding = tensor_bytes(config, types, "tok_embeddings")
    caps = []
    for rank, device in enumerate(profile.devices):
        free = device.memory - (embedding if rank == 0 else 0)
        caps.append(max(0, int(SHARE_UNITS * free / split)))
    for _ in range(8):
        if sum(caps) < SHARE_UNITS:
            raise DllmError(f"the model ({_mb(split + embedding)} with a context of "
                            f"{max_seq_len}) does not fit the profile's memory "
                            f"({_mb(sum(d.memory for d in profile.devices))})")
        shares = proportional_counts(SHARE_UNITS, profile.speeds, caps)
        if not all(shares):
            return shares        # plan() names the rank without a share
        shards = plan(config, profile.size, scheme, shares=shares)
        over = [(s.rank, shard_bytes(config, types, s, s.rank == 0, max_seq_len) - d.memory)
                for s, d in zip(shards, profile.devices)]
        if all(excess <= 0 for _, excess in over):
            return shares
        for rank, excess in over:
            if excess > 0:
                caps[rank] = min(caps[rank], shares[rank]) - math.ceil(
                    SHARE_UNITS * excess / split) - SHARE_UNITS // (4 * config.n_heads)
                caps[rank] = max(caps[rank], 0)
    return shares


def check_tensor_memory(config, types, profile, shards, max_seq_len):
    """Raise DllmError when a rank's slices (after rounding to heads and blocks) exceed its
    memory in the profile."""
    for shard, device in zip(shards, profile.devices):
        need = shard_bytes(config, types, shard, shard.rank == 0, max_seq_len)
        if need > device.memory:
            raise DllmError(f"rank {shard.rank} ({device.name}) needs {_mb(need)} for its "
                            f"slices, more than the {_mb(device.memory)} in the profile")


def _mb(nbytes):
    """A size for messages: 10.0 kB, 37.5 MB, 3.9 GB (decimal units, as in profiles)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"
