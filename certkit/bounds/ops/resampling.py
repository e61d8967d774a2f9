"""ConvTranspose and resizing (Resize, Upsample, interpolate).

Both are affine in the input, so CROWN's backward rule is exact:

- a transposed convolution's adjoint is the convolution with the same kernel (stride,
  padding, dilation and groups alike); its IBP rule is the centre/radius form with |W|;
- a resize (nearest, linear/bilinear/trilinear with or without aligned corners, area) is a
  linear map whose weights are all non-negative, hence monotone: IBP resizes both ends
  (exact element-wise), and the backward rule is the vector-Jacobian product of the
  resize. Cubic interpolation has negative weights and is refused.

onnx2torch does not implement every ONNX attribute of these operators faithfully (nearest
rounding modes, some coordinate transformations, ``output_shape``): :func:`onnx_node_issue`
names the ONNX nodes whose conversion would compute a different function, for the loader
to refuse them before any bound is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from certkit.bounds.ops.base import Monotone, Op, adjoint, center_radius, dims
from certkit.bounds.ops.registry import Ctx, register

# ------------------------------------------------------------------ transposed convolution

_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d}
_ADJOINT = {1: F.conv1d, 2: F.conv2d}


class ConvTranspose(Op):
    """1-D or 2-D transposed convolution with weights ``(C_in, C_out / groups, *kernel)`` (any
    stride, padding, output padding, dilation and groups).

    IBP: y = W ⊛ᵀ c + b ± |W| ⊛ᵀ r with c, r the box's centre and radius (exact for one layer).
    CROWN: A·y = (conv(A, W))·x + Σ_channels (Σ_positions A)·b exactly, where conv is the
    convolution with the same kernel, stride, padding, dilation and groups, i.e. the adjoint
    of the transposed convolution (it maps the C_out output channels back to the C_in input
    channels). When the output padding is at least the stride (allowed with dilation), the
    convolution yields extra trailing positions, which correspond to no input and are cut.
    """

    kind = "convtranspose"
    affine = True
    mixing = True

    def __init__(self, params: Callable[[], tuple[Tensor, Tensor | None]], stride: Sequence[int],
                 padding: Sequence[int], output_padding: Sequence[int], dilation: Sequence[int], groups: int,
                 in_shape: Sequence[int], module: nn.Module | None = None):
        self.raw = params  # live: reads the module's current weights
        self.module = module
        self.in_shape = tuple(in_shape)
        self.spatial = len(self.in_shape) - 1
        n = self.spatial
        self.stride, self.padding = _tuple(stride, n), _tuple(padding, n)
        self.output_padding, self.dilation = _tuple(output_padding, n), _tuple(dilation, n)
        self.groups = int(groups)

    def _apply(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _TRANSPOSED[self.spatial](x, w, b, self.stride, self.padding, self.output_padding, self.groups,
                                         self.dilation)

    def forward(self, x):
        return self._apply(x, *self.raw())

    def interval(self, b_in):
        w, b = self.raw()
        c, r = center_radius(b_in)
        c2, r2 = self._apply(c, w, b), self._apply(r, w.abs(), None)
        return _unbounded_where_nan(c2 - r2, c2 + r2, b_in)

    def backward(self, A, in_bounds, **kw):
        w, b = self.raw()
        B, S = A.shape[:2]
        flat = A.reshape(B * S, *A.shape[2:])
        A_in = _ADJOINT[self.spatial](flat, w, None, self.stride, self.padding, self.dilation, self.groups)
        A_in = A_in[(..., *(slice(0, size) for size in self.in_shape[1:]))]  # extra positions: see the doc
        if tuple(A_in.shape[1:]) != self.in_shape:
            raise RuntimeError(f"transposed convolution adjoint of shape {tuple(A_in.shape[1:])}, "
                               f"expected {self.in_shape}")
        bias = None if b is None else A.flatten(3).sum(-1).matmul(b)
        return [A_in.reshape(B, S, *self.in_shape)], bias

    def describe(self):
        w, _ = self.raw()
        one = lambda t: "x".join(map(str, t)) if len(set(t)) > 1 else f"{t[0]}"  # noqa: E731
        return (f"{w.shape[0]}→{w.shape[1] * self.groups} k{one(tuple(w.shape[2:]))} s{one(self.stride)} "
                f"p{one(self.padding)}" + (f" op{one(self.output_padding)}" if any(self.output_padding) else "")
                + (f" d{one(self.dilation)}" if any(d != 1 for d in self.dilation) else "")
                + (f" g{self.groups}" if self.groups > 1 else ""))

    def num_params(self):
        w, b = self.raw()
        return w.numel() + (0 if b is None else b.numel())


def _unbounded_where_nan(lo: Tensor, up: Tensor, b_in: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Infinite input bounds make ``inf - inf`` or ``0 * inf`` (NaN) in an affine map's output
    bounds: there the output is unbounded, so -inf / +inf are the sound bounds. NaN in the
    input bounds is an upstream error and is passed on untouched."""
    if torch.isnan(b_in[0]).any() or torch.isnan(b_in[1]).any():
        return lo, up
    return lo.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf), \
        up.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(t) for t in v)
    return tuple(int(v) for _ in range(n))


# ------------------------------------------------------------------ resizing

# interpolation modes whose weights are all non-negative (a monotone linear map)
MONOTONE_MODES = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"})
_ONNX_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Resize(Monotone):
    """Nearest, (bi/tri)linear or area resizing of (C, *spatial) samples by constant scales or
    to constant sizes: ``F.interpolate(x, **kwargs)``.

    Every output is a convex combination of inputs (nearest: one input with weight 1; linear:
    the neighbours with the interpolation weights in [0, 1]; area: a window average), so the
    map is linear and monotone: IBP resizes the lower and the upper ends (exact element-wise),
    and CROWN's A·y = (Jᵀ A)·x holds with equality, Jᵀ A computed as the vector-Jacobian
    product of the resize (batched over boxes × specifications).
    """

    kind = "resize"
    affine = True

    def __init__(self, kwargs: dict, in_shape: Sequence[int]):
        self.kwargs = dict(kwargs)
        self.in_shape = tuple(in_shape)
        self.mixing = self.kwargs["mode"] not in ("nearest", "nearest-exact")  # nearest copies, never combines

    def forward(self, x):
        return F.interpolate(x, **self.kwargs)

    def interval(self, b_in):
        return _unbounded_where_nan(self.forward(b_in[0]), self.forward(b_in[1]), b_in)

    def backward(self, A, in_bounds, **kw):
        B, S = A.shape[:2]
        A_in = adjoint(self.forward, A.reshape(B * S, *A.shape[2:]), self.in_shape)
        return [A_in.reshape(B, S, *self.in_shape)], None

    def describe(self):
        how = (f"×{self.kwargs['scale_factor']}" if self.kwargs.get("scale_factor") is not None
               else f"to {dims(self.kwargs['size'])}")
        corners = " align_corners" if self.kwargs.get("align_corners") else ""
        return f"{self.kwargs['mode']} {how}{corners}"


# ------------------------------------------------------------------ rules


def _constant_args(ctx: Ctx, skip: int = 1) -> None:
    """Refuse the node when any argument other than the first ``skip`` depends on the input."""
    if ctx.dynamic(ctx.node.args[skip:]) or ctx.dynamic(ctx.node.kwargs):
        ctx.unsupported("weights, scales and sizes must be constant")


def _sample_input(ctx: Ctx, x) -> tuple[int, ...]:
    """The (C, *spatial) per-sample shape of ``x``, refusing inputs without the usual batch axis."""
    shape = ctx.shape(x)
    if not ctx.implicit(x) or len(shape) < 2:
        ctx.unsupported(f"input of full shape {ctx.full(x)}; expected (1, C, *spatial)")
    return shape


def _checked(ctx: Ctx, op: Op, x) -> Op:
    """The operator, after checking it reproduces the converted network's value on the example."""
    with torch.no_grad():
        mine = op.forward(ctx.value(x))
    if mine.shape != ctx.value(ctx.node).shape or not torch.equal(mine, ctx.value(ctx.node)):
        ctx.unsupported("the bounded operator does not reproduce the network's value")
    return op


@register(onnx=["ConvTranspose"], fx=["ConvTranspose1d", "ConvTranspose2d"])
def _conv_transpose_module(ctx: Ctx):
    mod = ctx.target
    if not isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        ctx.unsupported("not a torch transposed convolution")
    if len(ctx.node.args) != 1 or ctx.node.kwargs:
        ctx.unsupported("an explicit output_size")
    if mod.padding_mode != "zeros":
        ctx.unsupported(f"padding mode {mod.padding_mode!r}")
    in_shape = _sample_input(ctx, ctx.x)
    if len(in_shape) != mod.weight.dim() - 1:
        ctx.unsupported(f"input of per-sample shape {in_shape}")
    op = ConvTranspose(lambda m=mod: (m.weight, m.bias), mod.stride, mod.padding, mod.output_padding, mod.dilation,
                       mod.groups, in_shape, module=mod)
    return _checked(ctx, op, ctx.x), [ctx.x]


@register(fx=["conv_transpose1d", "conv_transpose2d"])
def _conv_transpose_function(ctx: Ctx):
    _constant_args(ctx)
    names = ["weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
    sig = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    sig.update(zip(names, ctx.args[1:]))
    sig.update(ctx.kwargs)
    if "weight" not in sig or not isinstance(sig["weight"], Tensor):
        ctx.unsupported("weights must be a constant tensor")
    x = ctx.node.args[0]
    in_shape = _sample_input(ctx, x)
    w, b = sig["weight"], sig["bias"]
    if len(in_shape) != w.dim() - 1:
        ctx.unsupported(f"input of per-sample shape {in_shape}")
    op = ConvTranspose(lambda w=w, b=b: (w, b), sig["stride"], sig["padding"], sig["output_padding"],
                       sig["dilation"], sig["groups"], in_shape)
    return _checked(ctx, op, x), [x]


def _resize_kwargs(ctx: Ctx, mode: str, size: Any, scale_factor: Any, align_corners: bool | None,
                   recompute_scale_factor: bool | None = None, antialias: bool = False) -> dict:
    """F.interpolate's keyword arguments, refusing modes with negative weights."""
    if mode not in MONOTONE_MODES:
        ctx.unsupported(f"{mode!r} interpolation (negative weights); supported: {', '.join(sorted(MONOTONE_MODES))}")
    kwargs: dict[str, Any] = {"mode": mode, "size": size, "scale_factor": scale_factor}
    if mode not in ("nearest", "nearest-exact", "area"):
        kwargs["align_corners"] = align_corners
    if recompute_scale_factor is not None:
        kwargs["recompute_scale_factor"] = recompute_scale_factor
    if antialias:
        kwargs["antialias"] = True
    return kwargs


def _onnx_resize_kwargs(ctx: Ctx, mod: nn.Module, roi: Any, scales: Any, sizes: Any) -> dict:
    """The F.interpolate call onnx2torch's OnnxResize makes for these constant operands."""
    in_shape = ctx.shape(ctx.x)
    if mod.onnx_mode == "cubic":
        ctx.unsupported("cubic interpolation (negative weights)")
    if mod.onnx_mode not in ("nearest", "linear"):
        ctx.unsupported(f"mode {mod.onnx_mode!r}")
    mode = "nearest" if mod.onnx_mode == "nearest" else _ONNX_LINEAR.get(len(in_shape) - 1)
    if mode is None:
        ctx.unsupported(f"linear interpolation of {len(in_shape) - 1}-D samples")
    if not mod.ignore_roi and roi is not None and torch.as_tensor(roi).numel():
        ctx.unsupported("a region of interest (tf_crop_and_resize)")
    size = scale = None
    if sizes is not None and torch.as_tensor(sizes).numel():
        size = [int(s) for s in torch.as_tensor(sizes).tolist()[2:]]
    if scales is not None and torch.as_tensor(scales).numel():
        scale = [float(s) for s in torch.as_tensor(scales).tolist()[2:]]
    return _resize_kwargs(ctx, mode, size, scale, mod.align_corners)


@register(onnx=["Resize", "Upsample"], fx=["OnnxResize", "OnnxResizeV10", "Upsample", "UpsamplingNearest2d",
                                           "UpsamplingBilinear2d", "interpolate", "upsample"])
def _resize(ctx: Ctx):
    mod = ctx.target
    x = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs.get("input")
    if x is not ctx.x:
        ctx.unsupported("the resized tensor must be the first argument")
    _constant_args(ctx)
    in_shape = _sample_input(ctx, x)
    name = type(mod).__name__
    if name == "OnnxResize":
        sig = dict(zip(["roi", "scales", "sizes"], ctx.args[1:]), **ctx.kwargs)
        kwargs = _onnx_resize_kwargs(ctx, mod, sig.get("roi"), sig.get("scales"), sig.get("sizes"))
    elif name == "OnnxResizeV10":
        sig = dict(zip(["scales"], ctx.args[1:]), **ctx.kwargs)
        kwargs = _onnx_resize_kwargs(ctx, mod._resize, None, sig.get("scales"), None)
    elif isinstance(mod, nn.Upsample):  # also UpsamplingNearest2d / UpsamplingBilinear2d
        kwargs = _resize_kwargs(ctx, mod.mode, mod.size, mod.scale_factor, mod.align_corners,
                                mod.recompute_scale_factor)
    elif mod in (F.interpolate, getattr(F, "upsample", None)):
        names = ["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"]
        sig = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
               "recompute_scale_factor": None, "antialias": False}
        sig.update(zip(names, ctx.args[1:]))
        sig.update({k: v for k, v in ctx.kwargs.items() if k != "input"})
        kwargs = _resize_kwargs(ctx, sig["mode"], sig["size"], sig["scale_factor"], sig["align_corners"],
                                sig["recompute_scale_factor"], sig["antialias"])
    else:
        ctx.unsupported()
    return _checked(ctx, Resize(kwargs, in_shape), x), [x]


# ------------------------------------------------------------------ ONNX attributes


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _legacy_resize_issue(mode: str, in_dims: list[int] | None, out_dims: list[int] | None) -> str | None:
    """Why onnx2torch misconverts an Upsample or a pre-opset-11 Resize, if it does: these use
    asymmetric coordinates and round nearest down when upsampling but up when downsampling,
    while onnx2torch always rounds down."""
    if mode == "linear":
        return "linear with asymmetric coordinates (onnx2torch computes half_pixel)"
    if in_dims is None or out_dims is None or any(o < i for i, o in zip(in_dims, out_dims)):
        return "nearest downsampling (or unknown shapes) with ceil rounding (onnx2torch rounds down)"
    return None


def _unsupported_resize_attribute(a: dict[str, Any]) -> str | None:
    """The first Resize attribute that onnx2torch ignores although it is set to a value that
    changes the result (antialias, keep_aspect_ratio_policy, axes), if any."""
    for key, default in (("antialias", 0), ("keep_aspect_ratio_policy", "stretch")):
        if key in a and _text(a[key]) != str(default):
            return f"attribute {key}={_text(a[key])}"
    if "axes" in a:
        return "attribute axes"
    return None


def _nearest_resize_issue(a: dict[str, Any], coords: str, in_dims: list[int] | None,
                          out_dims: list[int] | None) -> str | None:
    """Why a nearest Resize (opset 11+) differs from onnx2torch's asymmetric floor, if it does:
    half-pixel coordinates with round-half rounding agree with it only for integer upscaling."""
    rounding = _text(a.get("nearest_mode", "round_prefer_floor"))
    if coords == "asymmetric" and rounding == "floor":
        return None
    integer_up = (in_dims is not None and out_dims is not None and len(in_dims) == len(out_dims)
                  and all(i > 0 and o % i == 0 for i, o in zip(in_dims, out_dims)))
    if coords in ("half_pixel", "pytorch_half_pixel") and rounding.startswith("round_prefer") and integer_up:
        return None  # no ties: round((j + 1/2)/s - 1/2 + k) = k for 0 <= j < s
    return (f"nearest with {coords} coordinates and {rounding} rounding (onnx2torch computes asymmetric "
            f"floor; equal only for integer upscaling)")


def _linear_resize_issue(coords: str, out_dims: list[int] | None) -> str | None:
    """Why a linear Resize (opset 11+) differs from onnx2torch's half_pixel / align_corners, if
    it does."""
    if coords in ("half_pixel", "align_corners"):
        return None
    if coords == "pytorch_half_pixel" and out_dims is not None and all(o > 1 for o in out_dims):
        return None  # pytorch_half_pixel differs from half_pixel only for outputs of length 1
    return f"linear with {coords} coordinates (onnx2torch computes half_pixel or align_corners)"


def _resize_issue(node, opset: int, a: dict[str, Any], in_dims: list[int] | None,
                  out_dims: list[int] | None) -> str | None:
    """See :func:`unfaithful_nodes`; ``in_dims`` / ``out_dims``: the static spatial sizes, if known."""
    mode = _text(a.get("mode", "nearest"))
    if mode not in ("nearest", "linear"):
        return f"mode {mode!r}"
    if node.op_type == "Upsample" or opset < 11:
        return _legacy_resize_issue(mode, in_dims, out_dims)
    issue = _unsupported_resize_attribute(a)
    if issue is not None:
        return issue
    coords = _text(a.get("coordinate_transformation_mode", "half_pixel"))
    if mode == "nearest":
        return _nearest_resize_issue(a, coords, in_dims, out_dims)
    return _linear_resize_issue(coords, out_dims)


def unfaithful_nodes(proto) -> list[tuple[str, str, str]]:
    """(node name, op type, reason) of each ConvTranspose / Resize / Upsample node of an ONNX
    model whose onnx2torch conversion computes a different function than ONNX defines; the
    loader refuses them (the bounds would hold for the wrong network).

    onnx2torch maps Resize to ``F.interpolate``: nearest with ``asymmetric`` coordinates and
    ``floor`` rounding, linear with ``half_pixel`` or ``align_corners`` coordinates, and
    ignores ``output_shape`` of ConvTranspose. Resize-10 and Upsample use asymmetric
    coordinates, rounding nearest down when upsampling and up when downsampling.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        d = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [x.dim_value for x in d] if all(x.HasField("dim_value") for x in d) else None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    issues = []
    for i, node in enumerate(proto.graph.node):
        a = _attrs(node)
        reason = None
        if node.op_type == "ConvTranspose":
            if "output_shape" in a:
                reason = "output_shape (onnx2torch ignores it)"
            elif _text(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
                reason = f"auto_pad {_text(a['auto_pad'])}"
        elif node.op_type in ("Resize", "Upsample"):
            in_full, out_full = shapes.get(node.input[0]), shapes.get(node.output[0])
            reason = _resize_issue(node, opset, a, None if in_full is None else in_full[2:],
                                   None if out_full is None else out_full[2:])
        if reason is not None:
            issues.append((node.name or f"#{i}", node.op_type, reason))
    return issues
