"""Learning-rate schedules: plain functions ``(epoch, step, history) -> lr`` of the global epoch,
the global step and the metrics records so far, so they survive the switch (the optimizer is
rebuilt at the transition, the schedule keeps counting) and a resumed run (the history is in
every checkpoint)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

Schedule = Callable[[int, int, Sequence[dict[str, Any]]], float]


def multistep(base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``base_lr · gamma^k`` where k is the number of milestones ≤ epoch (PyTorch's MultiStepLR)."""
    milestones = tuple(sorted(milestones))

    def schedule(epoch: int, step: int = 0, history: Sequence[dict[str, Any]] = ()) -> float:
        return base_lr * gamma ** sum(epoch >= m for m in milestones)

    return schedule


def plateau(base_lr: float, eval_name: str = "val", switch_factor: float = 0.5, plateau_factor: float = 0.25) -> Schedule:
    """The official LM schedule as ``schedule(epoch, step, history) -> lr``.

    ``base_lr``, times ``switch_factor`` from the epoch the model was factorized on (a
    transition record that split at least one layer; a vanilla ``--ranks 1.0`` run is not
    halved, like the official run without warm-up), times ``plateau_factor`` for every finished
    epoch whose ``<eval_name>_loss`` did not beat the best before it. Everything comes from the
    history, so a resumed run continues with exactly the same rate.
    """
    key = f"{eval_name}_loss"

    def schedule(epoch: int, step: int = 0, history: Sequence[dict[str, Any]] = ()) -> float:
        lr, best = base_lr, None
        for record in history:
            if record.get("event") == "transition":
                if record.get("factorized_layers", 0) > 0 and record["epoch"] <= epoch:
                    lr *= switch_factor
            elif key in record and record["epoch"] <= epoch:  # epoch records count finished epochs from 1
                loss = record[key]
                if best is None or loss < best:
                    best = loss
                else:
                    lr *= plateau_factor
        return lr

    return schedule
