"""Step-time benchmark: vanilla vs Pufferfish train step, and the warm-up → low-rank switch.

``python -m experiments.bench_step`` (or ``python experiments/bench_step.py``) builds the
project's own jitted train step (:func:`pufferfish_jax.train.steps.make_train_step` over
:func:`pufferfish_jax.parallel.data_mesh`, the :func:`pufferfish_jax.reducers.all_reduce`
reducer, and the model, loss and optimizer of :func:`experiments.cifar.experiment`:
``chain(add_decayed_weights, trace)``) for the vanilla model and for its Pufferfish form
``factorize(model, ranks, KEEP_FULL_RANK)``. The input is one fixed batch of real CIFAR-10
images from ``cifar10_subset.npz`` (folder ``$PUFFERFISH_DATA``, default ``../shared/data``).

Method. Both steps are compiled and run a few times (warm-up), then ``--steps`` steps are
timed *interleaved* (vanilla, Pufferfish, vanilla, …) so that load from other processes
hits both alike; every step is followed by ``jax.block_until_ready`` (it is needed for the
timing, and jaxlib 0.10 on a small CPU can deadlock when many computations are queued).
Medians are reported; ``speedup`` is vanilla / Pufferfish. ``transition_s`` is the median
wall time of ``factorize(..., init="svd")`` on freshly built models with trained shapes,
after the SVD program was compiled once (what the trainer pays at the switch).

``--profile`` adds a breakdown of where a step spends its time, two ways:

1. *Sub-pieces, timed.* Forward+backward of the model alone (``jax.value_and_grad`` of
   the same loss, jitted) and the optimizer update alone (``tx.update`` plus the parameter
   update, jitted, donated), interleaved with the full step like the main timing. Robust
   (no profiler), but it cannot split convolutions from BN/elementwise work.
2. *Per-op, traced.* A ``jax.profiler`` trace of a few steps: XLA:CPU records one event
   per executed thunk, named after its HLO instruction. Each instruction of the compiled
   step (``lower(...).compile().as_text()``) is given a category: ``conv/dot`` (a
   convolution or dot, or a fusion/custom call — e.g. a YNNPACK fusion — that contains
   one), ``optimizer`` (instructions whose HLO metadata points at optax or at the
   parameter update), ``copy/transpose``, and ``bn/elementwise`` (everything else:
   BN statistics, ReLU, residual adds, loss). Events run concurrently on the CPU threads,
   so wall time is attributed with a sweep line: each instant is split equally among the
   categories running then; the union is the busy time, and ``idle/dispatch`` is the
   wall time of the traced steps minus it (Python dispatch, waiting). FLOP counts (``cost_analysis``) are not used for the
   split: XLA:CPU reports one total, not per op, and FLOPs say nothing about the
   memory-bound BN/elementwise time that matters here.

From the traced split the *Amdahl bound* follows: if only the ``conv/dot`` time shrank by
the model's MAC ratio (2.56× for ResNet-18 at ranks 0.25) and everything else stayed,
the step speedup would be at most ``1 / ((1 - f) + f / mac_ratio)`` with ``f`` the
``conv/dot`` share of the (traced) vanilla step. The trace also shows how much the
``conv/dot`` time itself shrank, which is usually less than the MAC ratio (a rank-``r``
3×3 conv followed by a 1×1 conv is two thin ops instead of one wide one).

A table goes to stdout, then as the last line one JSON object (``vanilla_ms``,
``pufferfish_ms``, ``speedup``, ``transition_s``, ``xla_flags``, ``jax_version``, ``width``,
``batch_size``, ``arch``, …). Compare XLA configurations in separate processes, e.g.
``PUFFERFISH_NO_XLA_FLAGS=1 XLA_FLAGS=... python -m experiments.bench_step``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: make ``pufferfish_jax`` and ``experiments`` importable

import pufferfish_jax  # noqa: E402,F401  (sets XLA flags before jax initializes)

CATEGORIES = ("conv/dot", "bn/elementwise", "copy/transpose", "optimizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="resnet18 or vgg19 (default resnet18)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0 = 64..512 channels)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model, interleaved (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compilation (default 2)")
    p.add_argument("--ranks", type=float, default=0.25, help="rank ratio of the Pufferfish model (default 0.25)")
    p.add_argument("--transition-models", type=int, default=3,
                   help="models factorized to time the switch, median reported; 0 skips it (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="also break the step down: fwd+bwd vs optimizer (timed), conv vs BN/elementwise (traced), Amdahl bound")
    p.add_argument("--profile-steps", type=int, default=3, help="steps per model inside the profiler trace (default 3)")
    p.add_argument("--data", default=None,
                   help="path of the .npz (default $PUFFERFISH_DATA/cifar10_subset.npz, else ../shared/data/cifar10_subset.npz)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.transition_models < 0 or args.profile_steps < 1:
        p.error("--warmup and --transition-models must be >= 0, --profile-steps >= 1")
    if not args.width > 0:
        p.error("--width must be positive")
    if not 0 < args.ranks <= 1:
        p.error("--ranks must be in (0, 1]")
    return args


def data_path(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    folder = os.environ.get("PUFFERFISH_DATA") or str(REPO / ".." / "shared" / "data")
    return os.path.join(folder, "cifar10_subset.npz")


def real_batch(path: str, batch_size: int, seed: int):
    """``batch_size`` real training images (a seeded random pick, so all classes appear)."""
    import numpy as np

    from pufferfish_jax.data.cifar import load_npz

    train, _ = load_npz(path)
    idx = np.random.default_rng(seed).permutation(len(train))
    idx = np.resize(idx, batch_size)  # repeats images only if the file has fewer than batch_size
    return {"image": train.images[idx], "label": train.labels[idx]}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _quartiles(xs):
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def initial_state(params, rest, tx, reducer, mesh):
    """The train state placed on ``mesh`` exactly as the trainer places it."""
    import inspect

    from pufferfish_jax import parallel
    from pufferfish_jax.train.state import init_state

    if "num_workers" in inspect.signature(init_state).parameters:  # per-worker reducer state
        return parallel.place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
    return parallel.replicate(init_state(params, rest, tx, reducer), mesh)  # older, fully replicated state


class Runner:
    """One model's compiled train step, its (donated) state and the fixed batch."""

    def __init__(self, name, model, exp, tx, reducer, mesh, batch, lr):
        import jax
        import jax.numpy as jnp

        from pufferfish_jax import count_params
        from pufferfish_jax.train.state import split_model
        from pufferfish_jax.train.steps import make_train_step

        self.name = name
        self.params_count = count_params(model)
        self.graphdef, _, params, rest = split_model(model)
        self.step = make_train_step(self.graphdef, exp.loss_fn, tx, reducer, mesh)
        self.state = initial_state(params, rest, tx, reducer, mesh)
        self.batch, self.lr = batch, jnp.asarray(lr, jnp.float32)
        self.loss_fn, self.tx = exp.loss_fn, tx
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        self.compiled = self.step.lower(self.state, self.batch, self.lr).compile()
        self.compile_s = time.perf_counter() - t0
        self.last_loss = float("nan")

    def run(self) -> float:
        """One step, waited for; returns its wall time in seconds."""
        import jax

        t0 = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch, self.lr)
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        self.last_loss = float(metrics["loss_sum"] / metrics["count"])
        return dt

    # -- sub-pieces for --profile ------------------------------------------------------
    def pieces(self):
        """Jitted forward+backward only, and optimizer update only (donated), with their inputs."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, loss_fn, tx = self.graphdef, self.loss_fn, self.tx

        @jax.jit
        def fwd_bwd(params, rest, batch):
            def compute_loss(p):
                model = nnx.merge(graphdef, p, rest, copy=True)
                loss, metrics = loss_fn(model, batch)
                return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

            return jax.value_and_grad(compute_loss, has_aux=True)(params)

        def opt(params, opt_state, grads, lr):
            updates, opt_state = tx.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), params, updates), opt_state

        opt_update = jax.jit(opt, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, self.state.params)
        opt_state = jax.tree.map(jnp.copy, self.state.opt_state)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), self.state.params)
        jax.block_until_ready((params, opt_state, grads))
        box = {"params": params, "opt_state": opt_state}

        def run_fwd_bwd() -> float:
            t0 = time.perf_counter()
            jax.block_until_ready(fwd_bwd(self.state.params, self.state.rest, self.batch))
            return time.perf_counter() - t0

        def run_opt() -> float:
            t0 = time.perf_counter()
            box["params"], box["opt_state"] = opt_update(box["params"], box["opt_state"], grads, self.lr)
            jax.block_until_ready(box)
            return time.perf_counter() - t0

        return run_fwd_bwd, run_opt


# -- HLO instruction → category ---------------------------------------------------------

_COMP_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"(?:\s+source_line=(\d+))?')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")


def _split_shape(rest: str) -> str:
    """``rest`` of ``name = <shape> opcode(...)``, with the shape (maybe a tuple) removed."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[i + 1:].lstrip()
        return ""
    return rest.split(" ", 1)[1] if " " in rest else ""


def _stack_tables(text: str):
    """``frame id -> [(file, line), ...]`` (innermost first) from the module's stack-frame tables."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line.strip()
            tables[section] = {}
            continue
        row = _TABLE_ROW.match(line) if section else None
        if row:
            tables[section][int(row.group(1))] = row.group(2)
        elif section and line.strip() == "":
            section = None
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f, ln = re.search(r"file_name_id=(\d+)", v), re.search(r"\bline=(\d+)", v)
        locs[k] = (files.get(int(f.group(1)), "") if f else "", int(ln.group(1)) if ln else 0)
    frames = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc, parent = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
        frames[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)

    def chain(frame_id: int) -> list[tuple[str, int]]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            out.append(locs.get(loc, ("", 0)))
            frame_id = parent
        return out

    return chain


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name → {opcode, calls, op_name, sources, computation} for every instruction.

    ``sources`` is the Python call stack of the instruction's metadata, ``[(file, line), ...]``.
    """
    chain = _stack_tables(text)
    instrs: dict[str, dict] = {}
    comp = None
    for line in text.splitlines():
        header = _COMP_HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            comp = header.group(1)
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, rest = m.groups()
        body = _split_shape(rest)
        opcode = re.match(r"([\w\-]+)\(", body)
        if not opcode:
            continue
        calls = _CALLS.findall(body)
        for group in _BRANCHES.findall(body):
            calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        op_name, source, frame = _OP_NAME.search(body), _SOURCE.search(body), _FRAME_ID.search(body)
        sources = chain(int(frame.group(1))) if frame else []
        if source:
            sources.insert(0, (source.group(1), int(source.group(2) or 0)))
        instrs[name] = {"opcode": opcode.group(1), "calls": calls, "computation": comp,
                        "op_name": op_name.group(1) if op_name else "", "sources": sources}
    return instrs


def _update_lines() -> set[int]:
    """Lines of ``train/steps.py`` that apply the optimizer (``tx.update`` and the parameter update)."""
    import inspect

    from pufferfish_jax.train import steps

    lines = inspect.getsource(steps).splitlines()
    return {i + 1 for i, ln in enumerate(lines) if "tx.update(" in ln or "(lr * u)" in ln}


def categorize(instrs: dict[str, dict]) -> dict[str, str]:
    """Instruction name → one of :data:`CATEGORIES`."""
    by_comp: dict[str, list[dict]] = {}
    for ins in instrs.values():
        by_comp.setdefault(ins["computation"], []).append(ins)
    memo: dict[str, bool] = {}
    update_lines = _update_lines()

    def comp_has_mac(comp: str, seen=()) -> bool:
        if comp in memo:
            return memo[comp]
        if comp in seen:
            return False
        found = any(i["opcode"] in ("convolution", "dot") or
                    any(comp_has_mac(c, seen + (comp,)) for c in i["calls"]) for i in by_comp.get(comp, []))
        memo[comp] = found
        return found

    def is_optimizer(ins: dict) -> bool:
        for file, line in ins["sources"]:
            if "/optax/" in file and "/optax/losses/" not in file:
                return True
            if file.endswith("train/steps.py") and line in update_lines:
                return True
        return False

    out = {}
    for name, ins in instrs.items():
        op = ins["opcode"]
        if op in ("convolution", "dot") or any(comp_has_mac(c) for c in ins["calls"]):
            out[name] = "conv/dot"
        elif is_optimizer(ins):
            out[name] = "optimizer"
        elif op in ("copy", "transpose") or "transpose" in name or "copy" in name:
            out[name] = "copy/transpose"
        else:
            out[name] = "bn/elementwise"
    return out


def trace_breakdown(runner: Runner, steps: int) -> tuple[dict[str, float], float]:
    """Milliseconds per step in each category (sweep-line wall attribution over a profiler
    trace), and the median wall time of the traced steps."""
    import jax

    names = categorize(parse_hlo(runner.compiled.as_text()))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            walls = [runner.run() for _ in range(steps)]
        files = list(Path(log_dir).rglob("*.xplane.pb"))
        if not files:
            raise RuntimeError("the profiler wrote no .xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(files[0]))
        intervals = []  # (start_ns, end_ns, category)
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    cat = names.get(ev.name)
                    if cat is not None and ev.duration_ns > 0:
                        intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns, cat))
    if not intervals:
        raise RuntimeError("no XLA op events in the trace (op names did not match the compiled HLO)")
    points = sorted({t for s, e, _ in intervals for t in (s, e)})
    index = {t: i for i, t in enumerate(points)}
    # count of active intervals per category between consecutive points (difference arrays)
    delta = {c: [0] * (len(points) + 1) for c in CATEGORIES}
    for s, e, c in intervals:
        delta[c][index[s]] += 1
        delta[c][index[e]] -= 1
    totals = dict.fromkeys(CATEGORIES, 0.0)
    running = dict.fromkeys(CATEGORIES, 0)
    for i in range(len(points) - 1):
        for c in CATEGORIES:
            running[c] += delta[c][i]
        active = [c for c in CATEGORIES if running[c] > 0]
        span = points[i + 1] - points[i]
        for c in active:
            totals[c] += span / len(active)
    return {c: totals[c] / steps / 1e6 for c in CATEGORIES}, 1e3 * _median(walls)


def amdahl(fraction: float, factor: float) -> float:
    """Max speedup when ``fraction`` of the time shrinks by ``factor`` and the rest stays."""
    return 1.0 / ((1.0 - fraction) + fraction / factor)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from experiments import cifar
    from pufferfish_jax import count_macs, factorize
    from pufferfish_jax.parallel import check_batch_divisible, data_mesh, global_batch
    from pufferfish_jax.reducers import all_reduce

    load_start = os.getloadavg()[0]
    cargs = cifar.parse_args(["--arch", args.arch, "--width", str(args.width), "--batch-size", str(args.batch_size),
                              "--ranks", str(args.ranks), "--seed", str(args.seed)])
    cifar.validate(cargs)
    exp = cifar.experiment(cargs, None, None)  # same model, loss and tx as training; data unused
    tx, reducer, mesh = exp.make_tx(), all_reduce(), data_mesh()
    check_batch_divisible(args.batch_size, mesh)
    batch = global_batch(real_batch(data_path(args), args.batch_size, args.seed), mesh)
    lr = exp.schedule(0)

    vanilla = exp.build_model(nnx.Rngs(args.seed))
    jax.block_until_ready(nnx.state(vanilla))
    macs_v = count_macs(vanilla, (1, 32, 32, 3))
    puffer = exp.build_model(nnx.Rngs(args.seed))
    jax.block_until_ready(nnx.state(puffer))
    t0 = time.perf_counter()
    layers = factorize(puffer, args.ranks, exp.keep_full_rank)  # compiles the switch's SVD program
    jax.block_until_ready(nnx.state(puffer))
    first_transition_s = time.perf_counter() - t0
    macs_p = count_macs(puffer, (1, 32, 32, 3))
    runners = [Runner("vanilla", vanilla, exp, tx, reducer, mesh, batch, lr),
               Runner("pufferfish", puffer, exp, tx, reducer, mesh, batch, lr)]
    del vanilla, puffer
    print(f"compiled: vanilla {runners[0].compile_s:.1f}s, pufferfish {runners[1].compile_s:.1f}s "
          f"({len(layers)} layers factorized)", file=sys.stderr)

    for _ in range(args.warmup + 1):  # the first run also allocates and warms caches
        for r in runners:
            r.run()
    times = {r.name: [] for r in runners}
    for _ in range(args.steps):
        for r in runners:
            times[r.name].append(r.run())
    for r in runners:
        if r.last_loss != r.last_loss or abs(r.last_loss) == float("inf"):
            raise FloatingPointError(f"{r.name}: non-finite loss in the benchmark")

    transitions = []
    for i in range(args.transition_models):
        model = exp.build_model(nnx.Rngs(args.seed + 1 + i))
        jax.block_until_ready(nnx.state(model))
        t0 = time.perf_counter()
        factorize(model, args.ranks, exp.keep_full_rank)
        jax.block_until_ready(nnx.state(model))
        transitions.append(time.perf_counter() - t0)
        del model

    v_ms, p_ms = (1e3 * _median(times[r.name]) for r in runners)
    result = {
        "arch": args.arch, "width": args.width, "batch_size": args.batch_size, "ranks": args.ranks,
        "steps": args.steps,
        "vanilla_ms": round(v_ms, 2), "pufferfish_ms": round(p_ms, 2), "speedup": round(v_ms / p_ms, 4),
        "vanilla_iqr_ms": [round(1e3 * q, 2) for q in _quartiles(times["vanilla"])],
        "pufferfish_iqr_ms": [round(1e3 * q, 2) for q in _quartiles(times["pufferfish"])],
        "transition_s": round(_median(transitions), 4) if transitions else None,
        "transition_first_s": round(first_transition_s, 4),
        "compile_s": {r.name: round(r.compile_s, 2) for r in runners},
        "params": {r.name: r.params_count for r in runners},
        "macs_per_example": {"vanilla": macs_v, "pufferfish": macs_p},
        "mac_ratio": round(macs_v / macs_p, 4),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "pufferfish_no_xla_flags": bool(os.environ.get("PUFFERFISH_NO_XLA_FLAGS")),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
    }

    print(f"{args.arch} width {args.width:g}, batch {args.batch_size}, ranks {args.ranks:g}, "
          f"{args.steps} interleaved steps, jax {jax.__version__}, XLA_FLAGS={result['xla_flags']!r}")
    print(f"{'':14s}{'median ms':>11s}{'p25 ms':>9s}{'p75 ms':>9s}{'img/s':>8s}{'params':>12s}{'MACs/img':>14s}")
    for r in runners:
        med, (q1, q3) = _median(times[r.name]), _quartiles(times[r.name])
        print(f"{r.name:14s}{1e3 * med:>11.1f}{1e3 * q1:>9.1f}{1e3 * q3:>9.1f}{args.batch_size / med:>8.0f}"
              f"{r.params_count:>12,d}{result['macs_per_example'][r.name]:>14,d}")
    print(f"speedup (vanilla/pufferfish) {result['speedup']:.3f}x   MAC ratio {result['mac_ratio']:.2f}x   "
          f"transition {result['transition_s']}s (first, compiling: {first_transition_s:.2f}s)")

    if args.profile:
        result["profile"] = profile(args, runners, result)
    result["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))
    return result


def profile(args: argparse.Namespace, runners: list[Runner], result: dict) -> dict:
    """Sub-piece timings and the traced per-category split; prints them and the Amdahl bound."""
    out: dict = {}
    pieces = {r.name: r.pieces() for r in runners}
    for name, (fb, op) in pieces.items():  # compile and warm
        fb(), op(), fb(), op()
    t = {(r.name, k): [] for r in runners for k in ("step", "fwd_bwd", "opt")}
    for _ in range(max(3, args.steps // 2)):
        for r in runners:
            fb, op = pieces[r.name]
            t[(r.name, "step")].append(r.run())
            t[(r.name, "fwd_bwd")].append(fb())
            t[(r.name, "opt")].append(op())
    print("\nprofile 1: sub-pieces, timed separately (median ms)")
    print(f"{'':14s}{'step':>9s}{'fwd+bwd':>9s}{'optimizer':>11s}{'other':>9s}")
    for r in runners:
        med = {k: 1e3 * _median(t[(r.name, k)]) for k in ("step", "fwd_bwd", "opt")}
        med["other"] = med["step"] - med["fwd_bwd"] - med["opt"]
        out[f"{r.name}_pieces_ms"] = {k: round(v, 2) for k, v in med.items()}
        print(f"{r.name:14s}{med['step']:>9.1f}{med['fwd_bwd']:>9.1f}{med['opt']:>11.1f}{med['other']:>9.1f}")

    mac_ratio = result["mac_ratio"]
    try:
        print("\nprofile 2: per-op trace, ms per step by category (sweep-line wall attribution)")
        print(f"{'':14s}" + "".join(f"{c:>16s}" for c in CATEGORIES) + f"{'idle/dispatch':>15s}{'step':>9s}")
        split = {}
        for r in runners:
            cats, step_ms = trace_breakdown(r, args.profile_steps)
            cats["idle/dispatch"] = max(0.0, step_ms - sum(cats.values()))
            cats["step"] = step_ms
            split[r.name] = cats
            out[f"{r.name}_trace_ms"] = {k: round(v, 2) for k, v in cats.items()}
            print(f"{r.name:14s}" + "".join(f"{cats[c]:>16.1f}" for c in CATEGORIES)
                  + f"{cats['idle/dispatch']:>15.1f}{step_ms:>9.1f}")
        v = split["vanilla"]
        f = min(1.0, v["conv/dot"] / v["step"])
        out["conv_fraction"] = round(f, 4)
        out["amdahl_bound"] = round(amdahl(f, mac_ratio), 4)
        conv_speedup = v["conv/dot"] / max(split["pufferfish"]["conv/dot"], 1e-9)
        out["conv_speedup"] = round(conv_speedup, 4)
        print(f"\nconv/dot share of the vanilla step: {100 * f:.1f}%; Amdahl bound on the step speedup if only "
              f"conv/dot shrinks by the MAC ratio {mac_ratio:.2f}x: {out['amdahl_bound']:.3f}x "
              f"(measured step speedup {result['speedup']:.3f}x; measured conv/dot speedup {conv_speedup:.2f}x)")
    except Exception as e:  # the timed sub-pieces still stand
        out["trace_error"] = f"{type(e).__name__}: {e}"
        print(f"trace breakdown failed: {out['trace_error']}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
