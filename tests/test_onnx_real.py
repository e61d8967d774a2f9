"""Every real VNN-COMP network: loads, matches onnxruntime, gets sound bounds; others are refused by name."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

from certkit.bounds import BoundedModel, margin_matrix
from certkit.errors import UnsupportedOperator
from certkit.onnx_io import SUPPORTED_OPS
from tests.conftest import VNNCOMP, assert_matches_onnxruntime

# The issue's operator set, written out independently of certkit's own list.
ISSUE_OPS = {"Gemm", "MatMul", "Conv", "BatchNormalization", "Relu", "Add", "Sub", "Mul", "Div", "Flatten",
             "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "AveragePool", "Identity", "Dropout",
             "Constant", "Sigmoid", "Tanh", "MaxPool", "Pad"}
# ...and the operators of the exported-networks issue (common exports and published benchmarks).
EXPORT_OPS = {"GlobalAveragePool", "ReduceMean", "ReduceSum", "Clip", "LeakyRelu", "PRelu", "Elu", "Softplus",
              "HardSigmoid", "HardSwish", "Sign", "Abs", "Neg", "Max", "Min", "ReduceMax", "Exp", "Log", "Reciprocal",
              "Div", "Mul", "Pow", "Sqrt", "Softmax", "LogSoftmax", "LayerNormalization", "Erf", "Gelu", "MatMul",
              "Gather", "Slice", "Split", "Pad", "ConvTranspose", "Resize", "Upsample", "Sin", "Cos"}


def _networks() -> list[tuple[str, set[str]]]:
    """(onnx path, op types) from net_info.csv, written by the benchmark's publishers."""
    info = VNNCOMP / "net_info.csv"
    if not info.is_file():
        return []
    with open(info) as f:
        rows = list(csv.DictReader(f))
    return [(str(VNNCOMP / r["family"] / r["onnx"]), {t.split(":")[0] for t in r["op_types"].split()}) for r in rows]


NETWORKS = _networks()
SUPPORTED = [p for p, o in NETWORKS if o <= ISSUE_OPS]


def _id(p) -> str:
    return p.split("vnncomp/")[-1] if isinstance(p, str) else ""


def test_operator_lists_agree_and_every_network_is_supported():
    assert ISSUE_OPS <= SUPPORTED_OPS and EXPORT_OPS <= SUPPORTED_OPS, EXPORT_OPS - SUPPORTED_OPS
    if NETWORKS:
        assert len(NETWORKS) == 47 and len(SUPPORTED) == len(NETWORKS), sorted(set(NETWORKS) - set(SUPPORTED))


@pytest.mark.parametrize("path", SUPPORTED, ids=_id)
def test_real_network_matches_onnxruntime_and_bounds_are_sound(path, vnncomp_dir):
    bm, x = assert_matches_onnxruntime(path)
    shape = bm.graph.input_shape

    center = x[:1]
    eps = 0.02
    lo, up = center - eps, center + eps
    n_in = int(np.prod(shape))
    samples = lo + (up - lo) * torch.rand(2000, *shape)
    if n_in <= 14:  # every corner of the box too
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n_in))).reshape(-1, *shape)
        samples = torch.cat([samples, lo + (up - lo) * corners])
    with torch.no_grad():
        ys = bm(samples).reshape(len(samples), -1)
    K = ys.shape[1]
    label = int(bm(center).reshape(-1).argmax()) if K > 1 else 0
    for method in ("ibp", "crown-ibp", "crown"):
        with torch.no_grad():
            lb, ub = bm.compute_bounds(lo, up, method=method)
        tol = 1e-5 * (1 + ys.abs())
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), method
        assert (ys >= lb - tol).all(), f"{method}: lower bound violated by {float((lb - ys).max())}"
        assert (ys <= ub + tol).all(), f"{method}: upper bound violated by {float((ys - ub).max())}"
        if K > 1:
            C = margin_matrix(torch.tensor([label]), K)
            with torch.no_grad():
                mlb, mub = bm.compute_bounds(lo, up, method=method, C=C)
            margins = ys[:, label:label + 1] - ys
            margins = torch.cat([margins[:, :label], margins[:, label + 1:]], 1)
            mtol = 1e-5 * (1 + margins.abs())
            assert (margins >= mlb - mtol).all() and (margins <= mub + mtol).all(), method


def test_unsupported_operator_is_refused_by_name(unsupported_onnx):
    """An operator without a bound rule (Hardmax) is named, with its node, before anything is computed."""
    with pytest.raises(UnsupportedOperator) as info:
        BoundedModel(unsupported_onnx)
    assert info.value.op_type == "Hardmax" and info.value.node == "Hardmax_2"
    assert "Hardmax" in str(info.value) and "Hardmax_2" in str(info.value)
