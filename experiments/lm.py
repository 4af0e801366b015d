"""Pufferfish LSTM language model: ``python -m experiments.lm --ranks 0.25``.

Defaults are the paper's recipe (the official ``word_language_model``): a 2-layer LSTM,
emsize = nhid = 1500, tied embedding/decoder, dropout 0.65; plain SGD lr 20 with the gradient
norm clipped at 0.25, batch 20, BPTT 35, 40 epochs of which 10 vanilla warm-up epochs, then one
truncated-SVD switch of all 16 gate matrices to rank int(0.25·1500) = 375. The learning rate
is halved at the switch and divided by 4 after every epoch whose validation loss does not beat
the best so far. The hidden state of both layers is carried from chunk to chunk (truncated
backpropagation), reset at the start of every epoch and every evaluation pass.

Data: Penn Treebank (``ptb.{train,valid,test}.txt``, default ``../shared/data/ptb``) or
WikiText-2 (``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``), plain or ``.xz``.
Reports validation perplexity every epoch and test perplexity at the end.

Checkpoints go to <out-dir>/checkpoints; running again on the same --out-dir resumes.
Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad input, 3 NaN/Inf loss or
gradient, 1 another failure (e.g. a peer process of a multi-process run died).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pufferfish_jax  # noqa: F401  (sets XLA flags before jax starts)
from experiments.cli import (ArgumentParser, UsageError, add_run_args, compute_dtype, fail, prepare_run, print_dry_run,
                             report_done, run_training, time_train_steps, validate_run_args)
from pufferfish_jax.data.tfds_cifar10 import DatasetError

PAPER_VOCAB = 33_278  # WikiText-2, the paper's corpus
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIRS = {"ptb": "ptb", "wikitext2": "wikitext-2"}


def default_data_dir(dataset: str) -> str:
    """``$PUFFERFISH_DATA/<ptb|wikitext-2>``, else ``<repo>/../shared/data/<...>``."""
    root = os.environ.get("PUFFERFISH_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
    return os.path.join(root, DEFAULT_DIRS.get(dataset, dataset))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.lm", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="ptb", help="ptb or wikitext2")
    p.add_argument("--data-dir", default=None, help="folder of the three split files (default $PUFFERFISH_DATA/ptb "
                   "or <repo>/../shared/data/ptb; wikitext-2 for --dataset wikitext2)")
    add_run_args(p, epochs=40, warmup_epochs=10, batch_size=20)
    p.add_argument("--lr", type=float, default=20.0, help="base learning rate (plain SGD)")
    p.add_argument("--clip", type=float, default=0.25, help="global gradient-norm clip, applied to the reduced gradient")
    p.add_argument("--bptt", type=int, default=35, help="tokens per truncated-backpropagation chunk")
    p.add_argument("--emsize", type=int, default=1500, help="embedding size (= nhid: the decoder is tied to the embedding)")
    p.add_argument("--nhid", type=int, default=1500, help="LSTM units per layer")
    p.add_argument("--nlayers", type=int, default=2, help="LSTM layers")
    p.add_argument("--dropout", type=float, default=0.65, help="dropout on the embedding, between layers and before the decoder")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"vocabulary size for --dry-run without data (default {PAPER_VOCAB:,} = WikiText-2); "
                   "when training it must match the corpus")
    p.add_argument("--bench-steps", type=int, default=None,
                   help="train nothing: time N train steps of the vanilla and the Pufferfish model, interleaved, "
                   "on the first real training batch, and print the median step times (last line JSON)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    from pufferfish_jax.data.text import LAYOUTS

    if args.dataset not in LAYOUTS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(LAYOUTS)}")
    validate_run_args(args)
    for flag in ("emsize", "nhid", "nlayers", "bptt"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.emsize != args.nhid:
        raise UsageError(f"the decoder is tied to the embedding, so --emsize ({args.emsize}) must equal --nhid ({args.nhid})")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.clip) and args.clip > 0):
        raise UsageError(f"--clip must be a positive number, got {args.clip}")
    if args.bench_steps is not None and args.bench_steps < 1:
        raise UsageError(f"--bench-steps must be at least 1, got {args.bench_steps}")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise UsageError(f"--vocab-size must be at least 2, got {args.vocab_size}")


def build(args: argparse.Namespace, vocab_size: int, rngs):
    from pufferfish_jax.models.lstm_lm import lstm_lm

    dtype = None if args.dtype == "float32" else compute_dtype(args)
    return lstm_lm(vocab_size, args.emsize, args.nhid, args.dropout, num_layers=args.nlayers, dtype=dtype, rngs=rngs)


def dry_run(args: argparse.Namespace) -> dict:
    from flax import nnx

    from pufferfish_jax import count_params, low_rank_init, plan
    from pufferfish_jax.models.lstm_lm import KEEP_FULL_RANK

    vocab = args.vocab_size or PAPER_VOCAB
    model = nnx.eval_shape(lambda: build(args, vocab, nnx.Rngs(0)))
    layers = plan(model, args.ranks, KEEP_FULL_RANK)
    factorized = nnx.eval_shape(lambda: low_rank_init(lambda: build(args, vocab, nnx.Rngs(0)), args.ranks, KEEP_FULL_RANK))
    vanilla, low = count_params(model), count_params(factorized)
    report = {
        "model": "lstm", "vocab_size": vocab, "emsize": args.emsize, "nhid": args.nhid, "nlayers": args.nlayers,
        "rank_ratio": args.ranks, "params_vanilla": vanilla, "params_pufferfish": low,
        "grad_bytes_vanilla": 4 * vanilla, "grad_bytes_pufferfish": 4 * low, "factorized_layers": len(layers),
        "ranks": sorted({l.rank for l in layers}),
    }
    print(f"factorized layers: {len(layers)} ({', '.join(f'{l.path}@{l.rank}' for l in layers)})", file=sys.stderr)
    return print_dry_run(report, (("params", "trainable params"), ("grad_bytes", "grad bytes / step")))


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    loss = metrics["loss"]
    return {"perplexity": math.exp(loss) if loss < 700 else float("inf")}


def experiment(args: argparse.Namespace, corpus):
    """The LM :class:`Experiment`: model, loss, clipped SGD, plateau schedule, BPTT batches, carry."""
    import optax

    from pufferfish_jax.data.text import batchify, bptt_batches
    from pufferfish_jax.models.lstm_lm import KEEP_FULL_RANK, zero_carry
    from pufferfish_jax.train.schedules import plateau
    from pufferfish_jax.train.tasks import language_model
    from pufferfish_jax.train.trainer import Experiment

    # Evaluation uses the training batch (the official code uses 10) so it shards over the same devices.
    columns = {s: batchify(getattr(corpus, s), args.batch_size) for s in ("train", "valid", "test")}
    return Experiment(
        build_model=lambda rngs: build(args, corpus.vocab_size, rngs),
        keep_full_rank=KEEP_FULL_RANK,
        loss_fn=language_model(),
        # Plain SGD: clip the (reduced) gradient's global norm; the step subtracts lr · update.
        make_tx=lambda: optax.clip_by_global_norm(args.clip),
        schedule=plateau(args.lr, "val"),
        train_data=lambda epoch, i, n: bptt_batches(columns["train"], args.bptt, i, n),
        eval_data=lambda i, n: bptt_batches(columns["valid"], args.bptt, i, n),
        init_carry=lambda batch: zero_carry(batch, args.nhid, args.nlayers),
        eval_name="val",
        test_data=lambda i, n: bptt_batches(columns["test"], args.bptt, i, n),
        derived_metrics=perplexity,
    )


def bench(args: argparse.Namespace, corpus) -> dict:
    """Median wall time of the project's own jitted train step (the trainer's ``make_train_step``,
    exact all-reduce, clipped SGD, carry threaded through) for the vanilla model and for its
    Pufferfish form after the SVD switch, timed interleaved so that load from other processes
    hits both alike."""
    import numpy as np

    exp = experiment(args, corpus)
    timed = time_train_steps(exp, args.seed, args.ranks, exp.train_data(0, 0, 1)[0], args.lr, args.bench_steps)
    report = {"emsize": args.emsize, "nhid": args.nhid, "vocab_size": corpus.vocab_size, "batch_size": args.batch_size,
              "bptt": args.bptt, "steps": args.bench_steps, "rank_ratio": args.ranks,
              **{f"params_{n}": params for n, (params, _) in timed.items()},
              **{f"step_s_{n}": float(np.median(times)) for n, (_, times) in timed.items()}}
    report["speedup"] = report["step_s_vanilla"] / report["step_s_pufferfish"]
    print(f"median train step: vanilla {report['step_s_vanilla'] * 1e3:.1f} ms, Pufferfish "
          f"{report['step_s_pufferfish'] * 1e3:.1f} ms ({report['speedup']:.2f}x) over {args.bench_steps} interleaved steps")
    print(json.dumps(report))
    return report


def load(args: argparse.Namespace):
    from pufferfish_jax.data.text import load_corpus

    args.data_dir = args.data_dir or default_data_dir(args.dataset)
    corpus = load_corpus(args.data_dir, args.dataset)
    if args.vocab_size is not None and args.vocab_size != corpus.vocab_size:
        raise UsageError(f"--vocab-size {args.vocab_size} does not match the {args.dataset} vocabulary of {corpus.vocab_size} words")
    for split in ("train", "valid", "test"):
        n = len(getattr(corpus, split)) // args.batch_size
        if n < 2:
            raise UsageError(f"the {split} split ({len(getattr(corpus, split))} tokens) is too short for --batch-size {args.batch_size}")
    return corpus


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        validate(args)
        if args.dry_run:
            return dry_run(args)
        corpus = load(args)
        if args.bench_steps:
            return bench(args, corpus)
        identity = {"dataset": f"{args.dataset} {corpus.fingerprint()}", "emsize": args.emsize, "nhid": args.nhid,
                    "nlayers": args.nlayers, "dropout": args.dropout, "bptt": args.bptt}
        cfg, reducer, mesh = prepare_run(args, f"lm-{args.dataset}", identity)
    except (UsageError, DatasetError) as e:
        fail(str(e))
    s = run_training(experiment(args, corpus), cfg, reducer, mesh).summary
    return report_done(args, f"LSTM {args.emsize}/{args.nhid} on {args.dataset},",
                       f"val perplexity {s.get('val_perplexity', float('nan')):.2f}, "
                       f"test perplexity {s.get('test_perplexity', float('nan')):.2f}", s)


if __name__ == "__main__":
    main(sys.argv[1:])
