"""Shared fixtures: where the real data and VNN-COMP files live (read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
