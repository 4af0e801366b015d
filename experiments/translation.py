"""Pufferfish Transformer on Multi30k De→En: ``python -m experiments.translation --ranks 0.25``.

Defaults are the paper's recipe (the official ``low_rank_transformer``, the
``attention-is-all-you-need-pytorch`` code): 6+6 layers, d_model 512, 8 heads, d_ff 2048,
dropout 0.1, one shared source/target embedding tied to the output projection, label smoothing
0.1, Adam(0.9, 0.98, eps 1e-9) with lr = 2·d^-0.5·min(s^-0.5, s·warmup^-1.5) per step s
(warmup 128,000 steps, batch 256 sentences, 400 epochs: the official run script), 10 vanilla
warm-up epochs, then one truncated-SVD switch of Q, K, V, the output projection and both FFN
matrices of layers 1–5 to rank 128 (encoder and decoder layer 0 stay full rank).

At the switch the trainer builds a new Adam (as the official code); the official code also
restarts the learning-rate schedule's step counter there, and so do we by default: the
inverse-square-root warm-up exists to protect a freshly initialized Adam, whose second-moment
estimates are still noisy and whose first bias-corrected steps move every parameter by about
the learning rate — here the SVD factors of a trained model. ``--continue-schedule`` keeps
counting global steps instead. A vanilla run (``--ranks 1.0``) keeps its optimizer, so its
schedule never restarts.

Data: the raw (cased, untokenized) Multi30k files (default ``$PUFFERFISH_DATA/translation/multi30k``
or ``<repo>/../shared/data/translation/multi30k``). One SentencePiece BPE model is trained on the
German and English training sentences (saved as ``<out-dir>/tokenizer.model``). The validation
set is evaluated every epoch; at the end the test set (``test_2016_flickr``) is evaluated and
translated greedily and with beam search, and detokenized sacreBLEU goes into the summary.

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
import time
from typing import Any, Sequence

import numpy as np

import pufferfish_jax  # noqa: F401  (sets XLA flags before jax starts)
from experiments.cli import (ArgumentParser, UsageError, add_run_args, compute_dtype, default_out_dir, fail,
                             prepare_run, print_dry_run, report_done, run_training, time_train_steps,
                             validate_run_args)
from pufferfish_jax.data.tfds_cifar10 import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "translation"
TOKENIZER_FILE = "tokenizer.model"


def default_data_dir() -> str:
    """``$PUFFERFISH_DATA/translation/multi30k``, else ``<repo>/../shared/data/translation/multi30k``."""
    root = os.environ.get("PUFFERFISH_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
    return os.path.join(root, "translation", "multi30k")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m experiments.translation", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="folder of the Multi30k <split>.<lang>.xz files (default $PUFFERFISH_DATA/translation/multi30k "
                   "or <repo>/../shared/data/translation/multi30k)")
    add_run_args(p, epochs=400, warmup_epochs=10, batch_size=256)
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=512, help="model width (embedding, attention, residual stream)")
    m.add_argument("--heads", type=int, default=8, help="attention heads (must divide --d-model)")
    m.add_argument("--d-ff", type=int, default=2048, help="inner width of the feed-forward sublayers")
    m.add_argument("--layers", type=int, default=6, help="encoder layers = decoder layers")
    m.add_argument("--dropout", type=float, default=0.1, help="dropout on embeddings, sublayer outputs and attention")
    m.add_argument("--vocab-size", type=int, default=8000,
                   help="pieces of the shared SentencePiece vocabulary (also the V of --dry-run, which needs no data)")
    m.add_argument("--tokenizer", default=None,
                   help="an existing SentencePiece model to use instead of training one (its size must be --vocab-size)")
    o = p.add_argument_group("optimization")
    o.add_argument("--warmup-steps", type=int, default=128_000,
                   help="steps of the inverse-square-root schedule's linear warm-up (official run script: 128000)")
    o.add_argument("--lr-mul", type=float, default=2.0, help="lr = lr_mul * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)")
    o.add_argument("--label-smoothing", type=float, default=0.1)
    o.add_argument("--continue-schedule", action="store_true",
                   help="keep counting global steps in the schedule at the switch instead of restarting its warm-up "
                   "(the official code restarts it with the new optimizer)")
    o.add_argument("--max-len", type=int, default=100, help="drop training pairs longer than this many tokens (with BOS/EOS)")
    o.add_argument("--pad-multiple", type=int, default=16,
                   help="pad each batch to a multiple of this many tokens: fewer distinct shapes, so fewer compilations")
    d = p.add_argument_group("decoding and BLEU (test_2016_flickr)")
    d.add_argument("--beam-size", type=int, default=5, help="beam width for the beam-search BLEU (official: 5)")
    d.add_argument("--length-penalty", type=float, default=0.7,
                   help="beam hypotheses are ranked by log P / length^alpha (official alpha 0.7; 0 ranks by log P)")
    d.add_argument("--max-decode-len", type=int, default=100, help="longest translation in tokens (official: 100)")
    d.add_argument("--decode-batch-size", type=int, default=64, help="sentences decoded at once")
    d.add_argument("--bleu-sentences", type=int, default=None,
                   help="translate only the first N test sentences (quick runs; default all 1,000)")
    p.add_argument("--bench-steps", type=int, default=None,
                   help="instead of training: time N train steps of the vanilla and the Pufferfish model on one real "
                   "batch (--batch-size longest-first training pairs), interleaved, and print their medians")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    validate_run_args(args)
    for flag in ("d_model", "heads", "d_ff", "layers", "warmup_steps", "max_len", "beam_size", "max_decode_len",
                 "decode_batch_size", "pad_multiple"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.d_model % args.heads:
        raise UsageError(f"--heads ({args.heads}) must divide --d-model ({args.d_model})")
    if args.vocab_size < 8:
        raise UsageError(f"--vocab-size must be at least 8, got {args.vocab_size}")
    if args.max_len < 3:
        raise UsageError(f"--max-len must leave room for BOS, a token and EOS (at least 3), got {args.max_len}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if not (math.isfinite(args.lr_mul) and args.lr_mul > 0):
        raise UsageError(f"--lr-mul must be a positive number, got {args.lr_mul}")
    if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
        raise UsageError(f"--length-penalty must be a number ≥ 0, got {args.length_penalty}")
    if args.bench_steps is not None and args.bench_steps < 1:
        raise UsageError(f"--bench-steps must be at least 1, got {args.bench_steps}")
    if args.bleu_sentences is not None and args.bleu_sentences < 1:
        raise UsageError(f"--bleu-sentences must be at least 1, got {args.bleu_sentences}")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise UsageError(f"tokenizer model {args.tokenizer} does not exist")


def build_model(args: argparse.Namespace, vocab_size: int, rngs):
    from pufferfish_jax.data.translation import PAD
    from pufferfish_jax.models.transformer import transformer

    dtype = None if args.dtype == "float32" else compute_dtype(args)
    return transformer(vocab_size, d_model=args.d_model, heads=args.heads, d_ff=args.d_ff, layers=args.layers,
                       dropout=args.dropout, pad_id=PAD, dtype=dtype, rngs=rngs)


def dry_run(args: argparse.Namespace) -> dict:
    """Parameters and gradient bytes of the vanilla and the Pufferfish model, built abstractly (no data)."""
    from flax import nnx

    from pufferfish_jax import count_params, low_rank_init, plan
    from pufferfish_jax.models.transformer import KEEP_FULL_RANK

    model = nnx.eval_shape(lambda: build_model(args, args.vocab_size, nnx.Rngs(0)))
    layers = plan(model, args.ranks, KEEP_FULL_RANK)
    low = nnx.eval_shape(lambda: low_rank_init(lambda: build_model(args, args.vocab_size, nnx.Rngs(0)), args.ranks,
                                               KEEP_FULL_RANK))
    vanilla, pufferfish = count_params(model), count_params(low)
    report = {
        "task": TASK, "rank_ratio": args.ranks, "vocab_size": args.vocab_size, "d_model": args.d_model,
        "heads": args.heads, "d_ff": args.d_ff, "layers": args.layers,
        "params_vanilla": vanilla, "params_pufferfish": pufferfish,
        "grad_bytes_vanilla": 4 * vanilla, "grad_bytes_pufferfish": 4 * pufferfish,
        "factorized_layers": len(layers), "ranks": sorted({l.rank for l in layers}),
    }
    print(f"factorized layers: {len(layers)} ({', '.join(l.path for l in layers)})", file=sys.stderr)
    return print_dry_run(report, (("params", "trainable params"), ("grad_bytes", "grad bytes / step")))


def inverse_sqrt_schedule(d_model: int, warmup_steps: int, lr_mul: float = 2.0, restart_at_switch: bool = True):
    """``lr_mul · d^-0.5 · min(s^-0.5, s · warmup^-1.5)`` for the ``s``-th update (``s = step + 1``,
    the official ``ScheduledOptim``), as a trainer schedule ``(epoch, step, history) -> lr``.

    With ``restart_at_switch``, ``s`` counts from the transition when the transition factorized
    layers (the optimizer was rebuilt): ``s = step - transition_step + 1``, as the official code.
    The transition's step comes from the history (the metrics records), so a resumed run gets
    the same learning rates.
    """

    def schedule(epoch: int, step: int, history: Sequence[dict[str, Any]] = ()) -> float:
        start = 0
        if restart_at_switch:
            for record in history:
                if record.get("event") == "transition" and record.get("factorized_layers", 0) > 0:
                    start = int(record["step"])
        s = max(step - start, 0) + 1
        return lr_mul * d_model ** -0.5 * min(s ** -0.5, s * warmup_steps ** -1.5)

    return schedule


def make_tx(args: argparse.Namespace):
    import optax

    # Adam without the learning rate (the step multiplies by the schedule's lr). Signum's momentum
    # and sign live in the reducer, so with it the step applies the vote directly (as for CIFAR).
    if args.reducer == "signum":
        return optax.identity()
    return optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-9)


def experiment(args: argparse.Namespace, vocab_size: int, train, val, test):
    """The translation :class:`Experiment`: Transformer, hybrid list, smoothed loss, Adam, warm-up schedule, data."""
    from pufferfish_jax.data import translation as data
    from pufferfish_jax.models.transformer import KEEP_FULL_RANK
    from pufferfish_jax.train.tasks import translation
    from pufferfish_jax.train.trainer import Experiment

    return Experiment(
        build_model=lambda rngs: build_model(args, vocab_size, rngs),
        keep_full_rank=KEEP_FULL_RANK,
        loss_fn=translation(args.label_smoothing, pad_id=data.PAD),
        make_tx=lambda: make_tx(args),
        schedule=inverse_sqrt_schedule(args.d_model, args.warmup_steps, args.lr_mul,
                                       restart_at_switch=not args.continue_schedule),
        train_data=lambda epoch, i, n: data.train_batches(train, args.batch_size, args.seed, epoch, i, n,
                                                                 pad_multiple=args.pad_multiple),
        # Evaluation batches are as large as training's, so they divide over the same devices.
        eval_data=lambda i, n: data.eval_batches(val, args.batch_size, i, n, pad_multiple=args.pad_multiple),
        eval_name="val",
        test_data=lambda i, n: data.eval_batches(test, args.batch_size, i, n, pad_multiple=args.pad_multiple),
        derived_metrics=lambda m: {"perplexity": math.exp(min(m["loss"], 50.0))},
    )


def load_data(args: argparse.Namespace):
    """Raw splits, the tokenizer (resumed run's, ``--tokenizer``, or trained here) and the encoded splits."""
    from pufferfish_jax.data import translation as data

    splits = data.load_multi30k(args.data_dir, ("train", "val", "test_2016_flickr"))
    saved = os.path.join(args.out_dir, TOKENIZER_FILE)
    if os.path.isfile(saved):  # a resumed run keeps its own tokenizer
        tok = data.Tokenizer.load(saved)
    elif args.tokenizer is not None:
        tok = data.Tokenizer.load(args.tokenizer)
    else:
        try:
            tok = data.train_tokenizer([*splits["train"].src, *splits["train"].tgt], args.vocab_size)
        except ValueError as e:
            raise UsageError(f"--vocab-size {args.vocab_size}: {e}") from None
    if tok.vocab_size != args.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} pieces but --vocab-size is {args.vocab_size}")
    train = data.encode_pairs(tok, splits["train"], max_len=args.max_len)
    if len(train) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train)} training pairs")
    val = data.encode_pairs(tok, splits["val"])
    test = data.encode_pairs(tok, splits["test_2016_flickr"])
    return splits, tok, train, val, test


def evaluate_bleu(args: argparse.Namespace, model, tok, test_pairs) -> dict:
    """Greedy and beam-search translations of the test set, their detokenized BLEU, and the time taken."""
    import jax

    from pufferfish_jax.decoding import bleu, translate

    n = args.bleu_sentences or len(test_pairs)
    sources, references = test_pairs.src[:n], test_pairs.tgt[:n]
    out: dict[str, Any] = {"bleu_sentences": len(sources), "beam_size": args.beam_size,
                           "length_penalty": args.length_penalty}
    common = dict(batch_size=args.decode_batch_size, max_len=args.max_decode_len, src_max_len=args.max_len,
                  pad_multiple=args.pad_multiple)
    for name, beam in (("greedy", 1), ("beam", args.beam_size)):
        t0 = time.perf_counter()
        hyps = translate(model, tok, sources, beam_size=beam, length_penalty=args.length_penalty, **common)
        out[f"decode_{name}_s"] = time.perf_counter() - t0
        out[f"bleu_{name}"] = bleu(hyps, references)
        if args.out_dir and jax.process_index() == 0:
            with open(os.path.join(args.out_dir, f"test_2016_flickr.{name}.en"), "w", encoding="utf-8") as f:
                f.writelines(h + "\n" for h in hyps)
    return out


def bench_steps(args: argparse.Namespace, vocab_size: int, train) -> dict:
    """Median wall time of the project's train step (``make_train_step``, exact all-reduce) for the
    vanilla model and its Pufferfish form (SVD of the same weights), on one fixed batch of the
    ``--batch-size`` longest training pairs, timed interleaved so that load from other processes
    hits both alike."""
    import statistics

    from pufferfish_jax.data import translation as data

    longest = np.argsort(-train.lengths(), kind="stable")[: args.batch_size]
    batch = data._batch(train, longest, data.padded_length(int(train.lengths()[longest].max()), args.pad_multiple))
    exp = experiment(args, vocab_size, train, train, train)
    runners = time_train_steps(exp, args.seed, args.ranks, batch, 1e-4, args.bench_steps)
    report = {"task": TASK, "bench_steps": args.bench_steps, "batch_size": args.batch_size,
              "tokens": int(np.asarray(batch["tgt_out"] != data.PAD).sum()), "padded_length": int(batch["src"].shape[1])}
    for name, (params, times) in runners.items():
        report[f"{name}_ms"] = 1000 * statistics.median(times)
        report[f"params_{name}"] = params
    report["speedup"] = report["vanilla_ms"] / report["pufferfish_ms"]
    print(f"train step, {args.batch_size} sentences x {report['padded_length']} tokens: vanilla "
          f"{report['vanilla_ms']:.1f} ms, Pufferfish {report['pufferfish_ms']:.1f} ms ({report['speedup']:.2f}x)")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        validate(args)
        if args.dry_run:
            return dry_run(args)
        args.data_dir = args.data_dir or default_data_dir()
        args.out_dir = default_out_dir(args, TASK)
        from pufferfish_jax.data.translation import text_digest

        if args.bench_steps is not None:
            args.out_dir = os.devnull  # nothing is written
            splits, tok, train, _, _ = load_data(args)
            return bench_steps(args, tok.vocab_size, train)
        splits, tok, train, val, test = load_data(args)
        identity = {"d_model": args.d_model, "heads": args.heads, "d_ff": args.d_ff, "layers": args.layers,
                    "vocab_size": tok.vocab_size, "tokenizer": tok.digest, "max_len": args.max_len,
                    "dataset": f"multi30k de-en sha256:{text_digest(splits)}"}
        cfg, reducer, mesh = prepare_run(args, TASK, identity)
    except (UsageError, DatasetError) as e:
        fail(str(e))

    import jax

    if jax.process_index() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        tok.save(os.path.join(args.out_dir, TOKENIZER_FILE))
    result = run_training(experiment(args, tok.vocab_size, train, val, test), cfg, reducer, mesh)
    s = dict(result.summary)
    s.update(evaluate_bleu(args, result.model, tok, splits["test_2016_flickr"]))
    s["vocab_size"] = tok.vocab_size
    if jax.process_index() == 0:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(s, f, indent=2)
    return report_done(args, "transformer", f"test BLEU greedy {s['bleu_greedy']:.2f}, beam-{args.beam_size} "
                       f"{s['bleu_beam']:.2f}, test perplexity {s.get('test_perplexity', float('nan')):.2f}", s)


if __name__ == "__main__":
    main(sys.argv[1:])
