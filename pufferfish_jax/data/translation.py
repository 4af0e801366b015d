"""Multi30k De→En: the raw text files, a shared subword tokenizer, and length-bucketed batches.

The files are the original cased, untokenized sentences (``<split>.<lang>.xz``, line i of
``.de`` translates line i of ``.en``). One SentencePiece BPE model is trained on the German
and English training sentences together, so source and target share one vocabulary (the
paper ties the source embedding, the target embedding and the output projection). Training is
deterministic (one thread, input in file order), so every process of a multi-host run trains
the same model, and it uses the identity normalization without whitespace folding plus byte
fallback, so ``decode(encode(s)) == s`` for any sentence.

Batches are random-access ``grain.MapDataset``s indexed by step, as for CIFAR: the whole
epoch's plan (which examples form each global batch, and its padded length) is a function of
``(seed, epoch)`` only, so every process computes the same plan, reads only its own rows, and
a resumed run slices it. Examples are grouped by length (torchtext's BucketIterator way:
shuffle, sort within pools of 100 batches, shuffle the batches) and a batch is padded to a
multiple of ``pad_multiple`` tokens, which bounds the number of distinct shapes the train
step compiles for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import os
from typing import Sequence

import grain
import numpy as np

from pufferfish_jax.data.tfds_cifar10 import DatasetError

SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")
PAD, UNK, BOS, EOS = 0, 1, 2, 3
MAX_LEN = 100
"""Longest training pair kept, in tokens with BOS/EOS (the official preprocessing drops longer ones)."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Parallel sentences: ``src[i]`` translates to ``tgt[i]``."""

    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DatasetError(f"data file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"data file {path} is not readable")
    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (lzma.LZMAError, EOFError, UnicodeDecodeError, OSError) as e:
        raise DatasetError(f"data file {path} is not xz-compressed UTF-8 text ({type(e).__name__})") from None
    return [line.strip() for line in text.splitlines()]


def load_split(data_dir: str, split: str, src_lang: str = "de", tgt_lang: str = "en") -> Pairs:
    """One split of Multi30k (``train``, ``val``, ``test_2016_flickr``, ...) as raw sentence pairs.

    Raises ``DatasetError`` when a file is missing, unreadable or not xz text, the two sides
    differ in length, or the split is empty.
    """
    if not os.path.isdir(data_dir):
        raise DatasetError(f"data directory {data_dir} does not exist")
    src_path = os.path.join(data_dir, f"{split}.{src_lang}.xz")
    tgt_path = os.path.join(data_dir, f"{split}.{tgt_lang}.xz")
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DatasetError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    if not src:
        raise DatasetError(f"{src_path} is empty")
    return Pairs(src, tgt)


def load_multi30k(data_dir: str, splits: Sequence[str] = ("train", "val", "test_2016_flickr"),
                  src_lang: str = "de", tgt_lang: str = "en") -> dict[str, Pairs]:
    """The named splits of Multi30k in ``data_dir`` (``shared/data/translation/multi30k``)."""
    return {s: load_split(data_dir, s, src_lang, tgt_lang) for s in splits}


def text_digest(splits: dict[str, Pairs]) -> str:
    """Names the data by content (not path): a checkpoint resumes only on the text it was trained on."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for line in (*splits[name].src, *splits[name].tgt):
            h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


class Tokenizer:
    """A SentencePiece model with the ids ``PAD=0, UNK=1, BOS=2, EOS=3``.

    ``encode`` gives subword ids without BOS/EOS; ``decode`` turns ids back into text,
    stopping at the first EOS and ignoring PAD and BOS.
    """

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise DatasetError("the tokenizer model does not use the ids pad=0, unk=1, bos=2, eos=3")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()[:16]

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(sentences))

    def decode(self, ids: Sequence[int]) -> str:
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(i)
        return self.sp.decode(out)

    def save(self, path: str) -> None:
        """Writes the model atomically (a crash never leaves a half-written file behind)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self.proto)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise DatasetError(f"tokenizer model {path} does not exist")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{path} is not a SentencePiece model ({type(e).__name__})") from None


def train_tokenizer(sentences: Sequence[str], vocab_size: int, model_type: str = "bpe") -> Tokenizer:
    """A joint subword model of ``vocab_size`` pieces trained on ``sentences`` (deterministic).

    ``ValueError`` when the vocabulary cannot be that size for this text (too small to hold
    the 4 special ids, the 256 byte pieces and every character; or more pieces than the text has).
    """
    import sentencepiece as spm

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, character_coverage=1.0, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=False,
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on this text: {str(e).strip().splitlines()[-1]}") from None
    return Tokenizer(writer.getvalue())


def load_or_train_tokenizer(path: str | None, train: Pairs, vocab_size: int) -> Tokenizer:
    """The tokenizer saved at ``path`` if there is one (its size must be ``vocab_size``), else
    one trained on both sides of ``train`` (and saved at ``path`` when given)."""
    if path is not None and os.path.exists(path):
        tok = Tokenizer.load(path)
        if tok.vocab_size != vocab_size:
            raise DatasetError(f"tokenizer model {path} has {tok.vocab_size} pieces, not the requested {vocab_size}")
        return tok
    tok = train_tokenizer([*train.src, *train.tgt], vocab_size)
    if path is not None:
        tok.save(path)
    return tok


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of parallel sentences, each wrapped in ``BOS … EOS``."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> np.ndarray:
        """Per example, the longer of the two sides (what a batch is padded to)."""
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt)], np.int64)


def encode_pairs(tok: Tokenizer, pairs: Pairs, max_len: int | None = None) -> Encoded:
    """Tokenizes both sides; with ``max_len``, drops pairs whose either side is longer (training)."""
    wrap = lambda ids: np.asarray([BOS, *ids, EOS], np.int32)  # noqa: E731
    src = [wrap(s) for s in tok.encode(pairs.src)]
    tgt = [wrap(t) for t in tok.encode(pairs.tgt)]
    if max_len is not None:
        keep = [i for i in range(len(src)) if len(src[i]) <= max_len and len(tgt[i]) <= max_len]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    return Encoded(src, tgt)


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def pad_rows(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    """``(len(rows), length)`` int32, PAD-filled."""
    out = np.full((len(rows), length), PAD, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _batch(data: Encoded, indices: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """``src``: source ids; ``tgt_in``: target without its last token; ``tgt_out``: target shifted
    left (the labels). All ``(len(indices), length)``; ``-1`` indices are all-PAD rows (no tokens
    counted in the loss)."""
    src = [data.src[i] if i >= 0 else np.zeros(0, np.int32) for i in indices]
    tgt = [data.tgt[i] if i >= 0 else np.zeros(0, np.int32) for i in indices]
    return {"src": pad_rows(src, length), "tgt_in": pad_rows([t[:-1] for t in tgt], length),
            "tgt_out": pad_rows([t[1:] for t in tgt], length)}


def batch_plan(data: Encoded, global_batch: int, seed: int, epoch: int, pool: int = 100) -> np.ndarray:
    """``(n_batches, global_batch)`` example indices of one epoch, grouped by length.

    Shuffle, sort each pool of ``pool`` batches by length, cut into batches, shuffle the
    batches. The remainder of the shuffled order is dropped (a different remainder each epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    n_batches = len(data) // global_batch
    order = rng.permutation(len(data))[: n_batches * global_batch]
    lengths = data.lengths()
    chunk = pool * global_batch
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        order[start:start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = order.reshape(n_batches, global_batch)
    return batches[rng.permutation(n_batches)]


def train_batches(data: Encoded, global_batch: int, seed: int, epoch: int, shard_index: int = 0,
                  shard_count: int = 1, pad_multiple: int = 8) -> grain.MapDataset:
    """This process's rows of each global training batch of one epoch.

    Item ``i`` is ``{"src", "tgt_in", "tgt_out"}``, int32 ``(global_batch / shard_count, L_i)``
    with ``L_i`` the longest sequence of the whole global batch rounded up to ``pad_multiple``
    (so every process pads its rows to the same length).
    """
    if global_batch % shard_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {shard_count} processes")
    if len(data) < global_batch:
        raise ValueError(f"batch size {global_batch} is larger than the {len(data)} training pairs")
    plan = batch_plan(data, global_batch, seed, epoch)
    lengths = data.lengths()
    local = global_batch // shard_count
    mine = slice(shard_index * local, (shard_index + 1) * local)

    def load(i: int) -> dict[str, np.ndarray]:
        rows = plan[i]
        return _batch(data, rows[mine], padded_length(int(lengths[rows].max()), pad_multiple))

    return grain.MapDataset.range(len(plan)).map(load)


def eval_batches(data: Encoded, global_batch: int, shard_index: int = 0, shard_count: int = 1,
                 pad_multiple: int = 8) -> grain.MapDataset:
    """Every example once, sorted by length (less padding); the last batch is filled with all-PAD
    rows, which hold no target tokens and so count for nothing."""
    if global_batch % shard_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {shard_count} processes")
    lengths = data.lengths()
    order = np.argsort(lengths, kind="stable")
    n_batches = -(-len(order) // global_batch)
    plan = np.full(n_batches * global_batch, -1, np.int64)
    plan[: len(order)] = order
    plan = plan.reshape(n_batches, global_batch)
    local = global_batch // shard_count
    mine = slice(shard_index * local, (shard_index + 1) * local)

    def load(i: int) -> dict[str, np.ndarray]:
        rows = plan[i]
        real = rows[rows >= 0]
        return _batch(data, rows[mine], padded_length(int(lengths[real].max()), pad_multiple))

    return grain.MapDataset.range(n_batches).map(load)
