"""Per-operator bound rules, one module per operator family, all registered in one table
(:mod:`certkit.bounds.ops.registry`). Importing this package registers every rule."""

from certkit.bounds.ops import (  # noqa: F401  (importing a family registers its rules)
    activation,
    arithmetic,
    bilinear,
    indexing,
    linear,
    normalization,
    piecewise,
    pooling,
    reduction,
    resampling,
    shape,
    smooth,
)
from certkit.bounds.ops.activation import ReLU, Sigmoid, SShaped, Tanh
from certkit.bounds.ops.arithmetic import Add, Sub
from certkit.bounds.ops.base import Activation, Interval, Monotone, Op
from certkit.bounds.ops.linear import BatchNorm, Conv2d, ElementwiseAffine, Linear, batchnorm_of
from certkit.bounds.ops.pooling import AvgPool2d, MaxPool2d
from certkit.bounds.ops.registry import RULES, Alias, Ctx, Tuple, rule_for, supported_onnx
from certkit.bounds.ops.shape import Concat, Pad, Permute, Reshape

__all__ = [
    "RULES", "Activation", "Add", "Alias", "AvgPool2d", "BatchNorm", "Concat", "Conv2d", "Ctx", "ElementwiseAffine",
    "Interval", "Linear", "MaxPool2d", "Monotone", "Op", "Pad", "Permute", "ReLU", "Reshape", "SShaped", "Sigmoid",
    "Sub", "Tanh", "Tuple", "batchnorm_of", "rule_for", "supported_onnx",
]
