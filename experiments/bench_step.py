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

``--profile`` breaks the step down by timing its pieces alone, interleaved with the full
step like the main timing (``--profile-steps`` rounds):

* ``fwd+bwd``: ``jax.value_and_grad`` of the same loss, jitted (no optimizer, no reducer);
* ``conv/dot``: the step's own convolutions and matrix products and nothing else. Every
  ``conv_general_dilated`` and ``dot_general`` equation of the step's jaxpr (forward and
  backward, found through jit/shard_map nesting) is bound again with its shapes and
  parameters on fresh random inputs, all in one jitted call;
* ``optimizer``: ``tx.update`` plus the parameter update, jitted and donated;
* ``BN/elementwise/rest`` = step − conv/dot − optimizer: BN statistics and normalization,
  ReLU, residual adds, loss, layout copies, dispatch.

This is robust where the alternatives are not: XLA:CPU's ``cost_analysis`` gives one FLOP
total per program (no per-op split, and FLOPs say nothing about memory-bound BN time), and
a ``jax.profiler`` trace names each thunk but Eigen convolutions run asynchronously on the
intra-op pool, so their trace events cover the launch, not the work (tried: at full width
the trace put under 2% of the step in convolutions). Replayed in isolation, convolutions
get the whole machine as in the step; with the project's XLA flags each convolution is
its own op in the compiled step too (not fused with BN or ReLU), so the split is fair.

``--trace`` adds what the replay cannot show: a ``jax.profiler`` trace of ``--profile-steps``
steps of each model, whose fused (non-convolution) kernels are summed by kind —
``transpose`` (layout copies feeding the kernel-gradient convolutions, with whatever XLA fused
into them), ``ynnpack`` and ``other fusions`` (BN, ReLU, residual adds, loss, optimizer) — in
thread-milliseconds per step. It found the BN/ReLU recompute fused into the transposes that
:func:`pufferfish_jax.runtime.train_step_options` now avoids.

From the split follows the *Amdahl bound*: if only the ``conv/dot`` time shrank by the
model's MAC ratio (2.57× for ResNet-18 at ranks 0.25) and everything else stayed, the step
speedup would be at most ``1 / ((1 - f) + f / mac_ratio)`` with ``f`` the ``conv/dot``
share of the vanilla step. The measured ``conv/dot`` speedup is printed beside it; it is
usually below the MAC ratio (a rank-``r`` 3×3 conv plus a 1×1 conv is two thin ops).

ImageNet models (``--arch resnet50`` / ``wrn50_2``) use :func:`experiments.imagenet.experiment`
(label smoothing, no weight decay on 1-D parameters) on real CIFAR images upscaled to
``--image-size`` (default 224). ``--dtypes float32 bfloat16`` builds vanilla and Pufferfish in
each compute dtype and interleaves all four steps (``by_dtype`` in the JSON: images/s, speedups,
and ``<model>_vs_float32``, the paired per-round ratio of float32 time to bf16 time).

A table goes to stdout, then as the last line one JSON object (``vanilla_ms``,
``pufferfish_ms``, ``speedup``, ``transition_s``, ``xla_flags``, ``jax_version``, ``width``,
``batch_size``, ``arch``, …).

``--compare NAME=XLA_FLAGS ...`` compares XLA configurations. XLA reads its flags once per
process, so each configuration gets a worker process (``PUFFERFISH_NO_XLA_FLAGS=1`` and
exactly the given ``XLA_FLAGS``; ``NAME=@project`` keeps the project's own choice from
:mod:`pufferfish_jax.runtime`). The parent lets one worker compute at a time and
interleaves their steps (config A vanilla, A Pufferfish, B vanilla, …, order reversed
every round), so load from other processes hits every configuration alike; besides the
medians it reports the median of the *paired* per-round ratios to the first
configuration. Separate runs one after the other are not comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: make ``pufferfish_jax`` and ``experiments`` importable

import pufferfish_jax  # noqa: E402,F401  (sets XLA flags before jax initializes)

MAC_PRIMITIVES = ("conv_general_dilated", "dot_general")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18",
                   help="resnet18 or vgg19 (CIFAR, 32x32), resnet50 or wrn50_2 (ImageNet, --image-size) (default resnet18)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                   help="compute dtypes, timed side by side (e.g. float32 bfloat16); --profile covers the first "
                        "(default float32)")
    p.add_argument("--image-size", type=int, default=224,
                   help="input size of the ImageNet models: real CIFAR images upscaled (default 224)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0 = 64..512 channels)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model, interleaved (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model after the first (compiling) call (default 2)")
    p.add_argument("--ranks", type=float, default=0.25, help="rank ratio of the Pufferfish model (default 0.25)")
    p.add_argument("--transition-models", type=int, default=3,
                   help="models factorized to time the switch, median reported; 0 skips it (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="also time the step's pieces alone (fwd+bwd, conv/dot, optimizer) and print the Amdahl bound")
    p.add_argument("--profile-steps", type=int, default=3, help="interleaved rounds of the --profile timing (default 3)")
    p.add_argument("--trace", action="store_true",
                   help="also trace --profile-steps steps of each model with jax.profiler and print the time of the "
                        "step's fused (non-convolution) kernels by kind: transposes, YNNPACK, other fusions")
    p.add_argument("--data", default=None,
                   help="path of the .npz (default $PUFFERFISH_DATA/cifar10_subset.npz, else ../shared/data/cifar10_subset.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs="+", metavar="NAME=XLA_FLAGS", default=None,
                   help="compare XLA configurations: one worker process per NAME=XLA_FLAGS (exactly those flags; "
                        "NAME=@project for the project's own choice), steps interleaved across processes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    if args.image_size < 32:
        p.error("--image-size must be at least 32")
    if len(set(args.dtypes)) != len(args.dtypes):
        p.error("--dtypes must not repeat a dtype")
    return args


IMAGENET = ("resnet50", "wrn50_2")


def image_size(args: argparse.Namespace) -> int:
    return args.image_size if args.arch in IMAGENET else 32


def runner_names(dtype: str, first: str) -> tuple[str, str]:
    """Runner names: ``vanilla``/``pufferfish`` for the first dtype, ``vanilla_bf16``/... for others."""
    suffix = "" if dtype == first else "_" + {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return "vanilla" + suffix, "pufferfish" + suffix


def data_path(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    folder = os.environ.get("PUFFERFISH_DATA") or str(REPO / ".." / "shared" / "data")
    return os.path.join(folder, "cifar10_subset.npz")


def real_batch(path: str, batch_size: int, seed: int, size: int = 32):
    """``batch_size`` real training images (a seeded random pick, so all classes appear),
    upscaled (bilinear) to ``size``² when that is not 32."""
    import numpy as np

    from pufferfish_jax.data.cifar import load_npz

    train, _ = load_npz(path)
    idx = np.random.default_rng(seed).permutation(len(train))
    idx = np.resize(idx, batch_size)  # repeats images only if the file has fewer than batch_size
    images = train.images[idx]
    if size != images.shape[1]:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
    return {"image": images, "label": train.labels[idx]}


def make_experiment(args: argparse.Namespace, dtype: str):
    """The training command's own Experiment (model, loss, tx) for ``args.arch`` in ``dtype``; data unused."""
    common = ["--arch", args.arch, "--width", str(args.width), "--batch-size", str(args.batch_size),
              "--ranks", str(args.ranks), "--seed", str(args.seed), "--dtype", dtype]
    if args.arch in IMAGENET:
        from types import SimpleNamespace

        from experiments import imagenet

        iargs = imagenet.parse_args(common + ["--image-size", str(args.image_size)])
        imagenet.validate(iargs)
        return imagenet.experiment(iargs, SimpleNamespace(num_classes=1000, train=None, validation=None))
    from experiments import cifar

    cargs = cifar.parse_args(common)
    cifar.validate(cargs)
    return cifar.experiment(cargs, None, None)


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
        self.last_loss = float("nan")
        self.compile_s = self.run()  # the first call compiles (and runs one step)

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

        from pufferfish_jax import runtime

        graphdef, loss_fn, tx = self.graphdef, self.loss_fn, self.tx
        options = runtime.train_step_options(jax.default_backend())  # compiled like the step itself

        @functools.partial(jax.jit, compiler_options=options)
        def fwd_bwd(params, rest, batch):
            def compute_loss(p):
                model = nnx.merge(graphdef, p, rest, copy=True)
                loss, metrics, _ = loss_fn(model, batch, ())
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

    def mac_replay(self):
        """The step's own convolutions and matrix products, alone: every ``conv_general_dilated``
        and ``dot_general`` of the step's jaxpr (forward *and* backward), bound again with the
        same shapes and parameters to fresh random inputs, all in one jitted call."""
        import jax

        eqns = mac_eqns(jax.make_jaxpr(self.step.__wrapped__)(self.state, self.batch, self.lr).jaxpr)
        key = jax.random.key(0)
        inputs = []
        for i, eqn in enumerate(eqns):  # distinct inputs per op, so XLA cannot merge equal ops
            keys = jax.random.split(jax.random.fold_in(key, i), len(eqn.invars))
            inputs.append([jax.random.normal(k, v.aval.shape, v.aval.dtype) for k, v in zip(keys, eqn.invars)])
        jax.block_until_ready(inputs)
        replay = jax.jit(lambda xs: [e.primitive.bind(*x, **e.params) for e, x in zip(eqns, xs)])

        def run_macs() -> float:
            t0 = time.perf_counter()
            jax.block_until_ready(replay(inputs))
            return time.perf_counter() - t0

        return run_macs, len(eqns)


def mac_eqns(jaxpr) -> list:
    """Every conv/dot equation of ``jaxpr``, including those in nested jaxprs (jit, shard_map,
    custom derivatives). Loops would need their trip counts; the CIFAR models have none."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in MAC_PRIMITIVES:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    found += mac_eqns(inner)
    return found


def amdahl(fraction: float, factor: float) -> float:
    """Max speedup when ``fraction`` of the time shrinks by ``factor`` and the rest stays."""
    return 1.0 / ((1.0 - fraction) + fraction / factor)


class Setup:
    """The experiment, the compiled steps of vanilla and Pufferfish per dtype (warmed up), and
    what building them measured."""

    def __init__(self, args: argparse.Namespace):
        import jax
        from flax import nnx

        from pufferfish_jax import count_macs, factorize
        from pufferfish_jax.parallel import check_batch_divisible, data_mesh, global_batch
        from pufferfish_jax.reducers import all_reduce

        reducer, mesh, size = all_reduce(), data_mesh(), image_size(args)
        check_batch_divisible(args.batch_size, mesh)
        batch = global_batch(real_batch(data_path(args), args.batch_size, args.seed, size), mesh)
        runners, first_transition_s, self.macs = [], None, {}
        for k, dtype in enumerate(args.dtypes):
            exp = make_experiment(args, dtype)
            tx, lr = exp.make_tx(), exp.schedule(0, 0, [])
            vanilla = exp.build_model(nnx.Rngs(args.seed))
            jax.block_until_ready(nnx.state(vanilla))
            puffer = exp.build_model(nnx.Rngs(args.seed))
            jax.block_until_ready(nnx.state(puffer))
            t0 = time.perf_counter()
            if args.transition_models and k == 0:  # the switch itself: compiles its SVD program, timed below once compiled
                layers = factorize(puffer, args.ranks, exp.keep_full_rank)
            else:  # step timing does not depend on the weights' values; skip the SVD compilation
                layers = factorize(puffer, args.ranks, exp.keep_full_rank, init="random", rngs=nnx.Rngs(args.seed + 1))
            jax.block_until_ready(nnx.state(puffer))
            if k == 0:
                first_transition_s = time.perf_counter() - t0 if args.transition_models else None
                self.exp, self.layers = exp, layers
                self.macs = {"vanilla": count_macs(vanilla, (1, size, size, 3)),
                             "pufferfish": count_macs(puffer, (1, size, size, 3))}
            names = runner_names(dtype, args.dtypes[0])
            pair = [Runner(names[0], vanilla, exp, tx, reducer, mesh, batch, lr),
                    Runner(names[1], puffer, exp, tx, reducer, mesh, batch, lr)]
            for r in pair:
                r.dtype = dtype
            del vanilla, puffer
            print(f"{dtype}: first call (compile + 1 step): vanilla {pair[0].compile_s:.1f}s, pufferfish "
                  f"{pair[1].compile_s:.1f}s ({len(layers)} layers factorized)", file=sys.stderr)
            runners += pair
        for _ in range(args.warmup):
            for r in runners:
                r.run()
        self.runners, self.first_transition_s = runners, first_transition_s

    def check_finite(self) -> None:
        for r in self.runners:
            if r.last_loss != r.last_loss or abs(r.last_loss) == float("inf"):
                raise FloatingPointError(f"{r.name}: non-finite loss in the benchmark")

    def time_transition(self, args: argparse.Namespace) -> list[float]:
        """Seconds of ``factorize(..., init="svd")`` on fresh models (the SVD program is compiled already)."""
        import jax
        from flax import nnx

        from pufferfish_jax import factorize

        out = []
        for i in range(args.transition_models):
            model = self.exp.build_model(nnx.Rngs(args.seed + 1 + i))
            jax.block_until_ready(nnx.state(model))
            t0 = time.perf_counter()
            factorize(model, args.ranks, self.exp.keep_full_rank)
            jax.block_until_ready(nnx.state(model))
            out.append(time.perf_counter() - t0)
            del model
        return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    if args.worker:
        return worker(args)
    import jax

    load_start = os.getloadavg()[0]
    setup = Setup(args)
    runners, macs_v, macs_p = setup.runners, setup.macs["vanilla"], setup.macs["pufferfish"]
    first_pair = runners[:2]
    first_transition_s = setup.first_transition_s
    times = {r.name: [] for r in runners}
    for _ in range(args.steps):
        for r in runners:
            times[r.name].append(r.run())
    setup.check_finite()
    transitions = setup.time_transition(args)

    v_ms, p_ms = (1e3 * _median(times[r.name]) for r in first_pair)
    by_dtype = {}
    for dtype in args.dtypes:
        v, p = (r for r in runners if r.dtype == dtype)
        v_med, p_med = _median(times[v.name]), _median(times[p.name])
        by_dtype[dtype] = {"vanilla_ms": round(1e3 * v_med, 2), "pufferfish_ms": round(1e3 * p_med, 2),
                           "vanilla_img_s": round(args.batch_size / v_med, 2),
                           "pufferfish_img_s": round(args.batch_size / p_med, 2),
                           "speedup": round(v_med / p_med, 4),
                           # paired: the two steps of one round ran back to back
                           "speedup_paired": round(_median([a / b for a, b in zip(times[v.name], times[p.name])]), 4),
                           "final_loss": {"vanilla": v.last_loss, "pufferfish": p.last_loss}}
    result = {
        "arch": args.arch, "width": args.width, "batch_size": args.batch_size, "ranks": args.ranks,
        "image_size": image_size(args), "dtypes": args.dtypes, "by_dtype": by_dtype,
        "steps": args.steps,
        "vanilla_ms": round(v_ms, 2), "pufferfish_ms": round(p_ms, 2), "speedup": round(v_ms / p_ms, 4),
        "vanilla_iqr_ms": [round(1e3 * q, 2) for q in _quartiles(times["vanilla"])],
        "pufferfish_iqr_ms": [round(1e3 * q, 2) for q in _quartiles(times["pufferfish"])],
        "transition_s": round(_median(transitions), 4) if transitions else None,
        "transition_first_s": round(first_transition_s, 4) if first_transition_s is not None else None,
        "first_call_s": {r.name: round(r.compile_s, 2) for r in runners},  # compile + one step
        "params": {r.name: r.params_count for r in runners},
        "macs_per_example": {"vanilla": macs_v, "pufferfish": macs_p},
        "mac_ratio": round(macs_v / macs_p, 4),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "pufferfish_no_xla_flags": bool(os.environ.get("PUFFERFISH_NO_XLA_FLAGS")),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(), "cpu_count": os.cpu_count(),
    }

    if len(args.dtypes) > 1:
        ref = args.dtypes[0]
        for dtype in args.dtypes[1:]:
            for model in ("vanilla", "pufferfish"):
                a, b = (next(r for r in runners if r.dtype == d and r.name.startswith(model)) for d in (ref, dtype))
                by_dtype[dtype][f"{model}_vs_{ref}"] = round(_median([x / y for x, y in zip(times[a.name], times[b.name])]), 4)
    print(f"{args.arch} width {args.width:g}, {image_size(args)}x{image_size(args)}, batch {args.batch_size}, "
          f"ranks {args.ranks:g}, {args.steps} interleaved steps, jax {jax.__version__}, "
          f"XLA_FLAGS={result['xla_flags']!r}")
    print(f"{'':16s}{'median ms':>11s}{'p25 ms':>9s}{'p75 ms':>9s}{'img/s':>8s}{'params':>12s}{'MACs/img':>16s}")
    for r in runners:
        med, (q1, q3) = _median(times[r.name]), _quartiles(times[r.name])
        macs = result["macs_per_example"][r.name.split("_")[0]]
        print(f"{r.name:16s}{1e3 * med:>11.1f}{1e3 * q1:>9.1f}{1e3 * q3:>9.1f}{args.batch_size / med:>8.1f}"
              f"{r.params_count:>12,d}{macs:>16,d}")
    transition = (f"transition {result['transition_s']}s (first, compiling: {first_transition_s:.2f}s)"
                  if transitions else "transition not timed")
    print(f"speedup (vanilla/pufferfish) {result['speedup']:.3f}x   MAC ratio {result['mac_ratio']:.2f}x   {transition}")

    for dtype, row in by_dtype.items():
        extra = "".join(f", {k} {v:.3f}x" for k, v in row.items() if k.endswith(f"_vs_{args.dtypes[0]}"))
        print(f"{dtype}: images/s vanilla {row['vanilla_img_s']:.1f}, pufferfish {row['pufferfish_img_s']:.1f}, "
              f"speedup {row['speedup']:.3f}x (paired {row['speedup_paired']:.3f}x){extra}")
    if args.profile:
        result["profile"] = profile(args, first_pair, result)
    if args.trace:
        result["trace"] = trace(args, first_pair)
    result["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))
    return result


FUSION_KINDS = ("transpose", "ynnpack", "other fusions")


def _fusion_kind(name: str) -> str | None:
    if name.startswith("transpose"):
        return "transpose"
    if name.startswith("ynn_fusion"):
        return "ynnpack"
    if "fusion" in name and not name.startswith("end:"):
        return "other fusions"
    return None


def trace(args: argparse.Namespace, runners: list[Runner]) -> dict:
    """Thread-milliseconds per step of the step's fused kernels, by kind, from a profiler trace.

    The events are those of XLA:CPU's intra-op threads. Fusions run there synchronously, so their
    events measure their work (summed over the threads that split one fusion; hence
    "thread-ms"); convolutions run asynchronously in Eigen and are not in these figures (see
    the module docstring), which is why ``--profile`` times them by replay instead.
    """
    import glob
    import tempfile

    import jax

    out: dict = {}
    print(f"\ntrace: thread-ms per step of fused kernels by kind ({args.profile_steps} traced steps)")
    print(f"{'':14s}" + "".join(f"{k:>16s}" for k in FUSION_KINDS) + f"{'transposes':>12s}")
    for r in runners:
        with tempfile.TemporaryDirectory() as folder:
            with jax.profiler.trace(folder):
                for _ in range(args.profile_steps):
                    r.run()
            path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
            data = jax.profiler.ProfileData.from_file(path)
        ms = dict.fromkeys(FUSION_KINDS, 0.0)
        count = 0
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):
                    continue
                for event in line.events:
                    kind = _fusion_kind(event.name)
                    if kind is not None:
                        ms[kind] += event.duration_ns / 1e6 / args.profile_steps
                        count += kind == "transpose"
        out[r.name] = {k: round(v, 1) for k, v in ms.items()} | {"transpose_count": count // args.profile_steps}
        print(f"{r.name:14s}" + "".join(f"{ms[k]:>16.1f}" for k in FUSION_KINDS)
              + f"{count // args.profile_steps:>12d}")
    return out


def profile(args: argparse.Namespace, runners: list[Runner], result: dict) -> dict:
    """Times the step's pieces interleaved; prints the breakdown and the Amdahl bound."""
    out: dict = {}
    pieces = {}
    for r in runners:
        fwd_bwd, opt = r.pieces()
        macs, n_ops = r.mac_replay()
        pieces[r.name] = {"fwd_bwd": fwd_bwd, "opt": opt, "conv_dot": macs}
        out[f"{r.name}_conv_dot_ops"] = n_ops
        for fn in pieces[r.name].values():  # compile and warm
            fn(), fn()
    keys = ("step", "fwd_bwd", "conv_dot", "opt")
    t = {(r.name, k): [] for r in runners for k in keys}
    for _ in range(args.profile_steps):
        for r in runners:
            t[(r.name, "step")].append(r.run())
            for k in keys[1:]:
                t[(r.name, k)].append(pieces[r.name][k]())
    # Medians of each piece; the shares and speedups are medians of per-round (paired) ratios,
    # which a slow drift of the machine's load cancels out of.
    med = {}
    for r in runners:
        m = {k: 1e3 * _median(t[(r.name, k)]) for k in keys}
        rounds = list(zip(*(t[(r.name, k)] for k in keys)))
        m["rest"] = 1e3 * _median([st - cd - op for st, _, cd, op in rounds])
        m["conv_share"] = _median([cd / st for st, _, cd, _ in rounds])
        med[r.name] = m
    print(f"\nprofile: median ms of the pieces, each timed alone, interleaved ({args.profile_steps} rounds)")
    print(f"{'':14s}{'step':>10s}{'fwd+bwd':>10s}{'conv/dot':>10s}{'optimizer':>11s}{'BN/elementwise/rest':>21s}"
          f"{'conv share':>12s}")
    for r in runners:
        m = med[r.name]
        out[f"{r.name}_ms"] = {k: round(v, 2) for k, v in m.items() if k != "conv_share"}
        print(f"{r.name:14s}{m['step']:>10.1f}{m['fwd_bwd']:>10.1f}{m['conv_dot']:>10.1f}{m['opt']:>11.1f}"
              f"{m['rest']:>21.1f}{100 * m['conv_share']:>11.1f}%")
    v, p = med["vanilla"], med["pufferfish"]
    paired = lambda k: _median([a / b for a, b in zip(t[("vanilla", k)], t[("pufferfish", k)])])  # noqa: E731
    mac_ratio = result["mac_ratio"]
    f = min(1.0, max(0.0, v["conv_share"]))
    out["conv_fraction"] = round(f, 4)
    out["amdahl_bound"] = round(amdahl(f, mac_ratio), 4)
    out["conv_speedup"] = round(paired("conv_dot"), 4)
    out["step_speedup"] = round(paired("step"), 4)
    out["fwd_bwd_speedup"] = round(paired("fwd_bwd"), 4)
    out["rest_speedup"] = round(v["rest"] / p["rest"], 4) if p["rest"] > 0 and v["rest"] > 0 else None
    print(f"\nconv/dot share of the vanilla step: {100 * f:.1f}%. Amdahl bound, if only conv/dot shrank by the "
          f"MAC ratio {mac_ratio:.2f}x and the rest stayed: {out['amdahl_bound']:.3f}x.")
    rest = "n/a" if out["rest_speedup"] is None else f"{out['rest_speedup']:.2f}x"
    print(f"measured speedups (paired): step {out['step_speedup']:.3f}x, fwd+bwd {out['fwd_bwd_speedup']:.3f}x, "
          f"conv/dot alone {out['conv_speedup']:.2f}x, rest {rest}")
    return out


def worker(args: argparse.Namespace) -> dict:
    """``--compare``'s worker: builds and warms both steps, says ``READY``, then runs one step
    per ``vanilla``/``pufferfish`` line on stdin and answers with its seconds."""
    import jax

    setup = Setup(args)
    runners = {r.name: r for r in setup.runners}
    meta = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
            "first_call_s": {r.name: round(r.compile_s, 2) for r in setup.runners}}
    print("READY " + json.dumps(meta), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in runners:
            print(repr(runners[cmd].run()), flush=True)
        elif cmd == "quit":
            break
    setup.check_finite()
    return meta


def _spec(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"error: --compare takes NAME=XLA_FLAGS, got {text!r}")
    return name, flags


def compare(args: argparse.Namespace) -> dict:
    """XLA configurations side by side: each in its own process (flags are read once per process),
    steps interleaved across the processes so that outside load hits every configuration alike;
    only one process computes at a time. The first configuration is the reference."""
    import subprocess

    import jax

    specs = [_spec(t) for t in args.compare]
    forward = ["--arch", args.arch, "--width", str(args.width), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--dtypes", args.dtypes[0],
               "--warmup", str(args.warmup), "--ranks", str(args.ranks), "--seed", str(args.seed),
               "--transition-models", "0", "--worker"] + (["--data", args.data] if args.data else [])
    load_start = os.getloadavg()[0]
    workers = {}
    try:
        for name, flags in specs:  # started one after the other: compilation is not timed but is heavy
            env = dict(os.environ)
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
            env.pop("XLA_FLAGS", None)
            env.pop("PUFFERFISH_NO_XLA_FLAGS", None)
            if flags != "@project":
                env["PUFFERFISH_NO_XLA_FLAGS"] = "1"
                if flags:
                    env["XLA_FLAGS"] = flags
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *forward], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            line = proc.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"worker {name!r} failed to start (exit code {proc.wait()})")
            workers[name] = (proc, json.loads(line[len("READY "):]))
            print(f"{name}: ready, XLA_FLAGS={workers[name][1]['xla_flags']!r}", file=sys.stderr)
        times = {(n, m): [] for n in workers for m in ("vanilla", "pufferfish")}
        for i in range(args.steps):
            order = list(workers) if i % 2 == 0 else list(reversed(workers))  # no config always first
            for name in order:
                proc = workers[name][0]
                for model in ("vanilla", "pufferfish"):
                    proc.stdin.write(model + "\n")
                    proc.stdin.flush()
                    times[(name, model)].append(float(proc.stdout.readline()))
    finally:
        for proc, _ in workers.values():
            if proc.poll() is None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
                    proc.wait(timeout=60)
                except Exception:
                    proc.kill()
    ref = specs[0][0]
    rows = {}
    print(f"{args.arch} width {args.width:g}, batch {args.batch_size}, {args.steps} steps per model and config, "
          f"interleaved across {len(workers)} processes, jax {jax.__version__}; reference: {ref}")
    print(f"{'config':14s}{'vanilla ms':>12s}{'puffer ms':>11s}{'speedup':>9s}{'V vs ref':>10s}{'P vs ref':>10s}  XLA_FLAGS")
    for name, (_, meta) in workers.items():
        v, p = (1e3 * _median(times[(name, m)]) for m in ("vanilla", "pufferfish"))
        # paired ratios (same round, adjacent in time) are robust to slow drifts of the load
        rel = {m: _median([a / b for a, b in zip(times[(ref, m)], times[(name, m)])]) for m in ("vanilla", "pufferfish")}
        rows[name] = {"vanilla_ms": round(v, 2), "pufferfish_ms": round(p, 2), "speedup": round(v / p, 4),
                      "vanilla_speedup_vs_ref": round(rel["vanilla"], 4),
                      "pufferfish_speedup_vs_ref": round(rel["pufferfish"], 4), "xla_flags": meta["xla_flags"]}
        print(f"{name:14s}{v:>12.1f}{p:>11.1f}{v / p:>9.3f}{rel['vanilla']:>9.3f}x{rel['pufferfish']:>9.3f}x  "
              f"{meta['xla_flags']!r}")
    result = {"arch": args.arch, "width": args.width, "batch_size": args.batch_size, "ranks": args.ranks,
              "steps": args.steps, "reference": ref, "configs": rows, "jax_version": jax.__version__,
              "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
