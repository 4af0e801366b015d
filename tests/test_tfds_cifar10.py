"""The TFDS CIFAR-10 builder, on a tiny official-format archive of real images."""

import os
import pickle
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pufferfish_jax.data import tfds_cifar10 as cifar

DATA_DIR = os.environ.get(
    "PUFFERFISH_DATA", str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


@pytest.fixture(scope="module")
def arrays():
    path = os.path.join(DATA_DIR, "cifar10_subset.npz")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found (set PUFFERFISH_DATA)")
    with np.load(path) as d:
        # The subset is grouped by class; strided picks cover all ten classes.
        return (
            d["x_train"][::200][:50],
            d["y_train"][::200][:50],
            d["x_test"][::100][:20],
            d["y_test"][::100][:20],
        )


@pytest.fixture(scope="module")
def archive(arrays, tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    sha = cifar.write_binary_archive(manual / cifar.ARCHIVE_NAME, *arrays)
    return manual, sha


@pytest.fixture(scope="module")
def prepared(archive, tmp_path_factory):
    manual, sha = archive
    data_dir = tmp_path_factory.mktemp("tfds")
    cifar.build(str(data_dir), str(manual), download=False, expected_sha256=sha, records_per_file=None)
    return str(data_dir)


def test_archive_has_official_record_layout(arrays, archive):
    x_train, y_train, x_test, y_test = arrays
    manual, _ = archive
    with tarfile.open(manual / cifar.ARCHIVE_NAME, "r:gz") as tar:
        names = set(tar.getnames())
        first = tar.extractfile(f"{cifar.BATCH_DIR}/data_batch_1.bin").read()
        last = tar.extractfile(f"{cifar.BATCH_DIR}/data_batch_5.bin").read()
        test = tar.extractfile(f"{cifar.BATCH_DIR}/test_batch.bin").read()
    assert {f"{cifar.BATCH_DIR}/{n}" for n in cifar.TRAIN_FILES + cifar.TEST_FILES} <= names
    assert len(first) == len(last) == 10 * 3073 and len(test) == 20 * 3073
    # Record 0 by hand: label byte, then the R, G and B planes, each row-major.
    assert first[0] == y_train[0]
    for c in range(3):
        plane = np.frombuffer(first[1 + 1024 * c : 1 + 1024 * (c + 1)], np.uint8)
        np.testing.assert_array_equal(plane.reshape(32, 32), x_train[0, :, :, c])
    # The last record of the last file is the last training image.
    assert last[-3073] == y_train[-1]
    np.testing.assert_array_equal(
        np.frombuffer(last[-3072:], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0), x_train[-1]
    )
    assert test[0] == y_test[0]


def test_build_then_load_is_exact_and_tensorflow_free(arrays, prepared):
    x_train, y_train, x_test, y_test = arrays
    images, labels = cifar.load_split(prepared, "train")
    assert images.dtype == labels.dtype == np.uint8 and images.shape == (50, 32, 32, 3)
    np.testing.assert_array_equal(images, x_train)
    np.testing.assert_array_equal(labels, y_train)
    images, labels = cifar.load_split(prepared, "test")
    np.testing.assert_array_equal(images, x_test)
    np.testing.assert_array_equal(labels, y_test)

    files = os.listdir(os.path.join(prepared, "pufferfish_cifar10", "1.0.0"))
    assert any(".array_record-" in f for f in files), files
    # grain pickles its source into worker processes.
    source = pickle.loads(pickle.dumps(cifar.data_source(prepared, "test")))
    assert len(source) == 20 and source[7]["label"] == y_test[7]
    np.testing.assert_array_equal(source[7]["image"], x_test[7])
    assert "tensorflow" not in sys.modules


def test_extracted_folder_is_accepted_and_size_checked(arrays, archive, tmp_path):
    manual = tmp_path / "manual"
    (manual / cifar.BATCH_DIR).mkdir(parents=True)
    with tarfile.open(archive[0] / cifar.ARCHIVE_NAME, "r:gz") as tar:
        for member in tar.getmembers():
            (manual / member.name).write_bytes(tar.extractfile(member).read())
    cifar.build(str(tmp_path / "ok"), str(manual), download=False, records_per_file=None)
    np.testing.assert_array_equal(cifar.load_split(str(tmp_path / "ok"), "test")[0], arrays[2])

    batch = manual / cifar.BATCH_DIR / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(cifar.DatasetError, match="data_batch_3.bin.*not a positive multiple"):
        cifar.build(str(tmp_path / "short"), str(manual), download=False, records_per_file=None)
    # Official sizes are exact: 10 records where 10000 are due is rejected too.
    batch.write_bytes(b"\0" * 10 * 3073)
    with pytest.raises(cifar.DatasetError, match="30730000 bytes"):
        cifar.build(str(tmp_path / "official"), str(manual), download=False)


def test_corrupt_archive_fails_checksum(archive, tmp_path):
    good, sha = archive
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(good / cifar.ARCHIVE_NAME, manual)
    # A tiny archive is not the official one, so the default digest refuses it.
    with pytest.raises(cifar.DatasetError, match=cifar.CIFAR10_SHA256):
        cifar.build(str(tmp_path / "a"), str(manual), download=False)

    path = manual / cifar.ARCHIVE_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(cifar.DatasetError, match="checksum") as err:
        cifar.build(str(tmp_path / "b"), str(manual), download=False, expected_sha256=sha)
    assert cifar.ARCHIVE_NAME in str(err.value) and sha in str(err.value)
    assert not os.path.exists(tmp_path / "b" / "pufferfish_cifar10" / "1.0.0")


def test_missing_dataset_gives_guidance(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(cifar.DatasetError) as err:
        cifar.build(str(tmp_path / "data"), str(tmp_path / "empty"), download=False)
    message = str(err.value)
    assert cifar.ARCHIVE_NAME in message and "manual dir" in message and "--data" in message
    with pytest.raises(cifar.DatasetError, match="build"):
        cifar.load_split(str(tmp_path / "data"), "train")


def test_official_digest_matches_tfds_registry():
    import tensorflow_datasets as tfds

    registry = tfds.core.utils.tfds_path() / "url_checksums" / "cifar10.txt"
    if not registry.exists():
        pytest.skip("this TFDS release ships no url_checksums/cifar10.txt")
    url, size, sha, _ = registry.read_text().split("\n")[0].split("\t")
    assert (url, int(size), sha) == (cifar.CIFAR10_URL, cifar.CIFAR10_SIZE, cifar.CIFAR10_SHA256)
