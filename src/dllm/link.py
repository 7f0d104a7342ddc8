"""python -m dllm.link: run an MPI job with every rank-to-rank byte crossing an emulated link.

    python -m dllm.link 1gbit -n 4 -- python -m dllm.bench --preset llama2-7b --layers 4
    python -m dllm.link 1gbit -n 4 -- python -m dllm.linkprobe --shape llama2-7b
    python -m dllm.link 100mbit -n 2 --mpirun-args "-disable-auto-cleanup" -- python -m dllm.generate

Topology "switch" (the 1gbit and 100mbit presets, the paper's Gigabit switch): every rank runs
in its own network namespace with one interface, eth0, the end of a veth pair whose other end
is a port of a bridge in a namespace of its own (the switch). A token bucket (tc tbf) on both
ends limits each rank's upload and download to the link's rate separately, as full-duplex
Ethernet ports of a switch do. Topology "shared" (the wifi preset): all ranks in one namespace
talking over its loopback, whose one token bucket every byte of every rank shares, as on one
radio channel.

MPI is forced onto TCP over those interfaces (MPICH: no shared memory, the OFI netmod's tcp
provider on eth0/lo; `mpi_environment`), so no byte can bypass the shaping; dllm.linkprobe
reads the interface's byte counters to show that they do cross it.

Per-message delay: this kernel's tc has tbf and htb but not netem, so the links add no delay
of their own. Each preset's `delay_ms` (one way) is used by dllm.linkprobe and the figures as a
*modelled* term (message rounds x delay), stated as such; what the emulated links do have is
the latency of the TCP stack and MPI, measured by dllm.linkprobe (about 0.1 ms one way here).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN: `ip netns add`), iproute2 and the tbf qdisc;
without them it says why in one line and exits 1 (tests skip with that reason). The namespaces
are named dllm<pid>-... and removed on every way out but SIGKILL (`cleanup-stale` removes those
of dead processes).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DllmError

PROG = "dllm.link"
ENV_LINK = "DLLM_LINK"              # the link's JSON, set for the job so runs record it
MTU = 1500                          # bytes: Ethernet's, on every emulated interface
# The tbf bucket. A real port serializes every frame at the line rate, so the bucket should be
# as small as possible: a message that fits in a full bucket (after the idle gap of a compute
# phase) leaves at memory speed. But the qdisc's timer wakes late by tens of microseconds on a
# loaded machine, and tokens beyond the bucket are lost meanwhile, so a bucket of two frames
# delivers well under 1 Gbit/s (measured: 42 of 120 MB/s). The bucket is therefore two frames
# or BURST_SECONDS of the rate, whichever is larger: 12.5 kB at 1 Gbit/s (the emulation's
# resolution: a message skips at most 0.1 ms of serialization), two frames at 100 Mbit/s.
MIN_BURST_BYTES = 2 * (MTU + 14)
BURST_SECONDS = 100e-6
QUEUE_SECONDS = 0.2                 # how long a frame may wait in the bucket before a drop


@dataclass(frozen=True)
class Link:
    """An emulated network: rate per port (bit/s), modelled one-way delay, topology."""
    name: str
    rate_bits: float
    delay_ms: float        # modelled, not emulated (no netem here): see the module docstring
    medium: str            # "switch": a full-duplex port per rank; "shared": one channel
    about: str

    @property
    def burst_bytes(self):
        """The token bucket's size (see BURST_SECONDS)."""
        return max(MIN_BURST_BYTES, int(self.rate_bits / 8 * BURST_SECONDS))

    @property
    def payload_bytes_per_s(self):
        """TCP payload rate of one port: a 1500-byte frame carries 1448 bytes of payload
        (IPv4 20, TCP 32 with timestamps) in 1514 bytes counted by tc (Ethernet header 14)."""
        return self.rate_bits / 8 * (MTU - 52) / (MTU + 14)


PRESETS = {
    "1gbit": Link("1gbit", 1e9, 0.2, "switch",
                  "Gigabit Ethernet through one switch (the paper's TP-Link LS1008G)"),
    "100mbit": Link("100mbit", 1e8, 0.5, "switch", "Fast Ethernet through one switch"),
    "wifi": Link("wifi", 5e7, 2.0, "shared",
                 "Wi-Fi-like: one 50 Mbit/s channel shared by every rank, 2 ms"),
}


def current_link():
    """The Link this process runs under (dllm.link sets it for the job), else None."""
    text = os.environ.get(ENV_LINK)
    if not text:
        return None
    try:
        return Link(**json.loads(text))
    except (ValueError, TypeError):
        return None


def mpi_environment(link):
    """Environment that keeps MPICH off shared memory and on TCP over the shaped interface.

    MPIR_CVAR_NOLOCAL makes MPICH treat every rank as remote (no shared-memory transport even
    though all ranks share one host and /dev/shm); the OFI netmod's tcp provider then carries
    every message over FI_TCP_IFACE. UCX (MPICH's other netmod here) is told the same in case a
    build prefers it."""
    iface = "eth0" if link.medium == "switch" else "lo"
    return {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_SHM_ENABLE": "0",
            "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": iface,
            "UCX_TLS": "tcp", "UCX_NET_DEVICES": iface,
            ENV_LINK: json.dumps(asdict(link))}


def _ip(*args):
    """Run `ip ARGS`; a failure becomes one DllmError line with ip's own message."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise DllmError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")


def _tbf(namespace, device, link):
    """Shape `device`'s egress in `namespace` to the link's rate."""
    rate = int(link.rate_bits)
    limit = max(int(rate / 8 * QUEUE_SECONDS), 4 * link.burst_bytes)
    _ip("-n", namespace, "link", "set", device, "mtu", str(MTU))
    cmd = ["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
           "rate", f"{rate}bit", "burst", str(link.burst_bytes), "limit", str(limit)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DllmError(f"{' '.join(cmd)}: {result.stderr.strip() or 'failed'}")


def namespace_names(tag, ranks, link):
    """(switch namespace or None, namespace of each rank)."""
    if link.medium == "shared":
        return None, [f"{tag}-net"] * ranks
    return f"{tag}-sw", [f"{tag}-r{r}" for r in range(ranks)]


def address(rank):
    """Rank r's IPv4 address on the emulated switch (10.93.x.y/16)."""
    return f"10.93.{(rank + 1) // 250}.{(rank + 1) % 250 + 1}"


def set_up(tag, ranks, link):
    """Create the namespaces, interfaces and shaping; returns the rank namespaces.
    On any failure, what was made is removed and one DllmError line says why."""
    switch, names = namespace_names(tag, ranks, link)
    try:
        if link.medium == "shared":
            _ip("netns", "add", names[0])
            _ip("-n", names[0], "link", "set", "lo", "up")
            _tbf(names[0], "lo", link)
            return names
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for r, name in enumerate(names):
            _ip("netns", "add", name)
            _ip("-n", switch, "link", "add", f"p{r}", "type", "veth", "peer", "name", "eth0",
                "netns", name)
            _ip("-n", switch, "link", "set", f"p{r}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{r}", "up")
            _ip("-n", name, "addr", "add", f"{address(r)}/16", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _tbf(name, "eth0", link)          # the rank's upload
            _tbf(switch, f"p{r}", link)       # its download: the switch port's egress
        return names
    except BaseException:
        tear_down(tag)
        raise


def tear_down(tag):
    """Remove every namespace named tag-... (their interfaces go with them)."""
    for name in _namespaces():
        if name.startswith(f"{tag}-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _namespaces():
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def cleanup_stale():
    """Remove the namespaces of dllm.link processes that no longer exist (after a SIGKILL)."""
    removed = []
    for name in _namespaces():
        tag = name.split("-")[0]
        if tag.startswith("dllm") and tag[4:].isdigit() and not Path(f"/proc/{tag[4:]}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def unavailable_reason():
    """Why this machine cannot emulate links (None when it can): tools, root, namespaces, tbf."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    tag = f"dllm{os.getpid()}probe"
    try:
        set_up(tag, 1, PRESETS["wifi"])
    except DllmError as exc:
        return f"network namespaces or tbf are not allowed here ({exc})"
    finally:
        tear_down(tag)
    return None


def mpirun_command(mpirun, mpirun_args, names, command):
    """MPMD mpirun line: rank r runs `command` inside namespace names[r] (ip netns exec).
    The launcher itself stays outside: hydra hands each rank its PMI socket as an open file
    descriptor, which crosses into the namespace with the process."""
    line = [mpirun, *mpirun_args]
    for r, name in enumerate(names):
        if r:
            line.append(":")
        line += ["-n", "1", "ip", "netns", "exec", name, *command]
    return line


def default_mpirun():
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


def build_parser():
    from .cli import ArgumentParser
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0],
                       epilog="Presets: " + "; ".join(
                           f"{k}: {v.about} ({v.rate_bits / 1e6:g} Mbit/s, {v.delay_ms} ms "
                           f"modelled)" for k, v in PRESETS.items())
                       + ". 'python -m dllm.link cleanup-stale' removes namespaces left by a "
                         "killed run.")
    p.add_argument("link", choices=tuple(PRESETS), help="the emulated network")
    p.add_argument("-n", "--ranks", type=int, required=True, help="MPI ranks of the job")
    p.add_argument("--mpirun", default=None, help="launcher (default: the mpirun beside "
                   "this python, else on PATH); MPICH's hydra")
    p.add_argument("--mpirun-args", default="", help="extra launcher arguments, one string")
    p.add_argument("command", nargs="+", help="the program every rank runs (after --)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["cleanup-stale"]:
            for name in cleanup_stale():
                print(f"{PROG}: removed {name}", file=sys.stderr)
            return 0
        args = build_parser().parse_args(argv)
        if args.ranks < 1:
            raise DllmError(f"-n must be at least 1, got {args.ranks}")
        reason = unavailable_reason()
        if reason:
            raise DllmError(f"cannot emulate a link on this machine: {reason}")
        return run_job(PRESETS[args.link], args.ranks, args.mpirun or default_mpirun(),
                       shlex.split(args.mpirun_args), args.command)
    except DllmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2 if "(see --help)" in str(exc) else 1


def run_job(link, ranks, mpirun, mpirun_args, command):
    """Set the link up, run the job through it, tear it down; returns the job's exit code."""
    tag = f"dllm{os.getpid()}"

    def stop(signum, frame):     # SIGTERM (scancel, timeout) ends here too: clean up first
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        names = set_up(tag, ranks, link)
        env = {**os.environ, **mpi_environment(link)}
        line = mpirun_command(mpirun, mpirun_args, names, command)
        print(f"{PROG}: {ranks} rank(s) on {link.name} ({link.about}; {link.delay_ms} ms delay "
              f"modelled, not emulated)", file=sys.stderr, flush=True)
        job = subprocess.Popen(line, env=env)
        try:
            return job.wait()
        except KeyboardInterrupt:
            job.send_signal(signal.SIGINT)
            try:
                job.wait(timeout=10)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()
            return 130
    except KeyboardInterrupt:
        return 130
    finally:
        tear_down(tag)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
