"""Products of two bounded tensors (Mul, Div, MatMul) and W @ x with a constant W.

Each rule is checked with sampled soundness (IBP, CROWN, and α-CROWN under random α) over
hypothesis-drawn shapes (broadcasting, x·x, attention-shaped matrices) and boxes, on fixed
hard cases (degenerate, straddling zero, huge and infinite widths, NaN), for tightness where
the relaxation is exact, and end to end from small ONNX networks against onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from certkit.bounds import BoundedModel
from certkit.bounds.ops import Activation
from certkit.bounds.ops.bilinear import ConstantMatMul, MatMulBounded, Product
from tests.conftest import assert_matches_onnxruntime
from tests.op_soundness import check_op, random_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float64])


class Tied(Activation):
    """A two-input operator fed the same node twice (the engine sums the two coefficient tensors)."""

    def __init__(self, op: Activation):
        self.op = op
        self.tunable = op.tunable

    def forward(self, x):
        return self.op.forward(x, x)

    def interval(self, b):
        return self.op.interval(b, b)

    def default_alpha(self, lo, up):
        return self.op.default_alpha(lo, up)

    def backward(self, A, in_bounds, **kw):
        (a1, a2), bias = self.op.backward(A, [in_bounds[0], in_bounds[0]], **kw)
        return [a1 + a2], bias


def boxes_of(shapes, batch: int, seed: int, scale: float, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [random_boxes(s, batch, gen, scale=scale, dtype=dtype) for s in shapes]


# ------------------------------------------------------------------ element-wise product


@st.composite
def broadcast_shapes(draw):
    """Two per-sample shapes broadcasting against each other (a lower rank left-padded)."""
    out = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    b = [s if draw(st.booleans()) else 1 for s in out]
    b = b[draw(st.integers(0, len(b) - 1)):]  # drop leading axes
    return (tuple(out), tuple(b)) if draw(st.booleans()) else (tuple(b), tuple(out))


@settings(**SETTINGS, max_examples=25)
@given(broadcast_shapes(), st.sampled_from([0.1, 1.0, 5.0]), DTYPES, st.integers(0, 999))
def test_product_sound(shapes, scale, dtype, seed):
    check_op(Product(*shapes), boxes_of(shapes, 4, seed, scale, dtype), points=4000)


@settings(**SETTINGS, max_examples=15)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.sampled_from([0.1, 1.0, 5.0]), DTYPES,
       st.booleans(), st.integers(0, 999))
def test_square_sound(shape, scale, dtype, same, seed):
    """x * x: the square's rule, and the general product fed one node twice."""
    shape = tuple(shape)
    check_op(Tied(Product(shape, shape, same=same)), boxes_of([shape], 4, seed, scale, dtype), points=4000)


def test_se_gate_product():
    """Squeeze-excitation: x (C, H, W) times a per-channel gate s (C, 1, 1), in both orders."""
    x_box, s_box = boxes_of([(4, 3, 3), (4, 1, 1)], 6, 1, 2.0)
    check_op(Product((4, 3, 3), (4, 1, 1)), [x_box, s_box])
    check_op(Product((4, 1, 1), (4, 3, 3)), [s_box, x_box])
    out = Product((4, 3, 3), (4, 1, 1)).forward(x_box[0], s_box[0])
    assert out.shape == (6, 4, 3, 3)


def hard_boxes(dtype):
    """Degenerate, straddling, one-signed, touching 0 and huge intervals, paired every way."""
    big = 1e15 if dtype == torch.float32 else 1e150
    ends = torch.tensor([[0.0, 0.0], [2.0, 2.0], [-3.0, -3.0], [-1.0, 1.0], [-0.1, 5.0], [1.0, 3.0],
                         [-4.0, -2.0], [0.0, 2.0], [-2.0, 0.0], [-big, big], [1.0, big], [-big, -1.0],
                         [-1e-30, 1e-30], [5.0, 5.0 + 1e-6]], dtype=torch.float64)
    n = ends.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x, y = ends[i.reshape(-1)], ends[j.reshape(-1)]
    return [(x[:, 0].reshape(-1, 1).to(dtype), x[:, 1].reshape(-1, 1).to(dtype)),
            (y[:, 0].reshape(-1, 1).to(dtype), y[:, 1].reshape(-1, 1).to(dtype))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_product_hard_cases(dtype):
    boxes = hard_boxes(dtype)
    check_op(Product((1,), (1,)), boxes, points=20_000, specs=2)
    check_op(Tied(Product((1,), (1,), same=True)), boxes[:1], points=2000, specs=2)
    check_op(MatMulBounded((1, 1), (1, 1), (1,), (1,), (1,)), boxes, points=20_000, specs=2)


def test_product_infinite_and_nan_bounds():
    """An infinite or NaN bound never yields a finite bound for the rows that use it (and no NaN)."""
    inf, nan = math.inf, math.nan
    xl = torch.tensor([[-inf, 1.0, nan, 0.0]])
    xu = torch.tensor([[1.0, inf, 1.0, 0.0]])
    yl = torch.tensor([[1.0, 2.0, 1.0, -inf]])
    yu = torch.tensor([[2.0, 3.0, 2.0, inf]])
    op = Product((4,), (4,))
    lo, up = op.interval((xl, xu), (yl, yu))
    assert lo[0, 0] == -inf and up[0, 1] == inf and lo[0, 2].isnan() and lo[0, 3] == 0 and up[0, 3] == 0
    A = torch.eye(4).reshape(1, 4, 4)
    for alpha in (None, torch.rand(1, 4, 4, 2)):
        kw = {} if alpha is None else {"alpha": alpha}
        for sign in (1, -1):
            (ax, ay), bias = op.backward(sign * A, [(xl, xu), (yl, yu)], **kw)
            assert not bias.isnan().any() and not ax.isnan().any() and not ay.isnan().any()
            assert (bias[0, :4] == -inf).all()  # every row touches a non-finite bound
    # a square of an unbounded interval
    sq = Product((1,), (1,), same=True)
    box = (torch.tensor([[-inf]]), torch.tensor([[1.0]]))
    lo, up = sq.interval(box, box)
    assert lo.item() == 0 and up.item() == inf
    # matrices: an unbounded entry spoils its row of the output only
    mm = MatMulBounded((2, 2), (2, 2))
    xl, xu = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    xu[0, 0, 1] = inf
    lo, up = mm.interval((xl, xu), (torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)))
    assert (up[0, 0] == inf).all() and (lo[0, 0] == -inf).all() and torch.isfinite(lo[0, 1]).all()
    assert torch.isfinite(up[0, 1]).all()
    (ax, ay), bias = mm.backward(torch.eye(4).reshape(1, 4, 2, 2), [(xl, xu), (torch.ones(1, 2, 2),
                                                                             2 * torch.ones(1, 2, 2))])
    assert (bias[0, :2] == -inf).all() and torch.isfinite(bias[0, 2:]).all()


def test_product_tightness():
    """Exact for degenerate boxes and for a single output over its operands' box (CROWN's t); the
    square's upper line is the chord and its lower bound exact."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    res = check_op(Product((5,), (5,)), [(x, x), (y, y)], points=100, specs=3)
    exact = (res["A"] * (x * y).unsqueeze(1)).flatten(2).sum(-1)
    assert torch.allclose(res["crown_lower"], exact, atol=1e-12) and torch.allclose(res["crown_upper"], exact,
                                                                                       atol=1e-12)
    # single outputs: CROWN with CROWN's t is as tight as IBP (which is exact for one product)
    (xl, xu), (yl, yu) = boxes_of([(6,), (6,)], 20, 4, 2.0, torch.float64)
    eye = torch.eye(6, dtype=torch.float64).expand(20, 6, 6)
    op = Product((6,), (6,))
    ibp_lo, ibp_up = op.interval((xl, xu), (yl, yu))
    (ax, ay), bias = op.backward(eye, [(xl, xu), (yl, yu)])
    lower = bias + (ax.clamp(min=0) * xl.unsqueeze(1) + ax.clamp(max=0) * xu.unsqueeze(1)
                    + ay.clamp(min=0) * yl.unsqueeze(1) + ay.clamp(max=0) * yu.unsqueeze(1)).sum(-1)
    assert torch.allclose(lower, ibp_lo, rtol=1e-9, atol=1e-9)
    # the square: exact lower bound and chord upper bound over the box
    sq = Tied(Product((6,), (6,), same=True))
    ibp_lo, ibp_up = sq.interval((xl, xu))
    low, high = _single_bounds(sq, xl, xu)
    assert torch.allclose(low, ibp_lo, atol=1e-9) and torch.allclose(high, ibp_up, rtol=1e-9, atol=1e-9)


def _single_bounds(op, lo, up):
    """CROWN bounds of each output of a one-input op on its own box."""
    n = lo.shape[1]
    eye = torch.eye(n, dtype=lo.dtype).expand(lo.shape[0], n, n)
    out = []
    for sign in (1, -1):
        (a,), bias = op.backward(sign * eye, [(lo, up)])
        lb = bias + (a.clamp(min=0) * lo.unsqueeze(1) + a.clamp(max=0) * up.unsqueeze(1)).sum(-1)
        out.append(sign * lb)
    return out


# ------------------------------------------------------------------ matrix products


@st.composite
def matmul_shapes(draw):
    """Matrix views X (..., n, k), Y (..., k, m) with broadcast batch axes."""
    n, k, m = (draw(st.integers(1, 5)) for _ in range(3))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    bx = tuple(s if draw(st.booleans()) else 1 for s in batch)
    by = tuple(s if draw(st.booleans()) else 1 for s in batch)
    return (*bx, n, k), (*by, k, m)


@settings(**SETTINGS, max_examples=25)
@given(matmul_shapes(), st.sampled_from([0.1, 1.0, 4.0]), DTYPES, st.integers(0, 999))
def test_matmul_sound(shapes, scale, dtype, seed):
    check_op(MatMulBounded(*shapes), boxes_of(shapes, 3, seed, scale, dtype), points=3000)


def test_attention_matmuls():
    """Q·Kᵀ (2 heads, 5 tokens, dim 4) and weights·V, with weights in [0, 1] as after a softmax."""
    q, kt = boxes_of([(2, 5, 4), (2, 4, 5)], 4, 5, 1.0)
    check_op(MatMulBounded((2, 5, 4), (2, 4, 5)), [q, kt])
    gen = torch.Generator().manual_seed(6)
    c = torch.rand(4, 2, 5, 5, generator=gen)
    r = 0.2 * torch.rand(4, 2, 5, 5, generator=gen)
    weights = ((c - r).clamp(min=0), (c + r).clamp(max=1))
    (v,) = boxes_of([(2, 5, 4)], 4, 7, 1.0)
    check_op(MatMulBounded((2, 5, 5), (2, 5, 4)), [weights, v])
    # an operand whose per-sample shape leaves out its leading size-1 axis, against one that keeps it
    x, y = boxes_of([(5, 4), (2, 4, 3)], 4, 8, 1.0)
    check_op(MatMulBounded((1, 5, 4), (2, 4, 3), (5, 4), (2, 4, 3), (2, 5, 3)), [x, y])


def test_matmul_tightness():
    """Degenerate boxes are exact; CROWN's t is at least as tight as IBP on single outputs in aggregate,
    and the centred planes' CROWN bound of one output equals the first-order formula."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 5, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    op = MatMulBounded((2, 5, 4), (2, 4, 5))
    res = check_op(op, [(x, x), (y, y)], points=30, specs=3)
    exact = (res["A"] * (x @ y).unsqueeze(1)).flatten(2).sum(-1)
    assert torch.allclose(res["crown_lower"], exact, atol=1e-10) and torch.allclose(res["crown_upper"], exact,
                                                                                       atol=1e-10)
    (xl, xu), (yl, yu) = boxes_of([(5, 4), (4, 5)], 10, 10, 2.0, torch.float64)
    op = MatMulBounded((5, 4), (4, 5))
    eye = torch.eye(25, dtype=torch.float64).expand(10, 25, 25).reshape(10, 25, 5, 5)
    ibp_lo, ibp_up = op.interval((xl, xu), (yl, yu))
    widths = {}
    for name, alpha in (("crown", None), ("centred", torch.full((10, 50, 5, 5, 2), 0.5, dtype=torch.float64))):
        A = torch.cat([eye, -eye], 1)
        (ax, ay), bias = op.backward(A, [(xl, xu), (yl, yu)], **({} if alpha is None else {"alpha": alpha}))
        lb = bias + (ax.clamp(min=0) * xl.unsqueeze(1) + ax.clamp(max=0) * xu.unsqueeze(1)).flatten(2).sum(-1) \
            + (ay.clamp(min=0) * yl.unsqueeze(1) + ay.clamp(max=0) * yu.unsqueeze(1)).flatten(2).sum(-1)
        widths[name] = (-lb[:, 25:] - lb[:, :25]).sum()
        if name == "centred":  # A·XY >= (A cyᵀ)·X + (cxᵀ A)·Y − A·cxcy − |A|·rxry, over the box:
            # cxcy − |cx|ry − rx|cy| − rxry
            cx, rx = (xl + xu) / 2, (xu - xl) / 2
            cy, ry = (yl + yu) / 2, (yu - yl) / 2
            formula = cx @ cy - (cx.abs() @ ry + rx @ cy.abs() + rx @ ry)
            assert torch.allclose(lb[:, :25], formula.reshape(10, 25), rtol=1e-9, atol=1e-9)
    assert widths["crown"] <= (ibp_up - ibp_lo).sum() * (1 + 1e-9)
    assert widths["crown"] <= widths["centred"] * (1 + 1e-9)


@pytest.mark.parametrize("op, shapes", [(Product((3, 4), (1, 4)), [(3, 4), (1, 4)]),
                                        (Product((3, 4), (3, 4), same=True), [(3, 4), (3, 4)]),
                                        (MatMulBounded((2, 3, 4), (2, 4, 5)), [(2, 3, 4), (2, 4, 5)])])
def test_default_alpha_is_crowns_choice(op, shapes):
    """Given both operands' bounds, default_alpha reproduces CROWN's choice (alpha=None) exactly."""
    boxes = boxes_of(shapes, 3, 11, 2.0, torch.float64)
    if op.__class__ is Product and op.same:
        boxes[1] = boxes[0]
    A = torch.randn(3, 4, *op.out_shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    alpha = op.default_alpha(*boxes[0], *boxes[1]).unsqueeze(1).expand(3, 4, *op.out_shape, 2)
    plain, tuned = op.backward(A, boxes), op.backward(A, boxes, alpha=alpha)
    for a, b in zip(plain[0], tuned[0]):
        assert torch.allclose(a, b)
    assert torch.allclose(plain[1], tuned[1])


@settings(**SETTINGS, max_examples=12)
@given(matmul_shapes(), DTYPES, st.integers(0, 999))
def test_constant_matmul_sound(shapes, dtype, seed):
    w_shape, x_shape = shapes
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(w_shape, generator=gen, dtype=dtype)
    op = ConstantMatMul(w, x_shape)
    res = check_op(op, boxes_of([x_shape], 3, seed, 2.0, dtype), points=2000)
    # affine: CROWN is exact, lower == upper for degenerate boxes and <= IBP width in general
    assert (res["crown_upper"] - res["crown_lower"] >= -1e-4).all()


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        MatMulBounded((2, 3), (4, 5))
    with pytest.raises(ValueError):
        ConstantMatMul(torch.ones(3), (3, 2))
    with pytest.raises(ValueError):
        Product((2,), (3,), same=True)


# ------------------------------------------------------------------ ONNX networks


def _init(name: str, shape, gen: np.random.Generator, scale: float = 0.5):
    return numpy_helper.from_array((gen.standard_normal(shape) * scale).astype(np.float32), name)


def _save(tmp_path, name, nodes, inits, in_shape, out_shape):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def mul_net(tmp_path, square: bool = False):
    """Gemm → (h1, h2) → Mul → Gemm; with ``square`` Mul(h1, h1)."""
    g = np.random.default_rng(0)
    inits = [_init("w1", (8, 6), g), _init("b1", (8,), g), _init("w2", (8, 6), g), _init("b2", (8,), g),
             _init("w3", (3, 8), g), _init("b3", (3,), g)]
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], transB=1),
             helper.make_node("Gemm", ["input", "w2", "b2"], ["h2"], transB=1),
             helper.make_node("Mul", ["h1", "h1" if square else "h2"], ["p"]),
             helper.make_node("Gemm", ["p", "w3", "b3"], ["output"], transB=1)]
    return _save(tmp_path, "square" if square else "mul", nodes, inits, [1, 6], [1, 3])


def se_net(tmp_path):
    """Conv → x (4, 6, 6); Conv over the whole map → Sigmoid → s (4, 1, 1); x·s; Flatten → Gemm."""
    g = np.random.default_rng(1)
    inits = [_init("c1", (4, 2, 3, 3), g), _init("cb1", (4,), g), _init("c2", (4, 4, 6, 6), g, 0.1),
             _init("cb2", (4,), g), _init("w", (3, 144), g, 0.1), _init("b", (3,), g)]
    nodes = [helper.make_node("Conv", ["input", "c1", "cb1"], ["x"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "c2", "cb2"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["gated"]),
             helper.make_node("Flatten", ["gated"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["output"], transB=1)]
    return _save(tmp_path, "se", nodes, inits, [1, 2, 6, 6], [1, 3])


def div_net(tmp_path):
    """Gemm → a; Gemm → Sigmoid → +1 → b in [1, 2]; a / b → Gemm."""
    g = np.random.default_rng(2)
    inits = [_init("w1", (5, 4), g), _init("b1", (5,), g), _init("w2", (5, 4), g), _init("b2", (5,), g),
             _init("w3", (2, 5), g), _init("b3", (2,), g), numpy_helper.from_array(np.ones(1, np.float32), "one")]
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["a"], transB=1),
             helper.make_node("Gemm", ["input", "w2", "b2"], ["z"], transB=1),
             helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("Add", ["s", "one"], ["b"]),
             helper.make_node("Div", ["a", "b"], ["q"]),
             helper.make_node("Gemm", ["q", "w3", "b3"], ["output"], transB=1)]
    return _save(tmp_path, "div", nodes, inits, [1, 4], [1, 2])


def attention_net(tmp_path):
    """One attention block: x (5 tokens, dim 8) → Q, K, V (2 heads, dim 4) by MatMul with constants,
    Q·Kᵀ → Sigmoid (weights in [0, 1]) → ·V → heads merged → MatMul; plus a constant W @ V."""
    g = np.random.default_rng(3)
    inits = [_init(n, (8, 8), g) for n in ("wq", "wk", "wv", "wo")] + [
        numpy_helper.from_array(np.array([1, 5, 2, 4], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([1, 5, 8], np.int64), "merge_heads"),
        _init("mix", (5, 5), g)]
    nodes = [helper.make_node("MatMul", ["input", "wq"], ["q0"]),
             helper.make_node("MatMul", ["input", "wk"], ["k0"]),
             helper.make_node("MatMul", ["input", "wv"], ["v0"]),
             helper.make_node("Reshape", ["q0", "split_heads"], ["q1"]),
             helper.make_node("Reshape", ["k0", "split_heads"], ["k1"]),
             helper.make_node("Reshape", ["v0", "split_heads"], ["v1"]),
             helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Sigmoid", ["scores"], ["weights"]),
             helper.make_node("MatMul", ["weights", "v"], ["att"]),
             helper.make_node("MatMul", ["mix", "v"], ["mixed"]),  # a constant matrix on the left
             helper.make_node("Add", ["att", "mixed"], ["att2"]),
             helper.make_node("Transpose", ["att2"], ["att3"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["att3", "merge_heads"], ["merged"]),
             helper.make_node("MatMul", ["merged", "wo"], ["output"])]
    return _save(tmp_path, "attention", nodes, inits, [1, 5, 8], [1, 5, 8])


NETS = {"mul": mul_net, "square": lambda p: mul_net(p, square=True), "se": se_net, "div": div_net,
        "attention": attention_net}
EXPECTED = {"mul": {"Product"}, "square": {"Product"}, "se": {"Product"}, "div": {"Product", "Reciprocal"},
            "attention": {"MatMulBounded", "ConstantMatMul"}}


@pytest.mark.parametrize("name", list(NETS))
def test_onnx_network_bounds(tmp_path, name):
    if name == "div":
        from certkit.bounds.ops import smooth

        if not hasattr(smooth, "Reciprocal"):
            pytest.skip("smooth.Reciprocal not written yet")
    path = NETS[name](tmp_path)
    bm, x = assert_matches_onnxruntime(path)
    kinds = {type(n.op).__name__ for n in bm.graph.nodes[1:]}
    assert EXPECTED[name] <= kinds
    assert all(n.op.same == (name == "square") for n in bm.graph.nodes[1:] if isinstance(n.op, Product))
    check_box(bm, x[:1])


def check_box(bm: BoundedModel, centre: torch.Tensor, eps: float = 0.05):
    """Every method's bounds on [centre ± eps] contain 2000 sampled outputs; raw CROWN beats IBP."""
    gen = torch.Generator().manual_seed(0)
    lo, hi = centre - eps, centre + eps
    pts = lo + (hi - lo) * torch.rand(2000, *centre.shape[1:], generator=gen)
    pts[:2] = torch.stack([lo[0], hi[0]])
    with torch.no_grad():
        ys = bm(pts).reshape(2000, -1)
    widths = {}
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = bm.compute_bounds(lo, hi, method=method)
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        slack = 1e-5 * (1 + ys.abs())
        assert (ys >= lb - slack).all(), f"{method}: lower bound violated by {(lb - ys).max():.3g}"
        assert (ys <= ub + slack).all(), f"{method}: upper bound violated by {(ys - ub).max():.3g}"
        widths[method] = (ub - lb).sum().item()
    # raw CROWN (not intersected with IBP) is tighter than IBP on these small boxes
    with torch.no_grad():
        bounds = bm.intervals(lo, hi, "crown")
        lb, ub = bm.spec_bounds(bounds, None, "crown", intersect=False)
    assert (ub - lb).sum().item() <= widths["ibp"]
    assert widths["alpha-crown"] <= widths["crown"] * (1 + 1e-6)


class TorchAttention(torch.nn.Module):
    """A traced torch module: x·x (fx ``mul`` of one node), torch.bmm and ``@`` of two activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):  # x (B, 5, 4)
        q, k = self.q(x), self.k(x)
        scores = torch.sigmoid(torch.bmm(q, k.transpose(1, 2)))  # (B, 5, 5)
        att = scores @ (q * q)
        return self.out(att).flatten(1)


def test_torch_module_products():
    bm = BoundedModel(TorchAttention(), input_shape=(5, 4))
    kinds = [type(n.op).__name__ for n in bm.graph.nodes[1:]]
    assert kinds.count("MatMulBounded") == 2 and "Product" in kinds
    assert any(isinstance(n.op, Product) and n.op.same for n in bm.graph.nodes[1:])
    check_box(bm, torch.rand(1, 5, 4, generator=torch.Generator().manual_seed(1)))
