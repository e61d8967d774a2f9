"""VNN-LIB properties on the outputs of a network ending in Softmax keep the Softmax: the
complete solver bounds through its rule, and its answers agree with an exhaustive grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from certkit.complete import Solver, SolverConfig
from certkit.confirm import Oracle, in_unsafe_set
from certkit.status import Status
from certkit.vnnlib import Case, Property

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 3), nn.Softmax(-1)).eval()


@pytest.mark.parametrize("split", ["input", "relu"])
def test_solver_answers_on_softmax_outputs_agree_with_a_grid(tmp_path, split):
    rng = np.random.default_rng(5)
    cfg = SolverConfig(input_split_max=20 if split == "input" else 0, attack_restarts=2, attack_steps=5)
    answers = []
    axes = np.linspace(-1, 1, 300)
    grid = np.stack(np.meshgrid(axes, axes, indexing="ij"), -1).reshape(-1, 2)
    for seed in range(4):
        model = _softmax_net(seed)
        path = tmp_path / f"softmax{seed}.onnx"
        torch.onnx.export(model, torch.zeros(1, 2), str(path), dynamo=False, opset_version=13)
        with torch.no_grad():
            probs = model(torch.as_tensor(grid, dtype=torch.float32)).double().numpy()
        solver = Solver(path, cfg)
        assert any(n.source == "Softmax" for n in solver.bm.graph.nodes), "the Softmax must stay in the graph"
        for _ in range(3):
            i, j = rng.choice(3, 2, replace=False)
            A = np.zeros((1, 3))
            A[0, i], A[0, j] = 1.0, -1.0  # unsafe: p_i - p_j < b
            vals = probs @ A[0]
            b = np.quantile(vals, rng.uniform(0.0, 0.02)) - rng.uniform(0, 0.2) * vals.std()
            prop = Property(2, 3, [Case(-np.ones(2), np.ones(2), [(A, np.array([b]))])])
            truth_sat = bool((vals - b < 0).any())
            res = solver.solve(prop, timeout=20)
            answers.append(res.status.vnncomp)
            if res.status is Status.VERIFIED:
                assert not truth_sat, f"unsat claimed but a grid point violates the property (seed {seed})"
            if res.status is Status.FALSIFIED:
                y = Oracle(path, (2,)).outputs(res.x[None])[0]
                assert in_unsafe_set(prop.cases[0], y)
    assert "sat" in answers, answers
    if split == "input":  # splitting the box tightens the Softmax's relaxation; ReLU splitting does not
        assert answers.count("unsat") >= 2 and sum(a in ("sat", "unsat") for a in answers) >= len(answers) - 2, answers
