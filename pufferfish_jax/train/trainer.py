"""The one trainer: vanilla warm-up, the SVD switch, low-rank training (Pufferfish §3.2).

Every task (CIFAR now; ImageNet, the LSTM and the Transformer later) runs through
:func:`fit`; they differ only in the :class:`Experiment` they hand it — model, hybrid
list, loss, optimizer, schedule and data — never in the loop.

With an ``out_dir``, :func:`fit` checkpoints (see :mod:`pufferfish_jax.checkpoint`) every
``save_every`` steps, at each epoch end, right after the switch and on SIGTERM, and a run
started on a directory that holds a checkpoint continues from it exactly: same parameters
bit for bit, same metrics records (timing fields aside) as a run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from pufferfish_jax.accounting import count_params
from pufferfish_jax.checkpoint import (CheckpointError, CheckpointMismatch, Checkpointer, all_processes_agree,
                                       checkpoint_dir, committed_steps, identity_mismatch)
from pufferfish_jax.factorize import FactorizedLayer, factorize
from pufferfish_jax.parallel import DATA, check_batch_divisible, data_mesh, global_batch, place_state, replicate
from pufferfish_jax.reducers import Reducer, all_reduce, no_communication
from pufferfish_jax.train.state import TrainState, init_state, split_model, state_specs
from pufferfish_jax.train.steps import LossFn, make_eval_step, make_train_step

WARMUP, LOW_RANK = "warmup", "low_rank"
CHECK_EVERY = 10  # steps between host syncs: progress, the finiteness check, agreeing on SIGTERM across processes
TIMING_FIELDS = ("epoch_s", "examples_per_s", "step_s", "compute_s", "comm_s", "transition_s", "total_s")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a task is made of. Data callables return grain ``MapDataset``s of this process's
    share of each global batch: ``train_data(epoch, shard_index, shard_count)`` and
    ``eval_data(shard_index, shard_count)``.

    ``schedule(epoch, step, history)`` gives the learning rate of the next step from the global
    epoch, the global steps done so far and the metrics records written so far (epoch records
    and the transition record), so plateau rules and per-step warm-ups resume exactly.
    ``init_carry(global_batch)`` (tasks with state across batches, e.g. an LSTM's hidden state)
    gives the carry at the start of every training epoch and every evaluation pass.
    Per-epoch evaluation metrics are logged as ``<eval_name>_*``; ``test_data``, when given, is
    evaluated once after training, into the summary as ``test_*``. ``derived_metrics`` adds
    figures computed from finished metrics (e.g. perplexity from the loss).
    """

    build_model: Callable[[nnx.Rngs], nnx.Module]
    keep_full_rank: Sequence[str]
    loss_fn: LossFn
    make_tx: Callable[[], optax.GradientTransformation]
    schedule: Callable[[int, int, list[dict[str, Any]]], float]
    train_data: Callable[[int, int, int], grain.MapDataset]
    eval_data: Callable[[int, int], grain.MapDataset]
    rank_overrides: dict[str, float] | None = None
    init_carry: Callable[[int], Any] | None = None
    eval_name: str = "test"
    test_data: Callable[[int, int], grain.MapDataset] | None = None
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None


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
    # Checkpoints go to <out_dir>/checkpoints (none without an out_dir).
    checkpoint: bool = True
    save_every: int = 0  # also save every this many steps; 0: at epoch ends, the switch and SIGTERM only
    keep_checkpoints: int = 3
    resume: bool = True  # continue from a checkpoint in out_dir; False refuses to run on one
    identity: Mapping[str, Any] | None = None  # what else a checkpoint must share to be resumed (arch, dataset, ...)
    config: Mapping[str, Any] | None = None  # the run's full configuration: config.json and every checkpoint


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the run stopped, its checkpoints all predate the fault."""


class Preempted(Exception):
    """SIGTERM: the run saved a checkpoint at a step every process agreed on, and stopped."""


def run_identity(cfg: TrainConfig, reducer: Reducer, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What a checkpoint must share with a run to continue it: anything that changes the shapes
    of the state or the meaning of the step count. (Epochs may grow; the schedule may change.)"""
    return {"rank_ratio": cfg.rank_ratio, "warmup_epochs": cfg.warmup_epochs, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "reducer": reducer.name, "devices": mesh.size, "processes": jax.process_count(),
            **dict(cfg.identity or {})}


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

    def reset(self, records: list[dict[str, Any]]) -> None:
        """Replaces everything logged by ``records`` (a resumed run drops what followed its checkpoint)."""
        self.records = list(records)
        if self.path and jax.process_index() == 0:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(tmp, self.path)


def _finish(sums: dict[str, float], exp: Experiment) -> dict[str, float]:
    count = max(float(sums.get("count", 0.0)), 1.0)
    out = {"loss": float(sums["loss_sum"]) / count}
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"]) / count
    if exp.derived_metrics is not None:
        out.update(exp.derived_metrics(out))
    return out


def initial_carry(exp: Experiment, batch_size: int, mesh) -> Any:
    """The task's carry for ``batch_size`` examples, created on the devices and sharded like the
    batch (no host transfer, the same in every process)."""
    if exp.init_carry is None:
        return ()
    return jax.jit(lambda: exp.init_carry(batch_size), out_shardings=NamedSharding(mesh, P(DATA)))()


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


def evaluate(phase: _Phase, state: TrainState, exp: Experiment, mesh,
             data: Callable[[int, int], grain.MapDataset] | None = None) -> dict[str, float]:
    """Metrics over the whole evaluation set (``exp.eval_data`` unless ``data``), data-parallel,
    the carry (if any) threaded through its batches in order."""
    sums: dict[str, Any] = {}
    carry = None
    for i, batch in enumerate((data or exp.eval_data)(jax.process_index(), jax.process_count())):
        batch = global_batch(batch, mesh)
        if carry is None:  # sized by the evaluation batch, which may differ from training's
            carry = initial_carry(exp, next(iter(batch.values())).shape[0], mesh)
        out, carry = phase.eval_step(state.params, state.rest, batch, carry)
        sums = out if not sums else jax.tree.map(jnp.add, sums, out)
        if i % CHECK_EVERY == CHECK_EVERY - 1:
            # Bounded queue: hundreds of enqueued multi-device steps make jaxlib 0.10's CPU
            # collectives time out in their rendezvous (seen with the LM's 263 eval batches).
            jax.block_until_ready(sums)
    return _finish(jax.device_get(sums), exp)


def _build(exp: Experiment, cfg: TrainConfig, low_rank: bool, abstract: bool) -> tuple[nnx.Module, list[FactorizedLayer]]:
    """The model a run starts from (vanilla, or factorized with random factors); ``abstract``
    builds shapes only, the target a checkpoint restores into."""
    layers: list[FactorizedLayer] = []

    def build() -> nnx.Module:
        model = exp.build_model(nnx.Rngs(cfg.seed))
        if low_rank:
            layers.extend(factorize(model, cfg.rank_ratio, exp.keep_full_rank, exp.rank_overrides, init="random",
                                    rngs=nnx.Rngs(cfg.seed + 1)))
        return model

    return (nnx.eval_shape(build) if abstract else build()), layers


def _abstract_state(model: nnx.Module, exp: Experiment, cfg: TrainConfig, tx, reducer: Reducer, mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state of ``model`` (abstract): what a checkpoint restores into."""
    _, _, params, rest = split_model(model)
    carry = jax.eval_shape(lambda: exp.init_carry(cfg.batch_size)) if exp.init_carry is not None else ()
    shapes = jax.eval_shape(lambda p, r, c: init_state(p, r, tx, reducer, mesh.size, carry=c), params, rest, carry)
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)), sub),
        state_specs(shapes), shapes, is_leaf=lambda x: isinstance(x, P))


@jax.jit
def _all_finite(loss_sum: jax.Array, params: nnx.State) -> jax.Array:
    # A NaN/Inf gradient shows up in the updated parameters (and the next loss); checking both
    # names the step it happened at. Runs on device, read back at the next host sync.
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(loss_sum) & jnp.all(jnp.stack(finite))


def _sums_to_json(sums: dict[str, Any]) -> dict[str, list]:
    return {k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in jax.device_get(sums).items()}


def _sums_from_json(saved: dict[str, list], mesh) -> dict[str, jax.Array]:
    return replicate({k: np.asarray(v, dtype) for k, (v, dtype) in saved.items()}, mesh) if saved else {}


class _SigTerm:
    """The first SIGTERM asks the loop to save and stop after the current step; it also restores
    the default action, so a second SIGTERM ends the process at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_SigTerm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(f"{who}SIGTERM: finishing the current step, then saving a checkpoint (a second SIGTERM stops at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, sync_point: bool) -> bool:
        """Whether to stop now. Across processes only at sync points (a collective), so that every
        process stops, and saves, at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return sync_point and not all_processes_agree(not self.requested)


def _test_kill(point: str, step: int, ckpt: Checkpointer | None) -> None:
    """Test hook, for the tests of exact resumption only (``PUFFERFISH_TEST_KILL``): ``step:N``
    SIGKILLs this process once step N is done and every save started so far is on disk;
    ``save:N`` SIGKILLs it right after the save of step N started, while it is being written;
    ``term:N`` sends it a real SIGTERM after step N (so it saves and stops after step N + 1)."""
    spec = os.environ.get("PUFFERFISH_TEST_KILL")
    if not spec:
        return
    kind, _, at = spec.partition(":")
    if not at.isdigit() or int(at) != step or (kind == "save") != (point == "save"):
        return
    if kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if kind == "step" and ckpt is not None:
        ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)


def _resume(exp: Experiment, cfg: TrainConfig, tx, reducer: Reducer, mesh, ckpt: Checkpointer,
            identity: dict) -> tuple[TrainState, _Phase, dict]:
    """The state, compiled phase and metadata of the newest intact checkpoint of this run."""
    models: list[nnx.Module] = []

    def target(meta: dict) -> TrainState:
        why = identity_mismatch(meta["identity"], identity)
        if why:
            raise CheckpointMismatch(f"the checkpoints in {ckpt.directory} belong to another run ({why})")
        # A low-rank checkpoint restores into the factorized model: rebuild its structure first.
        model, layers = _build(exp, cfg, low_rank=bool(meta["factorized"]), abstract=True)
        if [[l.path, l.rank] for l in layers] != meta["factorized"]:
            raise CheckpointMismatch(f"the checkpoints in {ckpt.directory} have other low-rank layers or ranks")
        models.append(model)
        return _abstract_state(model, exp, cfg, tx, reducer, mesh)

    state, meta = ckpt.restore(target)
    phase, _, _ = _compile_phase(meta["phase"], models[-1], exp, tx, reducer, mesh)
    if jax.process_index() == 0:
        print(f"resuming from checkpoint step {meta['step']} (epoch {meta['epoch'] + 1}, {meta['step_in_epoch']} "
              f"batches in, {meta['phase']}) in {ckpt.directory}", file=sys.stderr, flush=True)
    return state, phase, meta


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

    With ``cfg.out_dir`` it checkpoints to ``<out_dir>/checkpoints`` and, if a checkpoint is
    there, continues from the newest intact one (:class:`CheckpointError` if none is usable or
    it is another run's; with ``cfg.resume=False`` if there is one at all). Raises
    :class:`NonFiniteError` on a NaN/Inf loss or gradient and :class:`Preempted` after saving
    on SIGTERM.
    """
    reducer = reducer or all_reduce()
    mesh = mesh or data_mesh()
    check_batch_divisible(cfg.batch_size, mesh)
    tx = exp.make_tx()
    identity = run_identity(cfg, reducer, mesh)
    ckpt = None
    saved_steps: list[int] = []
    if cfg.out_dir and cfg.checkpoint:
        saved_steps = committed_steps(checkpoint_dir(cfg.out_dir))
        if saved_steps and not cfg.resume:
            raise CheckpointError(f"{checkpoint_dir(cfg.out_dir)} holds checkpoints of a run; refusing to start over on it")
        ckpt = Checkpointer(checkpoint_dir(cfg.out_dir), keep=cfg.keep_checkpoints)
    vanilla_params = count_params(_build(exp, cfg, low_rank=False, abstract=True)[0])
    clean_exit = False  # whether every process is known to leave fit together (waiting on saves is safe)
    try:
        if saved_steps:
            state, phase, meta = _resume(exp, cfg, tx, reducer, mesh, ckpt, identity)
        else:
            name = phase_of(0, cfg)
            model, layers = _build(exp, cfg, low_rank=name == LOW_RANK, abstract=False)
            phase, params, rest = _compile_phase(name, model, exp, tx, reducer, mesh)
            state = place_state(init_state(params, rest, tx, reducer, mesh.size), mesh)
            state = state.replace(carry=initial_carry(exp, cfg.batch_size, mesh))
            del model
            meta = {"epoch": 0, "step_in_epoch": 0, "factorized": [[l.path, l.rank] for l in layers], "sums": {},
                    "comm": {}, "timed_phases": [], "records": [], "transition_s": None}

        if cfg.out_dir:
            os.makedirs(cfg.out_dir, exist_ok=True)
            if cfg.config is not None and jax.process_index() == 0:
                with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                    json.dump(dict(cfg.config), f, indent=2)
        log = log or MetricsLog(cfg.out_dir)
        if saved_steps:
            log.reset(meta["records"])
        factorized: list = meta["factorized"]
        transition_s = meta["transition_s"]
        timed_phases: set[str] = set(meta["timed_phases"])
        step = int(state.step)
        shard = (jax.process_index(), jax.process_count())
        run_start = time.perf_counter()

        def save(epoch: int, batches_done: int, sums: dict, comm: dict) -> None:
            """A checkpoint of the state after ``batches_done`` batches of ``epoch``."""
            if ckpt is None:
                return
            meta = {"phase": phase.name, "factorized": factorized, "rank_ratio": cfg.rank_ratio, "epoch": epoch,
                    "step_in_epoch": batches_done, "identity": identity, "config": dict(cfg.config or {}),
                    "sums": _sums_to_json(sums), "comm": comm, "timed_phases": sorted(timed_phases),
                    "records": log.records, "transition_s": transition_s}
            if ckpt.save(step, state, meta):
                _test_kill("save", step, ckpt)

        with _SigTerm() as sigterm:
            stop = lambda sync_point: ckpt is not None and sigterm.agreed(sync_point)  # noqa: E731

            def preempted(epoch: int) -> Preempted:
                ckpt.wait()
                return Preempted(f"stopped by SIGTERM in epoch {epoch + 1} after step {step}; checkpoint step {step} "
                                 f"is saved in {ckpt.directory}; run the same command again to resume")

            for epoch in range(meta["epoch"], cfg.epochs):
                resuming_epoch = epoch == meta["epoch"]
                first = meta["step_in_epoch"] if resuming_epoch else 0
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
                        state = place_state(init_state(params, rest, tx, reducer, mesh.size, step=step), mesh)
                        state = state.replace(carry=initial_carry(exp, cfg.batch_size, mesh))
                        del model
                    factorized = [[l.path, l.rank] for l in switched]
                    log.write({"event": "transition", "epoch": epoch, "step": step, "transition_s": transition_s,
                               "params": phase.params, "factorized_layers": len(switched)})
                    save(epoch, 0, {}, {})  # a kill from here on resumes in the low-rank phase

                if first == 0 and exp.init_carry is not None:  # each epoch starts from a fresh carry
                    state = state.replace(carry=initial_carry(exp, cfg.batch_size, mesh))
                lr, lr_arr = None, None
                data = exp.train_data(epoch, *shard)
                n_steps = len(data) if cfg.max_steps_per_epoch is None else min(len(data), cfg.max_steps_per_epoch)
                bar = tqdm(total=n_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs} [{phase.name}]", leave=False,
                           disable=not cfg.progress or jax.process_index() != 0, file=sys.stderr)
                sums: dict[str, Any] = _sums_from_json(meta["sums"], mesh) if resuming_epoch else {}
                comm: dict[str, float] = dict(meta["comm"]) if resuming_epoch else {}
                pending: list[tuple[int, jax.Array]] = []  # (step, all finite) not yet read back

                def check_finite() -> None:
                    for (at, _), ok in zip(pending, jax.device_get([f for _, f in pending])):
                        if not ok:
                            kept = ckpt.steps() if ckpt is not None else []
                            raise NonFiniteError(
                                f"non-finite loss or gradient at step {at} (epoch {epoch + 1}); training stopped, "
                                + (f"the last good checkpoint is step {kept[-1]} in {ckpt.directory}" if kept
                                   else "no checkpoint had been saved"))
                    pending.clear()

                t0 = time.perf_counter()
                batches = data[first:n_steps].to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
                for i, batch in enumerate(batches, start=first):
                    batch = global_batch(batch, mesh)
                    next_lr = float(exp.schedule(epoch, step, log.records))
                    if next_lr != lr:  # one host→device copy per change, not per step
                        lr, lr_arr = next_lr, jnp.asarray(next_lr, jnp.float32)
                    if i == 0 and cfg.measure_comm and mesh.size > 1 and phase.name not in timed_phases:
                        timed_phases.add(phase.name)
                        comm = comm_split(phase, state, batch, lr_arr, exp, tx, mesh)
                        t0 = time.perf_counter()
                    state, out = phase.train_step(state, batch, lr_arr)
                    step += 1
                    pending.append((step, _all_finite(out["loss_sum"], state.params)))
                    sums = out if not sums else jax.tree.map(jnp.add, sums, out)
                    bar.update(1)
                    last = i == n_steps - 1
                    sync_point = i % CHECK_EVERY == 0 or last
                    # The epoch's last step is saved after evaluation, as the epoch end.
                    periodic = ckpt is not None and cfg.save_every > 0 and step % cfg.save_every == 0 and not last
                    stopping = stop(sync_point)
                    if sync_point or periodic or stopping:
                        check_finite()  # never save a non-finite state
                        done = jax.device_get(sums)
                        seen = float(done["count"])
                        shown = {"loss": f"{done['loss_sum'] / seen:.3f}"}
                        if "correct" in done:
                            shown["acc"] = f"{done['correct'] / seen:.3f}"
                        bar.set_postfix(**shown, ex_s=f"{seen / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3g}")
                    if periodic or stopping:
                        save(epoch, i + 1, sums, comm)
                    if stopping:
                        bar.close()
                        clean_exit = True
                        raise preempted(epoch)
                    _test_kill("step", step, ckpt)
                jax.block_until_ready(state)
                epoch_s = time.perf_counter() - t0
                bar.close()
                check_finite()
                train = _finish(jax.device_get(sums), exp)
                test = evaluate(phase, state, exp, mesh)
                record = {
                    "epoch": epoch + 1, "phase": phase.name, "lr": lr, "step": step,
                    **{f"train_{k}": v for k, v in train.items()}, **{f"{exp.eval_name}_{k}": v for k, v in test.items()},
                    "epoch_s": epoch_s, "examples_per_s": float(jax.device_get(sums)["count"]) / epoch_s,
                    "params": phase.params, "reducer": reducer.name, "devices": mesh.size,
                    "bytes_per_step": phase.bytes_per_step, **comm,
                }
                log.write(record)
                if cfg.progress and jax.process_index() == 0:
                    extra = "".join(f" {exp.eval_name}_{k} {v:.4f}" for k, v in test.items() if k != "loss")
                    print(f"epoch {epoch + 1}/{cfg.epochs} [{phase.name}] lr {lr:.4g} train_loss {train['loss']:.4f} "
                          f"{exp.eval_name}_loss {test['loss']:.4f}{extra} ({epoch_s:.1f}s)", file=sys.stderr)
                # The epoch end; when the switch comes next, its own save (same step) stands for it.
                switch_next = epoch + 1 < cfg.epochs and phase_of(epoch + 1, cfg) != phase.name
                if not switch_next:
                    save(epoch + 1, 0, {}, {})
                if stop(True):
                    save(epoch + 1, 0, {}, {})
                    clean_exit = True
                    raise preempted(epoch)
        clean_exit = True
    except (NonFiniteError, CheckpointError):
        clean_exit = True  # every process meets the same fault at the same step
        raise
    finally:
        # After a peer died, waiting on a multi-process save could hang: leave at once instead.
        if ckpt is not None and (clean_exit or jax.process_count() == 1):
            ckpt.close()

    last = log.records[-1] if log.records else {}
    summary = {
        "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs, "rank_ratio": cfg.rank_ratio,
        "params_vanilla": vanilla_params, "params_final": phase.params,
        "transition_s": transition_s,
        **{k: v for k, v in last.items() if k.startswith((f"{exp.eval_name}_", "train_"))},
    }
    if exp.test_data is not None:
        summary.update({f"test_{k}": v for k, v in evaluate(phase, state, exp, mesh, exp.test_data).items()})
    summary["total_s"] = time.perf_counter() - run_start
    if cfg.out_dir and jax.process_index() == 0:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return FitResult(summary, state, nnx.merge(phase.eval_def, jax.device_get(state.params), jax.device_get(state.rest)))
