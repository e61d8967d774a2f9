"""VNN-COMP instances named on a benchmark's command line as ``FAMILY:INDEX`` (a row of the
family's instances.csv), resolved against the shared benchmark directory."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "vnncomp"


def instance_paths(vnncomp: Path, item: str) -> tuple[Path, Path]:
    """(ONNX path, VNN-LIB path) of ``FAMILY:INDEX``."""
    family, index = item.split(":")
    root = vnncomp / family
    onnx, vnnlib, _ = list(csv.reader(open(root / "instances.csv")))[int(index)]
    return root / onnx, root / vnnlib


def add_instance_arguments(ap: argparse.ArgumentParser, default: list[str]) -> None:
    """``--instances FAMILY:INDEX …`` (``default`` when none are named) and ``--vnncomp DIR``."""
    ap.add_argument("--instances", nargs="+", default=default, help="FAMILY:INDEX (row of instances.csv)")
    ap.add_argument("--vnncomp", type=Path, default=VNNCOMP, help="the VNN-COMP benchmark directory")
