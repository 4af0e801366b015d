"""Checkpoints: one format for every task, written by orbax asynchronously, checked on the way back.

A checkpoint is one orbax step directory ``<dir>/<step>/`` holding two items:

- ``state``: the :class:`~pufferfish_jax.train.state.TrainState` pytree (parameters, BN statistics,
  optimizer and per-worker reducer state, step counter), saved with ``StandardSave``. Restoring
  needs an abstract target of the right structure: a low-rank checkpoint restores into a
  factorized model, which the trainer rebuilds from the ``phase`` and ``factorized`` entries
  of the metadata before reading any array.
- ``meta``: JSON — phase, factorized layers and their ranks, epoch and batch position in the
  epoch, the run's config and identity, the metric sums of the unfinished epoch, the metrics
  records so far — and a ``digest``.

Orbax detects truncated or missing files, but restores silently altered bytes (a flipped bit in
a tensor file comes back as a different number), so every save records a sha256 of the arrays
(each process hashes the shards it holds replica 0 of) and of the metadata itself; a restore
that does not reproduce them is *damaged*: it is reported, moved aside to
``<dir>-damaged/``, and the previous checkpoint is tried. No usable checkpoint at all is an
error, never a silent fresh start.

Only whole checkpoints count: orbax writes into a temporary directory and renames it when
the write is complete, so a process killed during a save leaves no half checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

STATE, META = "state", "meta"
FORMAT = 1


class CheckpointError(Exception):
    """A run cannot continue from its checkpoints (none usable, or they belong to another run)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint belongs to a run with another identity (arch, rank ratio, dataset, ...)."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files are truncated, missing or altered."""


# ------------------------------------------------------------------------------------------------
# Digests
# ------------------------------------------------------------------------------------------------


def _canonical(meta: dict) -> bytes:
    # Through a JSON round trip first, so tuples/lists and key types hash the same before and after.
    return json.dumps(json.loads(json.dumps(meta)), sort_keys=True).encode()


def meta_digest(meta: dict) -> str:
    """sha256 of the metadata without its own ``digest["meta"]`` entry."""
    digest = dict(meta.get("digest", {}))
    digest.pop("meta", None)
    return hashlib.sha256(_canonical({**meta, "digest": digest})).hexdigest()


def arrays_digest(tree: Any) -> str:
    """sha256 over the shards of every array in ``tree`` that this process holds replica 0 of.

    Across processes the digests cover every shard of every array exactly once, without any
    process gathering another's data. Paths, shapes and dtypes are hashed too.
    """
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)  # dropout RNG keys: hash their raw bits
        if isinstance(leaf, jax.Array):
            h.update(f"{leaf.shape}{leaf.dtype}".encode())
            shards = sorted((s for s in leaf.addressable_shards if s.replica_id == 0),
                            key=lambda s: tuple(i.start or 0 for i in s.index))
            for shard in shards:
                h.update(np.ascontiguousarray(jax.device_get(shard.data)).tobytes())
        else:
            x = np.asarray(leaf)
            h.update(f"{x.shape}{x.dtype}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _allgather_digest(digest: str) -> list[str]:
    if jax.process_count() == 1:
        return [digest]
    from jax.experimental import multihost_utils

    rows = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return [bytes(np.asarray(r, np.uint8)).hex() for r in np.asarray(rows).reshape(jax.process_count(), -1)]


def all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective in a multi-process run)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


# ------------------------------------------------------------------------------------------------
# Reading without JAX (the command line checks a checkpoint before JAX starts)
# ------------------------------------------------------------------------------------------------


def checkpoint_dir(out_dir: str) -> str:
    """Where a run's checkpoints live: ``<out_dir>/checkpoints``."""
    return os.path.join(out_dir, "checkpoints")


def committed_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, ascending (temporary dirs left by a
    killed save are not steps: orbax renames a checkpoint into place once it is complete)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def read_meta(directory: str, step: int) -> dict:
    """The metadata of checkpoint ``step``; :class:`DamagedCheckpoint` if unreadable or altered."""
    path = os.path.join(directory, str(step), META, "metadata")  # where orbax's JsonSave puts it
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"its metadata is unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "digest" not in meta:
        raise DamagedCheckpoint("its metadata is not a pufferfish checkpoint's")
    if meta["digest"].get("meta") != meta_digest(meta):
        raise DamagedCheckpoint("its metadata does not match its digest")
    if meta.get("step") != step:
        raise DamagedCheckpoint(f"its metadata names step {meta.get('step')}")
    return meta


def latest_meta(directory: str) -> tuple[int, dict] | None:
    """(step, metadata) of the newest checkpoint whose metadata reads back intact, else None.
    Only the metadata is checked here; the arrays are verified when they are restored."""
    for step in reversed(committed_steps(directory)):
        try:
            return step, read_meta(directory, step)
        except DamagedCheckpoint:
            continue
    return None


def identity_mismatch(saved: dict, current: dict) -> str | None:
    """``None`` if a checkpoint with identity ``saved`` can continue a run with ``current``,
    else a phrase naming what differs, e.g. ``"arch resnet18 there, vgg19 here"``."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k} {saved.get(k, '(unset)')} there, {current.get(k, '(unset)')} here"
             for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs) or None


# ------------------------------------------------------------------------------------------------
# Saving and restoring
# ------------------------------------------------------------------------------------------------


def _drop_closed_loop_noise() -> None:
    """After orbax gives up on a restore whose files are damaged, tensorstore's outstanding reads
    still complete and try to wake the asyncio loop orbax has already closed, each printing an
    "Event loop is closed" traceback (as unraisable exceptions). Harmless: drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "pufferfish_filter", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.pufferfish_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class Checkpointer:
    """``ocp.CheckpointManager`` over ``directory``: asynchronous saves, the last ``keep`` kept.

    ``save(step, state, meta)`` returns once the arrays are copied off the devices (the write
    goes on in the background, so training continues); ``restore(target)`` returns the newest
    intact checkpoint. Every process of a multi-process run calls both.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self._ocp = ocp
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts saving ``state`` with ``meta`` as checkpoint ``step``; False (nothing written)
        if that step is already saved (a resumed run reaching its restored step again)."""
        if step in self._mgr.all_steps():
            return False
        meta = {**meta, "format": FORMAT, "step": step,
                "digest": {"arrays": _allgather_digest(arrays_digest(state))}}
        meta["digest"]["meta"] = meta_digest(meta)
        ocp = self._ocp
        self._mgr.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
                       force=True)
        return True

    def restore(self, target: Callable[[dict], Any]) -> tuple[Any, dict]:
        """The newest checkpoint that restores intact, as ``(state, meta)``.

        ``target(meta)`` returns the abstract state (``jax.ShapeDtypeStruct`` leaves with
        shardings) that the checkpoint described by ``meta`` restores into; it may raise
        :class:`CheckpointMismatch`, which is passed on. A damaged checkpoint is reported, moved
        aside, and the previous one tried; :class:`CheckpointError` if none is left.
        """
        ocp = self._ocp
        steps = self.steps()
        damaged: list[int] = []
        for step in reversed(steps):
            reason = None
            try:
                meta = read_meta(self.directory, step)
                abstract = target(meta)
                state = self._mgr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
                mine = meta["digest"]["arrays"]
                if len(mine) != jax.process_count() or mine[jax.process_index()] != arrays_digest(state):
                    raise DamagedCheckpoint("its arrays do not match their digest")
            except CheckpointMismatch:
                raise
            except DamagedCheckpoint as e:
                reason = str(e)
            except Exception as e:  # orbax/tensorstore: truncated, missing or unreadable files
                _drop_closed_loop_noise()
                detail = str(e).split(" See full TensorStore details")[0].strip().splitlines()
                reason = f"its arrays do not read back ({type(e).__name__}: {detail[0][:200] if detail else ''})"
            if all_processes_agree(reason is None):
                return state, meta
            _say(f"checkpoint step {step} in {self.directory} is damaged: {reason or 'another process could not read it'}; "
                 f"moving it to {self.directory}-damaged/")
            self._quarantine(step)
            damaged.append(step)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + (f"all {len(damaged)} are damaged (moved to {self.directory}-damaged/)" if damaged else "there is none")
            + "; refusing to start the run over")

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = f"{self.directory}-damaged"
            os.makedirs(aside, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"pufferfish quarantine {step}")
        self._mgr.reload()

    def wait(self) -> None:
        """Blocks until every save started so far is on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()
