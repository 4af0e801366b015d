"""Input-pipeline throughput: decoded + augmented images per second, per worker and in total.

``python -m experiments.bench_input`` writes a real ImageFolder tree — CIFAR-10 training images
from ``cifar10_subset.npz`` upscaled (bicubic) to random sizes between ``--min-size`` and
``--max-size`` pixels a side (ImageNet's JPEGs average about 400×350) and saved as JPEGs — prepares
it with the project's TFDS builder (:func:`pufferfish_jax.data.imagenet.load`) and then times:

* ``per_worker``: one thread decoding records one by one, for training (random-resized-crop 224 +
  flip) and for evaluation (resize 256 + center crop 224): what one worker (core) sustains;
* ``threads``: the training pipeline exactly as the trainer reads it —
  :func:`pufferfish_jax.data.imagenet.train_batches` iterated through grain's ``to_iter_dataset``
  with the trainer's 2 reader threads — with ``--threads`` decode threads per process (1: each
  reader thread decodes its batch itself, so up to 2 cores work).

Pillow releases the GIL while decoding and resizing, so threads scale with cores; grain's
multiprocessing workers (``mp_prefetch``) are not used by the trainer, which reads batches by step
so that a run resumes mid-epoch, and their start-up (a Python process each) dominated every
pass of a small benchmark, so they are not timed here.

Every figure is the median of ``--repeats`` passes over the data (after one untimed pass).
A table goes to stdout, then one JSON object as the last line. To keep an accelerator fed,
divide its training images/s by ``per_worker.train_img_s``: that many cores must decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_input", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="training images written (default 256)")
    p.add_argument("--min-size", type=int, default=256, help="smallest side of the written JPEGs (default 256)")
    p.add_argument("--max-size", type=int, default=500, help="largest side of the written JPEGs (default 500)")
    p.add_argument("--image-size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the pipeline timing (default 32)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="decode threads per process to time the pipeline with (default 1 and every core)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (default 3)")
    p.add_argument("--data", default=None,
                   help="the .npz (default $PUFFERFISH_DATA/cifar10_subset.npz, else ../shared/data/cifar10_subset.npz)")
    p.add_argument("--work-dir", default=None, help="where the tree and the TFDS dataset go (default: a temporary dir)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or min(args.threads) < 1:
        p.error("--images, --batch-size, --repeats and --threads must be at least 1")
    if not 32 <= args.min_size <= args.max_size:
        p.error("need 32 <= --min-size <= --max-size")
    return args


def data_path(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    folder = os.environ.get("PUFFERFISH_DATA") or str(REPO / ".." / "shared" / "data")
    return os.path.join(folder, "cifar10_subset.npz")


def write_tree(args: argparse.Namespace, root: str) -> dict:
    """The ImageFolder tree (train and a small val), real images upscaled; returns its statistics."""
    import numpy as np

    from pufferfish_jax.data import imagenet
    from pufferfish_jax.data.cifar import load_npz

    train, test = load_npz(data_path(args))
    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(train))[: args.images]
    sizes = rng.integers(args.min_size, args.max_size + 1, size=(len(idx), 2))
    names = [f"class{c}" for c in range(10)]
    paths = imagenet.write_image_folder(root, train.images[idx], train.labels[idx], names, sizes=sizes)
    vidx = rng.permutation(np.flatnonzero(np.isin(test.labels, train.labels[idx])))[:20]  # classes train has
    imagenet.write_image_folder(root, test.images[vidx], test.labels[vidx], names, split="val",
                                sizes=rng.integers(args.min_size, args.max_size + 1, size=(len(vidx), 2)))
    return {"images": len(paths), "mean_jpeg_bytes": int(np.mean([os.path.getsize(p) for p in paths])),
            "mean_pixels": int(np.mean(sizes[:, 0] * sizes[:, 1]))}


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # untimed: page cache, pools, first-call costs
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import grain

    from pufferfish_jax.data import imagenet

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_input_")
    tree = os.path.join(work, "tree")
    stats = write_tree(args, tree) if not os.path.isdir(tree) else {"images": None}
    data = imagenet.load(os.path.join(work, "tfds"), image_folder=tree)
    records = [data.train[i] for i in range(len(data.train))]
    n = len(records)
    size = args.image_size
    result: dict = {"tree": stats, "image_size": size, "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
                    "loadavg_1m": [round(os.getloadavg()[0], 2)]}

    result["per_worker"] = {
        "train_img_s": round(_median_rate(lambda: [imagenet.decode_train(r["image"], i, size) for i, r in enumerate(records)],
                                          n, args.repeats), 1),
        "eval_img_s": round(_median_rate(lambda: [imagenet.decode_eval(r["image"], size) for r in records], n, args.repeats), 1),
    }
    steps = n // args.batch_size

    def pipeline(threads: int):
        ds = imagenet.train_batches(data.train, args.batch_size, args.seed, 0, image_size=size, threads=threads)
        return lambda: sum(1 for _ in ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    result["threads"] = {str(t): round(_median_rate(pipeline(t), steps * args.batch_size, args.repeats), 1)
                         for t in args.threads}

    result["loadavg_1m"].append(round(os.getloadavg()[0], 2))

    print(f"{stats.get('images')} real JPEGs, mean {stats.get('mean_pixels', 0):,} pixels, "
          f"{stats.get('mean_jpeg_bytes', 0):,} bytes; crop {size}, {os.cpu_count()} cores")
    print(f"one worker: train (random-resized-crop + flip) {result['per_worker']['train_img_s']:.1f} img/s, "
          f"eval (resize + center crop) {result['per_worker']['eval_img_s']:.1f} img/s")
    for t, rate in result["threads"].items():
        print(f"train pipeline as the trainer reads it, {t} decode thread(s): {rate:.1f} img/s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
