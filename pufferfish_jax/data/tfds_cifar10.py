"""CIFAR-10 as a TFDS builder that writes array_record files without TensorFlow.

TFDS's own ``cifar10`` builder extracts the archive with ``tf.io.gfile`` and
is read back through ``tf.data``, so it cannot run in a TensorFlow-free
environment. This builder reads the official binary archive with ``tarfile``,
lets TFDS write ``array_record`` shards, and is read back with
``builder.as_data_source`` (random access, numpy only), which grain can use.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import socket
import tarfile
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from pufferfish_jax.data.tfds_common import DatasetError, manual_dir_of, prepare, sha256_file

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
# Taken from tensorflow_datasets/url_checksums/cifar10.txt (TFDS 4.9.10), the
# digest TFDS's own cifar10 builder validates this URL against. (The md5 that
# Krizhevsky publishes for the same file is c32a1d4ab5d03f1284b67883e8d87530.)
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
CIFAR10_SIZE = 170052171

BATCH_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
SPLIT_FILES = {"train": TRAIN_FILES, "test": TEST_FILES}
IMAGE_SHAPE = (32, 32, 3)
RECORD_BYTES = 1 + 32 * 32 * 3
RECORDS_PER_FILE = 10000
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _missing_message(where: str) -> str:
    return (
        f"CIFAR-10 not found ({where}): allow the online download, put "
        f"{ARCHIVE_NAME} (or its extracted {BATCH_DIR}/ folder) in the manual "
        "dir, or use --data FILE.npz."
    )


def _offline(url: str) -> bool:
    # Offline, TFDS's downloader retries for minutes before giving up; a failed
    # DNS lookup says so at once. A proxy may resolve names we cannot, though.
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(url).hostname, 443)
    except OSError:
        return True
    return False


def _check_batch_size(name: str, size: int, records_per_file: int | None) -> None:
    # Without a checksum (extracted folder) the byte count is the only guard
    # against truncated copies, so demand whole records and, for the official
    # data, exactly 10000 of them.
    if records_per_file is not None:
        if size != records_per_file * RECORD_BYTES:
            raise DatasetError(
                f"{name} has {size} bytes but {records_per_file} records of "
                f"{RECORD_BYTES} bytes ({records_per_file * RECORD_BYTES} bytes) "
                "were expected, so the file is truncated or not CIFAR-10."
            )
    elif size == 0 or size % RECORD_BYTES:
        raise DatasetError(
            f"{name} has {size} bytes, which is not a positive multiple of the "
            f"{RECORD_BYTES}-byte CIFAR-10 record, so the file is truncated."
        )


class _Batches:
    """Reads batch files from the archive or from an extracted folder."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}

    def __enter__(self) -> _Batches:
        if not os.path.isdir(self.source):
            try:
                self._tar = tarfile.open(self.source, "r:gz")
                members = self._tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DatasetError(f"{self.source} is not a readable .tar.gz archive ({e}).") from e
            for m in members:
                if m.isfile():
                    self._members[posixpath.normpath(m.name)] = m
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._tar is not None:
            self._tar.close()

    def size(self, name: str) -> int:
        if self._tar is None:
            path = os.path.join(self.source, name)
            if not os.path.isfile(path):
                raise DatasetError(f"{path} is missing from the CIFAR-10 folder.")
            return os.path.getsize(path)
        member = self._members.get(posixpath.join(BATCH_DIR, name))
        if member is None:
            raise DatasetError(f"{BATCH_DIR}/{name} is missing from {self.source}.")
        return member.size

    def read(self, name: str) -> bytes:
        if self._tar is None:
            with open(os.path.join(self.source, name), "rb") as f:
                return f.read()
        fobj = self._tar.extractfile(self._members[posixpath.join(BATCH_DIR, name)])
        assert fobj is not None  # members are regular files
        return fobj.read()


def _decode_batch(name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise DatasetError(f"{name} holds label {labels.max()}, so it is not CIFAR-10.")
    # The file is channel-planar (1024 R, 1024 G, 1024 B bytes); models want HWC.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


class PufferfishCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CIFAR-10 from the official binary archive, written as array_record.

    Registration is skipped because the builder is used through this module's
    helpers, and a second import of the module under another name (path
    tricks, reloads) would otherwise fail with "already registered".
    """

    name = "pufferfish_cifar10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official CIFAR-10 binary archive, file order kept."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {ARCHIVE_NAME} from {CIFAR10_URL} (or its extracted {BATCH_DIR}/ "
        "folder) in the manual dir."
    )
    # A class attribute (not a checksums.tsv file) so the module carries its
    # own digest and needs no package data; TFDS validates downloads with it.
    url_infos = {
        CIFAR10_URL: tfds_checksums.UrlInfo(
            size=tfds.core.utils.Size(CIFAR10_SIZE),
            checksum=CIFAR10_SHA256,
            filename=ARCHIVE_NAME,
        )
    }

    def __init__(
        self,
        *,
        download: bool = True,
        expected_sha256: str = CIFAR10_SHA256,
        records_per_file: int | None = RECORDS_PER_FILE,
        **kwargs: Any,
    ) -> None:
        """See `build` for the arguments; the rest go to the TFDS builder."""
        super().__init__(**kwargs)
        self._download = download
        self._expected_sha256 = expected_sha256.lower()
        self._records_per_file = records_per_file
        # TFDS unpickles builders by re-running __init__ on _original_state.
        self._original_state.update(
            download=download,
            expected_sha256=expected_sha256,
            records_per_file=records_per_file,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-10 (official binary release), file order kept.",
            features=tfds.features.FeaturesDict(
                {
                    # Raw uint8 tensor rather than Image: no PNG round trip,
                    # so decoding is a memcpy and exactness is obvious.
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            # Keeping the official order lets tests compare record by record
            # and leaves shuffling to the input pipeline.
            disable_shuffling=True,
        )

    def _locate(self, dl_manager: tfds.download.DownloadManager) -> str:
        manual = manual_dir_of(dl_manager)
        if manual is not None:
            archive = os.path.join(manual, ARCHIVE_NAME)
            if os.path.isfile(archive):
                actual = sha256_file(archive)
                if actual != self._expected_sha256:
                    raise DatasetError(
                        f"{archive} failed the checksum: sha256 is {actual} but "
                        f"{self._expected_sha256} was expected, so delete it "
                        "and download it again."
                    )
                return archive
            folder = os.path.join(manual, BATCH_DIR)
            if os.path.isdir(folder):
                return folder
        # The configured path is private to the download manager; it is only
        # read to tell the user where we looked.
        where = f"nothing usable in manual dir {manual or getattr(dl_manager, '_manual_dir', '')}"
        if not self._download:
            raise DatasetError(_missing_message(f"{where}, download off"))
        if _offline(CIFAR10_URL):
            raise DatasetError(_missing_message(f"{where}, no network"))
        try:
            return os.fspath(dl_manager.download(CIFAR10_URL))
        except NonMatchingChecksumError as e:
            raise DatasetError(f"Downloaded {CIFAR10_URL} failed the checksum: {e}") from e
        except Exception as e:  # network failures come in many exception types
            raise DatasetError(_missing_message(f"download failed with {type(e).__name__}")) from e

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        source = self._locate(dl_manager)
        # Validate every file before writing anything, so a bad copy fails
        # fast and names the culprit.
        with _Batches(source) as batches:
            for name in TRAIN_FILES + TEST_FILES:
                _check_batch_size(
                    os.path.join(source, name), batches.size(name), self._records_per_file
                )
        return {split: self._generate_examples(source, files) for split, files in SPLIT_FILES.items()}

    def _generate_examples(self, source: str, files: Sequence[str]) -> Iterator[tuple[int, dict]]:
        index = 0  # integer keys: with shuffling disabled TFDS sorts by key
        with _Batches(source) as batches:
            for name in files:
                images, labels = _decode_batch(name, batches.read(name))
                for image, label in zip(images, labels):
                    yield index, {"image": image, "label": int(label)}
                    index += 1


def build(
    data_dir: str,
    manual_dir: str | None = None,
    download: bool = True,
    *,
    expected_sha256: str = CIFAR10_SHA256,
    records_per_file: int | None = RECORDS_PER_FILE,
) -> None:
    """Prepares CIFAR-10 as array_record files under ``data_dir``.

    Does nothing if the dataset is already prepared there.

    Args:
      data_dir: TFDS data dir; shards land in ``data_dir/pufferfish_cifar10/1.0.0``.
      manual_dir: folder holding ``cifar-10-binary.tar.gz`` or an extracted
        ``cifar-10-batches-bin/``; defaults to ``data_dir/downloads/manual``.
      download: fetch the archive from the official URL when the manual dir
        has nothing; False guarantees no network access.
      expected_sha256: digest a manual archive must have (the official one by
        default; tests override it for tiny archives). Downloads are always
        checked against the official digest.
      records_per_file: records each batch file must hold; None accepts any
        positive number (for small test archives).

    Raises:
      DatasetError: the data is missing, fails its checksum or is malformed.
    """
    builder = PufferfishCifar10(
        data_dir=data_dir,
        download=download,
        expected_sha256=expected_sha256,
        records_per_file=records_per_file,
    )
    prepare(builder, manual_dir)


def data_source(data_dir: str, split: str) -> Sequence[dict[str, np.ndarray]]:
    """Returns the random-access source of a prepared split (e.g. for grain).

    Items are dicts with ``image`` (32x32x3 uint8 array) and ``label`` (int).
    """
    builder = PufferfishCifar10(data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetError(_missing_message(f"nothing prepared in {data_dir}; run build() first"))
    return builder.as_data_source(split)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a prepared split into memory.

    Returns:
      ``(images, labels)``: uint8 arrays of shape (N, 32, 32, 3) and (N,), in
      the official file order.
    """
    source = data_source(data_dir, split)
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.uint8)
    for start in range(0, n, 1000):  # batched reads amortise the per-call cost
        items = source.__getitems__(range(start, min(start + 1000, n)))
        for i, item in enumerate(items, start):
            images[i] = item["image"]
            labels[i] = item["label"]
    return images, labels


def write_binary_archive(
    path: str | os.PathLike,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> str:
    """Writes images in the official ``cifar-10-binary.tar.gz`` layout.

    The training images are split as evenly as possible over
    ``data_batch_1..5.bin``; the test images go to ``test_batch.bin``. The
    archive is byte-for-byte reproducible (fixed timestamps).

    Args:
      path: archive to write.
      x_train, x_test: uint8 images, shape (N, 32, 32, 3).
      y_train, y_test: labels in [0, 10), shape (N,).

    Returns:
      The archive's sha256 hex digest.
    """

    def records(x: np.ndarray, y: np.ndarray) -> bytes:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE or len(x) != len(y):
            raise ValueError(f"need uint8 images (N, 32, 32, 3) and N labels, got {x.shape} {x.dtype} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(CLASS_NAMES)):
            raise ValueError("labels must lie in [0, 10)")
        planar = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        return np.concatenate([y.astype(np.uint8)[:, None], planar], axis=1).tobytes()

    files = {
        name: records(x, y)
        for name, x, y in zip(
            TRAIN_FILES, np.array_split(x_train, 5), np.array_split(y_train, 5)
        )
    }
    files["test_batch.bin"] = records(x_test, y_test)
    files["batches.meta.txt"] = "".join(f"{c}\n" for c in CLASS_NAMES).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return sha256_file(path)
