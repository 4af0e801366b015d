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
import sys

import pufferfish_jax  # noqa: F401  (sets XLA flags before jax starts)
from experiments.cli import (ArgumentParser, UsageError, add_run_args, compute_dtype, fail, prepare_run, print_dry_run, report_done,
                             run_training,
                             validate_run_args)
from pufferfish_jax.data.tfds_cifar10 import DatasetError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.cifar", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="resnet18 or vgg19")
    # Epoch ends are the default checkpoints: a CIFAR epoch is a few hundred steps (under a minute
    # on one GPU), so at most that much work is lost to a SIGKILL; SIGTERM saves at once anyway.
    add_run_args(p, epochs=300, warmup_epochs=80, batch_size=128)
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--milestones", type=int, nargs="*", default=[150, 250], help="epochs where lr is divided by 10")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (e.g. 0.25 for CPU runs)")
    p.add_argument("--data", default=None, help="an .npz with x_train, y_train, x_test, y_test (uint8 NHWC) instead of TFDS")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, help="folder holding cifar-10-binary.tar.gz for offline preparation")
    p.add_argument("--no-download", action="store_true", help="never download the archive")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    from pufferfish_jax.models import ARCHS

    if args.arch not in ARCHS:
        raise UsageError(f"unknown arch {args.arch!r}; choose one of: {', '.join(sorted(ARCHS))}")
    validate_run_args(args)
    if not args.width > 0:
        raise UsageError(f"--width must be positive, got {args.width}")


def dry_run(args: argparse.Namespace) -> dict:
    from flax import nnx

    from pufferfish_jax import count_macs, count_params, low_rank_init, plan
    from pufferfish_jax.models import get_spec

    spec = get_spec(args.arch)
    model = nnx.eval_shape(lambda: spec.build(width=args.width, rngs=nnx.Rngs(0)))
    layers = plan(model, args.ranks, spec.keep_full_rank)
    vanilla = count_params(model)
    macs_vanilla = count_macs(model, (1, 32, 32, 3))
    low = nnx.eval_shape(lambda: low_rank_init(lambda: spec.build(width=args.width, rngs=nnx.Rngs(0)), args.ranks,
                                               spec.keep_full_rank))
    report = {
        "arch": args.arch, "rank_ratio": args.ranks, "width": args.width,
        "params_vanilla": vanilla, "params_pufferfish": count_params(low),
        "macs_vanilla": macs_vanilla, "macs_pufferfish": count_macs(low, (1, 32, 32, 3)),
        "grad_bytes_vanilla": 4 * vanilla, "grad_bytes_pufferfish": 4 * count_params(low),
        "factorized_layers": len(layers),
    }
    print_dry_run(report, (("params", "trainable params"), ("macs", "MACs / example"), ("grad_bytes", "grad bytes / step")))
    print(f"factorized layers: {len(layers)} ({', '.join(l.path for l in layers)})", file=sys.stderr)
    return report


def dataset_id(train, test) -> str:
    """Names the data by content (not path): a checkpoint resumes only on the data it was trained on."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(split.images.tobytes())
        h.update(split.labels.tobytes())
    return f"cifar10 {len(train)}+{len(test)} images sha256:{h.hexdigest()[:16]}"


def identity(args: argparse.Namespace, train, test) -> dict:
    """What besides the trainer's own settings a checkpoint must share to be resumed."""
    return {"arch": args.arch, "width": args.width, "dataset": dataset_id(train, test)}


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
        build_model=lambda rngs: spec.build(width=args.width, dtype=compute_dtype(args), rngs=rngs),
        keep_full_rank=spec.keep_full_rank,
        loss_fn=image_classification(dtype=compute_dtype(args)),
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
        from pufferfish_jax.data import load_cifar10

        train, test = load_cifar10(args.data, args.data_dir, args.manual_dir, download=not args.no_download)
        cfg, reducer, mesh = prepare_run(args, "cifar", identity(args, train, test), run_name=f"cifar-{args.arch}")
    except (UsageError, DatasetError) as e:
        fail(str(e))
    s = run_training(experiment(args, train, test), cfg, reducer, mesh).summary
    return report_done(args, args.arch, f"test accuracy {s.get('test_accuracy', float('nan')):.4f}", s)


if __name__ == "__main__":
    main(sys.argv[1:])
