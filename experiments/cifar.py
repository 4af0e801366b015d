"""Pufferfish on CIFAR-10: ``python -m experiments.cifar --ranks 0.25``.

Defaults are the paper's recipe (ResNet-18, 300 epochs, batch 128, SGD lr 0.1 momentum 0.9,
weight decay 1e-4, lr ÷10 at epochs 150 and 250, 80 vanilla warm-up epochs, then one
truncated-SVD switch to the hybrid low-rank model).

Checkpoints go to <out-dir>/checkpoints; running again on the same --out-dir resumes.
Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad input, 3 NaN/Inf loss or
gradient, 1 another failure (e.g. a peer process of a multi-process run died).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import pufferfish_jax  # noqa: F401  (sets XLA flags before jax starts)
from experiments.cli import ArgumentParser, UsageError, check_out_dir, check_resumable, fail, rank_ratio_arg
from pufferfish_jax.data.tfds_cifar10 import DatasetError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.cifar", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="resnet18 or vgg19")
    p.add_argument("--ranks", type=rank_ratio_arg, default=0.25,
                   help="rank ratio in (0, 1]: r = int(min(fan_in, fan_out) * ratio); 1.0 trains the vanilla model")
    p.add_argument("--epochs", type=int, default=300, help="total epochs")
    p.add_argument("--warmup-epochs", type=int, default=80, help="vanilla epochs before the SVD switch; 0 = low-rank from scratch")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=int, nargs="*", default=[150, 250], help="epochs where lr is divided by 10")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (e.g. 0.25 for CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="an .npz with x_train, y_train, x_test, y_test (uint8 NHWC) instead of TFDS")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, help="folder holding cifar-10-binary.tar.gz for offline preparation")
    p.add_argument("--no-download", action="store_true", help="never download the archive")
    p.add_argument("--out-dir", default=None, help="where metrics.jsonl, summary.json and checkpoints go "
                   "(default runs/cifar-<arch>-r<ranks>-<time>); one that holds checkpoints is resumed")
    c = p.add_argument_group("checkpoints")
    # Epoch ends by default: a CIFAR epoch is a few hundred steps (under a minute on one GPU), so at most
    # that much work is lost to a SIGKILL, SIGTERM saves at once anyway, and each save costs a device→host
    # copy of the parameters and optimizer state.
    c.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: at epoch ends, the switch and SIGTERM only)")
    c.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints")
    c.add_argument("--no-resume", action="store_true", help="refuse to run on an --out-dir that holds checkpoints instead of resuming")
    g = p.add_argument_group("data parallelism")
    g.add_argument("--reducer", default="allreduce", help="gradient reducer: allreduce, allreduce-flat, powersgd or signum")
    g.add_argument("--powersgd-rank", type=int, default=None, help="PowerSGD rank (default 2 for vanilla, 4 with Pufferfish)")
    g.add_argument("--signum-momentum", type=float, default=0.9, help="Signum's momentum (applied before the sign)")
    g.add_argument("--devices", type=int, default=None, help="split this host's CPU into N XLA devices (testing data parallelism)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 for a multi-process run")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (with --coordinator)")
    g.add_argument("--multi-host", action="store_true", help="auto-detect the cluster (TPU pod slice, SLURM, Open MPI)")
    g.add_argument("--peer-timeout", type=int, default=60,
                   help="seconds after which a multi-process run whose peer stopped answering exits with an error")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="build both models, print parameters/MACs/gradient bytes, train nothing")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    from pufferfish_jax.models import ARCHS

    if args.arch not in ARCHS:
        raise UsageError(f"unknown arch {args.arch!r}; choose one of: {', '.join(sorted(ARCHS))}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup-epochs ({args.warmup_epochs}) must be between 0 and --epochs ({args.epochs})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.width > 0:
        raise UsageError(f"--width must be positive, got {args.width}")
    from pufferfish_jax.reducers import REDUCERS

    if args.reducer not in REDUCERS:
        raise UsageError(f"unknown reducer {args.reducer!r}; choose one of: {', '.join(REDUCERS)}")
    if args.powersgd_rank is not None and args.powersgd_rank < 1:
        raise UsageError(f"--powersgd-rank must be at least 1, got {args.powersgd_rank}")
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        raise UsageError("--coordinator needs --num-processes and --process-id")
    if args.num_processes is not None and args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be 0 or more steps, got {args.save_every}")
    if args.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if args.peer_timeout < 1:
        raise UsageError(f"--peer-timeout must be at least 1 second, got {args.peer_timeout}")


def make_reducer(args: argparse.Namespace):
    """The reducer the flags ask for; PowerSGD's rank defaults as in the official scripts."""
    from pufferfish_jax.reducers import get_reducer

    if args.reducer == "powersgd":
        rank = args.powersgd_rank or (4 if args.ranks < 1.0 else 2)
        return get_reducer("powersgd", rank=rank)
    if args.reducer == "signum":
        return get_reducer("signum", momentum=args.signum_momentum)
    return get_reducer(args.reducer)


def dry_run(args: argparse.Namespace) -> dict:
    from flax import nnx

    from pufferfish_jax import count_macs, count_params, plan
    from pufferfish_jax.models import get_spec

    spec = get_spec(args.arch)
    model = nnx.eval_shape(lambda: spec.build(width=args.width, rngs=nnx.Rngs(0)))
    layers = plan(model, args.ranks, spec.keep_full_rank)
    vanilla = count_params(model)
    macs_vanilla = count_macs(model, (1, 32, 32, 3))
    low = nnx.eval_shape(lambda: _factorized(spec, args))
    report = {
        "arch": args.arch, "rank_ratio": args.ranks, "width": args.width,
        "params_vanilla": vanilla, "params_pufferfish": count_params(low),
        "macs_vanilla": macs_vanilla, "macs_pufferfish": count_macs(low, (1, 32, 32, 3)),
        "grad_bytes_vanilla": 4 * vanilla, "grad_bytes_pufferfish": 4 * count_params(low),
        "factorized_layers": len(layers),
    }
    print(f"{'':24s}{'vanilla':>14s}{'pufferfish':>14s}{'ratio':>8s}")
    for key, label in (("params", "trainable params"), ("macs", "MACs / example"), ("grad_bytes", "grad bytes / step")):
        v, p = report[f"{key}_vanilla"], report[f"{key}_pufferfish"]
        print(f"{label:24s}{v:>14,d}{p:>14,d}{v / p:>7.2f}x")
    print(f"factorized layers: {len(layers)} ({', '.join(l.path for l in layers)})")
    print(json.dumps(report))
    return report


def _factorized(spec, args):
    from flax import nnx

    from pufferfish_jax import factorize

    m = spec.build(width=args.width, rngs=nnx.Rngs(0))
    factorize(m, args.ranks, spec.keep_full_rank, init="random")
    return m


def dataset_id(train, test) -> str:
    """Names the data by content (not path): a checkpoint resumes only on the data it was trained on."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(split.images.tobytes())
        h.update(split.labels.tobytes())
    return f"cifar10 {len(train)}+{len(test)} images sha256:{h.hexdigest()[:16]}"


def identity(args: argparse.Namespace, train, test) -> dict:
    """What besides the trainer's own settings a checkpoint must share to be resumed."""
    reducer = {"powersgd": f"powersgd rank {args.powersgd_rank or (4 if args.ranks < 1.0 else 2)}",
               "signum": f"signum momentum {args.signum_momentum:g}"}.get(args.reducer, args.reducer)
    return {"arch": args.arch, "width": args.width, "dataset": dataset_id(train, test), "reducer_options": reducer}


def experiment(args: argparse.Namespace, train, test):
    """The CIFAR :class:`Experiment`: model, hybrid list, loss, SGD, multistep schedule, data."""
    import optax

    from pufferfish_jax.data import cifar
    from pufferfish_jax.models import get_spec
    from pufferfish_jax.train.schedules import multistep
    from pufferfish_jax.train.tasks import image_classification
    from pufferfish_jax.train.trainer import Experiment

    spec = get_spec(args.arch)
    return Experiment(
        build_model=lambda rngs: spec.build(width=args.width, rngs=rngs),
        keep_full_rank=spec.keep_full_rank,
        loss_fn=image_classification(),
        # PyTorch SGD: weight decay added to the gradient, then heavy-ball momentum; lr applied by the step.
        # Signum's momentum lives in the reducer (before the sign), so the step applies the vote directly.
        make_tx=lambda: optax.chain(optax.add_decayed_weights(args.weight_decay),
                                    optax.identity() if args.reducer == "signum" else optax.trace(decay=args.momentum)),
        schedule=multistep(args.lr, args.milestones, 0.1),
        train_data=lambda epoch, i, n: cifar.train_batches(train, args.batch_size, args.seed, epoch, i, n),
        eval_data=lambda i, n: cifar.eval_batches(test, max(args.batch_size, 256) // n * n, i, n),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        validate(args)
        if args.dry_run:
            return dry_run(args)
        args.out_dir = args.out_dir or os.path.join(
            "runs", f"cifar-{args.arch}-r{args.ranks:g}-{time.strftime('%Y%m%d-%H%M%S')}")
        resuming = check_out_dir(args.out_dir, resume=not args.no_resume)
        from pufferfish_jax.data import load_cifar10

        train, test = load_cifar10(args.data, args.data_dir, args.manual_dir, download=not args.no_download)
        from pufferfish_jax import distributed
        from pufferfish_jax.parallel import check_batch_divisible, data_mesh

        if args.devices:
            distributed.set_host_devices(args.devices)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.multi_host,
                               heartbeat_timeout_s=args.peer_timeout)
        mesh = data_mesh()
        check_batch_divisible(args.batch_size, mesh)
        from pufferfish_jax.train.trainer import TrainConfig, run_identity

        reducer = make_reducer(args)
        cfg = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                          rank_ratio=args.ranks, seed=args.seed, out_dir=args.out_dir,
                          progress=not args.no_progress, max_steps_per_epoch=args.max_steps_per_epoch,
                          save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=not args.no_resume,
                          identity=identity(args, train, test), config=vars(args))
        if resuming:
            check_resumable(args.out_dir, run_identity(cfg, reducer, mesh), args.epochs)
    except (UsageError, DatasetError) as e:
        fail(str(e))
    except ValueError as e:  # batch/mesh mismatch
        fail(str(e))

    import jax

    from pufferfish_jax.checkpoint import CheckpointError
    from pufferfish_jax.train.trainer import NonFiniteError, Preempted, fit

    try:
        result = fit(experiment(args, train, test), cfg, reducer=reducer, mesh=mesh)
    except Preempted as e:
        print(e, flush=True)
        raise SystemExit(0)
    except CheckpointError as e:  # every checkpoint damaged, or another run's
        fail(str(e))
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    except Exception as e:
        if jax.process_count() > 1:
            # A collective failed: almost always a peer that died. Leave now rather than wait in
            # jax.distributed's shutdown barrier for a process that will never come.
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"error: process {jax.process_index()} of {jax.process_count()} stops because the run lost a peer "
                  f"process or a collective failed ({first}); rerun every process with the same command to resume "
                  "from the last checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        raise
    s = result.summary
    print(f"done: {args.arch} ranks {args.ranks:g}, {s['epochs']} epochs "
          f"({s['warmup_epochs']} warm-up): test accuracy {s.get('test_accuracy', float('nan')):.4f}, "
          f"params {s['params_vanilla']:,} -> {s['params_final']:,}, {s['total_s']:.0f}s; logs in {args.out_dir}")
    print(json.dumps(s))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
