"""Real exports that nobody here wrote: torchvision classifiers and transformers, exported
with torch.onnx.export (seeded weights, small inputs, 10 classes), load, agree with
onnxruntime, get sound bounds at ε = 1/255, and go through ``certkit verify`` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.bounds import BoundedModel
from certkit.cli import main
from certkit.ort_session import run_onnxruntime
from certkit.results import read_results
from tests.conftest import assert_matches_onnxruntime
from tests.zoo import ZOO, export

EPS = 1 / 255
# full CROWN where it takes seconds; CROWN-IBP (IBP intermediate bounds, CROWN on the output) on the
# larger CNNs, whose full CROWN at every layer takes minutes on two cores (benchmarks/zoo.py times it)
CROWN = {"vit": "crown", "transformer_encoder": "crown", "softmax_mlp": "crown", "squeezenet1_1": "crown-ibp",
         "resnet18": "crown-ibp", "mobilenet_v2": "crown-ibp", "mobilenet_v3_small": "crown-ibp",
         "efficientnet_b0": "crown-ibp"}
TRANSFORMERS = {"vit", "transformer_encoder"}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def _sampled_outputs(path, lo: torch.Tensor, up: torch.Tensor, k: int, gen: torch.Generator) -> np.ndarray:
    """onnxruntime's outputs on the box ends and ``k`` uniform points of each box: (B, k + 2, K)."""
    B = lo.shape[0]
    u = torch.rand(B, k + 2, *lo.shape[1:], generator=gen)
    u[:, 0], u[:, 1] = 0, 1
    pts = lo.unsqueeze(1) + u * (up - lo).unsqueeze(1)
    out = run_onnxruntime(path, pts.reshape(B * (k + 2), *lo.shape[1:]).numpy())
    return out.reshape(B, k + 2, -1)


@pytest.mark.parametrize("name", list(ZOO))
def test_export_loads_matches_and_bounds_hold(name, zoo_dir):
    path = export(name, zoo_dir)
    inspected = CliRunner().invoke(main, ["inspect", str(path)])
    assert inspected.exit_code == 0, inspected.output
    assert "all operators supported" in inspected.output
    bm, x = assert_matches_onnxruntime(path)
    lo, up = x[:2] - EPS, x[:2] + EPS
    ys = _sampled_outputs(path, lo, up, 48, torch.Generator().manual_seed(0))
    tol = 1e-4 * (1 + np.abs(ys).max())
    widths = {}
    for method in ("ibp", CROWN[name]):
        with torch.no_grad():
            lb, ub = bm.compute_bounds(lo, up, method=method)
        lb, ub = lb.numpy()[:, None], ub.numpy()[:, None]
        # NaN bounds (IBP through a transformer's LayerNorms overflows) claim nothing; finite ones must hold
        assert not (ys < lb - tol).any() and not (ys > ub + tol).any(), method
        widths[method] = float((ub - lb).mean())
    assert np.isfinite(widths[CROWN[name]]) and widths[CROWN[name]] > 0
    if name not in TRANSFORMERS:  # IBP is finite on the CNNs, and CROWN no looser
        assert widths[CROWN[name]] <= widths["ibp"] * (1 + 1e-6)


@pytest.mark.parametrize("name", list(ZOO))
def test_verify_runs_end_to_end(name, zoo_dir, tmp_path):
    path = export(name, zoo_dir)
    shape = ZOO[name][1]
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    y = run_onnxruntime(path, x.numpy()).reshape(4, -1).argmax(1)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y)
    out = tmp_path / "results.h5"
    args = ["verify", str(path), "--eps", "1/255", "--dataset", f"npz:{tmp_path / 'data.npz'}", "-n", "4",
            "--out", str(out), "--pixel-range", "0,1"]
    if name not in ("transformer_encoder", "softmax_mlp"):  # full CROWN/α-CROWN: tens of seconds
        args += ["--method", "crown-ibp"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    attrs, data = read_results(out)
    assert attrs["complete"] and len(data["status"]) == 4
    assert (data["prediction"] == y).all()
    if name == "softmax_mlp":
        assert "softmax" in attrs["bounded_output"]


def test_dynamo_export_of_a_transformer_loads(zoo_dir):
    """torch.onnx.export's default exporter (dynamo, opset 18: Reshape allowzero, axes as inputs)."""
    bm, _ = assert_matches_onnxruntime(export("transformer_encoder", zoo_dir, dynamo=True))
    assert bm.graph.output_shape == (10,)
    assert isinstance(bm, BoundedModel)
