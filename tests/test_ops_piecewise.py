"""Piecewise-linear and sign-like operators: LeakyReLU, PReLU, Clip (ReLU6, Hardtanh, clamp),
HardSigmoid, HardSwish, Abs, Neg, Sign and element-wise Max / Min.

Their relaxation lines are checked on dense grids of hard intervals (degenerate, at the kinks,
straddling, huge, infinite, NaN) for every α; the IBP / CROWN / α-CROWN rules with the sampled
soundness check over hypothesis-drawn operators and boxes; tightness where the lines should
be exact or touch the function; and every operator end to end from ONNX (against onnxruntime)
and from torch modules traced by torch.fx.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from certkit.bounds import BoundedModel
from certkit.bounds.ops import ReLU
from certkit.bounds.ops.piecewise import Abs, Clip, HardSigmoid, HardSwish, Kinked, LeakyReLU, PReLU, Sign
from certkit.errors import UnsupportedOperator
from certkit.ort_session import run_onnxruntime
from tests.conftest import assert_matches_onnxruntime, onnx_model_file
from tests.op_soundness import check_op, random_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
INF, NAN = float("inf"), float("nan")


def gen_of(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def c(v: float) -> torch.Tensor:
    return torch.tensor(v)


def all_ops() -> list:
    """One of each operator and parameter regime (convex, concave, decreasing, constant...)."""
    return [LeakyReLU(0.01), LeakyReLU(0.0), LeakyReLU(-0.7), LeakyReLU(2.5),
            PReLU(lambda: torch.tensor([0.25])), PReLU(lambda: torch.tensor([-1.5])),
            PReLU(lambda: torch.tensor([3.0])),
            Clip(c(-1.0), c(2.0)), Clip(c(0.0), c(6.0)), Clip(None, c(0.5)), Clip(c(-0.5), None),
            Clip(c(2.0), c(-1.0)), Clip(c(1.0), c(1.0)),
            HardSigmoid(0.2, 0.5), HardSigmoid(1 / 6, 0.5, torch_default=True), HardSigmoid(-0.4, 0.3),
            HardSigmoid(0.0, 0.7), HardSigmoid(3.0, -2.0),
            HardSwish(), Abs(), Sign()]


OPS = all_ops()
IDS = [f"{op.kind}-{i}" for i, op in enumerate(OPS)]


def hard_intervals() -> tuple[torch.Tensor, torch.Tensor]:
    """Degenerate ones at and near the kinks, ones ending at kinks, straddling, narrow, huge."""
    pairs = [(0, 0), (-3, -3), (3, 3), (-1.5, -1.5), (-1, -1), (2, 2), (6, 6), (0.5, 0.5), (-0.5, -0.5),
             (-1, 1), (-1, 0), (0, 1), (-3, 3), (-3, 0), (-5, 5), (-4, -3.5), (3.5, 9), (-2, 7), (-1e-7, 1e-7),
             (-1e-3, 2e-3), (0.5, 2), (-1, 2), (1, 1 + 1e-6), (-30, 1), (-1e4, 1e4), (-1e30, 1e30),
             (-1e30, -1e29), (1e29, 1e30), (-7, -2), (2.9, 3.1), (-3.1, -2.9), (-1.6, -1.4)]
    lo, up = torch.tensor(pairs, dtype=torch.float64).unbind(1)
    return lo, up


def random_intervals(gen: torch.Generator, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    centre = torch.randn(n, generator=gen, dtype=torch.float64) * 4
    width = torch.tensor([0.0, 1e-6, 0.1, 1.0, 5.0, 20.0], dtype=torch.float64)[
        torch.randint(0, 6, (n,), generator=gen)] * torch.rand(n, generator=gen, dtype=torch.float64)
    return centre - width / 2, centre + width / 2


def lines_on_grid(op, lo: torch.Tensor, up: torch.Tensor, alpha=None, points: int = 301):
    """(h, f(h), lower line, upper line) on a grid of each [lo, up] (the kinks included), lines and
    f in float64; asserts the lines are finite and sound there, and IBP encloses f."""
    dtype = lo.dtype
    shape = lo.shape
    a_l, b_l, a_u, b_u = (t.reshape(shape) for t in op.relax(lo.reshape(1, 1, *shape), up.reshape(1, 1, *shape), alpha))
    assert a_l.dtype == dtype and all(torch.isfinite(t).all() for t in (a_l, a_u))
    t = torch.linspace(0, 1, points, dtype=torch.float64).unsqueeze(1)
    h = lo.double() + (up.double() - lo.double()) * t
    kinks = torch.tensor([-3.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 6.0], dtype=torch.float64).unsqueeze(1)
    h = torch.cat([h, kinks.expand(-1, h.shape[1])]).to(dtype)
    h = torch.minimum(torch.maximum(h, lo), up)  # grid points inside the interval, in the caller's dtype
    exact = op.fn(h.double())
    lower = a_l.double() * h.double() + b_l.double()
    upper = a_u.double() * h.double() + b_u.double()
    assert (lower <= exact).all(), f"lower line above f by {(lower - exact).max().item():.3g}"
    assert (upper >= exact).all(), f"upper line below f by {(exact - upper).max().item():.3g}"
    y = op.fn(h)  # and f as the caller's dtype computes it
    assert (a_l * h + b_l <= y).all() and (a_u * h + b_u >= y).all()
    ibp_lo, ibp_up = op.interval((lo, up))  # IBP against f in the caller's dtype (its constants rounded)
    assert (ibp_lo <= y).all() and (y <= ibp_up).all()
    return h, exact, lower, upper


# ------------------------------------------------------------------ relaxation lines


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_lines_sound_on_grid_for_every_alpha(op):
    gen = gen_of(0)
    lo_h, up_h = hard_intervals()
    lo_r, up_r = random_intervals(gen)
    lo, up = torch.cat([lo_h, lo_r]), torch.cat([up_h, up_r])
    for dtype in (torch.float32, torch.float64):
        lo_d, up_d = lo.to(dtype), up.to(dtype)
        lines_on_grid(op, lo_d, up_d)
        if not (isinstance(op, Kinked) or isinstance(op, Sign)):
            continue
        base = op.default_alpha(lo_d.unsqueeze(0), up_d.unsqueeze(0))  # (1, n, 2)
        assert base.shape == (1, *lo.shape, 2) and ((base >= 0) & (base <= 1)).all()
        for alpha in (base, torch.rand(base.shape, generator=gen, dtype=dtype) * 2 - 0.5, torch.zeros_like(base),
                      torch.ones_like(base)):
            lines_on_grid(op, lo_d, up_d, alpha.unsqueeze(1))


@settings(**SETTINGS, max_examples=25)
@given(st.sampled_from(range(len(OPS))), st.floats(-40, 40), st.floats(0, 60) | st.sampled_from([0.0, 1e-7, 1e-4]),
       st.floats(0, 1))
def test_lines_sound_hypothesis(i, centre, width, t):
    op = OPS[i]
    lo = torch.tensor([centre - width / 2, centre - width, centre], dtype=torch.float32)
    up = torch.tensor([centre + width / 2, centre, centre + width], dtype=torch.float32)
    lines_on_grid(op, lo, up)
    lines_on_grid(op, lo, up, torch.tensor([t, 1 - t]).expand(1, 1, 3, 2))


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_infinite_and_nan_intervals(op):
    """Infinite ends: lines sound (possibly infinite intercepts, never NaN) and IBP encloses huge
    finite inputs; NaN ends: NaN bounds and lines, never finite ones."""
    lo = torch.tensor([-INF, -INF, -2.0, -INF, INF, 0.0, NAN, 1.0, NAN])
    up = torch.tensor([INF, 3.0, INF, -INF, INF, 0.0, 1.0, NAN, NAN])
    lines = op.relax(lo.reshape(1, 1, -1), up.reshape(1, 1, -1))
    ibp_lo, ibp_up = op.interval((lo, up))
    bad = torch.isnan(lo) | torch.isnan(up)
    for t in (*lines, ibp_lo, ibp_up):
        t = t.reshape(-1)
        assert torch.isnan(t[bad]).all() and not torch.isnan(t[~bad][:3]).any()
    a_l, b_l, a_u, b_u = (t.reshape(-1)[:3].double() for t in lines)
    for j in range(3):  # finite points of the first three intervals
        h = torch.tensor([-1e30, -1e6, -7.0, -3.0, -1.5, 0.0, 0.3, 3.0, 8.0, 1e6, 1e30], dtype=torch.float64)
        h = h[(h >= lo[j]) & (h <= up[j])]
        y = op.fn(h)
        y32 = op.fn(h.float())
        assert (ibp_lo[j] <= y32).all() and (y32 <= ibp_up[j]).all()
        slack = 1e-12 * y.abs()  # f's own float64 rounding at 1e30
        assert (a_l[j] * h + b_l[j] <= y + slack).all() and (a_u[j] * h + b_u[j] >= y - slack).all()
    bounded = isinstance(op, HardSigmoid | Sign) or (isinstance(op, Clip) and None not in (op.lo, op.hi))
    if bounded:  # bounded functions keep finite lines on infinite intervals
        assert torch.isfinite(torch.stack(lines).reshape(4, -1)[:, :3]).all()


# ------------------------------------------------------------------ IBP / CROWN / alpha-CROWN, sampled


@st.composite
def piecewise_ops(draw):
    kind = draw(st.sampled_from(["leaky", "prelu", "clip", "clip-lo", "clip-hi", "clip-tensor", "hardsigmoid",
                                 "hardswish", "abs", "sign"]))
    slope = draw(st.floats(-3, 3))
    a, b = sorted([draw(st.floats(-4, 4)), draw(st.floats(-4, 4))])
    if kind == "leaky":
        return LeakyReLU(slope)
    if kind == "prelu":
        w = torch.tensor([slope, draw(st.floats(-2, 2)), draw(st.floats(0, 4))]).reshape(3, 1)
        return PReLU(lambda w=w: w)
    if kind == "clip":
        return Clip(c(a), c(b))
    if kind == "clip-lo":
        return Clip(c(a), None)
    if kind == "clip-hi":
        return Clip(None, c(b))
    if kind == "clip-tensor":  # per-element bounds, some with min > max
        return Clip(torch.linspace(-2, 2, 4), torch.tensor([1.0, -1.0, 3.0, 0.5]))
    if kind == "hardsigmoid":
        return HardSigmoid(draw(st.floats(-2, 2)), draw(st.floats(-1, 2)))
    return {"hardswish": HardSwish, "abs": Abs, "sign": Sign}[kind]()


@settings(**SETTINGS, max_examples=25)
@given(piecewise_ops(), st.sampled_from([0.3, 3.0, 10.0]), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31 - 1))
def test_rules_sound_sampled(op, scale, dtype, seed):
    gen = gen_of(seed)
    box = random_boxes((3, 4), 16, gen, scale=scale, dtype=dtype)
    check_op(op, [box], points=10_000)


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_rules_sound_on_hard_boxes(op):
    lo, up = hard_intervals()
    lo, up = lo.reshape(8, 4), up.reshape(8, 4)
    for dtype in (torch.float32, torch.float64):
        check_op(op, [(lo.to(dtype), up.to(dtype))], points=4000)
    per_channel = PReLU(lambda: torch.tensor([0.25, -1.5, 3.0, 1.0]))
    check_op(per_channel, [(lo, up)], points=4000)


# ------------------------------------------------------------------ tightness


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_exact_on_points_and_touching(op):
    """Exact on degenerate intervals; CROWN's lines touch f (no slack beyond rounding); the
    default α gives CROWN's lines; IBP is exact (f's extremes)."""
    x = torch.linspace(-8, 8, 641, dtype=torch.float64)
    h, exact, lower, upper = lines_on_grid(op, x, x, points=2)
    assert (upper - lower).max() < 1e-12
    lo, up = random_intervals(gen_of(1))
    h, exact, lower, upper = lines_on_grid(op, lo, up)
    # HardSwish's lower line may touch the parabola between grid points
    off_grid = ((up - lo) / 300) ** 2 / 6 if isinstance(op, HardSwish) else 0
    assert ((upper - exact).min(0).values < 1e-9).all() and ((exact - lower).min(0).values < 1e-9 + off_grid).all()
    base = op.default_alpha(lo.unsqueeze(0), up.unsqueeze(0)).unsqueeze(1)
    tuned = op.relax(lo.reshape(1, 1, -1), up.reshape(1, 1, -1), base)
    plain = op.relax(lo.reshape(1, 1, -1), up.reshape(1, 1, -1))
    assert all(torch.allclose(a, b, atol=1e-9, rtol=1e-9) for a, b in zip(tuned, plain))
    ibp_lo, ibp_up = op.interval((lo, up))
    assert torch.allclose(ibp_lo, exact.min(0).values, atol=1e-12)
    assert torch.allclose(ibp_up, exact.max(0).values, atol=1e-12)


def test_leaky_relu_with_zero_slope_is_relu_and_abs_is_triangle():
    """LeakyReLU(0) gets ReLU's triangle relaxation exactly; Abs's upper line is the chord."""
    lo, up = random_intervals(gen_of(2))
    lo, up = lo.reshape(1, 1, -1), up.reshape(1, 1, -1)
    mine = LeakyReLU(0.0).relax(lo, up)
    relu = ReLU().relax(lo, up)
    assert torch.allclose(mine[0], relu[0]) and torch.allclose(mine[2], relu[2])
    assert torch.allclose(mine[3], relu[3], atol=1e-12) and (mine[1].abs() < 1e-12).all()
    a_l, b_l, a_u, b_u = Abs().relax(lo, up)
    chord = (up.abs() - lo.abs()) / (up - lo).clamp(min=1e-300)
    wide = (up - lo) > 1e-3
    assert torch.allclose(a_u[wide], chord[wide]) and torch.allclose((a_u * lo + b_u)[wide], lo.abs()[wide])


def test_clip_and_hardswish_known_lines():
    # Clip on an interval inside one piece: exact; straddling both kinks: the hull's lines
    op = Clip(c(-1.0), c(1.0))
    lo, up = torch.tensor([[[-0.5, -9.0, 2.0, -2.0]]], dtype=torch.float64), torch.tensor([[[0.5, -3.0, 5.0, 2.0]]])
    a_l, b_l, a_u, b_u = op.relax(lo, up.double())
    assert torch.allclose(a_l[..., :3], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(a_u[..., :3], a_l[..., :3]) and torch.allclose(b_u[..., :3], b_l[..., :3], atol=1e-12)
    # [-2, 2]: area-minimising upper line through (-2, -1) and (1, 1), slope 2/3; lower through (-1, -1), (2, 1)
    assert torch.allclose(a_u[..., 3], torch.tensor(2 / 3, dtype=torch.float64))
    assert torch.allclose(a_u[..., 3] * -2 + b_u[..., 3], torch.tensor(-1.0, dtype=torch.float64))
    assert torch.allclose(a_l[..., 3] * 2 + b_l[..., 3], torch.tensor(1.0, dtype=torch.float64))
    # HardSwish: IBP reaches the minimum -3/8 at -1.5; on [-3, 3] (convex) the upper line is the chord
    hs = HardSwish()
    ibp = hs.interval((torch.tensor([-3.0, -1.0]), torch.tensor([0.0, 1.0])))
    assert abs(ibp[0][0] + 0.375) < 1e-6 and abs(ibp[0][1] - hs.fn(torch.tensor(-1.0))) < 1e-6
    a_l, b_l, a_u, b_u = hs.relax(torch.tensor([[[-3.0]]], dtype=torch.float64),
                                  torch.tensor([[[3.0]]], dtype=torch.float64))
    assert abs(a_u.item() - 0.5) < 1e-9 and abs(b_u.item() - 1.5) < 1e-9
    assert abs(a_l.item() - 0.5) < 1e-9 and abs(b_l.item()) < 1e-9  # the tangent at the midpoint: least area
    # Sign: on [-2, 0] the upper line is the chord h / 2
    a_l, b_l, a_u, b_u = Sign().relax(torch.tensor([[[-2.0]]]), torch.tensor([[[0.0]]]))
    assert abs(a_u.item() - 0.5) < 1e-6 and abs(b_u.item()) < 1e-5 and a_l.item() == 0 and abs(b_l.item() + 1) < 1e-5


# ------------------------------------------------------------------ ONNX end to end


def _save(tmp_path, name: str, nodes, inits, in_shape, out_shape, opset: int = 17):
    return onnx_model_file(tmp_path, name, nodes, inits, in_shape, out_shape, opset)


def _t(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


RNG = np.random.default_rng(0)
W1, B1 = RNG.normal(size=(6, 4)) * 1.5, RNG.normal(size=6)
W2, B2 = RNG.normal(size=(3, 6)), RNG.normal(size=3)
W3 = RNG.normal(size=(6, 4)) * 1.5


def gemm_sandwich(op_nodes: list, extra_inits: list) -> tuple[list, list]:
    """x (1, 4) -> Gemm -> h (1, 6) -> [op nodes: h -> o] -> Gemm -> y (1, 3); a second branch
    g = Gemm(x) is there for binary operators."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Gemm", ["x", "w3"], ["g"], transB=1),
             *op_nodes,
             helper.make_node("Gemm", ["o", "w2", "b2"], ["y"], transB=1)]
    inits = [_t("w1", W1), _t("b1", B1), _t("w2", W2), _t("b2", B2), _t("w3", W3), *extra_inits]
    return nodes, inits


N = helper.make_node
ONNX_CASES = {
    "leaky": ([N("LeakyRelu", ["h"], ["o"], alpha=0.2)], [], "leaky_relu"),
    "leaky-neg": ([N("LeakyRelu", ["h"], ["o"], alpha=-0.5)], [], "leaky_relu"),
    "prelu": ([N("PRelu", ["h", "slope"], ["o"])], [_t("slope", [0.1, -0.3, 1.5, 0.0, 2.0, 0.5])], "prelu"),
    "prelu-scalar": ([N("PRelu", ["h", "slope"], ["o"])], [_t("slope", [0.3])], "prelu"),
    "clip": ([N("Clip", ["h", "lo", "hi"], ["o"])], [_t("lo", -1.0), _t("hi", 1.5)], "clip"),
    "clip-min": ([N("Clip", ["h", "lo"], ["o"])], [_t("lo", -0.5)], "clip"),
    "relu6": ([N("Clip", ["h", "lo", "hi"], ["o"])], [_t("lo", 0.0), _t("hi", 6.0)], "clip"),
    "hardsigmoid": ([N("HardSigmoid", ["h"], ["o"], alpha=0.3, beta=0.4)], [], "hardsigmoid"),
    "hardswish": ([N("HardSwish", ["h"], ["o"])], [], "hardswish"),
    "abs": ([N("Abs", ["h"], ["o"])], [], "abs"),
    "neg": ([N("Neg", ["h"], ["o"])], [], "affine"),
    "sign": ([N("Sign", ["h"], ["o"])], [], "sign"),
    "max": ([N("Max", ["h", "g"], ["o"])], [], "add"),
    "min": ([N("Min", ["h", "g"], ["o"])], [], "sub"),
    "max-const": ([N("Max", ["h", "k"], ["o"])], [_t("k", RNG.normal(size=(1, 6)))], "clip"),
    "min-const": ([N("Min", ["k", "h"], ["o"])], [_t("k", 0.25)], "clip"),
}
NOT_BEATING_IBP = {"sign"}  # constant-ish lines: CROWN may be looser than IBP on a step function


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_operator_end_to_end(tmp_path, case):
    op_nodes, inits, last_kind = ONNX_CASES[case]
    nodes, all_inits = gemm_sandwich(op_nodes, inits)
    path = _save(tmp_path, case.replace("-", "_"), nodes, all_inits, [1, 4], [1, 3])
    bm, x = assert_matches_onnxruntime(path)
    kinds = [n.op.kind for n in bm.graph.nodes[1:]]
    assert last_kind in kinds, kinds
    check_bounds_hold(bm, path, x[:1], 0.6, expect_crown_tighter=case not in NOT_BEATING_IBP)


def check_bounds_hold(bm: BoundedModel, path, centre: torch.Tensor, eps: float, expect_crown_tighter: bool = True,
                      n: int = 2000) -> None:
    """Every method's bounds contain onnxruntime's outputs on n samples of the box (and its corners);
    raw CROWN is no looser than IBP in total."""
    gen = gen_of(3)
    lo, up = centre - eps, centre + eps
    u = torch.rand(n, *centre.shape[1:], generator=gen)
    u[: n // 4] = u[: n // 4].round()
    pts = lo + (up - lo) * u
    ys = torch.from_numpy(run_onnxruntime(path, pts.numpy())).reshape(n, -1)
    widths = {}
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = (t.detach() for t in bm.compute_bounds(lo, up, method=method))
        tol = 1e-5 * (1 + ys.abs())
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), method
        assert (ys >= lb - tol).all() and (ys <= ub + tol).all(), method
        widths[method] = (ub - lb).sum().item()
    raw_lb, raw_ub = bm.compute_bounds(lo, up, method="crown", intersect=False)
    assert (ys >= raw_lb.detach() - tol).all() and (ys <= raw_ub.detach() + tol).all()
    assert widths["alpha-crown"] <= widths["crown"] * 1.001 + 1e-5
    if expect_crown_tighter:  # on a smaller box (on wide ones saturating functions' lines can lose to IBP)
        small = (centre - eps / 4, centre + eps / 4)
        raw_lb, raw_ub = bm.compute_bounds(*small, method="crown", intersect=False)
        ibp_lb, ibp_ub = bm.compute_bounds(*small, method="ibp")
        assert (raw_ub - raw_lb).sum().item() <= (ibp_ub - ibp_lb).sum().item() * 1.001 + 1e-5


def test_onnx_conv_prelu_clip_hardswish(tmp_path):
    """Per-channel PRelu slopes (C, 1, 1) and a Clip between convolutions, then HardSwish."""
    wc = RNG.normal(size=(3, 2, 3, 3)) * 0.3
    wc2 = RNG.normal(size=(2, 3, 3, 3)) * 0.3
    nodes = [N("Conv", ["x", "wc"], ["c1"]), N("PRelu", ["c1", "slope"], ["p"]),
             N("Conv", ["p", "wc2"], ["c2"]), N("Clip", ["c2", "lo", "hi"], ["k"]),
             N("HardSwish", ["k"], ["s"]), N("Flatten", ["s"], ["f"]), N("Gemm", ["f", "wf"], ["y"], transB=1)]
    inits = [_t("wc", wc), _t("wc2", wc2), _t("slope", np.array([0.2, -0.5, 1.5]).reshape(3, 1, 1)),
             _t("lo", -1.0), _t("hi", 2.0), _t("wf", RNG.normal(size=(2, 2 * 2 * 2)))]
    path = _save(tmp_path, "convs", nodes, inits, [1, 2, 6, 6], [1, 2])
    bm, x = assert_matches_onnxruntime(path)
    assert [n.op.kind for n in bm.graph.nodes[1:]][:5] == ["conv", "prelu", "conv", "clip", "hardswish"]
    check_bounds_hold(bm, path, x[:1], 0.3)


class TorchOps(nn.Module):
    """Every torch spelling: modules exported to ONNX (LeakyReLU, PReLU, ReLU6, Hardtanh,
    Hardsigmoid, Hardswish) and functions and methods traced by torch.fx."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(4, 6)
        self.act = {"LeakyReLU": nn.LeakyReLU(0.1), "PReLU": nn.PReLU(6, init=0.3), "ReLU6": nn.ReLU6(),
                    "Hardtanh": nn.Hardtanh(-0.5, 1.5), "Hardsigmoid": nn.Hardsigmoid(),
                    "Hardswish": nn.Hardswish()}.get(kind, nn.Identity())

    def forward(self, x):
        h = self.fc1(x) * 2
        k = self.kind
        if k == "functions":
            o = F.leaky_relu(h, 0.2) + F.relu6(h) + F.hardtanh(h, -1.0, 0.5) + F.hardsigmoid(h) + F.hardswish(h)
            o = o + torch.abs(h) + (-h) + torch.sign(h) + torch.neg(h) + F.prelu(h, torch.tensor([0.5]))
        elif k == "clamps":
            o = torch.clamp(h, -1.0, 2.0) + h.clamp(min=0.5) + h.clip(max=torch.linspace(-1, 1, 6))
            o = o + torch.clamp_min(h, 0.1) + torch.clamp_max(h, 0.3) + h.abs()
        elif k == "maxmin":
            g = self.fc3(x)
            o = torch.maximum(h, g) + torch.minimum(g, h) + torch.maximum(h, torch.tensor(0.2))
            o = o + torch.minimum(torch.linspace(-1, 1, 6), g)
        else:
            o = self.act(h)
        return self.fc2(o)


@pytest.mark.parametrize("kind", ["LeakyReLU", "PReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish"])
def test_torch_modules_exported_to_onnx(tmp_path, kind):
    torch.manual_seed(1)
    model = TorchOps(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model, (torch.rand(1, 4),), str(path), opset_version=17, dynamo=False)
    bm, x = assert_matches_onnxruntime(path)
    check_bounds_hold(bm, path, x[:1], 0.5)


@pytest.mark.parametrize("kind", ["LeakyReLU", "PReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish",
                                  "functions", "clamps", "maxmin"])
def test_torch_fx_spellings(kind):
    torch.manual_seed(2)
    model = TorchOps(kind).eval()
    bm = BoundedModel(model, (4,))
    gen = gen_of(4)
    x = torch.randn(2, 4, generator=gen)
    with torch.no_grad():
        assert torch.allclose(bm(x), model(x), atol=1e-5)
        lo, up = x - 0.4, x + 0.4
        u = torch.rand(2, 1000, 4, generator=gen)
        u[:, :250] = u[:, :250].round()
        ys = model((lo.unsqueeze(1) + (up - lo).unsqueeze(1) * u).reshape(-1, 4)).reshape(2, 1000, -1)
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = (t.detach().unsqueeze(1) for t in bm.compute_bounds(lo, up, method=method))
        tol = 1e-5 * (1 + ys.abs())
        assert (ys >= lb - tol).all() and (ys <= ub + tol).all(), method


def test_prelu_module_weight_is_read_live():
    model = TorchOps("PReLU").eval()
    bm = BoundedModel(model, (4,))
    x = torch.randn(3, 4)
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-1, 2, 6))
        assert torch.allclose(bm(x), model(x), atol=1e-5)


class Variadic(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=x * 0.5)


def test_refusals(tmp_path):
    nodes, inits = gemm_sandwich([N("Max", ["h", "g", "h"], ["o"])], [])
    path = _save(tmp_path, "max3", nodes, inits, [1, 4], [1, 3])
    with pytest.raises(UnsupportedOperator, match="3 operands"):
        BoundedModel(path)
    with pytest.raises(UnsupportedOperator, match="input-dependent"):
        BoundedModel(Variadic(), (4,))
