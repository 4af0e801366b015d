"""The one trainer: vanilla warm-up, the SVD switch, low-rank training (Pufferfish §3.2).

Every task (CIFAR now; ImageNet, the LSTM and the Transformer later) runs through
:func:`fit`; they differ only in the :class:`Experiment` they hand it — model, hybrid
list, loss, optimizer, schedule and data — never in the loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from pufferfish_jax.accounting import count_params
from pufferfish_jax.factorize import factorize
from pufferfish_jax.parallel import check_batch_divisible, data_mesh, global_batch, place_state
from pufferfish_jax.reducers import Reducer, all_reduce, no_communication
from pufferfish_jax.train.state import TrainState, init_state, split_model
from pufferfish_jax.train.steps import LossFn, make_eval_step, make_train_step

WARMUP, LOW_RANK = "warmup", "low_rank"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a task is made of. Data callables return grain ``MapDataset``s of this process's
    share of each global batch: ``train_data(epoch, shard_index, shard_count)`` and
    ``eval_data(shard_index, shard_count)``."""

    build_model: Callable[[nnx.Rngs], nnx.Module]
    keep_full_rank: Sequence[str]
    loss_fn: LossFn
    make_tx: Callable[[], optax.GradientTransformation]
    schedule: Callable[[int], float]
    train_data: Callable[[int, int, int], grain.MapDataset]
    eval_data: Callable[[int, int], grain.MapDataset]
    rank_overrides: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run-level settings shared by every task."""

    epochs: int
    warmup_epochs: int
    batch_size: int
    rank_ratio: float = 0.25
    seed: int = 0
    out_dir: str | None = None
    progress: bool = True
    max_steps_per_epoch: int | None = None  # for smoke tests and benchmarks only
    measure_comm: bool = True  # time compute-only steps once per phase to split step time


@dataclasses.dataclass
class FitResult:
    """The run's summary, its final (replicated) state, and the trained model in eval mode."""

    summary: dict[str, Any]
    state: TrainState
    model: nnx.Module


def phase_of(epoch: int, cfg: TrainConfig) -> str:
    return WARMUP if epoch < cfg.warmup_epochs else LOW_RANK


class MetricsLog:
    """Appends one JSON object per line to ``<out_dir>/metrics.jsonl`` (and keeps them in memory)."""

    def __init__(self, out_dir: str | None):
        self.records: list[dict[str, Any]] = []
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path and jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _finish(sums: dict[str, float]) -> dict[str, float]:
    count = max(float(sums.get("count", 0.0)), 1.0)
    out = {"loss": float(sums["loss_sum"]) / count}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"]) / count
    return out


def comm_split(phase: "_Phase", state: TrainState, batch, lr, exp: Experiment, tx, mesh, repeats: int = 5) -> dict[str, float]:
    """Median step time with and without the gradient communication, on one real batch.

    The compute-only step is the same step with :func:`no_communication` as reducer, so the
    difference is the cost of the collectives that the real reducer adds (not overlapped).
    Runs on copies: the real state is untouched.
    """
    local = make_train_step(phase.train_def, exp.loss_fn, tx, no_communication(), mesh)
    local_state = state.replace(reducer_state=())
    times: dict[str, list[float]] = {"step_s": [], "compute_s": []}
    for _ in range(repeats + 1):  # the first round compiles
        for key, fn, st in (("step_s", phase.train_step, state), ("compute_s", local, local_state)):
            copy = jax.tree.map(jnp.copy, st)
            jax.block_until_ready(copy)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(copy, batch, lr))
            times[key].append(time.perf_counter() - t0)
    out = {k: float(np.median(v[1:])) for k, v in times.items()}
    out["comm_s"] = max(out["step_s"] - out["compute_s"], 0.0)
    return out


@dataclasses.dataclass
class _Phase:
    """Compiled steps and their graph definitions for the current model structure."""

    name: str
    train_def: nnx.GraphDef
    eval_def: nnx.GraphDef
    train_step: Callable
    eval_step: Callable
    params: int
    bytes_per_step: int


def _compile_phase(name: str, model: nnx.Module, exp: Experiment, tx, reducer: Reducer, mesh) -> tuple[_Phase, nnx.State, nnx.State]:
    train_def, eval_def, params, rest = split_model(model)
    phase = _Phase(
        name, train_def, eval_def,
        make_train_step(train_def, exp.loss_fn, tx, reducer, mesh),
        make_eval_step(eval_def, exp.loss_fn, mesh),
        count_params(model),
        reducer.bytes_per_step(params),
    )
    return phase, params, rest


def evaluate(phase: _Phase, state: TrainState, exp: Experiment, mesh) -> dict[str, float]:
    """Metrics over the whole evaluation set, data-parallel."""
    sums: dict[str, Any] = {}
    for batch in exp.eval_data(jax.process_index(), jax.process_count()):
        out = phase.eval_step(state.params, state.rest, global_batch(batch, mesh))
        sums = out if not sums else jax.tree.map(jnp.add, sums, out)
    return _finish(jax.device_get(sums))


def fit(
    exp: Experiment,
    cfg: TrainConfig,
    reducer: Reducer | None = None,
    mesh: jax.sharding.Mesh | None = None,
    log: MetricsLog | None = None,
) -> "FitResult":
    """Trains ``exp`` for ``cfg.epochs`` epochs; returns the summary (also written to
    ``<out_dir>/summary.json``). Epochs before ``cfg.warmup_epochs`` train the vanilla model;
    at that epoch every layer not kept full rank is split by one truncated SVD, a new
    optimizer is created, and the schedule keeps counting global epochs. With
    ``warmup_epochs = 0`` the low-rank model is trained from random init.
    """
    reducer = reducer or all_reduce()
    mesh = mesh or data_mesh()
    check_batch_divisible(cfg.batch_size, mesh)
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log = log or MetricsLog(cfg.out_dir)
    tx = exp.make_tx()

    model = exp.build_model(nnx.Rngs(cfg.seed))
    vanilla_params = count_params(model)
    name = phase_of(0, cfg)
    if name == LOW_RANK:
        factorize(model, cfg.rank_ratio, exp.keep_full_rank, exp.rank_overrides, init="random", rngs=nnx.Rngs(cfg.seed + 1))
    phase, params, rest = _compile_phase(name, model, exp, tx, reducer, mesh)
    state = place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
    del model

    transition_s = None
    timed_phases: set[str] = set()
    shard = (jax.process_index(), jax.process_count())
    run_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        if phase_of(epoch, cfg) != phase.name:
            t0 = time.perf_counter()
            model = nnx.merge(phase.train_def, jax.device_get(state.params), jax.device_get(state.rest))
            switched = factorize(model, cfg.rank_ratio, exp.keep_full_rank, exp.rank_overrides, init="svd")
            jax.block_until_ready(nnx.state(model))
            transition_s = time.perf_counter() - t0
            if not switched:  # e.g. --ranks 1.0: the vanilla run goes on untouched (no optimizer reset)
                phase.name = LOW_RANK
                del model
            else:
                phase, params, rest = _compile_phase(LOW_RANK, model, exp, tx, reducer, mesh)
                state = place_state(init_state(params, rest, tx, reducer, mesh.size, step=int(state.step)), mesh)
                del model
            log.write({"event": "transition", "epoch": epoch, "transition_s": transition_s, "params": phase.params,
                       "factorized_layers": len(switched)})

        lr = exp.schedule(epoch)
        lr_arr = jnp.asarray(lr, jnp.float32)
        data = exp.train_data(epoch, *shard)
        n_steps = len(data) if cfg.max_steps_per_epoch is None else min(len(data), cfg.max_steps_per_epoch)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs} [{phase.name}]", leave=False,
                   disable=not cfg.progress or jax.process_index() != 0, file=sys.stderr)
        sums: dict[str, Any] = {}
        comm: dict[str, float] = {}
        t0 = time.perf_counter()
        for i, batch in enumerate(data.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))):
            if i >= n_steps:
                break
            batch = global_batch(batch, mesh)
            if i == 0 and cfg.measure_comm and mesh.size > 1 and phase.name not in timed_phases:
                timed_phases.add(phase.name)
                comm = comm_split(phase, state, batch, lr_arr, exp, tx, mesh)
                t0 = time.perf_counter()
            state, out = phase.train_step(state, batch, lr_arr)
            sums = out if not sums else jax.tree.map(jnp.add, sums, out)
            bar.update(1)
            if i % 10 == 0 or i == n_steps - 1:
                done = jax.device_get(sums)
                seen = float(done["count"])
                bar.set_postfix(loss=f"{done['loss_sum'] / seen:.3f}", acc=f"{done.get('correct', 0) / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        jax.block_until_ready(state)
        epoch_s = time.perf_counter() - t0
        bar.close()
        train = _finish(jax.device_get(sums))
        if not np.isfinite(train["loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
        test = evaluate(phase, state, exp, mesh)
        record = {
            "epoch": epoch + 1, "phase": phase.name, "lr": lr, "step": int(state.step),
            **{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
            "epoch_s": epoch_s, "examples_per_s": float(jax.device_get(sums)["count"]) / epoch_s,
            "params": phase.params, "reducer": reducer.name, "devices": mesh.size,
            "bytes_per_step": phase.bytes_per_step, **comm,
        }
        log.write(record)
        if cfg.progress and jax.process_index() == 0:
            acc = f" test_acc {test['accuracy']:.4f}" if "accuracy" in test else ""
            print(f"epoch {epoch + 1}/{cfg.epochs} [{phase.name}] lr {lr:.4g} train_loss {train['loss']:.4f} "
                  f"test_loss {test['loss']:.4f}{acc} ({epoch_s:.1f}s)", file=sys.stderr)

    last = log.records[-1] if log.records else {}
    summary = {
        "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "rank_ratio": cfg.rank_ratio,
        "params_vanilla": vanilla_params, "params_final": phase.params,
        "transition_s": transition_s, "total_s": time.perf_counter() - run_start,
        **{k: v for k, v in last.items() if k.startswith("test_") or k.startswith("train_")},
    }
    if cfg.out_dir and jax.process_index() == 0:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return FitResult(summary, state, nnx.merge(phase.eval_def, jax.device_get(state.params), jax.device_get(state.rest)))
