"""Sigmoid, Tanh, MaxPool2d and Pad: their rules are sound, reasonably tight, and load from ONNX.

The S-shaped relaxations are checked line by line on a dense grid of each interval (wide,
narrow, degenerate, one-signed and straddling ones); MaxPool's and Pad's backward rules
against sampled inputs of random boxes; and small random networks built from them end to
end with every method (samples, corners and every node's interval inside the bounds). The
two VNN-COMP networks that use these operators must match onnxruntime and get sound bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from certkit.bounds import METHODS, BoundedModel, ops
from certkit.errors import UnsupportedOperator
from certkit.ort_session import run_onnxruntime
from tests.conftest import VNNCOMP, assert_matches_onnxruntime, onnx_model_file
from tests.test_soundness import SETTINGS, check_soundness, gen_of, init_params, random_box

pytestmark = pytest.mark.usefixtures("one_thread")

S_SHAPED = [ops.Sigmoid(), ops.Tanh()]


def s_boxes(gen: torch.Generator, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of every kind: centres up to ±40, widths from 0 (l == u) to 60, plus fixed cases."""
    centre = torch.randn(n, generator=gen) * torch.tensor([0.5, 3.0, 15.0])[torch.randint(0, 3, (n,), generator=gen)]
    width = torch.tensor([0.0, 1e-7, 1e-5, 1e-3, 0.1, 1.0, 5.0, 60.0])[torch.randint(0, 8, (n,), generator=gen)]
    width = width * torch.rand(n, generator=gen)
    fixed = torch.tensor([[-3.0, -1.0], [1.0, 3.0], [-1.0, 1.0], [-0.1, 8.0], [-8.0, 0.1], [-40.0, -39.0],
                          [39.0, 40.0], [0.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [-30.0, 30.0], [5.0, 5.0]])
    return torch.cat([centre - width / 2, fixed[:, 0]]), torch.cat([centre + width / 2, fixed[:, 1]])


def check_lines(op: ops.SShaped, lo: torch.Tensor, up: torch.Tensor, points: int = 401,
                alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The relaxation lines (tangent points ``alpha``) against fn on a dense grid of each [lo, up],
    in float64 and in float32."""
    a_l, b_l, a_u, b_u = op.relax(lo, up, alpha)
    assert a_l.dtype == lo.dtype and all(torch.isfinite(t).all() for t in (a_l, b_l, a_u, b_u))
    h = lo + (up - lo) * torch.linspace(0, 1, points).unsqueeze(1)
    h = torch.cat([torch.minimum(torch.maximum(h, lo), up), lo.unsqueeze(0), up.unsqueeze(0)])  # rounding
    exact = op.fn(h.double())
    lower = a_l.double() * h.double() + b_l.double()
    upper = a_u.double() * h.double() + b_u.double()
    assert (lower <= exact).all(), f"lower line above fn by {(lower - exact).max().item():.3g}"
    assert (upper >= exact).all(), f"upper line below fn by {(exact - upper).max().item():.3g}"
    y32 = op.fn(h)  # and as evaluated in float32
    assert (a_l * h + b_l <= y32 + 1e-7).all() and (a_u * h + b_u >= y32 - 1e-7).all()
    # IBP: fn of the end points encloses fn on the interval
    ibp_lo, ibp_up = op.interval((lo, up))
    assert (ibp_lo <= y32).all() and (y32 <= ibp_up).all()
    return lower, upper, exact


# ------------------------------------------------------------------ element-wise relaxations


@pytest.mark.parametrize("op", S_SHAPED, ids=lambda o: o.kind)
def test_sshaped_relaxation_sound_on_dense_grid(op):
    lo, up = s_boxes(gen_of(0))
    check_lines(op, lo, up)
    check_lines(op, lo.double(), up.double())


@settings(**SETTINGS, max_examples=60)
@given(st.sampled_from(S_SHAPED), st.floats(-50, 50), st.floats(0, 30) | st.sampled_from([0.0, 1e-7, 1e-4]))
def test_sshaped_relaxation_sound_hypothesis(op, centre, width):
    lo = torch.tensor([centre - width / 2, centre - width, centre], dtype=torch.float32)
    check_lines(op, lo, torch.tensor([centre + width / 2, centre, centre + width], dtype=torch.float32))


@pytest.mark.parametrize("op", S_SHAPED, ids=lambda o: o.kind)
def test_sshaped_relaxation_sound_for_every_alpha(op):
    """α-CROWN's tangent points: any α (clamped to [0, 1]) gives sound lines, and the default α
    gives CROWN's lines."""
    gen = gen_of(2)
    lo, up = s_boxes(gen)
    for dtype in (torch.float32, torch.float64):
        l_, u_ = lo.to(dtype), up.to(dtype)
        for alpha in (torch.rand(*lo.shape, 2, generator=gen) * 2 - 0.5, torch.zeros(*lo.shape, 2),
                      torch.ones(*lo.shape, 2)):
            check_lines(op, l_, u_, alpha=alpha.to(dtype))
        default = op.relax(l_, u_, op.default_alpha(l_, u_))
        assert all(torch.equal(a, b) for a, b in zip(default, op.relax(l_, u_)))
    # the tangent points move: on [1, 3] (concave) α = 0 and 1 touch fn at 1 and 3
    lower, upper, exact = check_lines(op, torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]),
                                      alpha=torch.tensor([[0.0, 0.5], [1.0, 0.5]]))
    assert abs(upper[-2, 0] - exact[-2, 0]) < 1e-5 and abs(upper[-1, 1] - exact[-1, 1]) < 1e-5


@pytest.mark.parametrize("op", S_SHAPED, ids=lambda o: o.kind)
def test_sshaped_relaxation_tight(op):
    """Exact at points; at most the IBP gap on narrow intervals; chords touch fn at both ends."""
    x = torch.linspace(-20, 20, 801)
    lower, upper, exact = check_lines(op, x, x)
    assert (upper - lower).max() < 1e-5
    lo, up = s_boxes(gen_of(1))
    narrow = (up - lo) <= 0.1
    lower, upper, exact = check_lines(op, lo[narrow], up[narrow])
    f_lo, f_up = op.fn(lo[narrow].double()), op.fn(up[narrow].double())
    assert ((upper - lower).max(0).values <= f_up - f_lo + 1e-5).all()
    # convex side: the upper line is the chord, the lower a tangent (touches fn inside)
    lo, up = torch.tensor([-4.0, -2.0, -1.0]), torch.tensor([-1.0, 0.0, -0.5])
    lower, upper, exact = check_lines(op, lo, up)
    assert torch.allclose(upper[[-2, -1]], exact[[-2, -1]], atol=1e-5)
    assert ((exact - lower).min(0).values < 1e-5).all()
    # straddling: tangents through the end points touch fn at the ends
    lower, upper, exact = check_lines(op, torch.tensor([-5.0]), torch.tensor([5.0]))
    assert abs(upper[-2] - exact[-2]) < 1e-4 and abs(lower[-1] - exact[-1]) < 1e-4


# ------------------------------------------------------------------------ MaxPool and Pad


def sample(lo: torch.Tensor, up: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, n + 2, *shape): uniform points of each box, its lower and upper corner, and for a third
    of the points only the two extremes per coordinate (ties and corners stress max)."""
    u = torch.rand(lo.shape[0], n, *lo.shape[1:], generator=gen)
    u[:, : n // 3] = u[:, : n // 3].round()
    pts = (lo.unsqueeze(1) + (up - lo).unsqueeze(1) * u).clamp(lo.unsqueeze(1), up.unsqueeze(1))
    return torch.cat([pts, lo.unsqueeze(1), up.unsqueeze(1)], 1)


def check_backward(op: ops.Op, lo: torch.Tensor, up: torch.Tensor, gen: torch.Generator, n: int = 400) -> None:
    """IBP encloses op(x), and A·op(x) >= A_in·x + bias for random A of both signs, x in the box."""
    B = lo.shape[0]
    pts = sample(lo, up, n, gen)
    ys = op.forward(pts.flatten(0, 1)).reshape(B, pts.shape[1], -1)
    ibp_lo, ibp_up = op.interval((lo, up))
    assert (ibp_lo.flatten(1).unsqueeze(1) <= ys).all() and (ys <= ibp_up.flatten(1).unsqueeze(1)).all()
    A = torch.randn(B, 5, *ibp_lo.shape[1:], generator=gen)
    A[:, 0] = A[:, 0].abs()
    A[:, 1] = -A[:, 1].abs()
    (A_in,), bias = op.backward(A, [(lo, up)])
    bias = torch.zeros(B, 5) if bias is None else bias
    lhs = torch.einsum("bsk,bnk->bns", A.flatten(2), ys)
    rhs = torch.einsum("bsk,bnk->bns", A_in.flatten(2), pts.flatten(2)) + bias.unsqueeze(1)
    assert (lhs >= rhs - 1e-4 * (1 + lhs.abs())).all(), f"backward rule violated by {(rhs - lhs).max():.3g}"


@st.composite
def pool_configs(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    stride = draw(st.sampled_from([None, 1, 2, (1, 2), 3]))
    dilation = draw(st.sampled_from([1, 2, (2, 1)]))
    pre_pad = draw(st.sampled_from([(0, 0, 0, 0), (0, 1, 0, 1), (1, 0, 2, 0)]))
    pre_pad = tuple(min(p, k[1 - i // 2] - 1) for i, p in enumerate(pre_pad))  # ONNX: pads < kernel
    shape = (draw(st.integers(1, 3)), draw(st.integers(5, 7)), draw(st.integers(5, 7)))
    return dict(kernel_size=k, stride=stride, padding=pad, dilation=dilation, ceil_mode=draw(st.booleans()),
                in_shape=shape, pre_pad=pre_pad)


@settings(**SETTINGS, max_examples=40)
@given(pool_configs(), st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 0.3, 2.0]))
def test_maxpool_rules_sound(cfg, seed, eps):
    gen = gen_of(seed)
    op = ops.MaxPool2d(**cfg)
    C, H, W = cfg["in_shape"]
    assume(not (op.table == H * W).all(0).any())  # a window entirely in the padding: the graph refuses it
    x = torch.randn(2, *cfg["in_shape"], generator=gen)
    lo, up = random_box(cfg["in_shape"], 2, gen, eps)
    check_backward(op, lo, up, gen)
    # the same windows as torch's own pooling on the padded input
    ref = F.max_pool2d(F.pad(x, cfg["pre_pad"], value=-math.inf), cfg["kernel_size"], cfg["stride"],
                       cfg["padding"], cfg["dilation"], cfg["ceil_mode"])
    assert torch.equal(op.forward(x), ref)


def test_maxpool_exact_when_one_element_dominates():
    """Windows whose largest lower bound beats every other upper bound are bounded exactly
    (up to the box width), both for positive and negative coefficients."""
    gen = gen_of(3)
    op = ops.MaxPool2d(2, 2, 0, 1, False, (2, 4, 4))
    x = torch.randn(2, 2, 4, 4, generator=gen) * 10  # well separated values
    A = torch.randn(2, 3, 2, 2, 2, generator=gen)
    true = (A.flatten(2) @ op.forward(x).flatten(1).unsqueeze(-1)).squeeze(-1)
    for eps in (0.0, 1e-3):
        lo, up = x - eps, x + eps
        (A_in,), bias = op.backward(A, [(lo, up)])
        lb = (A_in.flatten(2).clamp(min=0) @ lo.flatten(1).unsqueeze(-1)
              + A_in.flatten(2).clamp(max=0) @ up.flatten(1).unsqueeze(-1)).squeeze(-1) + bias
        assert (lb <= true + 1e-4).all()
        assert (true - lb <= 2 * eps * A.flatten(2).abs().sum(-1) + 1e-4).all()


@pytest.mark.parametrize("pads,value,shape", [((1, 2), 0.0, (3, 4)), ((1, 0, 2, 1), -0.7, (2, 3, 3)),
                                              ((-1, 2, 0, -1), 1.5, (2, 4, 5)), ((0, 0, 0, 0, 1, 1), 2.0, (2, 3, 3))])
def test_pad_rules_exact(pads, value, shape):
    gen = gen_of(4)
    op = ops.Pad(pads, value, shape)
    lo, up = random_box(shape, 2, gen, 1.0)
    check_backward(op, lo, up, gen, n=50)
    check_backward(ops.Pad(pads, value, shape), up.neg(), lo.neg(), gen, n=50)
    x = torch.randn(3, *shape, generator=gen)
    A = torch.randn(3, 2, *op.forward(x).shape[1:], generator=gen)
    (A_in,), bias = op.backward(A, [(x, x)])
    bias = 0 if bias is None else bias
    out = (A.flatten(2) * op.forward(x).flatten(1).unsqueeze(1)).sum(-1)
    assert torch.allclose(out, (A_in.flatten(2) * x.flatten(1).unsqueeze(1)).sum(-1) + bias, atol=1e-5)


# --------------------------------------------------------------------------- networks


class PadConvPool(nn.Module):
    """Pad → Conv → ReLU → MaxPool → Linear, with functional pad and max pooling."""

    def __init__(self, c: int, value: float, hw: int, k: int):
        super().__init__()
        self.value = value
        self.conv = nn.Conv2d(c, 3, 3)
        self.pool = nn.MaxPool2d(2, stride=1, padding=1)
        side = hw + 1  # padded by (1, 1), conv -2, pool +1
        self.fc = nn.Linear(3 * side * side, k)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), value=self.value)
        x = torch.relu(self.conv(x))
        return self.fc(F.max_pool2d(x, 2, stride=1, padding=1).flatten(1))


class FunctionalSTanh(nn.Module):
    """torch.tanh / Tensor.sigmoid called as functions and methods."""

    def __init__(self, d: int, w: int, k: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, w), nn.Linear(w, w), nn.Linear(w, k)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(self.fc1(x).sigmoid())))


def network(kind: str, gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
    d, w, k = (int(v) for v in torch.randint(2, 7, (3,), generator=gen))
    if kind == "sigmoid":
        return nn.Sequential(nn.Linear(d, w), nn.Sigmoid(), nn.Linear(w, k)), (d,)
    if kind == "tanh":
        return nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, k)), (d,)
    if kind == "functional":
        return FunctionalSTanh(d, w, k), (d,)
    if kind == "maxpool":
        pool = nn.MaxPool2d(2, ceil_mode=True)
        return nn.Sequential(nn.Conv2d(2, 3, 3), pool, nn.Flatten(), nn.Linear(3 * 3 * 3, k)), (2, 7, 7)
    if kind == "maxpool-overlap":
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1, dilation=1),
                             nn.Flatten(), nn.Linear(2 * 3 * 3, k), nn.Sigmoid(), nn.Linear(k, 2)), (1, 6, 6)
    return PadConvPool(2, float(torch.randn(1, generator=gen)), 4, k), (2, 4, 4)


KINDS = ["sigmoid", "tanh", "functional", "maxpool", "maxpool-overlap", "pad-conv-maxpool"]


@settings(**SETTINGS, max_examples=24)
@given(st.sampled_from(KINDS), st.sampled_from([0.0, 1e-3, 0.1, 1.0, 3.0]), st.integers(0, 2**31 - 1))
def test_networks_sound(kind, eps, seed):
    """Every method's bounds (plain, margin, raw CROWN) and every node interval hold the samples."""
    gen = gen_of(seed)
    model, shape = network(kind, gen)
    init_params(model, gen)
    lo, up = random_box(shape, 2, gen, eps) if eps else (torch.randn(2, *shape, generator=gen),) * 2
    check_soundness(model, lo, up, gen, n_samples=300)


@pytest.mark.parametrize("kind", KINDS)
def test_crown_tight_on_small_and_point_boxes(kind):
    """Raw CROWN (not intersected) is no looser than IBP on small boxes and exact on points."""
    gen = gen_of(5)
    model, shape = network(kind, gen)
    init_params(model, gen)
    bm = BoundedModel(model, shape)
    x = torch.randn(3, *shape, generator=gen)
    with torch.no_grad():
        y = model(x)
        ilb, iub = bm.compute_bounds(x - 1e-3, x + 1e-3, method="ibp")
        for method in ("crown-ibp", "crown"):
            clb, cub = bm.compute_bounds(x - 1e-3, x + 1e-3, method=method, intersect=False)
            assert ((cub - clb) <= (iub - ilb) * 1.01 + 1e-5).all(), method
            plb, pub = bm.compute_bounds(x, x, method=method, intersect=False)
            assert torch.allclose(plb, y, atol=1e-4) and torch.allclose(pub, y, atol=1e-4), method


def test_dropout_is_identity():
    gen = gen_of(6)
    body = [nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)]
    plain = init_params(nn.Sequential(*body), gen)
    with_dropout = nn.Sequential(body[0], nn.Dropout(0.5), body[1], nn.AlphaDropout(0.2), body[2]).train()
    bm, bd = BoundedModel(plain, (4,)), BoundedModel(with_dropout, (4,))
    kinds = [n.op.kind for n in bd.graph.nodes[1:]]
    assert kinds == [n.op.kind for n in bm.graph.nodes[1:]] == ["linear", "sigmoid", "linear"]
    lo, up = random_box((4,), 2, gen, 0.5)
    for method in METHODS:
        a, b = bm.compute_bounds(lo, up, method=method), bd.compute_bounds(lo, up, method=method)
        assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1]), method


class BadPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2, return_indices=True)[0]


@pytest.mark.parametrize("model,shape,words", [
    (nn.Sequential(nn.ReflectionPad2d(1)), (1, 4, 4), "ReflectionPad2d"),
    (BadPool(), (1, 4, 4), "max_pool2d_with_indices"),
    (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), (1, 4, 4), "return_indices"),
    (nn.Sequential(nn.Flatten(), nn.Unflatten(1, (2, 8)), nn.MaxPool1d(2)), (1, 4, 4), "MaxPool1d"),
])
def test_unsupported_variants_are_refused(model, shape, words):
    with pytest.raises(UnsupportedOperator) as info:
        BoundedModel(model, shape)
    assert words in str(info.value)


class ModePad(nn.Module):
    def __init__(self, mode: str, value: float = 0.0):
        super().__init__()
        self.mode, self.value = mode, value

    def forward(self, x):
        return F.pad(x, (1, 1, 1, 1), mode=self.mode, **({"value": self.value} if self.mode == "constant" else {}))


@pytest.mark.parametrize("mode,value,words", [("reflect", 0.0, "'reflect' padding"),
                                              ("replicate", 0.0, "'replicate' padding"),
                                              ("constant", -math.inf, "non-finite")])
def test_non_constant_padding_is_refused(mode, value, words):
    with pytest.raises(UnsupportedOperator) as info:
        BoundedModel(ModePad(mode, value), (1, 4, 4))
    assert words in str(info.value) and info.value.op_type == "pad"


# ------------------------------------------------------------------------------- ONNX


def _onnx_model(tmp_path, name: str, nodes, inits, in_shape, out_shape, opset: int):
    return onnx_model_file(tmp_path, name, nodes, inits, in_shape, out_shape, opset)


def check_against_onnxruntime(path, eps: float, methods=METHODS, n: int = 300) -> None:
    """Same outputs as onnxruntime; every method's bounds hold onnxruntime's outputs on samples."""
    bm, x = assert_matches_onnxruntime(path)
    shape = bm.graph.input_shape
    lo, up = x[:1] - eps, x[:1] + eps
    pts = lo + (up - lo) * torch.rand(n, *shape)
    pts = torch.cat([pts, lo, up])
    ys = torch.from_numpy(run_onnxruntime(path, pts.numpy())).reshape(len(pts), -1)
    for method in methods:
        lb, ub = bm.compute_bounds(lo, up, method=method)
        lb, ub = lb.detach(), ub.detach()
        tol = 1e-5 * (1 + ys.abs())
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), method
        assert (ys >= lb - tol).all() and (ys <= ub + tol).all(), method


def test_onnx_asymmetric_maxpool_and_dynamic_pad(tmp_path):
    """Opset 13: Pad with its pads as an input (onnx2torch's OnnxPadDynamic), MaxPool with
    asymmetric pads (onnx2torch's -inf OnnxPadStatic + MaxPool2d), Tanh and Sigmoid."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 18], np.random.default_rng(0).normal(size=36).tolist())
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 0, 0, 0, 0, 2])
    value = helper.make_tensor("value", TensorProto.FLOAT, [], [0.25])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 18])
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"], mode="constant"),
             helper.make_node("Tanh", ["p"], ["t"]),
             helper.make_node("MaxPool", ["t"], ["m"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("Reshape", ["m", "shape"], ["r"]),
             helper.make_node("Gemm", ["r", "w"], ["g"], transB=1),
             helper.make_node("Sigmoid", ["g"], ["y"])]
    path = _onnx_model(tmp_path, "padpool", nodes, [w, pads, value, shape], [1, 2, 5, 4], [1, 2], 13)
    bm = BoundedModel(path)
    assert [n.op.kind for n in bm.graph.nodes[1:]] == ["pad", "tanh", "maxpool", "reshape", "linear", "sigmoid"]
    check_against_onnxruntime(path, 0.2)


SIGMOID_NET = VNNCOMP / "eran_2021" / "onnx" / "ffnnSIGMOID__Point_6x200.onnx"
MAXPOOL_NET = VNNCOMP / "verivital_2021" / "onnx" / "Convnet_maxpool.onnx"
AVGPOOL_NET = VNNCOMP / "verivital_2021" / "onnx" / "Convnet_avgpool.onnx"


@pytest.mark.parametrize("path,kinds,methods", [
    (SIGMOID_NET, {"sigmoid"}, METHODS),
    (MAXPOOL_NET, {"maxpool"}, ("ibp", "crown-ibp", "crown")),
    (AVGPOOL_NET, {"pad"}, ("ibp", "crown-ibp", "crown")),
], ids=lambda v: v.name if hasattr(v, "name") else None)
def test_real_networks_load_match_onnxruntime_and_are_sound(path, kinds, methods, vnncomp_dir):
    bm = BoundedModel(path)
    assert kinds <= {n.op.kind for n in bm.graph.nodes[1:]}
    check_against_onnxruntime(path, 0.01, methods)
