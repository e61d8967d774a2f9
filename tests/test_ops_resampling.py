"""ConvTranspose and Resize/Upsample: their rules are sound and exact (both are affine), they
load from ONNX files matching onnxruntime, and the ONNX attributes onnx2torch mishandles are
refused.

The operators are checked on random boxes (hypothesis over shapes, strides, paddings, modes
and scales; plus degenerate, huge and infinite boxes), their backward rules against the
forward map (exactness), and small networks end to end with every method.
"""

from __future__ import annotations

import warnings
from unittest.mock import patch

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from certkit.bounds import METHODS, BoundedModel
from certkit.bounds.ops.resampling import ConvTranspose, Resize, unfaithful_nodes
from certkit.errors import UnsupportedOperator
from certkit.ort_session import run_onnxruntime
from tests.conftest import assert_matches_onnxruntime
from tests.op_soundness import check_op, random_boxes
from tests.test_soundness import SETTINGS, check_soundness, gen_of, init_params, random_box

pytestmark = pytest.mark.usefixtures("one_thread")

HYP = dict(SETTINGS, max_examples=25)


# ------------------------------------------------------------------ operator level


def conv_transpose_op(gen: torch.Generator, cin: int, cout: int, k: int, stride: int, padding: int, out_pad: int,
                      dilation: int, groups: int, size: int, spatial: int = 2, bias: bool = True):
    w = torch.randn(cin, cout // groups, *([k] * spatial), generator=gen)
    b = torch.randn(cout, generator=gen) if bias else None
    return ConvTranspose(lambda: (w, b), [stride] * spatial, [padding] * spatial, [out_pad] * spatial,
                         [dilation] * spatial, groups, (cin, *([size] * spatial)))


def assert_exact(op, box, gen: torch.Generator, specs: int = 3) -> None:
    """For an affine operator: Σ A_in·x + bias equals A·op(x) at a point x of the box."""
    lo, up = box
    x = lo + torch.rand(lo.shape, generator=gen, dtype=lo.dtype) * (up - lo)
    y = op.forward(x)
    A = torch.randn(x.shape[0], specs, *y.shape[1:], generator=gen, dtype=x.dtype)
    (A_in,), bias = op.backward(A, [box])
    lhs = (A * y.unsqueeze(1)).flatten(2).sum(-1)
    rhs = (A_in * x.unsqueeze(1)).flatten(2).sum(-1) + (0 if bias is None else bias)
    tol = 1e-9 if x.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(rhs, lhs, rtol=tol, atol=tol * (1 + lhs.abs().max().item()))


@settings(**HYP)
@given(st.integers(0, 10_000), st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 2), st.sampled_from([1, 2]), st.integers(2, 5), st.booleans())
def test_conv_transpose_sound_and_exact(seed, spatial, k, stride, padding, dilation, groups, size, bias):
    gen = gen_of(seed)
    out_pad = int(torch.randint(0, max(stride, dilation), (1,), generator=gen))
    padding = min(padding, dilation * (k - 1))  # torch requires a non-negative output size
    op = conv_transpose_op(gen, 2 * groups, 2 * groups, k, stride, padding, out_pad, dilation, groups, size,
                           spatial, bias)
    box = random_boxes(op.in_shape, 3, gen)
    check_op(op, [box], points=3000)
    box64 = tuple(t.double() for t in box)
    op64 = ConvTranspose(lambda: tuple(None if t is None else t.double() for t in op.raw()), op.stride, op.padding,
                         op.output_padding, op.dilation, op.groups, op.in_shape)
    assert_exact(op64, box64, gen)
    lo, up = op64.interval(box64)  # IBP is exact for a single affine layer: it equals the CROWN bound
    A = torch.eye(lo[0].numel(), dtype=torch.float64).reshape(1, -1, *lo.shape[1:]).expand(lo.shape[0], -1,
                                                                                          *lo.shape[1:])
    (A_in,), b = op64.backward(A, [box64])
    c, r = (box64[0] + box64[1]) / 2, (box64[1] - box64[0]) / 2
    crown_lo = (A_in * c.unsqueeze(1)).flatten(2).sum(-1) - (A_in.abs() * r.unsqueeze(1)).flatten(2).sum(-1)
    crown_lo = crown_lo + (0 if b is None else b)
    torch.testing.assert_close(crown_lo, lo.flatten(1))


def test_conv_transpose_output_padding_beyond_stride():
    """output_padding >= stride (legal with dilation): the adjoint convolution's extra rows are cut."""
    gen = gen_of(1)
    op = conv_transpose_op(gen, 2, 4, 3, stride=1, padding=0, out_pad=1, dilation=2, groups=2, size=4)
    box = random_boxes(op.in_shape, 2, gen)
    check_op(op, [box], points=2000)
    assert_exact(op, box, gen)


RESIZE_2D = [
    dict(mode="nearest", scale_factor=2.0), dict(mode="nearest", scale_factor=(1.5, 0.6)),
    dict(mode="nearest", size=(3, 7)), dict(mode="nearest-exact", scale_factor=1.7),
    dict(mode="bilinear", scale_factor=2.0, align_corners=False),
    dict(mode="bilinear", size=(7, 3), align_corners=True),
    dict(mode="bilinear", scale_factor=(0.5, 2.5), align_corners=False), dict(mode="area", size=(2, 3)),
    dict(mode="bilinear", size=(2, 3), align_corners=False, antialias=True),
]


@settings(**HYP)
@given(st.integers(0, 10_000), st.sampled_from(RESIZE_2D), st.integers(1, 3), st.integers(2, 6),
       st.sampled_from([0.01, 1.0, 3.0, 1e4]))
def test_resize_2d_sound_and_exact(seed, kwargs, channels, size, scale):
    gen = gen_of(seed)
    op = Resize(kwargs, (channels, size, size + 1))
    box = random_boxes(op.in_shape, 3, gen, scale=scale)
    result = check_op(op, [box], points=3000)
    assert_exact(op, tuple(t.double() for t in box), gen)
    lo, up = result["ibp"]  # exact element-wise (a convex combination of the ends)
    torch.testing.assert_close(lo, op.forward(box[0]))
    torch.testing.assert_close(up, op.forward(box[1]))
    assert (result["crown_lower"] <= result["crown_upper"] + 1e-4 * (1 + result["crown_upper"].abs())).all()


@pytest.mark.parametrize("kwargs, shape", [
    (dict(mode="linear", scale_factor=3.0, align_corners=True), (2, 5)),
    (dict(mode="nearest", size=(9,)), (2, 4)),
    (dict(mode="trilinear", scale_factor=2.0, align_corners=False), (1, 2, 3, 2)),
    (dict(mode="nearest", scale_factor=(2.0, 1.0, 3.0)), (1, 2, 2, 2)),
])
def test_resize_1d_3d_sound(kwargs, shape):
    gen = gen_of(2)
    op = Resize(kwargs, shape)
    box = random_boxes(shape, 4, gen)
    check_op(op, [box], points=3000)
    assert_exact(op, tuple(t.double() for t in box), gen)


def test_degenerate_huge_and_infinite_boxes():
    gen = gen_of(3)
    ct = conv_transpose_op(gen, 2, 2, 3, stride=2, padding=1, out_pad=1, dilation=1, groups=1, size=3)
    rs = Resize(dict(mode="bilinear", scale_factor=2.0, align_corners=False), (2, 3, 3))
    x = torch.randn(2, 2, 3, 3, generator=gen)
    for op in (ct, rs):
        lo, up = op.interval((x, x))  # degenerate box: the bounds are the value (up to rounding)
        torch.testing.assert_close(lo, op.forward(x))
        torch.testing.assert_close(up, op.forward(x))
        check_op(op, [(x, x)], points=200)
        check_op(op, [(x - 1e6, x + 1e6)], points=2000, tol=1e-5)
        check_op(op, [(torch.full_like(x, -3e30), torch.full_like(x, 3e30))], points=200)
        inf_lo = x.clone()
        inf_lo[:, 0, 1, 1] = -float("inf")  # an unbounded coordinate: no output bound may be finite and wrong
        lo, up = op.interval((inf_lo, x + 1))
        reach = op.forward(torch.where(torch.isinf(inf_lo), torch.full_like(x, -1e30), x)) < -1e20
        assert not torch.isfinite(lo[reach]).any()
        assert not torch.isnan(lo).any() and not torch.isnan(up).any()  # inf - inf, 0 * inf: unbounded, not NaN
        assert (lo <= op.forward(x) + 1e-5).all() and (up >= op.forward(x + 1) - 1e-5).all()
        nan_lo = x.clone()
        nan_lo[0, 0, 0, 0] = float("nan")  # NaN in: NaN out (never a finite number)
        assert torch.isnan(op.interval((nan_lo, x))[0]).any()


# ------------------------------------------------------------------ ONNX level


def _save(model: onnx.ModelProto, tmp_path, name: str):
    path = tmp_path / f"{name}.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _tensor(name: str, gen: torch.Generator, *shape: int, scale: float = 0.5):
    return numpy_helper.from_array((torch.randn(*shape, generator=gen) * scale).numpy(), name)


def onnx_net(tmp_path, name: str, ct: dict, resize: dict | None, resize_input: str = "scales",
             opset: int = 13):
    """Input (1, 2, 4, 4) → Conv 3×3 → ConvTranspose(**ct) → Relu → [Resize] → Flatten → Gemm(→3)."""
    gen = gen_of(7)
    k = 3
    groups = ct.get("group", 1)
    inits = [_tensor("cw", gen, 4, 2, 3, 3), _tensor("cb", gen, 4),
             _tensor("tw", gen, 4, 4 // groups, k, k), _tensor("tb", gen, 4)]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "tw", "tb"], ["t"], kernel_shape=[k, k], **ct),
             helper.make_node("Relu", ["t"], ["r"])]
    last = "r"
    if resize is not None:
        attrs = {a: v for a, v in resize.items() if a not in ("scales", "sizes")}
        if "scales" in resize:
            inits.append(numpy_helper.from_array(np.array(resize["scales"], np.float32), "scales"))
            ins = ["r", "", "scales"]
        else:
            inits.append(numpy_helper.from_array(np.array(resize["sizes"], np.int64), "sizes"))
            ins = ["r", "", "", "sizes"]
        nodes.append(helper.make_node("Resize", ins, ["z"], **attrs))
        last = "z"
    nodes.append(helper.make_node("Flatten", [last], ["f"]))
    probe = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", opset)]
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(probe, opset_imports=opsets))
    width = inferred.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    inits.append(_tensor("gw", gen, 3, width, scale=1 / width ** 0.5))
    nodes.append(helper.make_node("Gemm", ["f", "gw"], ["y"], transB=1))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), tmp_path, name)


def check_onnx_bounds(path, n: int = 2000, eps: float = 0.05, crown_tighter: bool = True) -> BoundedModel:
    """ORT outputs on ``n`` points of a box around a random input lie inside every method's bounds."""
    bm, x = assert_matches_onnxruntime(path)
    gen = gen_of(11)
    lo, hi = x[:1] - eps, x[:1] + eps
    pts = lo + torch.rand(n, *lo.shape[1:], generator=gen) * (hi - lo)
    pts[:2] = torch.cat([lo, hi])
    ref = torch.from_numpy(run_onnxruntime(path, pts.numpy())).reshape(n, -1)
    widths = {}
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = bm.compute_bounds(lo, hi, method=method)
        lb, ub = lb.detach().reshape(1, -1), ub.detach().reshape(1, -1)
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        slack = 1e-4 * (1 + ref.abs())
        assert (ref >= lb - slack).all() and (ref <= ub + slack).all(), f"{method} bounds violated"
        widths[method] = (ub - lb).sum().item()
    if crown_tighter:
        assert widths["crown"] <= widths["ibp"] * (1 + 1e-4)
        assert widths["alpha-crown"] <= widths["crown"] * (1 + 1e-4)
    return bm


CONV_T = {
    "s2_op1": dict(strides=[2, 2], output_padding=[1, 1], pads=[1, 1, 1, 1]),
    "groups2_dil2": dict(group=2, dilations=[2, 2], pads=[2, 2, 2, 2]),
    "s2_d2_op1": dict(strides=[2, 2], dilations=[2, 2], output_padding=[1, 1], group=2),
    "s3_rect": dict(strides=[3, 1], output_padding=[2, 0], pads=[0, 1, 0, 1]),
}


@pytest.mark.parametrize("name", list(CONV_T))
def test_onnx_conv_transpose(tmp_path, name):
    bm = check_onnx_bounds(onnx_net(tmp_path, name, CONV_T[name], None))
    assert any(isinstance(n.op, ConvTranspose) for n in bm.graph.nodes[1:])


RESIZES = {
    "nearest_scales": dict(scales=[1, 1, 2, 2], mode="nearest", coordinate_transformation_mode="asymmetric",
                           nearest_mode="floor"),
    "nearest_default_x2": dict(scales=[1, 1, 2, 3], mode="nearest"),  # half_pixel, round_prefer_floor: integer up
    "nearest_sizes_down": dict(sizes=[1, 4, 3, 5], mode="nearest", coordinate_transformation_mode="asymmetric",
                               nearest_mode="floor"),
    "linear_scales": dict(scales=[1, 1, 1.5, 2], mode="linear"),
    "linear_sizes_corners": dict(sizes=[1, 4, 11, 6], mode="linear", coordinate_transformation_mode="align_corners"),
    "linear_pytorch_half": dict(sizes=[1, 4, 3, 9], mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
}


@pytest.mark.parametrize("name", list(RESIZES))
def test_onnx_resize(tmp_path, name):
    path = onnx_net(tmp_path, name, dict(strides=[2, 2], output_padding=[1, 1], pads=[1, 1, 1, 1]), RESIZES[name])
    assert not unfaithful_nodes(onnx.load(str(path)))
    bm = check_onnx_bounds(path)
    assert any(isinstance(n.op, Resize) for n in bm.graph.nodes[1:])


@pytest.mark.parametrize("resize, why", [
    (dict(scales=[1, 1, 1.25, 0.75], mode="nearest"), "nearest"),  # half_pixel rounding, non-integer scale
    (dict(scales=[1, 1, 2, 2], mode="linear", coordinate_transformation_mode="asymmetric"), "asymmetric"),
    (dict(scales=[1, 1, 2, 2], mode="nearest", coordinate_transformation_mode="asymmetric",
          nearest_mode="round_prefer_ceil"), "round_prefer_ceil"),
    (dict(scales=[1, 1, 2, 2], mode="linear", coordinate_transformation_mode="tf_half_pixel_for_nn"), "tf_half"),
])
def test_onnx_resize_unfaithful_conversions_named(tmp_path, resize, why):
    """Attribute combinations for which onnx2torch computes another function are named and the
    loader refuses them; each indeed differs from onnxruntime (the unchecked conversion shows it)."""
    path = onnx_net(tmp_path, "bad", dict(strides=[2, 2], output_padding=[1, 1], pads=[1, 1, 1, 1]), resize)
    issues = unfaithful_nodes(onnx.load(str(path)))
    assert len(issues) == 1 and issues[0][1] == "Resize" and why in issues[0][2]
    with pytest.raises(UnsupportedOperator, match="different function"):
        BoundedModel(path)
    with patch("certkit.onnx_io.check_faithful"), pytest.raises(AssertionError):
        assert_matches_onnxruntime(path)


def test_onnx_conv_transpose_output_shape_named(tmp_path):
    path = onnx_net(tmp_path, "oshape", dict(strides=[2, 2], output_shape=[10, 10]), None)
    issues = unfaithful_nodes(onnx.load(str(path)))
    assert issues and issues[0][1] == "ConvTranspose" and "output_shape" in issues[0][2]
    with pytest.raises(UnsupportedOperator, match="output_shape"):
        BoundedModel(path)


def test_onnx_cubic_refused(tmp_path):
    path = onnx_net(tmp_path, "cubic", dict(strides=[1, 1], pads=[1, 1, 1, 1]), dict(scales=[1, 1, 2, 2], mode="cubic"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedOperator, match="cubic"):
            BoundedModel(path)
    assert unfaithful_nodes(onnx.load(str(path)))


class Generator(nn.Module):
    """Linear → reshape → ConvTranspose → ReLU → ConvTranspose → Sigmoid (a small decoder)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4 * 3 * 3)
        self.up1 = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(4, 1, 3, stride=2, padding=1, output_padding=1)

    def forward(self, z):
        h = self.fc(z).reshape(-1, 4, 3, 3)
        return torch.sigmoid(self.up2(torch.relu(self.up1(h)))).flatten(1)


class UpsampleNet(nn.Module):
    def __init__(self, mode: str, align: bool | None):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align)
        self.ct = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, groups=1, dilation=1)
        self.fc = nn.Linear(2 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(self.ct(torch.relu(self.up(self.conv(x)))).flatten(1))


def _export(model: nn.Module, shape, tmp_path, name: str):
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, *shape),), str(path), opset_version=17, dynamo=False)
    return path


@pytest.mark.parametrize("mode, align", [("nearest", None), ("bilinear", False), ("bilinear", True)])
def test_torch_exported_upsample(tmp_path, mode, align):
    model = init_params(UpsampleNet(mode, align), gen_of(4))
    path = _export(model, (2, 4, 4), tmp_path, f"up_{mode}_{align}")
    assert not unfaithful_nodes(onnx.load(str(path)))
    check_onnx_bounds(path)


def test_generator_onnx_end_to_end(tmp_path):
    model = init_params(Generator(), gen_of(5))
    path = _export(model, (6,), tmp_path, "generator")
    check_onnx_bounds(path, eps=0.1)


def test_generator_torch_every_method():
    """The traced torch modules (ConvTranspose2d, sigmoid) with every method, intervals included."""
    gen = gen_of(6)
    model = init_params(Generator(), gen)
    lo, up = random_box((6,), 2, gen, eps_max=0.3)
    check_soundness(model, lo, up, gen, methods=METHODS, n_samples=1000)


class Functional(nn.Module):
    """F.conv_transpose2d with constant weights, F.interpolate and a ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(3, 2, 3, 3, generator=gen_of(8)) * 0.4)
        self.ct1 = nn.ConvTranspose1d(2, 2, 3, stride=2)

    def forward(self, x):
        h = F.conv_transpose2d(x, self.w, None, 2, 1, 1, 1, 1)
        h = F.interpolate(torch.relu(h), scale_factor=1.5, mode="bilinear", align_corners=False)
        h = F.interpolate(h, size=(5, 4), mode="nearest")
        return self.ct1(h.flatten(2)).flatten(1)


def test_functional_torch_every_method():
    gen = gen_of(9)
    model = init_params(Functional(), gen)
    lo, up = random_box((3, 3, 3), 2, gen, eps_max=0.3)
    check_soundness(model, lo, up, gen, methods=METHODS, n_samples=1000)
    kinds = {n.op.kind for n in BoundedModel(model, input_shape=(3, 3, 3)).graph.nodes[1:]}
    assert {"convtranspose", "resize"} <= kinds


def test_bicubic_refused():
    class Cubic(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2.0, mode="bicubic")

    with pytest.raises(UnsupportedOperator, match="bicubic"):
        BoundedModel(Cubic(), input_shape=(1, 3, 3))


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_onnx_upsample_opset9(tmp_path, mode):
    """Upsample (opset 9, upgraded for onnx2torch): nearest is faithful and bounded; linear uses
    asymmetric coordinates, which onnx2torch does not compute: it is named, and indeed differs."""
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["u"], mode=mode), helper.make_node("Flatten", ["u"], ["f"]),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales"),
             _tensor("gw", gen_of(12), 3, 2 * 8 * 12, scale=0.1), _tensor("gb", gen_of(13), 3)]
    graph = helper.make_graph(nodes, "up9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), tmp_path, f"up9_{mode}")
    issues = unfaithful_nodes(onnx.load(str(path)))
    if mode == "nearest":
        assert not issues
        check_onnx_bounds(path, crown_tighter=False)
    else:
        assert issues and "asymmetric" in issues[0][2]
        with pytest.raises(UnsupportedOperator, match="asymmetric"):
            BoundedModel(path)
        with patch("certkit.onnx_io.check_faithful"), pytest.raises(AssertionError):
            assert_matches_onnxruntime(path)
