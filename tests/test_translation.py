"""The translation Transformer: exact paper counts (abstract), attention against its factorized and
truncated-SVD forms, causal and padding masks, the Multi30k loader on the real files, the joint
tokenizer, batches, the loss, the schedule, greedy vs beam search on a model trained by the one
trainer, and ``python -m experiments.translation`` end to end, as a dry run and on bad input."""

from __future__ import annotations

import json
import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pufferfish_jax import LowRankLinear, count_params, factorize, plan
from pufferfish_jax.data import translation as data
from pufferfish_jax.data.tfds_cifar10 import DatasetError
from pufferfish_jax.decoding import beam_search, bleu, greedy_decode, translate
from pufferfish_jax.models.transformer import KEEP_FULL_RANK, MultiHeadAttention, Transformer, transformer
from pufferfish_jax.train.tasks import translation
from tests.conftest import DATA_DIR, run_module

MULTI30K = DATA_DIR / "translation" / "multi30k"
TINY = dict(d_model=32, heads=4, d_ff=64, layers=2)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def layout_count(vocab: int, d: int, d_ff: int, layers: int, rank: int | None = None, full_layers: int = 1) -> int:
    """Parameters of the official layout from first principles: the shared embedding; per
    encoder layer 4 bias-free d×d attention matrices, the FFN with biases and 2 LayerNorms; per
    decoder layer 8 attention matrices, the FFN and 3 LayerNorms; one input LayerNorm per stack.
    With ``rank``, layers ≥ ``full_layers`` hold rank-r factor pairs (the bias on the second)."""
    def mat(i, o, low):
        return rank * (i + o) if low else i * o

    total = vocab * d + 2 * 2 * d
    for i in range(layers):
        low = rank is not None and i >= full_layers
        ffn = mat(d, d_ff, low) + d_ff + mat(d_ff, d, low) + d
        total += 4 * mat(d, d, low) + ffn + 2 * 2 * d  # encoder layer
        total += 8 * mat(d, d, low) + ffn + 3 * 2 * d  # decoder layer
    return total


# ----------------------------------------------------------------------------- parameter counts


def test_paper_counts_exact():
    """6+6 layers, d 512, d_ff 2048: 44,103,680 + 512·V vanilla, 21,821,440 + 512·V Pufferfish
    (V = 8000 here; the dry-run test checks V = 9521)."""
    vocab = 8000
    model = nnx.eval_shape(lambda: transformer(vocab, rngs=nnx.Rngs(0)))
    assert count_params(model) == 44_103_680 + 512 * vocab == layout_count(vocab, 512, 2048, 6)
    layers = plan(model, 0.25, KEEP_FULL_RANK)
    # Layers 1–5 of both stacks: 4 (encoder) or 8 (decoder) attention matrices and 2 FFN matrices each.
    assert len(layers) == 5 * (4 + 2) + 5 * (8 + 2) and {l.rank for l in layers} == {128}
    assert not any(".layers.0." in l.path for l in layers)
    assert {l.path.rsplit(".", 1)[-1] for l in layers} == {"query", "key", "value", "out", "w1", "w2"}

    def low_rank():
        m = transformer(vocab, rngs=nnx.Rngs(0))
        factorize(m, 0.25, KEEP_FULL_RANK, init="random")
        return m

    puffer = nnx.eval_shape(low_rank)
    assert count_params(puffer) == 21_821_440 + 512 * vocab == layout_count(vocab, 512, 2048, 6, rank=128)
    # Bias layout: none in attention projections (nor their factors), FFN bias on the second factor.
    attn = puffer.decoder.layers[3].cross_attn.query
    assert isinstance(attn, LowRankLinear) and attn.first.bias is None and attn.second.bias is None
    ffn = puffer.encoder.layers[5].ffn.w1
    assert ffn.first.bias is None and ffn.second.bias.shape == (2048,)
    assert puffer.encoder.layers[0].ffn.w1.bias.shape == (2048,) and puffer.encoder.layers[0].self_attn.out.bias is None


def test_tiny_counts_follow_the_layout():
    build = lambda: Transformer(300, d_model=24, heads=4, d_ff=80, encoder_layers=3, decoder_layers=3, rngs=nnx.Rngs(0))  # noqa: E731
    assert count_params(nnx.eval_shape(build)) == layout_count(300, 24, 80, 3)

    def low_rank():
        m = build()
        factorize(m, 0.25, KEEP_FULL_RANK, init="random")
        return m

    assert count_params(nnx.eval_shape(low_rank)) == layout_count(300, 24, 80, 3, rank=6)


# ----------------------------------------------------------------------------- attention


def _attention(seed=0, d=16, heads=4):
    return MultiHeadAttention(d, heads, dropout=0.0, rngs=nnx.Rngs(seed))


def _inputs(seed=0, b=2, lq=5, lk=7, d=16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, lq, d)), jnp.float32)
    mem = jnp.asarray(rng.normal(size=(b, lk, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, 1, lk)) > 0.3).at[:, :, :, 0].set(True)
    return x, mem, mask


def test_attention_at_full_rank_equals_vanilla():
    """Each whole d×d projection replaced by a full-rank (r = d) factor pair from its SVD: same outputs."""
    from pufferfish_jax import truncated_svd_factors

    attn = _attention()
    x, mem, mask = _inputs()
    expected = attn(x, mem, mask)
    for name in ("query", "key", "value", "out"):
        old = getattr(attn, name)
        (first, second), = truncated_svd_factors(((old.kernel[...],),), (16,), method="svd")
        new = LowRankLinear(16, 16, 16, use_bias=False, rngs=nnx.Rngs(1))
        new.first.kernel.set_value(first[0])
        new.second.kernel.set_value(second[0])
        setattr(attn, name, new)
    close(attn(x, mem, mask), expected, 1e-4)


def test_factorized_attention_equals_truncated_svd_kernels():
    """factorize(ratio 0.25) of an attention block computes what a vanilla block with every kernel
    replaced by its rank-4 truncated SVD (float64) computes."""
    attn = _attention(seed=3)
    reference = _attention(seed=3)
    for name in ("query", "key", "value", "out"):
        w = np.asarray(getattr(reference, name).kernel[...], np.float64)
        u, s, vt = np.linalg.svd(w)
        getattr(reference, name).kernel.set_value(jnp.asarray((u[:, :4] * s[:4]) @ vt[:4], jnp.float32))
    layers = factorize(attn, 0.25, init="svd")
    assert sorted(l.path for l in layers) == ["key", "out", "query", "value"] and {l.rank for l in layers} == {4}
    x, mem, mask = _inputs(1)
    close(attn(x, mem, mask), reference(x, mem, mask), 1e-4)


def test_masked_keys_are_ignored():
    attn = _attention()
    x, mem, mask = _inputs()
    changed = jnp.where(mask[:, 0, 0, :, None], mem, 100.0)  # anything at masked key positions
    close(attn(x, changed, mask), attn(x, mem, mask))


@pytest.fixture(scope="module")
def tiny_model():
    model = transformer(50, dropout=0.1, rngs=nnx.Rngs(0), **TINY)
    model.eval()
    return model


@nnx.jit
def forward(model, src, tgt):
    return model(src, tgt)


def test_decoder_is_causal(tiny_model):
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(4, 50, (2, 9)), jnp.int32)
    tgt = jnp.asarray(rng.integers(4, 50, (2, 8)), jnp.int32)
    logits = forward(tiny_model, src, tgt)
    future = tgt.at[:, 5:].set(jnp.asarray(rng.integers(4, 50, (2, 3)), jnp.int32))
    changed = forward(tiny_model, src, future)
    close(changed[:, :5], logits[:, :5])  # positions 0..4 never see tokens 5..7
    assert not np.allclose(changed[:, 5:], logits[:, 5:], atol=1e-3)
    # Source padding is invisible: appending PADs to the source changes nothing.
    padded = jnp.concatenate([src, jnp.zeros((2, 7), jnp.int32)], axis=1)
    close(forward(tiny_model, padded, tgt), logits, 1e-5)


def test_cached_decode_steps_equal_the_full_decoder():
    """Incremental decoding (self-attention key/value cache) gives the full decoder's logits at
    every position, for the vanilla and the factorized model."""
    model = transformer(50, dropout=0.1, rngs=nnx.Rngs(1), **TINY)
    rng = np.random.default_rng(1)
    src = jnp.asarray(rng.integers(4, 50, (2, 7)), jnp.int32).at[1, 5:].set(data.PAD)
    tgt = jnp.asarray(rng.integers(4, 50, (2, 6)), jnp.int32).at[:, 0].set(data.BOS)

    @nnx.jit
    def both(model, src, tgt):
        memory, mask = model.encode(src)
        full = model.decode(tgt, memory, mask)
        cache, steps = model.init_cache(memory, 8), []
        for t in range(tgt.shape[1]):
            logits, cache = model.decode_step(tgt[:, t], jnp.int32(t), cache, mask)
            steps.append(logits)
        return full, jnp.stack(steps, axis=1)

    for factorized in (False, True):
        if factorized:
            factorize(model, 0.25, KEEP_FULL_RANK, init="svd")
        model.eval()
        full, steps = both(model, src, tgt)
        close(steps, full, 1e-4)


def test_dropout_only_in_training(tiny_model):
    src = jnp.full((1, 6), 7, jnp.int32)
    tgt = jnp.full((1, 6), 9, jnp.int32)
    close(forward(tiny_model, src, tgt), forward(tiny_model, src, tgt))
    tiny_model.train()
    try:
        assert not np.allclose(forward(tiny_model, src, tgt), forward(tiny_model, src, tgt))
    finally:
        tiny_model.eval()


# ----------------------------------------------------------------------------- data and tokenizer


@pytest.fixture(scope="module")
def splits():
    return data.load_multi30k(str(MULTI30K), data.SPLITS)


@pytest.fixture(scope="module")
def small_tok(splits):
    train = splits["train"]
    return data.train_tokenizer([*train.src[:3000], *train.tgt[:3000]], 600)


def test_loader_reads_the_real_files(splits):
    sizes = {name: len(pairs) for name, pairs in splits.items()}
    assert sizes == {"train": 29_000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000,
                     "test_2017_mscoco": 461, "test_2018_flickr": 1071}
    with lzma.open(MULTI30K / "train.de.xz", "rt", encoding="utf-8") as f:
        assert splits["train"].src[0] == f.readline().strip()
    with lzma.open(MULTI30K / "test_2016_flickr.en.xz", "rt", encoding="utf-8") as f:
        assert splits["test_2016_flickr"].tgt[-1] == f.read().splitlines()[-1].strip()
    assert all(s and t for s, t in zip(splits["train"].src, splits["train"].tgt))


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.load_split(str(tmp_path / "nowhere"), "train")
    (tmp_path / "train.de.xz").write_bytes(b"not xz at all")
    (tmp_path / "train.en.xz").write_bytes(lzma.compress("a\nb\n".encode()))
    with pytest.raises(DatasetError, match="not xz"):
        data.load_split(str(tmp_path), "train")
    (tmp_path / "train.de.xz").write_bytes(lzma.compress("eins\n".encode()))
    with pytest.raises(DatasetError, match="has 1 lines"):
        data.load_split(str(tmp_path), "train")
    with pytest.raises(DatasetError, match="does not exist"):
        data.load_split(str(tmp_path), "val")


def test_tokenizer_round_trip_and_determinism(splits, small_tok):
    assert small_tok.vocab_size == 600
    test = splits["test_2016_flickr"]
    sentences = [*test.src[:300], *test.tgt[:300], "Zwei  Leerzeichen, Ümlaute und ein Emoji ☃."]
    ids = small_tok.encode(sentences)
    assert all(data.UNK not in row for row in ids)  # byte fallback: nothing is unknown
    assert [small_tok.decode(row) for row in ids] == sentences
    # decode stops at EOS and ignores BOS/PAD.
    assert small_tok.decode([data.BOS, *ids[0], data.EOS, *ids[1], data.PAD]) == sentences[0]
    train = splits["train"]
    again = data.train_tokenizer([*train.src[:3000], *train.tgt[:3000]], 600)
    assert again.proto == small_tok.proto
    with pytest.raises(ValueError, match="cannot train"):
        data.train_tokenizer(train.src[:50], 100_000)


def test_tokenizer_save_load(tmp_path, splits, small_tok):
    path = str(tmp_path / "tok.model")
    tok = data.load_or_train_tokenizer(path, data.Pairs(splits["train"].src[:3000], splits["train"].tgt[:3000]), 600)
    assert tok.proto == small_tok.proto and data.Tokenizer.load(path).proto == tok.proto
    with pytest.raises(DatasetError, match="not the requested"):
        data.load_or_train_tokenizer(path, splits["train"], 700)
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a SentencePiece model"):
        data.Tokenizer.load(str(tmp_path / "junk.model"))


@pytest.fixture(scope="module")
def encoded(splits, small_tok):
    pairs = data.Pairs(splits["train"].src[:2000], splits["train"].tgt[:2000])
    return data.encode_pairs(small_tok, pairs, max_len=60)


def test_train_batches_shard_pad_and_cover(encoded):
    whole = data.train_batches(encoded, 64, seed=1, epoch=2, pad_multiple=8)
    halves = [data.train_batches(encoded, 64, 1, 2, shard_index=i, shard_count=2, pad_multiple=8) for i in range(2)]
    assert len(whole) == len(encoded) // 64 == len(halves[0])
    seen = []
    for i in range(len(whole)):
        batch = whole[i]
        length = batch["src"].shape[1]
        assert length % 8 == 0 and batch["tgt_in"].shape == batch["tgt_out"].shape == (64, length)
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([h[i][key] for h in halves]), batch[key])
        # tgt_in is BOS + target, tgt_out the target + EOS: one shifted by one token.
        np.testing.assert_array_equal(batch["tgt_in"][:, 0], data.BOS)
        rows = [r[r != data.PAD] for r in batch["tgt_out"]]
        assert all(r[-1] == data.EOS for r in rows)
        for r_in, r_out in zip(batch["tgt_in"], batch["tgt_out"]):
            n = int((r_out != data.PAD).sum())
            np.testing.assert_array_equal(r_in[1:n], r_out[: n - 1])
        seen.extend(tuple(r[r != data.PAD]) for r in batch["src"])
    assert len(set(seen)) >= len(seen) - 5  # each example at most once (a few sentences repeat in the data)
    other = data.train_batches(encoded, 64, seed=1, epoch=3, pad_multiple=8)
    assert not np.array_equal(other[0]["src"], whole[0]["src"])  # a new order every epoch


def test_eval_batches_cover_every_example_once(encoded):
    batches = data.eval_batches(encoded, 96, pad_multiple=8)
    assert len(batches) == math.ceil(len(encoded) / 96)
    tokens = sum(int((b["tgt_out"] != data.PAD).sum()) for b in batches)
    assert tokens == sum(len(t) - 1 for t in encoded.tgt)
    last = batches[len(batches) - 1]
    assert (last["src"] == data.PAD).all(axis=1).sum() == len(batches) * 96 - len(encoded)


# ----------------------------------------------------------------------------- loss and schedule


def test_loss_is_smoothed_cross_entropy_over_real_tokens(tiny_model):
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(4, 50, (3, 6)), jnp.int32)
    tgt_in = jnp.asarray(rng.integers(4, 50, (3, 5)), jnp.int32).at[2, 3:].set(data.PAD)
    tgt_out = jnp.asarray(rng.integers(4, 50, (3, 5)), jnp.int32).at[2, 2:].set(data.PAD)
    batch = {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
    loss, metrics, carry = nnx.jit(translation(0.1))(tiny_model, batch, ())
    assert carry == ()
    logp = np.asarray(jax.nn.log_softmax(forward(tiny_model, src, tgt_in)), np.float64)
    mask = np.asarray(tgt_out) != data.PAD
    q = np.full(logp.shape, 0.1 / 49)
    np.put_along_axis(q, np.asarray(tgt_out)[..., None], 0.9, axis=-1)
    smoothed = -(q * logp).sum(-1)
    nll = -np.take_along_axis(logp, np.asarray(tgt_out)[..., None], -1)[..., 0]
    assert metrics["count"] == mask.sum() == 12
    close(loss, smoothed[mask].mean(), 1e-5)
    close(metrics["loss_sum"], nll[mask].sum(), 1e-4)


def test_schedule_restarts_only_when_the_optimizer_does():
    from experiments.translation import inverse_sqrt_schedule

    sched = inverse_sqrt_schedule(512, 4000, 2.0)
    close(sched(0, 0, []), 2 * 512 ** -0.5 * 1 * 4000 ** -1.5, 1e-12)
    close(sched(0, 3999, []), 2 * 512 ** -0.5 * 4000 ** -0.5, 1e-12)  # the peak, at update 4000
    close(sched(0, 8999, []), 2 * 512 ** -0.5 * 9000 ** -0.5, 1e-12)
    switched = [{"epoch": 1, "step": 300}, {"event": "transition", "epoch": 1, "step": 300, "factorized_layers": 80}]
    assert sched(1, 300, switched) == sched(0, 0, []) and sched(1, 310, switched) == sched(0, 10, [])
    vanilla = [dict(switched[0]), dict(switched[1], factorized_layers=0)]
    assert sched(1, 310, vanilla) == sched(0, 310, [])
    assert inverse_sqrt_schedule(512, 4000, restart_at_switch=False)(1, 310, switched) == sched(0, 310, [])


# ----------------------------------------------------------------------------- decoding on a trained model


@pytest.fixture(scope="module")
def trained(splits):
    """A tiny Transformer trained for 180 steps on short real pairs by the one trainer, and its
    1000-piece tokenizer. (The official layout learns slowly at first — tiny xavier embeddings
    under unit-size sinusoids — so this model is weak, but it ends its sentences.)"""
    import optax

    from experiments.translation import inverse_sqrt_schedule
    from pufferfish_jax.parallel import data_mesh
    from pufferfish_jax.train.trainer import Experiment, TrainConfig, fit

    pairs = splits["train"]
    tok = data.train_tokenizer([*pairs.src[:3000], *pairs.tgt[:3000]], 1000)
    train = data.encode_pairs(tok, data.Pairs(pairs.src[:8000], pairs.tgt[:8000]), max_len=32)
    exp = Experiment(
        build_model=lambda rngs: transformer(tok.vocab_size, dropout=0.0, rngs=rngs, **TINY),
        keep_full_rank=KEEP_FULL_RANK, loss_fn=translation(0.1),
        make_tx=lambda: optax.scale_by_adam(0.9, 0.98, 1e-9),
        schedule=inverse_sqrt_schedule(32, 60, 0.15),
        train_data=lambda epoch, i, n: data.train_batches(train, 64, 0, epoch, i, n, pad_multiple=32),
        eval_data=lambda i, n: data.eval_batches(data.Encoded(train.src[:64], train.tgt[:64]), 64, i, n, pad_multiple=32),
    )
    cfg = TrainConfig(epochs=3, warmup_epochs=3, batch_size=64, rank_ratio=1.0, progress=False, measure_comm=False,
                      max_steps_per_epoch=60)
    result = fit(exp, cfg, mesh=data_mesh())
    assert result.summary["train_loss"] < 6.0  # it learned something (a uniform guess is ln 1000 ≈ 6.9)
    return result.model, tok


def test_beam_search_scores_at_least_greedy(trained, splits):
    trained, tok = trained
    ids = [row for row in tok.encode(splits["test_2016_flickr"].src) if len(row) <= 30][:24]
    src = data.pad_rows([np.asarray([data.BOS, *row, data.EOS], np.int32) for row in ids], 32)
    g_out, g_logp = greedy_decode(trained, src, 40)
    b_out, b_logp = beam_search(trained, src, 40, beam_size=4, length_penalty=0.0)
    assert np.all(b_logp >= g_logp - 1e-4), (b_logp, g_logp)
    assert np.mean(b_logp > g_logp + 1e-4) > 0  # and beam search finds better translations for some
    one_out, one_logp = beam_search(trained, src, 40, beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(one_out, g_out)  # a beam of one is greedy search
    close(one_logp, g_logp, 1e-4)
    # The reported log-probability is the model's teacher-forced score of the emitted tokens.
    for out, logp in ((g_out, g_logp), (b_out, b_logp)):
        ended = (out == data.EOS).any(axis=1)
        assert ended.mean() > 0.5
        n = np.where(ended, np.argmax(out == data.EOS, axis=1) + 1, 40)
        tgt_in = np.concatenate([np.full((len(out), 1), data.BOS), out[:, :-1]], axis=1)
        tgt_in = np.where(np.arange(40)[None] < n[:, None], tgt_in, data.PAD)
        scores = np.asarray(jax.nn.log_softmax(forward(trained, jnp.asarray(src), jnp.asarray(tgt_in, jnp.int32))))
        token = np.take_along_axis(scores, out[..., None], -1)[..., 0]
        close((token * (np.arange(40)[None] < n[:, None])).sum(1), logp, 1e-3)


def test_translate_and_bleu(trained, splits):
    trained, tok = trained
    test = splits["test_2016_flickr"]
    greedy = translate(trained, tok, test.src[:20], beam_size=1, batch_size=8, max_len=40)
    beam = translate(trained, tok, test.src[:20], beam_size=2, batch_size=8, max_len=40)
    assert len(greedy) == len(beam) == 20 and sum(bool(h) for h in greedy) >= 15
    # In input order: sentence i's translation does not depend on the batch it was decoded in.
    assert translate(trained, tok, test.src[3:4], beam_size=1, batch_size=8, max_len=40) == greedy[3:4]
    assert bleu(test.tgt[:20], test.tgt[:20]) == pytest.approx(100.0)
    assert 0.0 <= bleu(greedy, test.tgt[:20]) < 100.0 and 0.0 <= bleu(beam, test.tgt[:20]) < 100.0


# ----------------------------------------------------------------------------- the command line


def test_dry_run_at_the_paper_config(capsys):
    from experiments.translation import main

    report = main(["--dry-run", "--vocab-size", "9521"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == report
    assert last["params_vanilla"] == 44_103_680 + 512 * 9521
    assert last["params_pufferfish"] == 21_821_440 + 512 * 9521
    assert last["grad_bytes_vanilla"] == 4 * last["params_vanilla"] and last["vocab_size"] == 9521
    assert last["grad_bytes_pufferfish"] == 4 * last["params_pufferfish"] and last["factorized_layers"] == 80


TINY_RUN = ["--d-model", "32", "--heads", "4", "--d-ff", "64", "--layers", "2", "--vocab-size", "600",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "64", "--max-steps-per-epoch", "6",
            "--warmup-steps", "20", "--pad-multiple", "128", "--bleu-sentences", "16", "--beam-size", "2",
            "--decode-batch-size", "16", "--max-decode-len", "32", "--no-progress"]


def test_end_to_end_warmup_switch_bleu(tmp_path):
    out = tmp_path / "run"
    proc = run_module("experiments.translation", *TINY_RUN, "--out-dir", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase", r.get("event")) for r in records] == ["warmup", "transition", "low_rank"]
    transition = records[1]
    assert transition["step"] == 6 and transition["factorized_layers"] == 6 + 10  # layer 1 of each stack
    assert records[2]["params"] < records[0]["params"] and records[2]["bytes_per_step"] < records[0]["bytes_per_step"]
    # The warm-up restarted with the new Adam: update 6 after the switch has the lr of update 6.
    assert records[2]["lr"] == pytest.approx(records[0]["lr"])
    assert "val_loss" in records[0] and "val_perplexity" in records[2]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summary
    for key in ("bleu_greedy", "bleu_beam", "test_loss", "test_perplexity", "val_loss"):
        assert math.isfinite(summary[key]), key
    assert summary["bleu_sentences"] == 16 and summary["vocab_size"] == 600
    assert len((out / "test_2016_flickr.beam.en").read_text().splitlines()) == 16
    assert data.Tokenizer.load(str(out / "tokenizer.model")).vocab_size == 600


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "0"], "rank ratio"),
    (["--heads", "3"], "must divide"),
    (["--vocab-size", "5"], "--vocab-size"),
    (["--vocab-size", "100000"], "cannot train"),
    (["--data-dir", "/nonexistent/multi30k"], "does not exist"),
    (["--warmup-epochs", "5"], "--warmup-epochs"),
    (["--batch-size", "40000"], "larger than"),
    (["--tokenizer", "/nonexistent.model"], "does not exist"),
    (["--dropout", "1.5"], "--dropout"),
    (["--bench-steps", "0"], "--bench-steps"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, flags, message):
    from experiments.translation import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*TINY_RUN, "--out-dir", str(out), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
