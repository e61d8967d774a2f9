"""Smooth element-wise functions (smooth.py): sampled soundness of IBP, CROWN and α-CROWN on random
and hard boxes, behaviour on degenerate, infinite and NaN bounds, tightness, and ONNX models
using each operator between Gemm layers (onnxruntime agreement, sound bounds)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from certkit.bounds import BoundedModel
from certkit.bounds.ops import smooth
from certkit.errors import UnsupportedOperator
from certkit.ort_session import run_onnxruntime
from tests.conftest import assert_matches_onnxruntime
from tests.op_soundness import check_op, random_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

SET = dict(deadline=None, derandomize=True)
INF, NAN = math.inf, math.nan

# functions defined on the whole line
WHOLE = {
    "exp": smooth.Exp, "softplus": smooth.Softplus, "softplus_b2_t5": lambda: smooth.Softplus(2.0, 5.0),
    "elu": smooth.Elu, "elu_03": lambda: smooth.Elu(0.3), "erf": smooth.Erf, "gelu": smooth.Gelu,
    "gelu_tanh": lambda: smooth.Gelu("tanh"), "sin": smooth.Sin, "cos": smooth.Cos,
    "pow2": lambda: smooth.Pow(2), "pow3": lambda: smooth.Pow(3), "pow4": lambda: smooth.Pow(4),
    "pow5": lambda: smooth.Pow(5), "pow1": lambda: smooth.Pow(1), "pow0": lambda: smooth.Pow(0),
}
# functions on h > 0 (or h >= 0), and odd/even negative powers on either side of 0
POSITIVE = {
    "log": smooth.Log, "sqrt": smooth.Sqrt, "reciprocal": smooth.Reciprocal, "pow0.5": lambda: smooth.Pow(0.5),
    "pow1.5": lambda: smooth.Pow(1.5), "pow-0.5": lambda: smooth.Pow(-0.5), "pow-2": lambda: smooth.Pow(-2),
    "pow-3": lambda: smooth.Pow(-3),
}
NEGATIVE_OK = ("reciprocal", "pow-2", "pow-3")


def gen_of(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fixed_boxes(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Degenerate, straddling, one-signed, narrow and wide intervals (one box of 16 neurons)."""
    lo = [-3.0, 1.0, -1.0, -0.1, -8.0, -40.0, 0.0, 0.0, -2.0, -30.0, 5.0, 0.3, -0.76, 1e-7, -1.5, -12.0]
    up = [-1.0, 3.0, 1.0, 8.0, 0.1, -39.0, 0.0, 2.0, 0.0, 30.0, 5.0, 0.3 + 1e-6, -0.74, 1e-7, 1.5, 11.0]
    return torch.tensor([lo], dtype=dtype), torch.tensor([up], dtype=dtype)


# ------------------------------------------------------------------ sampled soundness


@settings(max_examples=20, **SET)
@given(st.sampled_from(sorted(WHOLE)), st.sampled_from([(5,), (2, 3), (2, 2, 2)]),
       st.sampled_from([0.3, 2.0, 6.0]), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 99))
def test_whole_line_functions_sound(name, shape, scale, dtype, seed):
    op = WHOLE[name]()
    check_op(op, [random_boxes(shape, 8, gen_of(seed), scale, dtype)], points=3000, seed=seed)


@settings(max_examples=20, **SET)
@given(st.sampled_from(sorted(POSITIVE)), st.sampled_from([(5,), (2, 3)]), st.sampled_from([0.3, 2.0, 10.0]),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 99), st.booleans())
def test_positive_domain_functions_sound(name, shape, scale, dtype, seed, negative):
    lo, up = random_boxes(shape, 8, gen_of(seed), scale, dtype)
    lo, up = lo.abs() + 1e-3, lo.abs() + 1e-3 + (up - lo)  # inside (0, inf)
    if negative and name in NEGATIVE_OK:
        lo, up = -up, -lo
    check_op(POSITIVE[name](), [(lo, up)], points=3000, seed=seed)


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_fixed_hard_boxes(name):
    for dtype in (torch.float32, torch.float64):
        check_op(WHOLE[name](), [fixed_boxes(dtype)], points=4000)


@settings(max_examples=12, **SET)
@given(st.sampled_from(sorted(WHOLE)), st.floats(-60, 60), st.sampled_from([0.0, 1e-6, 1e-3, 0.5, 3.0, 25.0, 200.0]))
def test_any_centre_and_width(name, centre, width):
    lo = torch.tensor([[centre - width, centre - width / 2, centre]])
    check_op(WHOLE[name](), [(lo, lo + torch.tensor([[width, width, width]]))], points=2000)


def test_straddling_and_clamped_domains():
    """Reciprocal: intervals containing 0 are unbounded; Sqrt/Log/fractional powers: clamped to the
    domain, sound on the valid inputs of a box reaching below 0."""
    gen = gen_of(3)
    lo, up = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    r_lo, r_up = smooth.Reciprocal().interval((lo, up))
    assert (r_lo == -INF).all() and (r_up == INF).all()
    assert (smooth.Pow(-2).interval((lo, up))[0] <= 0).all()
    for op in (smooth.Sqrt(), smooth.Log(), smooth.Pow(0.5), smooth.Pow(1.5)):
        lo, up = random_boxes((6,), 20, gen, 2.0)
        valid_lo = lo.clamp(min=1e-3)  # (log(0) = -inf: outputs the sampled check cannot compare)
        up = torch.maximum(up, valid_lo)
        res = check_op(op, [(valid_lo, up)], points=2000)  # samples of the valid part
        full_lo, full_up = op.interval((lo, up))  # the box reaching below 0 gives the same bounds
        assert (full_lo <= res["ibp"][0]).all() and (full_up >= res["ibp"][1]).all()
        # CROWN lines on the whole box are sound at valid points
        a_l, b_l, a_u, b_u = op.relax(lo, up)
        h = valid_lo + (up - valid_lo) * torch.rand(50, *lo.shape, generator=gen)
        y = op.fn(h)
        ok = torch.isfinite(y)
        assert ((a_l * h + b_l <= y + 1e-5 * (1 + y.abs())) | ~ok).all()
        assert ((a_u * h + b_u >= y - 1e-5 * (1 + y.abs())) | ~ok).all()
    assert smooth.Log().interval((torch.tensor([[0.0]]), torch.tensor([[2.0]])))[0].item() == -INF


@pytest.mark.parametrize("name", sorted(WHOLE) + sorted(POSITIVE))
def test_infinite_and_nan_bounds(name):
    """Infinite input bounds give sound (possibly infinite) constant lines, never NaN; NaN input
    bounds give NaN, never a finite bound."""
    op = {**WHOLE, **POSITIVE}[name]()
    lo = torch.tensor([[-INF, -INF, 0.5, -1e30, 2.0, NAN]])
    up = torch.tensor([[INF, 1.0, INF, 1e30, 2.0, 1.0]])
    ibp_lo, ibp_up = op.interval((lo, up))
    lines = op.relax(lo.unsqueeze(1), up.unsqueeze(1))
    assert all(torch.isfinite(x).all() for x in (lines[0], lines[2])), "slopes must stay finite"
    assert torch.isnan(ibp_lo[0, 5]) or torch.isnan(ibp_up[0, 5])
    assert torch.isnan(lines[1][..., 5]).all() and torch.isnan(lines[3][..., 5]).all()
    finite_in = slice(0, 5)
    if name not in ("log", "sqrt", "pow0.5", "pow1.5", "pow-0.5"):  # whose domain excludes part of these
        assert not torch.isnan(ibp_lo[0, finite_in]).any() and not torch.isnan(ibp_up[0, finite_in]).any()
        assert not torch.isnan(lines[1][..., finite_in]).any() and not torch.isnan(lines[3][..., finite_in]).any()
    A = torch.randn(1, 3, 6)
    A[..., 5] = 0  # the NaN neuron left out: every other bound must not be NaN
    (A_in,), bias = op.backward(A, [(lo, up)])
    assert torch.isfinite(A_in).all() and not torch.isnan(bias).any()


def test_out_of_domain_gives_nan():
    lo, up = torch.tensor([[-3.0]]), torch.tensor([[-1.0]])
    for op in (smooth.Log(), smooth.Sqrt(), smooth.Pow(0.5)):
        assert all(torch.isnan(b).all() for b in op.interval((lo, up)))
        assert torch.isnan(op.relax(lo, up)[1]).all()


def test_alpha_any_value_sound_and_default_matches():
    gen = gen_of(5)
    for make in list(WHOLE.values()):
        op = make()
        lo, up = random_boxes((7,), 6, gen, 3.0, torch.float64)
        default = op.relax(lo.unsqueeze(1), up.unsqueeze(1), op.default_alpha(lo, up).unsqueeze(1))
        plain = op.relax(lo.unsqueeze(1), up.unsqueeze(1))
        for x, y in zip(default, plain):
            assert torch.allclose(x, y, atol=1e-9, rtol=1e-6), type(op).__name__
        # the α gradient exists (α-CROWN optimises it)
        alpha = op.default_alpha(lo, up).unsqueeze(1).clone().requires_grad_(True)
        (A_in,), bias = op.backward(torch.randn(6, 2, 7, dtype=torch.float64), [(lo, up)], alpha=alpha)
        total = A_in.sum() + bias.sum()
        if total.requires_grad:  # (Pow(0) and Pow(1) have nothing to tune)
            total.backward()
            assert alpha.grad is not None and torch.isfinite(alpha.grad).all(), type(op).__name__


# ------------------------------------------------------------------ tightness


@pytest.mark.parametrize("name", sorted(WHOLE) + sorted(POSITIVE))
def test_exact_on_points(name):
    op = {**WHOLE, **POSITIVE}[name]()
    x = torch.linspace(0.05, 4.0, 40, dtype=torch.float64).unsqueeze(0)
    if name not in POSITIVE:
        x = torch.cat([-x, x], 1)
    a_l, b_l, a_u, b_u = op.relax(x, x)
    y = op.fn(x)
    allowed = 1e-9 * (1 + y.abs().max()) + 2.1 * getattr(op, "delta", 0.0)  # Softplus' threshold switch
    assert ((a_u * x + b_u) - (a_l * x + b_l)).max() < allowed
    lo, up = op.interval((x, x))
    assert (up - lo).max() < 1e-12 * (1 + y.abs().max()) + allowed


def test_lines_touch_where_expected():
    """Convex functions: the chord touches f at both ends, the default tangent inside; concave
    ones the other way round; odd powers' tangent passes through the far end."""
    lo, up = torch.tensor([[-1.0, 0.5]], dtype=torch.float64), torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    for op in (smooth.Exp(), smooth.Softplus(), smooth.Pow(2), smooth.Elu(0.5)):
        a_l, b_l, a_u, b_u = op.relax(lo, up)
        for h in (lo, up):
            assert torch.allclose(a_u * h + b_u, op.fn(h), atol=1e-12)
        h = lo + (up - lo) * torch.linspace(0, 1, 1001, dtype=torch.float64).unsqueeze(1)
        assert ((op.fn(h) - (a_l * h + b_l)).min(0).values < 1e-6).all()
    a_l, b_l, a_u, b_u = smooth.Log().relax(lo[:, 1:], up[:, 1:])
    assert torch.allclose(a_l * up[:, 1:] + b_l, torch.log(up[:, 1:]), atol=1e-12)
    # x³ on [-3, 2]: the upper tangent at -1 passes through (2, 8)
    a_l, b_l, a_u, b_u = smooth.Pow(3).relax(torch.tensor([[-3.0]], dtype=torch.float64),
                                             torch.tensor([[2.0]], dtype=torch.float64))
    assert abs((a_u * 2 + b_u).item() - 8) < 1e-9 and abs(a_u.item() - 3) < 1e-9
    # sin / cos / gelu: the gap between the lines is close to the function's own range on narrow boxes
    for op in (smooth.Sin(), smooth.Cos(), smooth.Gelu()):
        lo = torch.linspace(-5, 5, 51, dtype=torch.float64).unsqueeze(0)
        up = lo + 0.1
        a_l, b_l, a_u, b_u = op.relax(lo, up)
        h = lo + (up - lo) * torch.linspace(0, 1, 101, dtype=torch.float64).unsqueeze(1)
        gap = ((a_u * h + b_u) - op.fn(h)).max(0).values
        assert gap.max() < 2e-3, type(op).__name__
    # GELU IBP uses its minimum
    g_lo, _ = smooth.Gelu().interval((torch.tensor([[-2.0]]), torch.tensor([[1.0]])))
    assert -0.1701 < g_lo.item() < -0.1699


# ------------------------------------------------------------------ ONNX models


def _save(tmp_path, name: str, nodes, inits, n_in: int = 4, n_out: int = 3) -> str:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _gemm_op_gemm(tmp_path, name: str, op_nodes, extra_inits=(), positive: bool = False) -> str:
    """x (1, 4) -> Gemm (5) -> the operator (h -> z) -> Gemm (3). ``positive``: the first layer
    maps [0, 1)^4 into [0.5, 3] (for functions on h > 0)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(5, 4)).astype(np.float32)
    b1 = rng.normal(size=5).astype(np.float32)
    if positive:
        w1, b1 = np.abs(w1) * 0.5, np.full(5, 0.5, np.float32)
    w2 = rng.normal(size=(3, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "w2"), *extra_inits]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), *op_nodes,
             helper.make_node("Gemm", ["z", "w2"], ["y"], transB=1)]
    return _save(tmp_path, name, nodes, inits)


def _scalar(name: str, v: float):
    return numpy_helper.from_array(np.array(v, np.float32), name)


ONNX_CASES = {
    "Exp": ([helper.make_node("Exp", ["h"], ["z"])], [], False),
    "Log": ([helper.make_node("Log", ["h"], ["z"])], [], True),
    "Reciprocal": ([helper.make_node("Reciprocal", ["h"], ["z"])], [], True),
    "Sqrt": ([helper.make_node("Sqrt", ["h"], ["z"])], [], True),
    "Pow2": ([helper.make_node("Pow", ["h", "e"], ["z"])], [_scalar("e", 2.0)], False),
    "Pow3": ([helper.make_node("Pow", ["h", "e"], ["z"])], [_scalar("e", 3.0)], False),
    "Pow1.5": ([helper.make_node("Pow", ["h", "e"], ["z"])], [_scalar("e", 1.5)], True),
    "PowBase": ([helper.make_node("Pow", ["e", "h"], ["z"])], [_scalar("e", 1.7)], False),
    "DivConst": ([helper.make_node("Div", ["e", "h"], ["z"])], [_scalar("e", 2.5)], True),
    "Softplus": ([helper.make_node("Softplus", ["h"], ["z"])], [], False),
    "Elu": ([helper.make_node("Elu", ["h"], ["z"], alpha=0.7)], [], False),
    "Erf": ([helper.make_node("Erf", ["h"], ["z"])], [], False),
    "Sin": ([helper.make_node("Sin", ["h"], ["z"])], [], False),
    "Cos": ([helper.make_node("Cos", ["h"], ["z"])], [], False),
}


def _check_model_bounds(bm, lo, up, ys, crown_not_looser: bool = True) -> None:
    res = {}
    for m in ("ibp", "crown", "alpha-crown"):
        lb, ub = (b.detach() for b in bm.compute_bounds(lo, up, method=m))
        tol = 1e-5 * (1 + ys.abs())
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), m
        assert (ys >= lb - tol).all() and (ys <= ub + tol).all(), m
        res[m] = (ub - lb).sum().item()
    if crown_not_looser:
        assert res["crown"] <= res["ibp"] + 1e-5 and res["alpha-crown"] <= res["crown"] + 1e-5


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_models(tmp_path, case):
    nodes, inits, positive = ONNX_CASES[case]
    path = _gemm_op_gemm(tmp_path, case, nodes, inits, positive)
    bm, x = assert_matches_onnxruntime(path)
    lo, up = x[:1] - 0.05, x[:1] + 0.05
    if positive:
        lo = lo.clamp(min=0)
    pts = torch.cat([lo + (up - lo) * torch.rand(2000, 4, generator=gen_of(1)), lo, up])
    ys = torch.from_numpy(run_onnxruntime(path, pts.numpy())).reshape(len(pts), -1)
    _check_model_bounds(bm, lo, up, ys)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_module_and_functional(approximate):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate=approximate), nn.Linear(6, 3))

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = net[0], net[2]

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x), approximate=approximate) + torch.sin(self.a(x)))

    for model in (net, Functional()):
        bm = BoundedModel(model, (4,))
        lo = torch.rand(1, 4) - 0.5
        up = lo + 0.6
        pts = torch.cat([lo + (up - lo) * torch.rand(2000, 4, generator=gen_of(2)), lo, up])
        with torch.no_grad():
            ys = model(pts)
        assert torch.allclose(bm(pts), ys, atol=1e-6)
        _check_model_bounds(bm, lo, up, ys)


def test_refusals(tmp_path):
    """ELU with alpha > 1 and Pow with a non-constant exponent are refused with a clear message."""
    path = _gemm_op_gemm(tmp_path, "elu2", [helper.make_node("Elu", ["h"], ["z"], alpha=1.5)])
    with pytest.raises(UnsupportedOperator, match="alpha"):
        BoundedModel(path)

    class PowDyn(nn.Module):
        def forward(self, x):
            return torch.pow(x, x)

    with pytest.raises(UnsupportedOperator, match="exponent"):
        BoundedModel(PowDyn(), (3,))
    with pytest.raises(ValueError):
        smooth.Elu(2.0)
