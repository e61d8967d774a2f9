"""Graph building: normalisation of modules and ONNX files, unsupported operators reported up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from certkit.bounds import BoundedModel, compute_bounds
from certkit.errors import InvalidInput, UnsupportedOperator
from certkit.train.models import build_model


class Rounded(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.round(self.fc(x))


class CumSum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


@pytest.mark.parametrize("model,op", [(Rounded(), "round"), (nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2)),
                                                              "MaxPool1d"), (CumSum(), "cumsum")])
def test_unsupported_module_operator_is_named_before_computing(model, op):
    x = torch.zeros(1, 4)
    with pytest.raises(UnsupportedOperator) as info:
        compute_bounds(model, x, x + 1)
    assert info.value.op_type == op and info.value.node


def test_cnn7_graph_kinds():
    bm = BoundedModel(build_model("cnn7", "cifar10").eval(), (3, 32, 32))
    kinds = [n.op.kind for n in bm.graph.nodes[1:]]
    assert kinds.count("conv") == 5 and kinds.count("linear") == 2 and kinds.count("batchnorm") == 0
    assert sum("+BatchNorm" in n.source for n in bm.graph.nodes) == 6  # every BN folded into its layer
    assert kinds.count("relu") == 6 and kinds[:2] == ["affine", "affine"]  # normalisation: sub, div
    assert bm.graph.output_shape == (10,)


def test_input_shape_mismatch_is_reported():
    model = build_model("mlp", "mnist").eval()
    with pytest.raises(InvalidInput, match=r"cannot run on inputs of per-sample shape \(3, 28, 28\)"):
        compute_bounds(model, torch.zeros(1, 3, 28, 28), torch.ones(1, 3, 28, 28))
    bm = BoundedModel(model, (1, 28, 28))
    with pytest.raises(InvalidInput, match=r"expects \(batch, 1, 28, 28\)"):
        bm.compute_bounds(torch.zeros(1, 3, 28, 28), torch.ones(1, 3, 28, 28))


def test_unknown_method():
    model = build_model("mlp", "mnist").eval()
    with pytest.raises(InvalidInput, match="unknown method"):
        compute_bounds(model, torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), method="magic")


def test_folded_batchnorm_matches_module_in_train_mode():
    torch.manual_seed(0)
    a = build_model("cnn-small", "cifar10").train()
    b = build_model("cnn-small", "cifar10").train()
    b.load_state_dict(a.state_dict())
    bm = BoundedModel(b, (3, 32, 32))
    x = torch.rand(16, 3, 32, 32)
    assert torch.allclose(a(x), bm(x), atol=1e-5)
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, nn.modules.batchnorm._BatchNorm):
            assert torch.allclose(ma.running_mean, mb.running_mean) and torch.allclose(ma.running_var, mb.running_var)
    # bounds with the clean batch's statistics contain the train-mode outputs of points in the box
    eps = 0.01
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    lb, ub = bm.compute_bounds(lo, up, "ibp", reuse_stats=True)
    stats = [m.stats for m in (n.op.bn for n in bm.graph.nodes[1:] if getattr(n.op, "bn", None) is not None)]
    assert len(stats) == 3
    with torch.no_grad():
        ev = build_model("cnn-small", "cifar10")
        ev.load_state_dict(b.state_dict())
        bns = [m for m in ev.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m, (mean, var) in zip(bns, stats):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        ev.eval()
        y = ev(lo + (up - lo) * torch.rand(16, 3, 32, 32))
    assert (y >= lb - 1e-4).all() and (y <= ub + 1e-4).all()
