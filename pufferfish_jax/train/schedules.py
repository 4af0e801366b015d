"""Learning-rate schedules as plain functions of the global epoch, so they survive the switch
(the optimizer is rebuilt at the transition, the schedule keeps counting global epochs)."""

from __future__ import annotations

from typing import Callable, Sequence

Schedule = Callable[[int], float]


def multistep(base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``base_lr · gamma^k`` where k is the number of milestones ≤ epoch (PyTorch's MultiStepLR)."""
    milestones = tuple(sorted(milestones))
    return lambda epoch: base_lr * gamma ** sum(epoch >= m for m in milestones)
