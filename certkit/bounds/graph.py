"""One graph for every model: a torch.fx trace normalised into a small set of node kinds.

``build_graph`` takes a ``torch.nn.Module`` (traced with torch.fx) or the
``torch.fx.GraphModule`` that onnx2torch makes from an ONNX file, runs it once on an
example input to learn every tensor's per-sample shape, folds everything that does
not depend on the input into constants, and maps each remaining operation to one of
the operator classes of :mod:`certkit.bounds.ops`. Anything it cannot map is reported
as :class:`~certkit.errors.UnsupportedOperator` before any bound is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from certkit.bounds import ops
from certkit.errors import InvalidInput, InvalidModel, UnsupportedOperator


@dataclass
class Node:
    """A node of the bound graph. ``op`` is None for the input node."""

    name: str
    op: ops.Op | None
    inputs: list[str]
    shape: tuple[int, ...]  # per-sample output shape
    source: str  # the operator it came from (module class, function or ONNX op)


@dataclass
class Graph:
    """Nodes in topological order; the first is the input, ``output`` names the result."""

    nodes: list[Node]
    output: str
    by_name: dict[str, Node] = field(init=False)
    consumers: dict[str, list[str]] = field(init=False)

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.nodes}
        self.consumers = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                self.consumers[i].append(n.name)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.by_name[self.output].shape

    @property
    def relus(self) -> list[Node]:
        """The ReLU nodes, in order (the units of ReLU splitting, MILP refinement and the warmup
        regularisers)."""
        return [n for n in self.nodes[1:] if n.op.kind == "relu"]

    def ancestors(self, name: str) -> list[Node]:
        """The node and everything it depends on, in reverse topological order."""
        need = {name}
        result = []
        for n in reversed(self.nodes):
            if n.name in need:
                result.append(n)
                need.update(n.inputs)
        return result

    def ibp_exact(self) -> dict[str, bool]:
        """Nodes whose IBP interval is exact: an affine function of the input with at most
        one coordinate-mixing operator on any path (so full CROWN can skip them)."""
        mixes: dict[str, float] = {self.input.name: 0}
        for n in self.nodes[1:]:
            op = n.op
            if not op.affine or isinstance(op, ops.Add):
                mixes[n.name] = float("inf")
            else:
                m = max(mixes[i] for i in n.inputs)
                mixes[n.name] = m + (1 if op.mixing else 0)
        return {k: v <= 1 for k, v in mixes.items()}


# ------------------------------------------------------------------ building


_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_ALIAS_NAMES = {"contiguous", "clone", "dropout", "identity", "detach"}
_RESHAPE_NAMES = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_ONNX = {"OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes",
                 "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes"}
_BINARY_NAMES = {"add": "add", "iadd": "add", "sub": "sub", "isub": "sub", "rsub": "rsub", "mul": "mul",
                 "imul": "mul", "truediv": "div", "div": "div", "true_divide": "div", "_onnx_div": "div"}
_SHAPE_NAMES = {"size", "dim"}


def _target_name(gm: fx.GraphModule, n: fx.Node) -> tuple[str, Any]:
    """A readable operator name for a node, and the object it calls."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        name = type(mod).__name__
        if name == "OnnxBinaryMathOperation":
            name = _BINARY_NAMES.get(mod.math_op_function.__name__, mod.math_op_function.__name__)
        return name, mod
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target)).strip("_"), n.target
    return str(n.target), n.target


def _trace(module: nn.Module) -> fx.GraphModule:
    if isinstance(module, fx.GraphModule):
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception as e:  # fx raises many kinds of errors on untraceable code
        raise InvalidModel(f"cannot trace {type(module).__name__} with torch.fx: {e}") from None


def reference_tensor(module: nn.Module) -> torch.Tensor | None:
    """A floating tensor of the module telling its dtype and device: a parameter, or a buffer
    (ONNX-converted modules often hold their weights as buffers only)."""
    param = next(module.parameters(), None)
    if param is None:
        param = next((b for b in module.buffers() if b.is_floating_point()), None)
    return param


def build_graph(module: nn.Module, input_shape: Sequence[int]) -> Graph:
    """Normalise ``module`` into a :class:`Graph` for inputs of per-sample ``input_shape``."""
    gm = _trace(module)
    param = reference_tensor(module)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    example = torch.rand(1, *input_shape, dtype=dtype, device=device)

    values: dict[fx.Node, Any] = {}
    bounded: dict[fx.Node, str] = {}  # fx node -> graph node name (aliases share names)
    nodes: list[Node] = []
    output = None
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n.op == "placeholder":
                    if nodes:
                        raise UnsupportedOperator(n.name, "second input", "certkit bounds single-input networks")
                    values[n] = example
                    bounded[n] = n.name
                    nodes.append(Node(n.name, None, [], tuple(input_shape), "input"))
                    continue
                if n.op == "output":
                    out = n.args[0]
                    if not isinstance(out, fx.Node) or out not in bounded:
                        raise UnsupportedOperator("output", "output",
                                                  "the network must return one tensor that depends on its input")
                    output = bounded[out]
                    continue
                if n.op == "get_attr":
                    values[n] = _fetch_attr(gm, n.target)
                    continue
                args = fx.node.map_arg(n.args, lambda a: values[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a])
                name, target = _target_name(gm, n)
                try:
                    if n.op == "call_method":
                        values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                    else:
                        values[n] = target(*args, **kwargs)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    raise InvalidInput(f"the model cannot run on inputs of per-sample shape {tuple(input_shape)} "
                                       f"(node {n.name!r}: {str(e).splitlines()[0]})") from None
                dyn = [a for a in n.all_input_nodes if a in bounded]
                if not dyn or name in _SHAPE_NAMES or (n.op == "call_function" and n.target is getattr):
                    continue  # constant (or a shape query, which reshapes ignore)
                result = _convert(n, name, target, args, kwargs, values, bounded)
                if isinstance(result, str):  # an alias of an existing node
                    bounded[n] = result
                    continue
                op, inputs = result
                out_val = values[n]
                if not isinstance(out_val, torch.Tensor) or out_val.dim() == 0 or out_val.shape[0] != 1:
                    raise UnsupportedOperator(n.name, name, "it changes the batch dimension")
                node = Node(n.name, op, [bounded[a] for a in inputs], tuple(out_val.shape[1:]), name)
                nodes.append(node)
                bounded[n] = n.name
    finally:
        for m, t in modes.items():
            m.train(t)
    if output is None:
        raise InvalidModel("the traced network has no output")
    return Graph(_fold_batchnorm(nodes, output), output)


def _fold_batchnorm(nodes: list[Node], output: str) -> list[Node]:
    """Merge each BatchNorm into the Linear/Conv that alone feeds it (the node keeps the BN's
    name and shape). A Linear qualifies only on (batch, features) tensors, where BN1d's
    channel is the Linear's output feature."""
    by_name = {n.name: n for n in nodes}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    drop = set()
    for k, n in enumerate(nodes):
        if not isinstance(n.op, ops.BatchNorm):
            continue
        prev = by_name[n.inputs[0]]
        fits = isinstance(prev.op, ops.Conv2d) or (isinstance(prev.op, ops.Linear) and len(prev.shape) == 1)
        if fits and prev.op.bn is None and uses[prev.name] == 1 and prev.name != output:
            prev.op.bn = n.op
            nodes[k] = Node(n.name, prev.op, prev.inputs, n.shape, f"{prev.source}+{n.source}")
            drop.add(prev.name)
    return [n for n in nodes if n.name not in drop]


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape(values, a: fx.Node) -> tuple[int, ...]:
    return tuple(values[a].shape[1:])


def _convert(n: fx.Node, name: str, target, args, kwargs, values, bounded):
    """Map one input-dependent fx node to (op, bounded fx inputs) or to an alias name."""
    dyn_args = [a for a in n.args if isinstance(a, fx.Node) and a in bounded]
    if isinstance(target, nn.Module):
        mod = target
        if isinstance(mod, _ALIAS_MODULES):
            return bounded[dyn_args[0]]
        if isinstance(mod, nn.Linear):
            return ops.Linear(lambda m=mod: (m.weight, m.bias), module=mod), dyn_args
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise UnsupportedOperator(n.name, name, f"padding {mod.padding!r} mode {mod.padding_mode!r}")
            return ops.Conv2d(lambda m=mod: (m.weight, m.bias), mod.stride, mod.padding, mod.dilation, mod.groups,
                              _shape(values, dyn_args[0]), module=mod), dyn_args
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.running_mean is None:
                raise UnsupportedOperator(n.name, name, "batch norm without running statistics")
            return ops.BatchNorm(mod), dyn_args
        if isinstance(mod, nn.ReLU):
            return ops.ReLU(), dyn_args
        if isinstance(mod, nn.Sigmoid):
            return ops.Sigmoid(), dyn_args
        if isinstance(mod, nn.Tanh) or (name == "OnnxFunction" and mod.function is torch.tanh):
            return ops.Tanh(), dyn_args
        if isinstance(mod, nn.MaxPool2d):
            return _maxpool(n, name, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                            mod.return_indices, values, dyn_args[0])
        if name == "OnnxPadStatic":
            return _pad(n, name, mod.pads, mod.mode, mod.constant_value, values, dyn_args[0])
        if name == "OnnxPadDynamic":
            if _depends(n.args[1:], bounded):
                raise UnsupportedOperator(n.name, name, "pads and value must be constant")
            pads = [int(p) for p in torch.as_tensor(args[1]).tolist()]  # ONNX order: all begins, then all ends
            half = len(pads) // 2
            torch_pads = [p for b, e in zip(pads[:half][::-1], pads[half:][::-1]) for p in (b, e)]
            value = args[2] if len(args) > 2 and args[2] is not None else 0.0
            return _pad(n, name, torch_pads, mod.mode, float(torch.as_tensor(value)), values, dyn_args[0])
        if isinstance(mod, nn.Sequential) and _is_onnx_padded_maxpool(mod):
            pad, pool = mod  # onnx2torch's asymmetric MaxPool padding: -inf Pad, then MaxPool2d
            return _maxpool(n, name, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                            pool.return_indices, values, dyn_args[0], pre_pad=pad.pads)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)) or name in _RESHAPE_ONNX:
            return _reshape(n, values, dyn_args[0])
        if isinstance(mod, nn.AvgPool2d):
            if mod.divisor_override is not None:
                raise UnsupportedOperator(n.name, name, "divisor_override")
            return ops.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                                 _shape(values, dyn_args[0])), dyn_args
        if name == "OnnxTranspose":
            perm = mod.perm if mod.perm is not None else list(reversed(range(values[dyn_args[0]].dim())))
            return _permute(n, name, perm, dyn_args)
        if name == "OnnxConcat":
            return _concat(n, name, mod.axis, n.args, values, bounded)
        if name == "OnnxMatMul":
            return _matmul(n, name, n.args, args, bounded)
        if name in ("add", "sub", "mul", "div"):
            return _binary(n, name, n.args, args, values, bounded)
        raise UnsupportedOperator(n.name, name)

    if name in _ALIAS_NAMES:
        return bounded[dyn_args[0]]
    if name in _BINARY_NAMES:
        return _binary(n, _BINARY_NAMES[name], n.args, args, values, bounded)
    if name in ("matmul",):
        return _matmul(n, name, n.args, args, bounded)
    if name == "linear":
        x, w, b = (list(args) + [kwargs.get("bias")])[:3] if len(args) >= 2 else (None, None, None)
        if w is None or _depends(n.args[1:], bounded):
            raise UnsupportedOperator(n.name, name, "weights must be constant")
        return ops.Linear(lambda w=w, b=b: (w, b)), dyn_args[:1]
    if name == "relu":
        return ops.ReLU(), dyn_args
    if name == "sigmoid":
        return ops.Sigmoid(), dyn_args
    if name == "tanh":
        return ops.Tanh(), dyn_args
    if name == "max_pool2d" and target is F.max_pool2d:
        sig = dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"], args[1:]),
                   **kwargs)
        return _maxpool(n, name, sig["kernel_size"], sig.get("stride"), sig.get("padding", 0), sig.get("dilation", 1),
                        sig.get("ceil_mode", False), sig.get("return_indices", False), values, n.args[0])
    if name == "pad" and target is F.pad:
        if _depends(n.args[1:], bounded) or _depends(n.kwargs, bounded):
            raise UnsupportedOperator(n.name, name, "pads and value must be constant")
        sig = dict(zip(["pad", "mode", "value"], args[1:]), **kwargs)
        value = sig.get("value")
        return _pad(n, name, sig["pad"], sig.get("mode", "constant"), 0.0 if value is None else value, values,
                    n.args[0])
    if name in _RESHAPE_NAMES:
        return _reshape(n, values, dyn_args[0])
    if name in ("permute", "transpose", "t"):
        x = values[dyn_args[0]]
        if name == "permute":
            perm = args[1:] if not isinstance(args[1], (list, tuple)) else args[1]
        else:
            d = list(range(x.dim()))
            i, j = (args[1], args[2]) if name == "transpose" else (0, 1)
            d[i], d[j] = d[j], d[i]
            perm = d
        return _permute(n, name, perm, dyn_args)
    if name in ("cat", "concat"):
        return _concat(n, name, kwargs.get("dim", args[1] if len(args) > 1 else 0), n.args[0], values, bounded)
    if name == "avg_pool2d" and target is F.avg_pool2d:
        x = n.args[0]
        sig = dict(zip(["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"], args[1:]), **kwargs)
        k = sig["kernel_size"]
        op = ops.AvgPool2d(k, sig.get("stride") or k, sig.get("padding", 0), sig.get("ceil_mode", False),
                           sig.get("count_include_pad", True), _shape(values, x))
        return op, [x]
    raise UnsupportedOperator(n.name, name)


def _is_onnx_padded_maxpool(mod: nn.Sequential) -> bool:
    return (len(mod) == 2 and type(mod[0]).__name__ == "OnnxPadStatic" and isinstance(mod[1], nn.MaxPool2d)
            and mod[0].mode == "constant" and mod[0].constant_value == -math.inf and len(mod[0].pads) <= 4)


def _maxpool(n, name, kernel_size, stride, padding, dilation, ceil_mode, return_indices, values, x: fx.Node,
             pre_pad=(0, 0, 0, 0)):
    """MaxPool2d on (channels, height, width) samples; pooling indices are not a bounded value."""
    if return_indices:
        raise UnsupportedOperator(n.name, name, "return_indices")
    in_shape = _shape(values, x)
    if len(in_shape) != 3:
        raise UnsupportedOperator(n.name, name, f"input of per-sample shape {in_shape}; expected (C, H, W)")
    pre_pad = (list(pre_pad) + [0, 0, 0, 0])[:4]
    op = ops.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode, in_shape, pre_pad)
    if (op.table == in_shape[1] * in_shape[2]).all(0).any():
        raise UnsupportedOperator(n.name, name, "a pooling window lies entirely in the padding (output -inf)")
    return op, [x]


def _pad(n, name, pads, mode, value, values, x: fx.Node):
    """Constant padding of per-sample dimensions (torch order: last dimension first)."""
    if mode != "constant":
        raise UnsupportedOperator(n.name, name, f"{mode!r} padding (only constant padding is supported)")
    if not math.isfinite(value):
        raise UnsupportedOperator(n.name, name, f"padding with the non-finite constant {value}")
    pads = [int(p) for p in pads]
    in_shape = _shape(values, x)
    if len(pads) % 2 or any(pads[2 * len(in_shape):]):
        raise UnsupportedOperator(n.name, name, f"pads {pads} change the batch dimension")
    return ops.Pad(pads[:2 * len(in_shape)], value, in_shape), [x]


def _depends(args, bounded) -> bool:
    found = []
    fx.node.map_arg(args, lambda a: found.append(a in bounded))
    return any(found)


def _reshape(n, values, x: fx.Node):
    return ops.Reshape(_shape(values, x), tuple(values[n].shape[1:])), [x]


def _permute(n, name, perm, dyn_args):
    perm = [int(p) for p in perm]
    if perm[0] != 0:
        raise UnsupportedOperator(n.name, name, "it moves the batch dimension")
    return ops.Permute(perm), dyn_args


def _concat(n, name, dim, tensors, values, bounded):
    if any(not (isinstance(t, fx.Node) and t in bounded) for t in tensors):
        raise UnsupportedOperator(n.name, name, "concatenation with constant tensors")
    ndim = values[tensors[0]].dim()
    dim = dim % ndim
    if dim == 0:
        raise UnsupportedOperator(n.name, name, "concatenation along the batch dimension")
    return ops.Concat(dim, [values[t].shape[dim] for t in tensors]), list(tensors)


def _matmul(n, name, fx_args, args, bounded):
    x, w = fx_args[:2]
    if _depends([w], bounded) or not _depends([x], bounded):
        raise UnsupportedOperator(n.name, name, "only x @ W with a constant matrix W is supported")
    w = args[1]
    if w.dim() != 2:
        raise UnsupportedOperator(n.name, name, f"constant operand of shape {tuple(w.shape)}")
    wt = w.t().contiguous()
    return ops.Linear(lambda wt=wt: (wt, None)), [x]


def _binary(n, kind, fx_args, args, values, bounded):
    a, b = fx_args[:2]
    da, db = _depends([a], bounded), _depends([b], bounded)
    if da and db:
        if kind in ("add", "sub"):
            shapes = [_shape(values, a), _shape(values, b)]
            return (ops.Add(shapes) if kind == "add" else ops.Sub(shapes)), [a, b]
        raise UnsupportedOperator(n.name, kind.capitalize(), "product or quotient of two non-constant tensors")
    x, c = (a, args[1]) if da else (b, args[0])
    out_dim = values[n].dim()
    c = torch.as_tensor(c, dtype=values[x].dtype, device=values[x].device)
    if c.dim() == out_dim:
        if c.shape[0] != 1:
            raise UnsupportedOperator(n.name, kind, "a constant with a batch dimension")
        c = c[0]
    in_shape = _shape(values, x)
    if kind == "add":
        return ops.ElementwiseAffine(None, c, in_shape), [x]
    if kind == "sub" and da:
        return ops.ElementwiseAffine(None, -c, in_shape), [x]
    if kind in ("sub", "rsub"):  # c - x (torch.rsub(x, c) is c - x too)
        return ops.ElementwiseAffine(-torch.ones_like(c), c, in_shape), [x]
    if kind == "mul":
        return ops.ElementwiseAffine(c, None, in_shape), [x]
    if kind == "div" and da:
        return ops.ElementwiseAffine(1.0 / c, None, in_shape), [x]
    raise UnsupportedOperator(n.name, kind, "division by a non-constant tensor")
