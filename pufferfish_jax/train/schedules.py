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
