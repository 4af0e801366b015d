"""CIFAR-10 arrays and the grain pipeline, on the real subset."""

from __future__ import annotations

import numpy as np
import pytest

from pufferfish_jax.data import DatasetError, cifar


def test_load_npz_real_subset(cifar_splits):
    train, test = cifar_splits
    assert train.images.shape == (10000, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (2000, 32, 32, 3)
    assert np.bincount(train.labels, minlength=10).tolist() == [1000] * 10
    assert train.labels.dtype == np.int32


def test_train_batches_cover_epoch_once_and_reshuffle(cifar_splits):
    train, _ = cifar_splits
    ds = cifar.train_batches(train, 100, seed=0, epoch=0)
    assert len(ds) == 100
    labels = np.concatenate([ds[i]["label"] for i in range(len(ds))])
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10  # a permutation: every example once
    again = cifar.train_batches(train, 100, seed=0, epoch=0)[7]
    other_epoch = cifar.train_batches(train, 100, seed=0, epoch=1)[7]
    assert np.array_equal(ds[7]["image"], again["image"])  # deterministic
    assert not np.array_equal(ds[7]["label"], other_epoch["label"])  # reshuffled per epoch


def test_shards_partition_the_single_process_batch(cifar_splits):
    train, _ = cifar_splits
    whole = cifar.train_batches(train, 64, seed=3, epoch=2)[5]
    parts = [cifar.train_batches(train, 64, seed=3, epoch=2, shard_index=i, shard_count=4)[5] for i in range(4)]
    assert np.array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    assert np.array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


def test_augment_is_crop_of_reflect_pad_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    params = np.array([[4, 4, 0], [0, 8, 0], [2, 3, 1]])
    out = cifar.augment(images, params)
    assert np.array_equal(out[0], images[0])  # centre crop, no flip = identity
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    assert np.array_equal(out[1], padded[1, 0:32, 8:40])
    assert np.array_equal(out[2], padded[2, 2:34, 3:35][:, ::-1])


def test_eval_batches_mask_padding(cifar_splits):
    _, test = cifar_splits
    ds = cifar.eval_batches(test, 300)
    assert len(ds) == 7
    masks = [ds[i]["mask"] for i in range(len(ds))]
    assert sum(m.sum() for m in masks) == 2000
    assert masks[-1][:200].all() and not masks[-1][200:].any()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((4, 32, 32), np.uint8)}, "lacks the arrays"),
        (dict(x_train=np.zeros((4, 28, 28, 3), np.uint8), y_train=np.zeros(4, np.uint8),
              x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2, np.uint8)), "shape"),
        (dict(x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.array([0, 1, 2, 10]),
              x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2, np.uint8)), "labels must be integers"),
        (dict(x_train=np.zeros((4, 32, 32, 3), np.float32), y_train=np.zeros(4, np.uint8),
              x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.zeros(2, np.uint8)), "uint8"),
    ],
)
def test_malformed_npz_rejected(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=message):
        cifar.load_npz(str(path))


def test_missing_unreadable_and_checksum(tmp_path, cifar_npz):
    with pytest.raises(DatasetError, match="does not exist"):
        cifar.load_npz(str(tmp_path / "nope.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable"):
        cifar.load_npz(str(junk))
    with pytest.raises(DatasetError, match="sha256"):
        cifar.load_npz(str(cifar_npz), expected_sha256="0" * 64)
