"""The LSTM language model: paper counts, the cell against flax's and against its truncated SVD,
the hidden state across BPTT chunks, the PTB loader on the real files, the schedule, and
``python -m experiments.lm`` end to end, as a dry run and on bad input."""

from __future__ import annotations

import json
import lzma
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pufferfish_jax import LowRankLinear, count_params, factorize, plan
from pufferfish_jax.data import text
from pufferfish_jax.data.tfds_cifar10 import DatasetError
from pufferfish_jax.layers import GATES
from pufferfish_jax.models.lstm_lm import LSTMLanguageModel, lstm_lm, run_lstm_layer, stacked_gates, zero_carry
from pufferfish_jax.train.tasks import language_model
from tests.conftest import DATA_DIR, run_module

PTB = DATA_DIR / "ptb"
V, H = 40, 16  # tiny model: rank int(0.25·16) = 4


def tiny(seed: int = 0, dropout: float = 0.0, num_layers: int = 2) -> LSTMLanguageModel:
    model = LSTMLanguageModel(V, H, H, num_layers, dropout, rngs=nnx.Rngs(seed))
    # Non-zero gate biases and decoder bias, so the tests see where every bias goes.
    rng = np.random.default_rng(seed + 100)
    for cell in model.layers:
        for gate in ("hi", "hf", "hg", "ho"):
            getattr(cell, gate).bias.set_value(jnp.asarray(rng.normal(0, 0.3, H), jnp.float32))
    model.decoder_bias.set_value(jnp.asarray(rng.normal(0, 0.3, V), jnp.float32))
    return model


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def random_carry(batch, seed=0, num_layers=2):
    rng = np.random.default_rng(seed)
    return tuple((jnp.asarray(rng.normal(0, 0.5, (batch, H)), jnp.float32),
                  jnp.asarray(rng.normal(0, 0.5, (batch, H)), jnp.float32)) for _ in range(num_layers))


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- parameter counts


def test_paper_counts_exact():
    """V = 33,278 (WikiText-2), emsize = nhid = 1500: 85,962,278 vanilla, 67,962,278 Pufferfish."""
    model = nnx.eval_shape(lambda: lstm_lm(rngs=nnx.Rngs(0)))
    v, e = 33_278, 1500
    # One bias per gate (4 per layer): what the paper's count needs. nn.LSTM's 8 would add 12,000.
    assert count_params(model) == v * e + v + 2 * (8 * e * e + 4 * e) == 85_962_278
    layers = plan(model, 0.25)
    assert sorted(l.path for l in layers) == sorted(f"layers.{i}.{g}" for i in (0, 1) for g in GATES)
    assert {(l.fan_in, l.fan_out, l.rank) for l in layers} == {(1500, 1500, 375)}

    def pufferfish():
        m = lstm_lm(rngs=nnx.Rngs(0))
        factorize(m, 0.25, init="random")
        return m

    low = nnx.eval_shape(pufferfish)
    assert count_params(low) == 67_962_278
    assert low.layers[1].ho.first.kernel.shape == (1500, 375) and low.embed.embedding.shape == (v, e)
    assert isinstance(low.layers[0].ii, LowRankLinear) and not low.layers[0].ii.second.use_bias
    assert low.layers[0].hi.second.bias.shape == (1500,)


def test_vanilla_ratio_leaves_model_untouched():
    model = nnx.eval_shape(lambda: lstm_lm(rngs=nnx.Rngs(0)))
    assert plan(model, 1.0) == []


# ----------------------------------------------------------------------------- the cell


def _reference_layer(cell, x, carry):
    """flax's own ``nnx.LSTMCell.__call__``, one time step at a time."""
    outputs = []
    for t in range(x.shape[0]):
        carry, y = cell(carry, x[t])
        outputs.append(y)
    return jnp.stack(outputs), carry


@pytest.mark.parametrize("variant", ["vanilla", "low_rank", "mixed"])
def test_scan_layer_equals_nnx_lstm_cell(variant):
    """The stacked-gate scan is exactly nnx.LSTMCell's equations, for full-rank, low-rank and
    mixed gates (the last takes the per-module fallback)."""
    model = tiny(1)
    if variant == "low_rank":
        factorize(model, 0.25, init="random", rngs=nnx.Rngs(5))
    elif variant == "mixed":
        factorize(model, 0.25, overrides={"layers.0.hf": 1.0, "layers.0.ig": 1.0}, init="random", rngs=nnx.Rngs(5))
        assert isinstance(model.layers[0].hf, nnx.Linear) and isinstance(model.layers[0].hi, LowRankLinear)
    cell = model.layers[0]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3, H)), jnp.float32)
    carry = random_carry(3, seed=3)[0]
    out, (c, h) = run_lstm_layer(cell, x, carry)
    ref_out, (ref_c, ref_h) = _reference_layer(cell, x, carry)
    close(out, ref_out)
    close(c, ref_c)
    close(h, ref_h)


def test_stacked_gates_match_modules():
    model = tiny(2)
    factorize(model, 0.25, init="random", rngs=nnx.Rngs(1))
    for names in (("ii", "if_", "ig", "io"), ("hi", "hf", "hg", "ho")):
        modules = [getattr(model.layers[1], g) for g in names]
        x = jnp.asarray(np.random.default_rng(4).normal(size=(5, H)), jnp.float32)
        close(stacked_gates(modules)(x), jnp.stack([m(x) for m in modules], -2))


def _logits(model, toks, carry=None):
    model.eval()
    return model(toks, carry if carry is not None else zero_carry(toks.shape[0], H))


def test_full_rank_factors_equal_vanilla():
    """Gates replaced by LowRankLinear with rank = full (A = W, B = I, bias kept): same model."""
    vanilla, low = tiny(3), tiny(3)
    for cell in low.layers:
        for gate in GATES:
            old = getattr(cell, gate)
            new = LowRankLinear(old.in_features, old.out_features, old.in_features, use_bias=old.use_bias, rngs=nnx.Rngs(9))
            new.first.kernel.set_value(old.kernel[...])
            new.second.kernel.set_value(jnp.eye(old.in_features, dtype=jnp.float32))
            if old.use_bias:
                new.second.bias.set_value(old.bias[...])
            setattr(cell, gate, new)
    assert count_params(low) > count_params(vanilla)  # really the factorized structure
    toks, carry = tokens((3, 9)), random_carry(3)
    (a, ca), (b, cb) = _logits(vanilla, toks, carry), _logits(low, toks, carry)
    close(a, b)
    jax.tree.map(close, ca, cb)


def test_svd_switch_equals_truncated_vanilla():
    """After ``factorize(..., init='svd')`` the model equals the vanilla one whose 16 gate kernels
    are replaced by their rank-4 truncated SVD (float64 reference)."""
    switched, truncated = tiny(4), tiny(4)
    layers = factorize(switched, 0.25, method="svd")
    assert len(layers) == 16 and {l.rank for l in layers} == {4}
    for cell in truncated.layers:
        for gate in GATES:
            w = np.asarray(getattr(cell, gate).kernel[...], np.float64)
            u, s, vt = np.linalg.svd(w)
            getattr(cell, gate).kernel.set_value(jnp.asarray((u[:, :4] * s[:4]) @ vt[:4], jnp.float32))
    toks, carry = tokens((2, 12), seed=1), random_carry(2, seed=1)
    (a, ca), (b, cb) = _logits(switched, toks, carry), _logits(truncated, toks, carry)
    close(a, b, 1e-4)
    jax.tree.map(lambda x, y: close(x, y, 1e-4), ca, cb)
    full, _ = _logits(tiny(4), toks, carry)
    assert float(jnp.abs(full - a).max()) > 1e-3  # the truncation really changed the model


# ----------------------------------------------------------------------------- carry across chunks


def test_carry_across_chunks_equals_one_long_chunk():
    model = tiny(5)
    toks = tokens((3, 20), seed=2)
    whole, carry_whole = _logits(model, toks)
    first, carry = _logits(model, toks[:, :8])
    second, carry_end = _logits(model, toks[:, 8:], carry)
    close(jnp.concatenate([first, second], 1), whole)
    jax.tree.map(close, carry_end, carry_whole)
    # Both layers' state matters: dropping layer 2's carry (the official code's slip) changes the output.
    only_first = (carry[0], zero_carry(3, H)[1])
    partial, _ = _logits(model, toks[:, 8:], only_first)
    assert float(jnp.abs(partial - second).max()) > 1e-4


def test_loss_stops_gradient_of_carry_and_returns_next():
    model = tiny(6, dropout=0.5)
    loss_fn = language_model()
    toks = tokens((2, 11), seed=3)
    batch = {"input": toks[:, :-1], "target": toks[:, 1:], "mask": jnp.ones((2, 10)).at[:, 7:].set(0.0)}
    carry = random_carry(2, seed=4)
    loss, metrics, new_carry = loss_fn(model, batch, carry)
    assert float(metrics["count"]) == 14.0 and np.isclose(float(loss), float(metrics["loss_sum"]) / 14.0)
    assert jax.tree.map(jnp.shape, new_carry) == jax.tree.map(jnp.shape, carry)
    model.eval()
    grad = jax.grad(lambda c: loss_fn(model, batch, c)[0])(carry)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad))
    zero_loss, _, _ = loss_fn(model, batch, zero_carry(2, H))
    assert abs(float(zero_loss) - float(loss_fn(model, batch, carry)[0])) > 1e-5  # the carry is used
    # The masked positions do not count: changing their targets leaves the loss unchanged.
    other = dict(batch, target=batch["target"].at[:, 7:].set((batch["target"][:, 7:] + 1) % V))
    assert float(loss_fn(model, other, carry)[0]) == float(loss_fn(model, batch, carry)[0])


def test_dropout_only_in_training():
    model = tiny(7, dropout=0.5)
    toks, carry = tokens((2, 5)), zero_carry(2, H)
    model.train()
    a, _ = model(toks, carry)
    b, _ = model(toks, carry)
    assert float(jnp.abs(a - b).max()) > 1e-4  # fresh masks per call
    model.eval()
    c, _ = model(toks, carry)
    d, _ = model(toks, carry)
    close(c, d, 0)


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def ptb():
    assert PTB.is_dir(), f"{PTB} not found: set PUFFERFISH_DATA to the shared data folder"
    return text.load_corpus(str(PTB), "ptb")


def test_ptb_loader_reads_the_real_files(ptb):
    assert ptb.vocab_size == 10_000 and "<eos>" in ptb.vocab and "<unk>" in ptb.vocab and "N" in ptb.vocab
    # Words + one <eos> per line (README: 887,521 / 70,390 / 78,669 words on 42,068 / 3,370 / 3,761 lines).
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (887_521 + 42_068, 70_390 + 3_370, 78_669 + 3_761)
    with lzma.open(PTB / "ptb.valid.txt.xz", "rt") as f:
        first_line = f.readline().split()
    assert [ptb.vocab[i] for i in ptb.valid[: len(first_line) + 1]] == [*first_line, "<eos>"]
    assert ptb.train.dtype == np.int32 and ptb.train.max() == 9_999


def test_other_layouts_and_plain_text(tmp_path, ptb):
    """WikiText-2 file names (both releases) and uncompressed files, filled with real PTB lines."""
    with lzma.open(PTB / "ptb.test.txt.xz", "rt") as f:
        lines = [next(f) for _ in range(30)]
    for layout, name in (("a", "wiki.{split}.tokens"), ("b", "{split}.txt")):
        folder = tmp_path / layout
        folder.mkdir()
        for i, split in enumerate(text.SPLITS):
            (folder / name.format(split=split)).write_text("".join(lines[10 * i:10 * (i + 1)]))
        corpus = text.load_corpus(str(folder), "wikitext2")
        assert len(corpus.train) == sum(len(l.split()) + 1 for l in lines[:10])
    with pytest.raises(DatasetError, match="no ptb train file"):
        text.load_corpus(str(tmp_path / "a"), "ptb")


def test_batchify_and_bptt_chunks(ptb):
    columns = text.batchify(ptb.valid, 4)
    n = len(ptb.valid) // 4
    assert columns.shape == (4, n)
    np.testing.assert_array_equal(columns[2], ptb.valid[2 * n:3 * n])  # row j = j-th stretch of the stream
    data = text.bptt_batches(columns, 35)
    assert len(data) == -(-(n - 1) // 35)
    item = data[3]
    np.testing.assert_array_equal(item["input"], columns[:, 105:140])
    np.testing.assert_array_equal(item["target"], columns[:, 106:141])
    last = data[len(data) - 1]
    real = (n - 1) - 35 * (len(data) - 1)
    assert 0 < real <= 35 and last["mask"].sum() == 4 * real and last["mask"][:, real:].sum() == 0
    np.testing.assert_array_equal(last["target"][:, :real], columns[:, -real:])
    # Every target is scored exactly once.
    assert sum(float(data[i]["mask"].sum()) for i in range(len(data))) == 4 * (n - 1)
    # Two processes each read their own rows; together they are the global batch.
    halves = [text.bptt_batches(columns, 35, i, 2)[3] for i in range(2)]
    for key in ("input", "target", "mask"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), item[key])


# ----------------------------------------------------------------------------- schedule


def test_plateau_schedule_from_history():
    from pufferfish_jax.train.schedules import plateau

    schedule = plateau(20.0, "val")
    history = [
        {"epoch": 1, "val_loss": 6.0}, {"epoch": 2, "val_loss": 5.0},
        {"event": "transition", "epoch": 2, "step": 10, "factorized_layers": 16},
        {"epoch": 3, "val_loss": 5.5},  # no improvement: ÷4
        {"epoch": 4, "val_loss": 5.2},  # still worse than 5.0: ÷4
        {"epoch": 5, "val_loss": 4.9},
    ]
    got = [schedule(e, 0, [r for r in history if r["epoch"] <= e]) for e in range(6)]
    assert got == [20.0, 20.0, 10.0, 2.5, 0.625, 0.625]
    assert schedule(5, 0, history) == 0.625 and schedule(1, 0, history) == 20.0  # future records ignored
    vanilla = [dict(r, factorized_layers=0) if r.get("event") else r for r in history]
    assert schedule(3, 0, vanilla) == 5.0  # --ranks 1.0: no halving at the (empty) switch


# ----------------------------------------------------------------------------- the command

TINY = ["--emsize", "16", "--nhid", "16", "--bptt", "35", "--batch-size", "8", "--no-progress", "--data-dir", str(PTB)]


# 2 epochs of 5 steps, the switch after the first; saves at steps 2, 4, 5 (the switch), 6, 8 and 10.
RUN = [*TINY, "--epochs", "2", "--warmup-epochs", "1", "--max-steps-per-epoch", "5", "--save-every", "2"]
TIMING = ("epoch_s", "examples_per_s", "step_s", "compute_s", "comm_s", "transition_s", "total_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("jax-cache")  # shared by this module's processes: compile once
    return {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _lm(out, env, *flags, kill=None):
    return run_module("experiments.lm", *flags, "--out-dir", str(out),
                      env={**env, **({"PUFFERFISH_TEST_KILL": kill} if kill else {})})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("lm") / "run"
    proc = _lm(out, env, *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_warmup_transition_low_rank(reference):
    out, proc = reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "phase" in r]
    assert [r["phase"] for r in epochs] == ["warmup", "low_rank"]
    (transition,) = [r for r in records if r.get("event") == "transition"]
    assert transition["epoch"] == 1 and transition["factorized_layers"] == 16
    assert epochs[1]["params"] == epochs[0]["params"] - 16 * (16 * 16 - 4 * 32) == transition["params"]
    assert epochs[0]["lr"] == 20.0 and epochs[1]["lr"] == 10.0  # halved at the switch
    for r in epochs:
        assert r["step"] == 5 * r["epoch"] and np.isclose(r["val_perplexity"], np.exp(r["val_loss"]))
        assert r["val_perplexity"] < 10_000 * 1.5  # near-uniform at worst over the 10k vocabulary
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert np.isclose(summary["test_perplexity"], np.exp(summary["test_loss"])) and summary["test_perplexity"] > 1
    assert summary["val_perplexity"] == epochs[-1]["val_perplexity"] and summary["params_final"] == transition["params"]
    assert json.loads((out / "config.json").read_text())["bptt"] == 35


def test_killed_mid_epoch_resumes_exactly(reference, tmp_path, env):
    """SIGKILL after step 7 (low-rank epoch, mid-epoch): resumes from step 6 with the saved hidden
    state, dropout RNG and schedule history, and ends bit-identical to the uninterrupted run."""
    from pufferfish_jax.checkpoint import checkpoint_dir, latest_meta

    ref, _ = reference
    out = tmp_path / "run"
    first = _lm(out, env, *RUN, kill="step:7")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    step, meta = latest_meta(checkpoint_dir(str(out)))
    assert (step, meta["phase"], meta["epoch"], meta["step_in_epoch"]) == (6, "low_rank", 1, 1)
    second = _lm(out, env, *RUN)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint step 6 " in second.stderr
    (_, a), (_, b) = latest_meta(checkpoint_dir(str(out))), latest_meta(checkpoint_dir(str(ref)))
    assert a["digest"]["arrays"] == b["digest"]["arrays"]  # parameters, carry, RNG: bit-identical
    assert _records(out) == _records(ref)


def test_two_devices_train_like_one(tmp_path, env):
    """The carry is sharded over the devices like the batch: 2 simulated devices give the same
    losses as 1 (dropout off, so both runs draw nothing random)."""
    # Batch 256: ~10 evaluation batches per pass. The trainer's evaluation queues its batches without
    # ever blocking, and with hundreds queued (batch 8: 263) jaxlib 0.10's in-process all-reduce
    # rendezvous between 2 CPU devices was seen to time out and abort the process.
    flags = [*TINY, "--batch-size", "256", "--dropout", "0", "--epochs", "2", "--warmup-epochs", "1",
             "--max-steps-per-epoch", "3"]
    runs = []
    for devices in ("1", "2"):
        proc = _lm(tmp_path / devices, env, *flags, "--devices", devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([r for r in _records(tmp_path / devices) if "phase" in r])
    assert [r["devices"] for r in runs[1]] == [2, 2]
    for one, two in zip(*runs):
        for key in ("train_loss", "val_loss"):
            assert np.isclose(one[key], two[key], rtol=1e-5), (key, one[key], two[key])


def test_dry_run_paper_configuration(capsys):
    from experiments.lm import main

    report = main(["--dry-run"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == report
    assert (last["params_vanilla"], last["params_pufferfish"]) == (85_962_278, 67_962_278)
    assert (last["grad_bytes_vanilla"], last["grad_bytes_pufferfish"]) == (4 * 85_962_278, 4 * 67_962_278)
    assert last["vocab_size"] == 33_278 and last["factorized_layers"] == 16 and last["ranks"] == [375]


def test_dry_run_other_sizes(capsys):
    from experiments.lm import main

    report = main(["--dry-run", "--emsize", "200", "--nhid", "200", "--vocab-size", "10000", "--ranks", "0.5"])
    assert report["params_vanilla"] == 10_000 * 200 + 10_000 + 2 * (8 * 200 * 200 + 4 * 200)
    # rank 100: 100·400 = 40,000 = 200², not fewer parameters, so nothing is split.
    assert report["params_pufferfish"] == report["params_vanilla"] and report["factorized_layers"] == 0


def test_bench_steps_times_both_models(capsys):
    from experiments.lm import main

    report = main([*TINY, "--bench-steps", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["params_vanilla"] - report["params_pufferfish"] == 16 * (16 * 16 - 4 * 32)
    assert report["step_s_vanilla"] > 0 and report["step_s_pufferfish"] > 0


def _bad(argv, capsys, tmp_path):
    from experiments.lm import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()  # nothing written
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ranks", "0"], "rank ratio"),
        (["--ranks", "2"], "rank ratio"),
        (["--dataset", "enwik8"], "unknown dataset"),
        (["--data-dir", "/nonexistent/ptb"], "does not exist"),
        (["--emsize", "16", "--nhid", "32"], "--emsize"),
        (["--dropout", "1.0"], "--dropout"),
        (["--bptt", "0"], "--bptt"),
        (["--lr", "-1"], "--lr"),
        (["--clip", "nan"], "--clip"),
        (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
        (["--vocab-size", "33278", "--data-dir", str(PTB)], "does not match"),
        (["--batch-size", "100000", "--data-dir", str(PTB)], "too short"),
        (["--nhid", "abc"], "invalid int"),
        (["--bench-steps", "0"], "--bench-steps"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(argv, message, capsys, tmp_path):
    assert message in _bad(argv, capsys, tmp_path)


def test_malformed_data_files(capsys, tmp_path):
    broken = tmp_path / "ptb"
    broken.mkdir()
    for split in text.SPLITS:
        (broken / f"ptb.{split}.txt.xz").write_bytes(b"this is not xz data")
    assert "not a readable" in _bad(["--data-dir", str(broken)], capsys, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in text.SPLITS:
        (empty / f"ptb.{split}.txt").write_text("")
    assert "is empty" in _bad(["--data-dir", str(empty)], capsys, tmp_path)
