"""Add and Sub of bounded tensors; Add, Sub, Mul, Div and MatMul dispatched by operand kind.

One constant operand makes them affine (:mod:`.linear`), two bounded operands make
Mul/Div/MatMul bilinear (:mod:`.bilinear`)."""

from __future__ import annotations

from collections.abc import Sequence

from certkit.bounds.ops.base import Op, sum_to
from certkit.bounds.ops.registry import Ctx, register


def left_pad(shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """``shape`` with leading 1s up to ``rank`` axes (how it broadcasts against a larger rank)."""
    return (1,) * (rank - len(shape)) + tuple(shape)


class Add(Op):
    """Sum of two bounded tensors (residual connections), broadcast against each other."""

    kind = "add"
    affine = True

    def __init__(self, in_shapes: Sequence[Sequence[int]], sign: float = 1.0):
        rank = max(len(s) for s in in_shapes)
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.padded = [left_pad(s, rank) for s in in_shapes]  # operands of a lower rank gain leading 1s
        self.sign = sign

    def _views(self, x, y):
        if len(self.in_shapes[0]) == len(self.in_shapes[1]):
            return x, y
        return x.reshape(x.shape[0], *self.padded[0]), y.reshape(y.shape[0], *self.padded[1])

    def forward(self, x, y):
        x, y = self._views(x, y)
        return x + y if self.sign > 0 else x - y

    def interval(self, bx, by):
        (xl, yl), (xu, yu) = self._views(bx[0], by[0]), self._views(bx[1], by[1])
        if self.sign > 0:
            return xl + yl, xu + yu
        return xl - yu, xu - yl

    def backward(self, A, in_bounds, **kw):
        Ay = A if self.sign > 0 else -A
        B, S = A.shape[:2]
        return [sum_to(coef, padded).reshape(B, S, *shape)
                for coef, padded, shape in zip((A, Ay), self.padded, self.in_shapes)], None


class Sub(Add):
    """Difference of two bounded tensors."""

    kind = "sub"

    def __init__(self, in_shapes):
        super().__init__(in_shapes, sign=-1.0)


# ------------------------------------------------------------------ rules

_KINDS = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub", "rsub": "rsub", "mul": "mul", "imul": "mul",
          "truediv": "div", "div": "div", "true_divide": "div", "onnx_div": "div"}


@register(onnx=["Add", "Sub", "Mul", "Div"], fx=list(_KINDS))
def _binary(ctx: Ctx):
    from certkit.bounds.ops import bilinear, linear, smooth

    kind = _KINDS[ctx.name]
    a, b = ctx.node.args[:2]
    da, db = ctx.dynamic(a), ctx.dynamic(b)
    if da and db:
        if kind in ("add", "sub", "rsub"):
            first, second = (b, a) if kind == "rsub" else (a, b)
            shapes = [ctx.shape(first), ctx.shape(second)]
            return (Add(shapes) if kind == "add" else Sub(shapes)), [first, second]
        return bilinear.product(ctx, a, b) if kind == "mul" else bilinear.quotient(ctx, a, b)
    if len(ctx.shape(a if da else b)) != len(ctx.shape()) and ctx.shape(a if da else b) != ctx.shape():
        ctx.unsupported("a constant operand that broadcasts the bounded one to a higher rank")
    built = linear.affine_by_constant(ctx, kind, da)
    return built if built is not None else smooth.constant_over(ctx, ctx.args[0], b)


@register(onnx=["MatMul"], fx=["OnnxMatMul", "matmul"])
def _matmul(ctx: Ctx):
    from certkit.bounds.ops import bilinear, linear

    x, w = ctx.node.args[:2]
    if ctx.dynamic(x) and ctx.dynamic(w):
        return bilinear.matmul(ctx, x, w)
    if ctx.dynamic(x):
        return linear.matmul_by_constant(ctx)
    return bilinear.constant_matmul(ctx, ctx.args[0], w)
