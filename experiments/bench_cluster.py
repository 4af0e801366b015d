"""Data-parallel step time over a rate-limited network: vanilla vs Pufferfish vs PowerSGD vs Signum.

``sudo python -m experiments.bench_cluster --rate 1gbit`` builds a small cluster on this one
Linux machine and times the project's own data-parallel train step
(:func:`pufferfish_jax.train.steps.make_train_step`) on it:

* ``--processes`` N processes, each in its own network namespace ``<prefix>-ns<i>``, joined by
  a Linux bridge ``<prefix>-br`` through veth pairs (``<prefix>-v<i>`` on the bridge,
  ``<prefix>-p<i>`` inside the namespace, address ``10.213.0.<i+1>/24``). The /24 exists only
  inside these namespaces and the bridge (which has no address), so no traffic leaves the
  machine. Loopback is brought up in every namespace.
* Each namespace's veth egress is capped with ``tc qdisc ... tbf rate <R> burst ... latency 50ms``
  (``--rate``, tc units: ``bit kbit mbit gbit`` or bytes ``bps kbps mbps gbps``); every byte a
  worker sends crosses its own cap, so this is the per-node link rate.
* Gloo binds the address that the machine's hostname resolves to (JAX's gloo ignores
  ``GLOO_SOCKET_IFNAME``), so ``/etc/netns/<ns>/hosts`` (bind-mounted over ``/etc/hosts`` by
  ``ip netns exec``) maps the hostname to the namespace's address. The coordinator is rank 0's
  address.
* Worker i runs ``ip netns exec <ns> taskset -c <core> python -m experiments.bench_cluster
  --worker ...``, pinned to one core (cores of this process's affinity, round robin).
* Everything (workers, namespaces, veths, bridge, ``/etc/netns`` dirs) is torn down on every exit
  path (normal end, errors, Ctrl-C, SIGTERM, SIGHUP); leftovers with the same prefix from a run
  that was killed with SIGKILL are removed before setup. Needs root; without it, exits 2.

Modes (``--modes``, default all): ``vanilla`` (ResNet-18, exact all-reduce), ``pufferfish``
(``factorize(model, 0.25, KEEP_FULL_RANK)``, exact all-reduce), ``vanilla+powersgd`` (rank 2),
``pufferfish+powersgd`` (rank 4), ``signum`` (vanilla model, majority vote, momentum 0.9).
The exact all-reduce is the default one (a flat concatenated buffer, as the official code does);
not in the default set: ``vanilla+per-tensor`` and ``pufferfish+per-tensor``, one all-reduce per
gradient tensor (``allreduce-per-tensor``), and the per-mode ``alone s`` column times the
collective by itself on the same gradient shapes, so ``overlap`` = 1 - (step - compute) / alone
says how much of it the step hid behind its backward pass.
The optimizer is the CIFAR recipe's ``chain(add_decayed_weights(1e-4), trace(0.9))``; for
Signum, ``add_decayed_weights`` only (its momentum is in the reducer).

Method. The workers load real CIFAR-10 images (``cifar10_subset.npz`` from ``--data``,
``$PUFFERFISH_DATA`` or ``<repo>/../shared/data``; each process reads its own shard of every
global batch, ``--batch-size`` global). For every mode, two steps are compiled: the real one
(with the mode's reducer) and a *compute-only* one, identical but with
:func:`pufferfish_jax.reducers.no_communication` as reducer (gradients stay local; BN statistics
and metrics are still averaged, a few KB). After ``--warmup`` untimed calls of each, ``--steps``
calls are timed *interleaved* (real, compute-only, real, …). Each timed call is preceded by a
barrier (a one-float all-reduce) and followed by ``jax.block_until_ready`` and another barrier,
so rank 0's time is that of the slowest rank, as in synchronous training; rank 0 reports
medians. ``comm_s = step_s - compute_s`` is therefore
everything the reducer adds: the network transfer and the reducer's own arithmetic (PowerSGD's
products and QR, Signum's signs). ``bytes_per_step`` is ``reducer.bytes_per_step(params)``, the
payload one worker sends per step as the reducer defines it (for Signum: one bit per entry,
although the simulated collective sums the signs in fp32, so the wire carries 32x that).

Output: a table (mode, median step s, compute s, comm s, bytes/step, speedup over vanilla) and,
as the last line of stdout, one JSON object::

    {"rate": "1gbit", "processes": 2, "modes": {"vanilla": {"step_s": ..., "bytes_per_step": ...,
     "compute_s": ...}, ...}}

``--find-balance``: finds the link rate at which vanilla's communication time equals its compute
time. Vanilla is measured at ``--rate`` and at a quarter of it (choose ``--rate`` so that the
transfer is clearly visible at both, e.g. ``400mbit`` for ResNet-18 on one CPU core); its comm
time (median of the per-step ``step - compute`` of interleaved pairs) is fitted as ``latency +
bits / rate`` (a fixed per-step cost — a few round trips per gloo collective — plus the transfer; measured, so gloo's algorithm and TCP overheads are in it) and the
balance rate solves ``latency + bits / rate = compute``; if noise makes the fit meaningless, the
lower rate's comm time alone is used (zero latency); see :func:`balance_rate`. Unless
``--no-verify``, the same workers (no recompilation: the tc rate is changed between phases) then
measure ``--modes`` at the balance rate and at a quarter of it. The last line is then ``{"balance_rate": ..., "balance_bps":
..., "latency_s": ..., "wire_bytes": ..., "compute_s": ..., "method": ..., "probes": [{<vanilla at --rate>},
{<at --rate/4>}], "runs": [{<at balance>}, {<at balance/4>}]}``.

Start-up per mode (model, states, tracing and compiling two step functions) takes 30-70 s for
ResNet-18 on a loaded core; the workers share a JAX persistent compilation cache
(``--compile-cache``), which saves the XLA compilation in later runs but not the tracing. The
train states are placed by :func:`pufferfish_jax.parallel.place_state`, as in training: each
process hands over its own shards, with no all-gather through the (rate-limited) link.

Keep other heavy jobs off the machine if you can: every gloo collective of a gradient leaf costs a
few round trips, and a process that waits on the network gets its core back only at the
scheduler's next opportunity, which on a loaded core is a few milliseconds per round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: make ``pufferfish_jax`` and ``experiments`` importable

MODES = ("vanilla", "pufferfish", "vanilla+powersgd", "pufferfish+powersgd", "signum")
EXTRA_MODES = ("vanilla+per-tensor", "pufferfish+per-tensor")
SUBNET = "10.213.0"  # /24, only inside the namespaces and the bridge this script creates
COORDINATOR_PORT = 12355
RANK_RATIO = 0.25
UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
         "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def rate_bps(text: str) -> float:
    """Bits per second of a tc rate (``1gbit``, ``250mbit``, ``10mbps`` = 10 MB/s)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", text.lower())
    if not m or m.group(2) not in UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: use a positive number with a tc unit ({', '.join(UNITS)})")
    return float(m.group(1)) * UNITS[m.group(2)]


def rate_arg(text: str) -> str:
    rate_bps(text)
    return text.strip().lower()


def format_rate(bps: float) -> str:
    """A tc rate string for ``bps`` bits/s, in whole kbit."""
    kbit = max(1, round(bps / 1e3))
    if kbit % 1_000_000 == 0:
        return f"{kbit // 1_000_000}gbit"
    return f"{kbit // 1000}mbit" if kbit % 1000 == 0 else f"{kbit}kbit"


def modes_arg(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES + EXTRA_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(bad) or text!r}; "
                                         f"choose from {', '.join(MODES + EXTRA_MODES)}")
    return list(dict.fromkeys(modes))


def prefix_arg(text: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", text):
        raise argparse.ArgumentTypeError("the prefix must be 1-8 lowercase letters/digits, starting with a letter")
    return text


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from experiments.cli import ArgumentParser

    p = ArgumentParser(prog="python -m experiments.bench_cluster", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=rate_arg, default="1gbit", help="per-node link rate, tc units (default 1gbit)")
    p.add_argument("--processes", type=positive_int, default=2, help="worker processes / namespaces (default 2)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per mode (default 10)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per mode, the first compiles (default 2)")
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel width multiplier (default 1.0)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (default 128)")
    p.add_argument("--modes", type=modes_arg, default=list(MODES), help=f"comma-separated subset of {','.join(MODES + EXTRA_MODES)} (default {','.join(MODES)})")
    p.add_argument("--data", default=None, help="the CIFAR .npz (default $PUFFERFISH_DATA/cifar10_subset.npz, else <repo>/../shared/data/cifar10_subset.npz)")
    p.add_argument("--find-balance", action="store_true",
                   help="measure vanilla at --rate, derive the rate where its comm time = compute time, then (unless --no-verify) measure --modes there and at a quarter of it")
    p.add_argument("--no-verify", action="store_true", help="with --find-balance: only derive the rate")
    p.add_argument("--save", default=None, help="also write every phase's raw results (per-step times) to this JSON file")
    p.add_argument("--prefix", type=prefix_arg, default="pfbench", help="name prefix of namespaces, links and /etc/netns dirs (default pfbench)")
    p.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "pufferfish-bench-cluster-jax-cache"),
                   help="JAX persistent compilation cache shared by the workers, reused across runs ('none': off; default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="give up (and tear down) after this many seconds (default 3600)")
    # Worker mode (internal: started by the parent inside a namespace).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--control", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.width > 0:
        p.error(f"--width must be positive, got {args.width}")
    if args.batch_size % args.processes:
        p.error(f"--batch-size {args.batch_size} is not divisible by --processes {args.processes}")
    if args.processes > 250:
        p.error("--processes must be at most 250 (one /24)")
    return args


def data_path(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    folder = os.environ.get("PUFFERFISH_DATA") or str(REPO.parent / "shared" / "data")
    return os.path.join(folder, "cifar10_subset.npz")


# --------------------------------------------------------------------------------------------
# Worker: one process of the data-parallel run, inside its namespace
# --------------------------------------------------------------------------------------------


def _log(*parts) -> None:
    print(f"[bench_cluster {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def worker(args: argparse.Namespace) -> None:
    import pufferfish_jax  # noqa: F401  (sets XLA flags before jax initializes)
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pufferfish_jax import distributed, factorize
    from pufferfish_jax.data.cifar import load_npz, train_batches
    from pufferfish_jax.models import cifar_resnet
    from pufferfish_jax.parallel import DATA, data_mesh, global_batch, place_state
    from pufferfish_jax.reducers import get_reducer, no_communication
    from pufferfish_jax.train.state import init_state, split_model
    from pufferfish_jax.train.steps import make_train_step
    from pufferfish_jax.train.tasks import image_classification

    if args.compile_cache != "none":
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    distributed.initialize(args.coordinator, args.processes, args.rank)
    rank, n = jax.process_index(), jax.process_count()
    mesh = data_mesh()
    train, _ = load_npz(data_path(args))
    data = train_batches(train, args.batch_size, seed=0, epoch=0, shard_index=rank, shard_count=n)
    batches = [global_batch(data[i % len(data)], mesh) for i in range(args.warmup + args.steps)]
    loss_fn = image_classification()
    # A tiny all-reduce before and after every timed step: all ranks start together, and the time
    # rank 0 records ends when the slowest rank is done (else a compute-only step, which syncs only
    # on the BN statistics after the forward pass, would not see a slower peer's backward pass).
    token = jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA)), np.ones((1,), np.float32))
    sync = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, DATA), mesh=mesh, in_specs=P(DATA), out_specs=P(DATA),
                                 check_vma=False))

    def barrier() -> None:
        jax.block_until_ready(sync(token))

    barrier()
    lr = np.float32(0.1)

    models: dict[str, tuple] = {}  # kind -> (train graphdef, params, rest), host copies
    steps: dict[tuple, object] = {}  # (kind, reducer key, tx key) -> jitted step

    def model(kind: str):
        if kind not in models:
            m = cifar_resnet.resnet18(width=args.width, rngs=nnx.Rngs(0))
            if kind == "pufferfish":
                factorize(m, RANK_RATIO, cifar_resnet.KEEP_FULL_RANK)
            train_def, _, params, rest = split_model(m)
            host = jax.tree.map(lambda x: np.array(x, copy=True), (params, rest))
            models[kind] = (train_def, *host)
        return models[kind]

    def make_tx(key: str):
        if key == "signum":
            return optax.add_decayed_weights(1e-4)
        return optax.chain(optax.add_decayed_weights(1e-4), optax.trace(decay=0.9))

    def make_reducer(key: str):
        if key == "none":
            return no_communication()
        name, _, kw = key.partition(":")
        return get_reducer(name, **json.loads(kw or "{}"))

    def fresh_state(kind: str, reducer_key: str, tx_key: str):
        train_def, params, rest = model(kind)
        tx, reducer = make_tx(tx_key), make_reducer(reducer_key)
        key = (kind, reducer_key, tx_key)
        if key not in steps:
            steps[key] = make_train_step(train_def, loss_fn, tx, reducer, mesh)
        return steps[key], place_state(init_state(params, rest, tx, reducer, n), mesh), reducer

    def bench(mode: str) -> dict:
        kind = "pufferfish" if mode.startswith("pufferfish") else "vanilla"
        if mode.endswith("+powersgd"):
            reducer_key = "powersgd:" + json.dumps({"rank": 4 if kind == "pufferfish" else 2})
        elif mode == "signum":
            reducer_key = "signum:" + json.dumps({"momentum": 0.9})
        elif mode.endswith("+per-tensor"):
            reducer_key = "allreduce-per-tensor"
        else:
            reducer_key = "allreduce"
        tx_key = "signum" if mode == "signum" else "sgd"
        compiled = (kind, reducer_key, tx_key) in steps and (kind, "none", tx_key) in steps
        warmup = 1 if compiled else args.warmup  # an earlier phase compiled both steps
        t0 = time.perf_counter()
        full, full_state, reducer = fresh_state(kind, reducer_key, tx_key)
        comp, comp_state, _ = fresh_state(kind, "none", tx_key)
        if rank == 0:
            _log(f"{mode}: model and states ready in {time.perf_counter() - t0:.1f}s")
        times = {"step": [], "compute": []}
        for i in range(warmup + args.steps):
            for name in ("step", "compute"):
                fn, st = (full, full_state) if name == "step" else (comp, comp_state)
                barrier()
                start = time.perf_counter()
                st, metrics = fn(st, batches[i], lr)
                jax.block_until_ready((st, metrics))
                barrier()
                elapsed = time.perf_counter() - start
                if i == 0 and not compiled and rank == 0:
                    _log(f"{mode}: first {name} call (trace, compile or load from cache, run) {elapsed:.1f}s")
                if name == "step":
                    full_state = st
                else:
                    comp_state = st
                if i >= warmup:
                    times[name].append(elapsed)
            if i == warmup - 1 and rank == 0:
                _log(f"{mode}: {'warmed up' if compiled else 'compiled and warmed up'} in {time.perf_counter() - t0:.1f}s")
        # The collective alone, on the same gradient shapes: if the step's communication overlapped
        # its backward pass, step - compute would come out below this.
        comm_only = jax.jit(jax.shard_map(
            lambda g, rs: reducer.reduce(g, jax.tree.map(lambda x: x[0], rs), DATA)[0],
            mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(), check_vma=False))
        grads, reducer_state = full_state.params, full_state.reducer_state
        jax.block_until_ready(comm_only(grads, reducer_state))
        alone = []
        for _ in range(min(3, args.steps)):
            barrier()
            start = time.perf_counter()
            jax.block_until_ready(comm_only(grads, reducer_state))
            barrier()
            alone.append(time.perf_counter() - start)
        params = models[kind][1]
        comm_alone = statistics.median(alone)
        comm_paired = statistics.median(a - b for a, b in zip(times["step"], times["compute"]))
        out = {"step_s": statistics.median(times["step"]), "bytes_per_step": int(reducer.bytes_per_step(params)),
               "comm_alone_s": comm_alone,
               # 0: the step pays the whole collective on top of its compute; 1: fully hidden.
               "overlap": min(1.0, max(0.0, 1.0 - comm_paired / comm_alone)) if comm_alone > 0 else 0.0,
               "compute_s": statistics.median(times["compute"]),
               # Each real step is timed right before its compute-only twin, under the same load.
               "comm_paired_s": comm_paired,
               "step_times": times["step"],
               "compute_times": times["compute"], "params": int(sum(x.size for x in jax.tree.leaves(params)))}
        if rank == 0:
            _log(f"{mode}: step {out['step_s']:.4f}s, compute {out['compute_s']:.4f}s, collective alone "
                 f"{comm_alone:.4f}s (overlap {out['overlap']:.2f}), {out['bytes_per_step']:,} B/step")
        del full_state, comp_state
        return out

    control = Path(args.control)
    phase = 0
    while True:
        cmd_file = control / f"cmd{phase}.json"
        while not cmd_file.exists():
            time.sleep(0.05)
        cmd = json.loads(cmd_file.read_text())
        if cmd.get("exit"):
            break
        if rank == 0:
            _log(f"phase {phase}: rate {cmd.get('rate')}, modes {', '.join(cmd['modes'])}")
        results = {mode: bench(mode) for mode in cmd["modes"]}
        if rank == 0:
            tmp = control / f".result{phase}.json"
            tmp.write_text(json.dumps(results))
            os.replace(tmp, control / f"result{phase}.json")
        phase += 1
    jax.distributed.shutdown()


# --------------------------------------------------------------------------------------------
# Parent: the namespaces, the workers, the table
# --------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """A termination signal arrived; unwinds through the ``finally`` that tears everything down."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Cluster:
    """The namespaces, bridge, veths and rate caps of one run; :meth:`teardown` is idempotent."""

    def __init__(self, prefix: str, processes: int):
        self.prefix, self.processes = prefix, processes
        self.bridge = f"{prefix}-br"
        self.namespaces = [f"{prefix}-ns{i}" for i in range(processes)]
        self.outer = [f"{prefix}-v{i}" for i in range(processes)]
        self.inner = [f"{prefix}-p{i}" for i in range(processes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(processes)]
        self.made_etc_netns = False

    # -- leftovers ------------------------------------------------------------------------
    def _ours(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.prefix)}-(br|ns\d+|v\d+|p\d+)", name) is not None

    def leftovers(self) -> dict[str, list[str]]:
        """Namespaces, links and /etc/netns dirs with this prefix that exist now."""
        netns = [line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
        links = []
        for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                links.append(parts[1].strip().split("@")[0])
        etc = os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []
        return {"netns": [x for x in netns if self._ours(x)], "links": [x for x in links if self._ours(x)],
                "etc": [x for x in etc if self._ours(x)]}

    def teardown(self) -> None:
        found = self.leftovers()
        for ns in found["netns"]:
            # Processes still inside one of our namespaces are workers of an earlier, killed run.
            for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False)
        for link in found["links"]:
            if link != self.bridge:
                _run("ip", "link", "del", link, check=False)
        if self.bridge in found["links"]:
            _run("ip", "link", "del", self.bridge, check=False)
        for d in found["etc"]:
            shutil.rmtree(os.path.join("/etc/netns", d), ignore_errors=True)
        if self.made_etc_netns:
            with contextlib.suppress(OSError):
                os.rmdir("/etc/netns")  # only if still empty

    # -- setup --------------------------------------------------------------------------------
    def setup(self, rate: str) -> None:
        self.teardown()  # leftovers of a killed earlier run with this prefix
        hostname = os.uname().nodename
        self.made_etc_netns = self.made_etc_netns or not os.path.isdir("/etc/netns")
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for ns, outer, inner, addr in zip(self.namespaces, self.outer, self.inner, self.addresses):
            _run("ip", "netns", "add", ns)
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(f"127.0.0.1 localhost\n{addr} {hostname}\n")
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "master", self.bridge)
            _run("ip", "link", "set", outer, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
        self.set_rate(rate)

    def set_rate(self, rate: str) -> None:
        """(Re)places each namespace's egress cap: ``tbf rate R burst B latency 50ms``."""
        bps = rate_bps(rate)
        burst = max(32 * 1024, int(bps / 8 * 0.002))  # ≥ 2 ms of traffic, ≥ a GSO segment's worth
        for ns, inner in zip(self.namespaces, self.inner):
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", inner, "root", "tbf",
                 "rate", f"{round(bps)}bit", "burst", str(burst), "latency", "50ms")


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _set_pdeathsig() -> None:
    # Workers die with the parent even if it is SIGKILLed (ip netns exec and taskset exec, not fork).
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Run:
    """The parent's side of one cluster run: starts workers, hands them phases, collects results."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, control: Path):
        self.args, self.cluster, self.control = args, cluster, control
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.phase = 0
        self.raw: list[dict] = []  # every phase's full results, for --save
        self.shown = 0  # lines of worker 0's log already relayed
        self.deadline = time.monotonic() + args.timeout

    def start(self) -> None:
        a, c = self.args, self.cluster
        cores = sorted(os.sched_getaffinity(0))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC would honour them
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        for i, ns in enumerate(c.namespaces):
            cmd = ["ip", "netns", "exec", ns, "taskset", "-c", str(cores[i % len(cores)]), sys.executable, "-m",
                   "experiments.bench_cluster", "--worker", "--rank", str(i), "--processes", str(a.processes),
                   "--coordinator", f"{c.addresses[0]}:{COORDINATOR_PORT}", "--control", str(self.control),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--width", repr(a.width),
                   "--batch-size", str(a.batch_size), "--data", data_path(a), "--compile-cache", a.compile_cache]
            log = self.control / f"worker{i}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                                   stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True, preexec_fn=_set_pdeathsig))

    def _tail(self, i: int, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logs[i].read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(f"worker {i} exited with code {p.returncode}; its log ends:\n{self._tail(i)}")
        if time.monotonic() > self.deadline:
            raise RuntimeError(f"no result within --timeout {self.args.timeout:g}s; worker 0's log ends:\n{self._tail(0)}")

    def _command(self, cmd: dict) -> None:
        tmp = self.control / f".cmd{self.phase}.json"
        tmp.write_text(json.dumps(cmd))
        os.replace(tmp, self.control / f"cmd{self.phase}.json")

    def measure(self, rate: str, modes: list[str]) -> dict:
        """Sets the link rate, has the workers time ``modes``; returns rank 0's results."""
        self.cluster.set_rate(rate)
        self._command({"rate": rate, "modes": modes})
        result = self.control / f"result{self.phase}.json"
        while not result.exists():
            self._check_alive()
            self._relay()
            time.sleep(0.2)
        self._relay()
        self.phase += 1
        out = {"rate": rate, "processes": self.args.processes, "modes": json.loads(result.read_text())}
        self.raw.append(out)
        if self.args.save:
            with open(self.args.save, "w") as f:
                json.dump({"width": self.args.width, "batch_size": self.args.batch_size, "steps": self.args.steps,
                           "phases": self.raw}, f, indent=1)
        return out

    def _relay(self) -> None:
        """Copies rank 0's new progress lines to our stderr."""
        with contextlib.suppress(OSError):
            lines = self.logs[0].read_text(errors="replace").splitlines()
            for line in lines[self.shown:]:
                if line.startswith("[bench_cluster"):
                    print(line, file=sys.stderr, flush=True)
            self.shown = len(lines)

    def finish(self) -> None:
        self._command({"exit": True})
        end = time.monotonic() + 60
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, end - time.monotonic()))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                _kill_group(p, signal.SIGTERM)
        end = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)


def table(result: dict) -> str:
    modes = result["modes"]
    base = modes.get("vanilla", {}).get("step_s")
    lines = [f"rate {result['rate']}, {result['processes']} processes",
             f"{'mode':22s}{'step s':>10s}{'compute s':>11s}{'comm s':>10s}{'alone s':>10s}{'overlap':>9s}"
             f"{'bytes/step':>14s}{'speedup':>9s}"]
    for mode, r in modes.items():
        speedup = f"{base / r['step_s']:8.2f}x" if base else f"{'-':>9s}"
        alone = f"{r['comm_alone_s']:10.4f}{r['overlap']:9.2f}" if "comm_alone_s" in r else f"{'-':>10s}{'-':>9s}"
        lines.append(f"{mode:22s}{r['step_s']:10.4f}{r['compute_s']:11.4f}{r['step_s'] - r['compute_s']:10.4f}{alone}"
                     f"{r['bytes_per_step']:14,d}{speedup}")
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """The JSON shape of one run: rate, processes, and per mode step_s, bytes_per_step, compute_s."""
    return {"rate": result["rate"], "processes": result["processes"],
            "modes": {m: {"step_s": round(r["step_s"], 6), "bytes_per_step": r["bytes_per_step"],
                          "compute_s": round(r["compute_s"], 6),
                          **({"comm_alone_s": round(r["comm_alone_s"], 6), "overlap": round(r["overlap"], 3)}
                             if "comm_alone_s" in r else {})}
                      for m, r in result["modes"].items()}}


def balance_rate(probes: list[dict]) -> dict:
    """The link rate at which vanilla's communication time equals its compute time.

    Vanilla's comm time at each probe rate is the median over steps of ``step - compute`` of
    adjacent (interleaved) pairs, which cancels most of the load changes a shared machine adds.
    From two rates R1 > R2 it fits ``comm(R) = latency + bits / R`` (a fixed per-step cost: a few
    round trips per gloo collective; plus the transfer) and solves
    ``comm(R) = compute`` (mean of the two compute medians): ``R = bits / (compute - latency)``.
    If noise makes the fit meaningless (``bits <= 0`` or ``latency`` outside ``[0, compute)``),
    it falls back to ``latency = 0`` at the lower rate, where the transfer dominates:
    ``R = R2 * comm(R2) / compute``.
    """
    (r1, v1), (r2, v2) = [(rate_bps(p["rate"]), p["modes"]["vanilla"]) for p in probes]
    c1, c2 = (v.get("comm_paired_s", v["step_s"] - v["compute_s"]) for v in (v1, v2))
    compute = (v1["compute_s"] + v2["compute_s"]) / 2
    bits = (c2 - c1) / (1 / r2 - 1 / r1)
    latency = c1 - bits / r1
    if bits > 0 and 0 <= latency < compute:
        method = "two-rate fit"
    else:
        if c2 <= 0:
            raise RuntimeError(f"vanilla shows no communication time at {probes[1]['rate']} (comm {c2:.4f}s): "
                               "probe at a lower --rate")
        method = f"two-rate fit failed (latency {latency:.4f}s, {bits / 8:,.0f} B): zero latency at {probes[1]['rate']}"
        latency, bits = 0.0, c2 * r2
    bps = bits / (compute - latency)
    rate = format_rate(bps)
    explanation = (f"balance rate (vanilla comm = compute): {rate}, by {method}: comm(R) = {latency:.4f}s + "
                   f"{bits / 8:,.0f} B x 8 / R (paired comm {c1:.4f}s at {probes[0]['rate']}, {c2:.4f}s at "
                   f"{probes[1]['rate']}); compute {compute:.4f}s; bytes_per_step {v1['bytes_per_step']:,}")
    return {"balance_rate": rate, "balance_bps": round(bps), "latency_s": round(latency, 6),
            "wire_bytes": round(bits / 8), "compute_s": round(compute, 6), "method": method,
            "explanation": explanation}


def _on_signal(signum, frame):
    raise Interrupted(signum)


def parent(args: argparse.Namespace) -> int:
    from experiments.cli import fail

    if os.geteuid() != 0:
        fail("bench_cluster needs root: it creates network namespaces, veth pairs, a bridge and tc rate limits")
    for tool in ("ip", "tc", "taskset"):
        if shutil.which(tool) is None:
            fail(f"bench_cluster needs the `{tool}` command (iproute2 / util-linux), which is not installed")
    if not os.path.isfile(data_path(args)):
        fail(f"data file {data_path(args)} does not exist: set PUFFERFISH_DATA or pass --data")

    import fcntl

    lock_path = os.path.join(tempfile.gettempdir(), f"bench_cluster-{args.prefix}.lock")
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another bench_cluster run with prefix {args.prefix!r} is active; wait for it or pass another --prefix")

    import glob

    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"bench_cluster-{args.prefix}-*")):
        if os.path.isdir(stale):  # control dirs of a killed run with this prefix (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
    cluster = Cluster(args.prefix, args.processes)
    control = Path(tempfile.mkdtemp(prefix=f"bench_cluster-{args.prefix}-"))
    run = Run(args, cluster, control)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        cluster.setup(args.rate)
        run.start()
        if not args.find_balance:
            result = run.measure(args.rate, args.modes)
            print(table(result), flush=True)
            final = summary(result)
        else:
            probes = [run.measure(r, ["vanilla"]) for r in (args.rate, format_rate(rate_bps(args.rate) / 4))]
            for probe in probes:
                print(table(probe), flush=True)
            fit = balance_rate(probes)
            print(fit["explanation"], flush=True)
            rate = fit["balance_rate"]
            final = {k: v for k, v in fit.items() if k != "explanation"}
            final.update(probes=[summary(p) for p in probes], runs=[])
            if not args.no_verify:
                for r in (rate, format_rate(fit["balance_bps"] / 4)):
                    result = run.measure(r, args.modes)
                    print(table(result), flush=True)
                    final["runs"].append(summary(result))
        run.finish()
        print(json.dumps(final), flush=True)
    except (KeyboardInterrupt, Interrupted) as e:
        name = signal.Signals(e.args[0]).name if isinstance(e, Interrupted) else "SIGINT"
        print(f"bench_cluster: interrupted by {name}; tearing down", file=sys.stderr)
        code = 130 if name == "SIGINT" else 128 + int(e.args[0])
    except Exception as e:  # noqa: BLE001  (report, tear down, exit 1)
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # let the teardown finish
        run.stop()
        cluster.teardown()
        shutil.rmtree(control, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still held: a run that opened it meanwhile would wait on this one
        for s, h in previous.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
