"""CIFAR-10 arrays (from an ``.npz`` or the TFDS builder) and the grain input pipeline.

Batches are built from random-access ``grain.MapDataset``s indexed by step, so an
epoch's position is just ``(epoch, step)``: resuming is slicing, and every process
of a multi-host run gathers only the images of its own slice of each global batch.
Images travel as uint8 (4× less host→device traffic); normalization happens on device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator

import grain
import numpy as np

from pufferfish_jax.data.tfds_cifar10 import DatasetError

NUM_CLASSES = 10
# Channel statistics the official Pufferfish CIFAR scripts normalize with (0–255 scale).
MEAN = np.array([125.3, 123.0, 113.9], np.float32)
STD = np.array([63.0, 62.1, 66.7], np.float32)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass(frozen=True)
class Split:
    """Images uint8 ``(N, 32, 32, 3)`` and labels int32 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_split(name: str, x: np.ndarray, y: np.ndarray, path: str) -> Split:
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DatasetError(f"{path}: {name} images must have shape (N, 32, 32, 3), got {x.shape}")
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: {name} images must be uint8, got {x.dtype}")
    if y.shape != (x.shape[0],):
        raise DatasetError(f"{path}: {name} labels must have shape ({x.shape[0]},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES)):
        raise DatasetError(f"{path}: {name} labels must be integers in [0, {NUM_CLASSES - 1}]")
    if len(y) == 0:
        raise DatasetError(f"{path}: {name} split is empty")
    return Split(np.ascontiguousarray(x), y.astype(np.int32))


def load_npz(path: str, expected_sha256: str | None = None) -> tuple[Split, Split]:
    """Reads ``x_train, y_train, x_test, y_test`` (the layout of ``cifar10_subset.npz``), validated."""
    if not os.path.isfile(path):
        raise DatasetError(f"data file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"data file {path} is not readable")
    if expected_sha256 is not None and sha256_of(path) != expected_sha256.lower():
        raise DatasetError(f"data file {path} does not match its expected sha256 {expected_sha256}")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in NPZ_KEYS if k not in d.files]
            if missing:
                raise DatasetError(f"data file {path} lacks the arrays {', '.join(missing)}")
            arrays = {k: d[k] for k in NPZ_KEYS}
    except DatasetError:
        raise
    except Exception as e:  # zip/pickle/format errors all mean "not a usable npz"
        raise DatasetError(f"data file {path} is not a readable .npz archive ({type(e).__name__})") from None
    return (_check_split("train", arrays["x_train"], arrays["y_train"], path),
            _check_split("test", arrays["x_test"], arrays["y_test"], path))


def load_cifar10(
    data: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
) -> tuple[Split, Split]:
    """CIFAR-10 train and test splits: from ``data`` (an .npz) if given, else through the TFDS
    builder in ``data_dir`` (prepared there on first use from ``manual_dir`` or a download)."""
    if data is not None:
        return load_npz(data)
    from pufferfish_jax.data import tfds_cifar10

    data_dir = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    try:
        tfds_cifar10.load_split(data_dir, "train")
    except DatasetError:
        tfds_cifar10.build(data_dir, manual_dir=manual_dir, download=download)
    splits = [tfds_cifar10.load_split(data_dir, s) for s in ("train", "test")]
    return tuple(_check_split(s, x, y, data_dir) for s, (x, y) in zip(("train", "test"), splits))  # type: ignore[return-value]


def crop_flip_params(n: int, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Per-example ``(dy, dx, flip)`` for :func:`augment`, drawn for a whole global batch so a
    process's share is augmented exactly as in a single-process run."""
    return np.stack([rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2, n)], 1)


def augment(images: np.ndarray, params: np.ndarray, pad: int = 4) -> np.ndarray:
    """Random crop of a reflect-padded image plus horizontal flip (the CIFAR recipe), on a batch."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rows = params[:, :1] + np.arange(h)[None]  # (n, h)
    cols = params[:, 1:2] + np.arange(w)[None]  # (n, w)
    cols = np.where(params[:, 2:3] == 1, cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batches(
    split: Split,
    global_batch: int,
    seed: int,
    epoch: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """This process's share of each global training batch of one epoch, as a random-access dataset.

    Every process shuffles the same global order (seed, epoch), cuts it into global batches
    (the remainder is dropped, as PyTorch's ``drop_last``), and keeps rows
    ``[shard_index·b, (shard_index+1)·b)`` of each, ``b = global_batch / shard_count``.
    Item ``i`` is ``{"image": uint8 (b, 32, 32, 3), "label": int32 (b,)}``.
    """
    local = global_batch // shard_count
    order = grain.MapDataset.range(len(split)).shuffle(seed=_mix(seed, epoch))
    batches = order.batch(global_batch, drop_remainder=True)

    def load(i_and_indices, rng: np.random.Generator):
        mine = slice(shard_index * local, (shard_index + 1) * local)
        indices = np.asarray(i_and_indices)[mine]
        params = crop_flip_params(global_batch, rng)[mine]
        return {"image": augment(split.images[indices], params), "label": split.labels[indices]}

    return batches.random_map(load, seed=_mix(seed + 1, epoch))


def eval_batches(split: Split, global_batch: int, shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Sequential evaluation batches covering every example once; the last batch is padded and
    carries ``mask`` (1 for real examples) so every process keeps the same static shape."""
    local = global_batch // shard_count
    n_batches = -(-len(split) // global_batch)

    def load(i: int) -> dict[str, np.ndarray]:
        idx = i * global_batch + shard_index * local + np.arange(local)
        mask = idx < len(split)
        idx = np.where(mask, idx, 0)
        return {"image": split.images[idx], "label": split.labels[idx], "mask": mask.astype(np.float32)}

    return grain.MapDataset.range(n_batches).map(load)


def prefetch(dataset: grain.MapDataset, start: int = 0, threads: int = 2, buffer: int = 4) -> Iterator[dict]:
    """Iterates ``dataset[start:]`` with grain's threaded prefetch."""
    sliced = dataset[start:] if start else dataset
    return iter(sliced.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)))


def _mix(seed: int, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, epoch), within the range grain accepts.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
