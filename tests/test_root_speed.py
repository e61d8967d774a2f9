"""The solver's per-stage timings and benchmarks/root_speed.py, the benchmark built on them."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from certkit.complete import Solver, SolverConfig
from certkit.status import Status
from certkit.vnnlib import Case, Property
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, str(REPO / "benchmarks"))
import root_speed  # noqa: E402  (benchmarks/root_speed.py)


@pytest.fixture(scope="module")
def tiny_solver(tmp_path_factory) -> Solver:
    """A 2-8-8-3 ReLU network on [-1, 1]², few attack steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    path = tmp_path_factory.mktemp("root_speed") / "tiny.onnx"
    torch.onnx.export(model, torch.zeros(1, 2), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["output"])
    start = time.perf_counter()
    solver = Solver(path, SolverConfig(attack_restarts=2, attack_steps=5))
    assert 0 <= solver.load_seconds <= time.perf_counter() - start
    return solver


def _property(threshold: float) -> Property:
    """Unsafe: y0 ≤ threshold (sat at +1000, refuted by CROWN at −1000)."""
    return Property(2, 3, [Case(-np.ones(2), np.ones(2), [(np.array([[1.0, 0.0, 0.0]]), np.array([threshold]))])])


@pytest.mark.parametrize("threshold,status,stages", [
    (1000.0, Status.FALSIFIED, {"crown-ibp", "attack"}),
    (-1000.0, Status.VERIFIED, {"crown-ibp"}),  # refuted before any attack
])
def test_timings_name_the_stages_run_and_fit_in_the_solve(tiny_solver, threshold, status, stages):
    start = time.perf_counter()
    res = tiny_solver.solve(_property(threshold), timeout=20)
    wall = time.perf_counter() - start
    assert res.status is status, res.log
    assert set(res.timings) == stages, res.timings
    assert all(t >= 0 for t in res.timings.values()), res.timings
    assert sum(res.timings.values()) <= wall


def test_parse_child_takes_the_last_json_line():
    out = 'warning: something\n{"answer": "sat"}\nnoise\n{"answer": "unsat", "timings": {}}\n'
    assert root_speed.parse_child(out) == {"answer": "unsat", "timings": {}}
    with pytest.raises(ValueError):
        root_speed.parse_child("no json here\n")


def test_benchmark_child_on_a_real_instance_decided_by_crown_ibp(vnncomp_dir, capsys):
    """rl_benchmarks_2022 #0 (cartpole, unsat): refuted by CROWN-IBP before any attack; the child's parts
    and the parent's wall time add up, and the table prints with α,β-CROWN's published time."""
    item = "rl_benchmarks_2022:0"
    cache = os.environ["CERTKIT_CACHE"]  # the test run's graph cache (conftest)
    root_speed.prepare(vnncomp_dir, [item], cache)
    r = root_speed.measure(vnncomp_dir, item, cache)
    assert (r["answer"], r["stage"], r["cached"]) == ("unsat", "crown-ibp", True), r
    parts = [r["imports"], r["load"], *r["timings"].values(), r["start+exit"], r["other"]]
    assert all(p >= 0 for p in parts), r
    assert r["imports"] + r["load"] + sum(r["timings"].values()) <= r["total"] <= r["wall"]
    root_speed.print_table(vnncomp_dir, [item], [r])
    out = capsys.readouterr().out
    assert item in out and "6.985" in out and "certkit / α,β-CROWN" in out
