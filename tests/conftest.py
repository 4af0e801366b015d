"""Shared fixtures: the real datasets in ``<repo>/../shared/data`` (or ``$PUFFERFISH_DATA``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PUFFERFISH_DATA", REPO.parent / "shared" / "data"))
CIFAR_NPZ = DATA_DIR / "cifar10_subset.npz"


@pytest.fixture(scope="session")
def cifar_npz() -> Path:
    """The real CIFAR-10 subset; a missing file is an error, not a skip (CI always has it)."""
    assert CIFAR_NPZ.is_file(), f"{CIFAR_NPZ} not found: set PUFFERFISH_DATA to the shared data folder"
    return CIFAR_NPZ


@pytest.fixture(scope="session")
def cifar_splits(cifar_npz):
    from pufferfish_jax.data.cifar import load_npz

    return load_npz(str(cifar_npz))


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None):
    """Runs ``python -m module args`` from the repo root; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
