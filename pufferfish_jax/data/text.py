"""Word-level language-modelling corpora (Penn Treebank, WikiText-2) and BPTT batches.

Reading follows the official ``data.Corpus``: every line becomes its whitespace-separated
words plus ``<eos>``; the vocabulary is every word in order of first appearance over train,
valid and test (10,000 words for PTB, 33,278 for WikiText-2).

Batches follow the official ``batchify``/``get_batch``: the token stream is cut into
``batch_size`` equal columns (the remainder dropped); step ``i`` feeds tokens
``[i·bptt, (i+1)·bptt)`` of every column and the next token as target. The columns are the
rows of our arrays (batch-major), so a process of a multi-host run keeps only its rows and
the hidden state of row ``j`` continues from chunk to chunk. The last chunk is shorter in the
official code; shapes must be static under ``jit``, so it is padded to ``bptt`` and carries a
``mask`` (1 for real targets) — every target is scored exactly once, as in the official code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
from typing import Sequence

import grain
import numpy as np

from pufferfish_jax.data.tfds_cifar10 import DatasetError

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
LAYOUTS: dict[str, tuple[str, ...]] = {
    "ptb": ("ptb.{split}.txt",),  # Mikolov's simple-examples / torchtext
    "wikitext2": ("wiki.{split}.tokens", "{split}.txt"),  # the Salesforce release / pytorch/examples' copy
}
"""Accepted file names per dataset; each may also be ``.xz``-compressed (``name.xz``)."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids (int32, one stream per split) and the vocabulary (id → word)."""

    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def fingerprint(self) -> str:
        """Names the data by content: a checkpoint resumes only on the corpus it was trained on."""
        h = hashlib.sha256()
        for word in self.vocab:
            h.update(word.encode("utf-8") + b"\n")
        for split in (self.train, self.valid, self.test):
            h.update(np.ascontiguousarray(split, np.int32).tobytes())
        return f"vocab {self.vocab_size}, {len(self.train)}/{len(self.valid)}/{len(self.test)} tokens sha256:{h.hexdigest()[:16]}"


def find_split_files(data_dir: str, dataset: str) -> dict[str, str]:
    """``{split: path}`` of ``dataset``'s three files in ``data_dir``; :class:`DatasetError` if any is missing."""
    if dataset not in LAYOUTS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(LAYOUTS)}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data directory {data_dir} does not exist")
    found = {}
    for split in SPLITS:
        names = [p.format(split=split) for p in LAYOUTS[dataset]]
        candidates = [os.path.join(data_dir, n + ext) for n in names for ext in ("", ".xz")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise DatasetError(f"{data_dir} has no {dataset} {split} file (looked for {' or '.join(n + '[.xz]' for n in names)})")
        found[split] = path
    return found


def read_words(path: str) -> list[str]:
    """Words of a text file (plain or ``.xz``), ``<eos>`` after every line, as the official ``tokenize``."""
    if not os.access(path, os.R_OK):
        raise DatasetError(f"data file {path} is not readable")
    opener = lzma.open if path.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            words = [w for line in f for w in (*line.split(), EOS)]
    except (OSError, lzma.LZMAError, UnicodeDecodeError, EOFError) as e:
        raise DatasetError(f"data file {path} is not a readable UTF-8 text file ({type(e).__name__})") from None
    if not words:
        raise DatasetError(f"data file {path} is empty")
    return words


def build_corpus(splits: Sequence[Sequence[str]]) -> Corpus:
    """Vocabulary in order of first appearance over the splits (train, valid, test) and their ids."""
    index: dict[str, int] = {}
    streams = []
    for words in splits:
        ids = np.fromiter((index.setdefault(w, len(index)) for w in words), np.int32, count=len(words))
        streams.append(ids)
    vocab = tuple(index)
    return Corpus(vocab, *streams)


def load_corpus(data_dir: str, dataset: str = "ptb") -> Corpus:
    """Reads ``dataset`` (``"ptb"`` or ``"wikitext2"``) from ``data_dir``; see :data:`LAYOUTS`."""
    files = find_split_files(data_dir, dataset)
    corpus = build_corpus([read_words(files[s]) for s in SPLITS])
    for split in SPLITS:
        if len(getattr(corpus, split)) < 2:
            raise DatasetError(f"data file {files[split]} holds fewer than 2 tokens")
    return corpus


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """``(batch_size, len(tokens) // batch_size)``: row ``j`` is the ``j``-th contiguous column of the
    stream (the official ``batchify``, transposed to batch-major); the remainder is dropped."""
    n = len(tokens) // batch_size
    if n < 2:
        raise ValueError(f"{len(tokens)} tokens are too few for {batch_size} columns of at least 2 tokens")
    return np.ascontiguousarray(np.asarray(tokens[: n * batch_size], np.int32).reshape(batch_size, n))


def num_chunks(columns: np.ndarray, bptt: int) -> int:
    """Chunks per pass: ``ceil((n - 1) / bptt)`` for columns of length ``n`` (the last may be short)."""
    return -(-(columns.shape[1] - 1) // bptt)


def bptt_batches(columns: np.ndarray, bptt: int, shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """This process's rows of every BPTT chunk of ``columns`` (from :func:`batchify`), in order.

    Item ``i`` is ``{"input", "target": int32 (b, bptt), "mask": float32 (b, bptt)}`` with
    ``b = batch / shard_count``: inputs ``columns[rows, i·bptt : (i+1)·bptt]``, targets shifted by
    one. The last chunk is zero-padded to ``bptt`` with ``mask`` 0 on the padding.
    """
    batch, n = columns.shape
    if batch % shard_count:
        raise ValueError(f"{batch} rows cannot be split over {shard_count} processes")
    local = batch // shard_count
    mine = columns[shard_index * local:(shard_index + 1) * local]

    def load(i: int) -> dict[str, np.ndarray]:
        start = i * bptt
        length = min(bptt, n - 1 - start)
        inputs = np.zeros((local, bptt), np.int32)
        targets = np.zeros((local, bptt), np.int32)
        mask = np.zeros((local, bptt), np.float32)
        inputs[:, :length] = mine[:, start:start + length]
        targets[:, :length] = mine[:, start + 1:start + 1 + length]
        mask[:, :length] = 1.0
        return {"input": inputs, "target": targets, "mask": mask}

    return grain.MapDataset.range(num_chunks(columns, bptt)).map(load)
