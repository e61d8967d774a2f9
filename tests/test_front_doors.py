"""A module and its ONNX export (BN fused by torch.onnx.export in eval mode) get the same bounds."""

from __future__ import annotations

import warnings

import pytest
import torch

from certkit.bounds import BoundedModel, margin_matrix
from certkit.train.models import build_model


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


@pytest.mark.parametrize("name,dataset", [("cnn-small", "mnist"), ("cnn-small", "cifar10"), ("mlp", "mnist")])
def test_module_and_onnx_export_give_equal_bounds(name, dataset, tmp_path):
    torch.manual_seed(1)
    model = build_model(name, dataset).eval()
    _randomise_bn(model, 1)
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, *shape), str(path), dynamo=False, opset_version=13,
                          dynamic_axes={"input": {0: "b"}}, input_names=["input"])
    x = torch.rand(4, *shape)
    eps = 0.01
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    C = margin_matrix(torch.tensor([0, 1, 2, 3]), 10)
    a, b = BoundedModel(model), BoundedModel(path)
    for method in ("ibp", "crown-ibp", "crown"):
        with torch.no_grad():
            lm, um = a.compute_bounds(lo, up, method=method, C=C)
            lo_, uo = b.compute_bounds(lo, up, method=method, C=C)
        scale = 1 + lm.abs().max()
        assert torch.allclose(lm, lo_, atol=1e-5 * scale, rtol=1e-5), method
        assert torch.allclose(um, uo, atol=1e-5 * scale, rtol=1e-5), method
