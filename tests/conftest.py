"""Shared fixtures: where the real data and VNN-COMP files live (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VNNCOMP = SHARED / "vnncomp"
DATA = SHARED / "data"


def require(path: Path) -> Path:
    """Skip (loudly) when the shared folder is absent: it is beside every CI checkout."""
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared)")
    return path


@pytest.fixture(scope="session")
def vnncomp_dir() -> Path:
    return require(VNNCOMP)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
