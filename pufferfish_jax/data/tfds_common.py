"""What the project's TensorFlow-free TFDS builders share.

TFDS can write ``array_record`` shards and read them back through
``builder.as_data_source`` (random access, numpy only) without TensorFlow, as long
as the builder never reaches for ``tf.io`` / ``tf.data``: sources are read with
the standard library, statistics (computed with tf.data) are skipped and GCS is
never asked.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds


class DatasetError(ValueError):
    """A dataset is missing, corrupt or not prepared."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manual_dir_of(dl_manager: tfds.download.DownloadManager) -> str | None:
    """The download manager's manual dir, or None when it is missing or empty."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # TFDS's way of saying "missing or empty"
        return None


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> None:
    """``download_and_prepare`` as array_record, without TensorFlow: no GCS, no statistics.
    Does nothing if the dataset is already prepared."""
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir,
            # Our datasets are not on GCS; asking would only need the network.
            try_download_gcs=False,
            # Statistics are computed with tf.data.
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )
