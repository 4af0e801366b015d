"""The trainer's hooks for sequence tasks, on 2 simulated devices: a carry threaded across
batches (reset every epoch and every evaluation pass, each device keeping its own rows),
per-step schedules that see the step count and the history, per-device dropout masks, a
named per-epoch evaluation, a final test set and derived metrics."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

BATCH, STEPS = 4, 3


def _experiment(calls: list):
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from pufferfish_jax.train.trainer import Experiment

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.dense = nnx.Linear(3, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    def loss_fn(model, batch, carry):
        # The carry counts, per row, the tokens seen since the last reset; the reported "loss"
        # is its mean, so the records show whether it was threaded and reset.
        total, mask = carry
        total = jax.lax.stop_gradient(total) + batch["x"]
        mask = model.drop(jnp.ones_like(mask))  # this device's dropout mask, kept in its carry rows
        loss = jnp.mean(model.dense(jnp.ones((1, 3))) ** 2)
        return loss, {"loss_sum": total.sum(), "count": jnp.float32(total.shape[0])}, (total, mask)

    def batches(n: int, value: float):
        x = np.arange(BATCH, dtype=np.float32) + value  # row i adds i + value every step
        return grain.MapDataset.source([{"x": x} for _ in range(n)])

    def schedule(epoch, step, history):
        calls.append((epoch, step, [dict(r) for r in history]))
        return 0.1

    return Experiment(
        build_model=Tiny, keep_full_rank=(), loss_fn=loss_fn, make_tx=optax.identity, schedule=schedule,
        train_data=lambda epoch, i, n: batches(STEPS, 1.0), eval_data=lambda i, n: batches(2, 0.0),
        init_carry=lambda b: (jnp.zeros((b,)), jnp.zeros((b, 32))), eval_name="val",
        test_data=lambda i, n: batches(3, 0.0), derived_metrics=lambda m: {"double": 2 * m["loss"]},
    )


def check_sequence_hooks() -> None:
    import jax
    import numpy as np

    from pufferfish_jax.parallel import data_mesh
    from pufferfish_jax.train.trainer import TrainConfig, fit

    assert jax.device_count() == 2
    calls: list = []
    cfg = TrainConfig(epochs=2, warmup_epochs=1, batch_size=BATCH, rank_ratio=0.5, progress=False, measure_comm=False)
    result = fit(_experiment(calls), cfg, mesh=data_mesh())

    # Per-row totals after STEPS steps of (i + 1): a carry reset at every epoch start.
    rows = np.arange(BATCH) + 1.0
    total, mask = jax.device_get(result.state.carry)
    np.testing.assert_allclose(total, STEPS * rows)
    s = result.summary
    np.testing.assert_allclose(s["train_loss"], np.mean([(k + 1) * rows.mean() for k in range(STEPS)]))
    # Evaluation passes start from a fresh carry too: 2 batches of i, then 3 batches of i.
    mean_row = np.arange(BATCH).mean()
    np.testing.assert_allclose(s["val_loss"], mean_row * (1 + 2) / 2)
    np.testing.assert_allclose(s["test_loss"], mean_row * (1 + 2 + 3) / 3)
    assert s["val_double"] == 2 * s["val_loss"] and s["test_double"] == 2 * s["test_loss"]
    assert "test_accuracy" not in s

    # The schedule is asked before every step with the global step and the records so far.
    assert [(e, st) for e, st, _ in calls] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    history = calls[-1][2]
    assert [r.get("event") for r in history] == [None, "transition"]
    assert history[0]["epoch"] == 1 and "val_loss" in history[0] and history[1]["step"] == STEPS

    # Dropout: the two devices' rows got different masks (the device index is folded into the key).
    half = BATCH // 2
    assert set(np.unique(mask)) <= {0.0, 2.0}
    assert not np.array_equal(mask[:half], mask[half:]), mask


def test_sequence_hooks_on_two_devices():
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    code = "from tests.test_trainer import check_sequence_hooks; check_sequence_hooks()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
