"""Pufferfish on ImageNet: ``python -m experiments.imagenet --arch resnet50 --ranks 0.25 --data-dir DIR``.

Defaults are the official recipe: ResNet-50 (or ``--arch wrn50_2``), 90 epochs, batch 256, SGD
lr 0.1 momentum 0.9, lr ÷10 at epochs 30, 60 and 80, weight decay 1e-4 on every parameter with
more than one dimension (not on BN scales/biases or the classifier bias), label smoothing 0.1,
15 vanilla warm-up epochs, then one truncated-SVD switch to the hybrid model (layer4 low rank);
the milestones keep counting global epochs. ``--dtype bfloat16`` computes in bf16 with float32
parameters, optimizer state, loss and BN statistics.

Data: a TFDS dataset (array_record, no TensorFlow) in ``--data-dir``, prepared on first use from
``ILSVRC2012_img_train.tar`` + ``ILSVRC2012_img_val.tar`` in ``--manual-dir`` or from an
ImageFolder tree (``--image-folder ROOT`` with ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``).
Training images: random-resized-crop + flip; validation: resize + center crop (256 → 224).

Checkpoints go to <out-dir>/checkpoints; running again on the same --out-dir resumes.
Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad input, 3 NaN/Inf loss or
gradient, 1 another failure (e.g. a peer process of a multi-process run died).
"""

from __future__ import annotations

import argparse
import json
import sys

import pufferfish_jax  # noqa: F401  (sets XLA flags before jax starts)
from experiments.cli import (ArgumentParser, UsageError, add_run_args, check_out_dir, compute_dtype, default_out_dir,
                             fail, prepare_run, print_dry_run, report_done, run_training, validate_run_args)
from pufferfish_jax.data.tfds_common import DatasetError

# The official figures (ptflops, GMACs at 224×224) the dry run is compared with; see README.
OFFICIAL_GMACS = {"resnet50": (4.12, 3.60), "wrn50_2": (11.44, 9.99)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.imagenet", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", help="resnet50 or wrn50_2 (default resnet50)")
    add_run_args(p, epochs=90, warmup_epochs=15, batch_size=256)
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="(default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="on parameters with ndim > 1 only (default 1e-4)")
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 60, 80],
                   help="global epochs where lr is divided by 10 (default 30 60 80)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0; small for CPU runs)")
    p.add_argument("--image-size", type=int, default=224,
                   help="training crop and evaluation crop size (default 224; evaluation resizes to size/0.875 first)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None, help="TFDS data dir holding the prepared dataset (default ~/tensorflow_datasets)")
    d.add_argument("--manual-dir", default=None,
                   help="folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (default <data-dir>/downloads/manual)")
    d.add_argument("--image-folder", default=None,
                   help="an ImageFolder tree (train/<class>/*.jpg, val/<class>/*.jpg) instead of the ILSVRC2012 archives")
    d.add_argument("--decode-threads", type=int, default=None,
                   help="JPEG decode/augment threads per process (default: every core)")
    d.add_argument("--prepare-only", action="store_true",
                   help="prepare the TFDS dataset in --data-dir and exit (do this once before a multi-process run)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    from pufferfish_jax.models import IMAGENET_ARCHS

    if args.arch not in IMAGENET_ARCHS:
        raise UsageError(f"unknown arch {args.arch!r}; choose one of: {', '.join(sorted(IMAGENET_ARCHS))}")
    validate_run_args(args)
    if not args.width > 0:
        raise UsageError(f"--width must be positive, got {args.width}")
    if args.image_size < 32:
        raise UsageError(f"--image-size must be at least 32 (the network downsamples 32x), got {args.image_size}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.decode_threads is not None and args.decode_threads < 1:
        raise UsageError(f"--decode-threads must be at least 1, got {args.decode_threads}")


def num_classes(args: argparse.Namespace, data=None) -> int:
    """The prepared dataset's classes; without data, the ImageFolder's (if given) or ImageNet's 1000."""
    if data is not None:
        return data.num_classes
    if args.image_folder:
        from pufferfish_jax.data.imagenet import folder_classes

        return len(folder_classes(args.image_folder))
    from pufferfish_jax.models import IMAGENET_ARCHS

    return IMAGENET_ARCHS[args.arch].num_classes


def build_model(args: argparse.Namespace, classes: int, rngs):
    from pufferfish_jax.models import IMAGENET_ARCHS

    return IMAGENET_ARCHS[args.arch].build(num_classes=classes, width=args.width, dtype=compute_dtype(args), rngs=rngs)


def dry_run(args: argparse.Namespace) -> dict:
    """Parameters, MACs per image at ``--image-size`` and gradient bytes, vanilla vs Pufferfish."""
    from flax import nnx

    from pufferfish_jax import count_macs, count_params, low_rank_init, plan
    from pufferfish_jax.models import IMAGENET_ARCHS

    spec, classes, shape = IMAGENET_ARCHS[args.arch], num_classes(args), (1, args.image_size, args.image_size, 3)
    model = nnx.eval_shape(lambda: build_model(args, classes, nnx.Rngs(0)))
    layers = plan(model, args.ranks, spec.keep_full_rank)
    low = nnx.eval_shape(lambda: low_rank_init(lambda: build_model(args, classes, nnx.Rngs(0)), args.ranks,
                                               spec.keep_full_rank))
    vanilla, puffer = count_params(model), count_params(low)
    report = {
        "arch": args.arch, "rank_ratio": args.ranks, "width": args.width, "image_size": args.image_size,
        "num_classes": classes, "dtype": args.dtype,
        "params_vanilla": vanilla, "params_pufferfish": puffer,
        "macs_vanilla": count_macs(model, shape), "macs_pufferfish": count_macs(low, shape),
        "grad_bytes_vanilla": 4 * vanilla, "grad_bytes_pufferfish": 4 * puffer,
        "factorized_layers": len(layers),
    }
    print(f"factorized layers: {len(layers)} ({', '.join(l.path for l in layers)})", file=sys.stderr)
    if args.width == 1.0 and args.image_size == 224 and classes == 1000 and args.ranks == 0.25:
        v, p = OFFICIAL_GMACS[args.arch]
        print(f"MACs count convolutions and matrix products only; the official ptflops figures ({v} G / {p} G) "
              "also count BN, ReLU and pooling, and the official low-rank downsample strides after its first 1x1 "
              "factor (README, 'ImageNet')", file=sys.stderr)
    return print_dry_run(report, (("params", "trainable params"), ("macs", "MACs / image"),
                                  ("grad_bytes", "grad bytes / step")))


def load_data(args: argparse.Namespace):
    from pufferfish_jax.data import imagenet

    return imagenet.load(args.data_dir, manual_dir=args.manual_dir, image_folder=args.image_folder)


def dataset_id(data) -> str:
    """Names the data for resuming: prepared config, split sizes and classes (hashing 150 GB of
    JPEGs per start would take minutes)."""
    import hashlib

    classes = hashlib.sha256("\n".join(data.class_names).encode()).hexdigest()[:12]
    return f"{data.name} {len(data.train)}+{len(data.validation)} images, {data.num_classes} classes sha256:{classes}"


def identity(args: argparse.Namespace, data) -> dict:
    """What besides the trainer's own settings a checkpoint must share to be resumed."""
    return {"arch": args.arch, "width": args.width, "image_size": args.image_size, "dataset": dataset_id(data)}


def weight_decay_mask(params):
    """True for parameters that get weight decay: every one with more than one dimension."""
    import jax

    return jax.tree.map(lambda p: p.ndim > 1, params)


def experiment(args: argparse.Namespace, data):
    """The ImageNet :class:`Experiment`: model, hybrid list, smoothed cross-entropy, SGD without
    decay on 1-D parameters, multistep schedule on the global epoch, grain JPEG pipelines."""
    import optax

    from pufferfish_jax.data import imagenet
    from pufferfish_jax.models import IMAGENET_ARCHS
    from pufferfish_jax.train.schedules import multistep
    from pufferfish_jax.train.tasks import image_classification
    from pufferfish_jax.train.trainer import Experiment

    spec = IMAGENET_ARCHS[args.arch]
    size, threads = args.image_size, args.decode_threads
    return Experiment(
        build_model=lambda rngs: build_model(args, data.num_classes, rngs),
        keep_full_rank=spec.keep_full_rank,
        loss_fn=image_classification(args.label_smoothing, spec.mean, spec.std, compute_dtype(args)),
        # PyTorch SGD: weight decay added to the gradient, then heavy-ball momentum; lr applied by the step.
        make_tx=lambda: optax.chain(optax.add_decayed_weights(args.weight_decay, mask=weight_decay_mask),
                                    optax.identity() if args.reducer == "signum" else optax.trace(decay=args.momentum)),
        schedule=multistep(args.lr, args.milestones, 0.1),
        train_data=lambda epoch, i, n: imagenet.train_batches(data.train, args.batch_size, args.seed, epoch, i, n,
                                                              image_size=size, threads=threads),
        eval_data=lambda i, n: imagenet.eval_batches(data.validation, max(args.batch_size, 256) // n * n, i, n,
                                                     image_size=size, threads=threads),
        eval_name="val",
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        validate(args)
        if args.dry_run:
            return dry_run(args)
        if not args.prepare_only:
            # Before the dataset is prepared (hours for ImageNet): an unusable --out-dir fails now.
            args.out_dir = default_out_dir(args, f"imagenet-{args.arch}")
            check_out_dir(args.out_dir, resume=not args.no_resume)
        data = load_data(args)
        if args.prepare_only:
            report = {"dataset": data.name, "train": len(data.train), "validation": len(data.validation),
                      "num_classes": data.num_classes}
            print(json.dumps(report))
            return report
        cfg, reducer, mesh = prepare_run(args, f"imagenet-{args.arch}", identity(args, data))
    except (UsageError, DatasetError) as e:
        fail(str(e))
    s = run_training(experiment(args, data), cfg, reducer, mesh).summary
    return report_done(args, f"{args.arch} {args.dtype}", f"val accuracy {s.get('val_accuracy', float('nan')):.4f}", s)


if __name__ == "__main__":
    main(sys.argv[1:])
