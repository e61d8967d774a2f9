"""One graph for every model: a torch.fx trace normalised into a small set of node kinds.

``build_graph`` takes a ``torch.nn.Module`` (traced with torch.fx) or the
``torch.fx.GraphModule`` that onnx2torch makes from an ONNX file, runs it once on an
example input to learn every tensor's per-sample shape, folds everything that does
not depend on the input into constants, and maps each remaining operation to one of
the operator rules registered in :mod:`certkit.bounds.ops`. Anything it cannot map is reported
as :class:`~certkit.errors.UnsupportedOperator` before any bound is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

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

    def before_output_softmax(self) -> Graph | None:
        """The graph up to the logits, when the output is a Softmax or LogSoftmax over the
        classes (the only axis of the output longer than 1): the class order, and so the
        argmax, is the same, and margins of logits are far better conditioned. None otherwise.

        A softmax rule marks its last node's operator with ``softmax_axis`` (an engine axis)
        and builds it from nodes named after it (``name/0``, ``name/1``, ...); the logits are
        the one input of that group from outside it."""
        out = self.by_name[self.output]
        axis = getattr(out.op, "softmax_axis", None)
        long_axes = [k + 1 for k, size in enumerate(out.shape) if size > 1]
        if axis is None or long_axes != [axis]:
            return None
        group = {out.name} | {n.name for n in self.nodes if n.name.startswith(out.name + "/")}
        outside = {i for n in self.nodes if n.name in group for i in n.inputs} - group
        if len(outside) != 1:
            return None
        logits = outside.pop()
        keep = {n.name for n in self.ancestors(logits)}
        return Graph([n for n in self.nodes if n.name in keep], logits)

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
        one coordinate-mixing operator on any path, and no operator reading two values (so
        full CROWN can skip them)."""
        mixes: dict[str, float] = {self.input.name: 0}
        for n in self.nodes[1:]:
            op = n.op
            if not op.affine or len(n.inputs) > 1:  # several inputs may share a source: not exact
                mixes[n.name] = float("inf")
            else:
                m = max(mixes[i] for i in n.inputs)
                mixes[n.name] = m + (1 if op.mixing else 0)
        return {k: v <= 1 for k, v in mixes.items()}


# ------------------------------------------------------------------ building


def _target_name(gm: fx.GraphModule, n: fx.Node) -> tuple[str, Any]:
    """The name an operator is registered under, and the object it calls: the module's class
    name (onnx2torch's element-wise wrappers: the function or operation they apply), or the
    function's or method's name."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        name = type(mod).__name__
        if name == "OnnxBinaryMathOperation":
            name = mod.math_op_function.__name__.strip("_")
        elif name == "OnnxFunction":
            name = mod.function.__name__.strip("_")
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


_SHAPE_QUERIES = {"size", "dim", "OnnxShape"}


class _Builder:
    """Walks a traced module once on an example sample, converting each input-dependent node
    with its registered rule (:mod:`certkit.bounds.ops.registry`)."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], example: torch.Tensor):
        self.gm, self.input_shape, self.example = gm, input_shape, example
        self.values: dict[fx.Node, Any] = {}
        self.bounded: dict[fx.Node, Any] = {}  # fx node -> graph node name (aliases share names), or a Tuple
        self.nodes: list[Node] = []
        self.output: str | None = None

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.nodes:
                    raise UnsupportedOperator(n.name, "second input", "certkit bounds single-input networks")
                self.values[n] = self.example
                self.bounded[n] = n.name
                self.nodes.append(Node(n.name, None, [], self.input_shape, "input"))
            elif n.op == "output":
                out = n.args[0]
                if not isinstance(out, fx.Node) or not isinstance(self.bounded.get(out), str):
                    raise UnsupportedOperator("output", "output",
                                              "the network must return one tensor that depends on its input")
                self.output = self.bounded[out]
            elif n.op == "get_attr":
                self.values[n] = _fetch_attr(self.gm, n.target)
            else:
                self._call(n)

    def _call(self, n: fx.Node) -> None:
        args = fx.node.map_arg(n.args, lambda a: self.values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.values[a])
        name, target = _target_name(self.gm, n)
        try:
            if n.op == "call_method":
                self.values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                self.values[n] = target(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise InvalidInput(f"the model cannot run on inputs of per-sample shape {self.input_shape} "
                               f"(node {n.name!r}: {str(e).splitlines()[0]})") from None
        dyn = [a for a in n.all_input_nodes if a in self.bounded]
        if not dyn or name in _SHAPE_QUERIES or (n.op == "call_function" and n.target is getattr):
            return  # constant (or a shape query: static once the example has run)
        ctx = ops.Ctx(n, name, target, args, kwargs, self.values, self.bounded, self._emit)
        if name == "getitem" and isinstance(self.bounded.get(n.args[0]), ops.Tuple):
            result = self.bounded[n.args[0]].item(ctx, int(n.args[1]))
        else:
            rule = ops.rule_for(name)
            if rule is None:
                raise UnsupportedOperator(n.name, name)
            result = rule.build(ctx)
        if isinstance(result, ops.Alias):
            self.bounded[n] = self.bounded[result.of]
            return
        if isinstance(result, ops.Tuple):
            self.bounded[n] = result
            return
        op, inputs = result
        out_val = self.values[n]
        if not isinstance(out_val, torch.Tensor) or not out_val.is_floating_point():
            raise UnsupportedOperator(n.name, name, "its output is not a floating-point tensor")
        self.nodes.append(Node(n.name, op, [self._input_name(a) for a in inputs], ctx.shape(), name))
        self.bounded[n] = n.name

    def _input_name(self, a: fx.Node | str) -> str:
        return a if isinstance(a, str) else self.bounded[a]

    def _emit(self, ctx: ops.Ctx, op: ops.Op, inputs: Sequence[fx.Node | str], shape: Sequence[int]) -> str:
        """Add an intermediate graph node for a rule that builds its operator from several."""
        name = f"{ctx.node.name}/{sum(n.name.startswith(ctx.node.name + '/') for n in self.nodes)}"
        self.nodes.append(Node(name, op, [self._input_name(a) for a in inputs], tuple(shape), ctx.name))
        return name


MAX_INPUT_ELEMENTS = 2**27  # per sample (512 MiB as float32): far past any network certkit can bound


def check_input_shape(shape: Sequence[int], what: str = "the network's input") -> tuple[int, ...]:
    """``shape`` (per sample) as a tuple of ints, or InvalidModel when a dimension is not positive
    or the sample is too large to allocate: a hostile file declaring a dimension of 10^12 gets
    this one-line error before anything tries to allocate it."""
    shape = tuple(int(d) for d in shape)
    if any(d <= 0 for d in shape):
        raise InvalidModel(f"{what} has per-sample shape {shape}: every dimension must be positive")
    size = 1
    for d in shape:
        size *= d
    if size > MAX_INPUT_ELEMENTS:
        raise InvalidModel(f"{what} has per-sample shape {shape} ({size:,} values), more than certkit's limit of "
                           f"{MAX_INPUT_ELEMENTS:,}")
    return shape


def build_graph(module: nn.Module, input_shape: Sequence[int]) -> Graph:
    """Normalise ``module`` into a :class:`Graph` for inputs of per-sample ``input_shape``."""
    input_shape = check_input_shape(input_shape)
    gm = _trace(module)
    param = reference_tensor(module)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    builder = _Builder(gm, tuple(input_shape), torch.rand(1, *input_shape, dtype=dtype, device=device))
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            builder.run()
    finally:
        for m, t in modes.items():
            m.train(t)
    if builder.output is None:
        raise InvalidModel("the traced network has no output")
    return Graph(_fold_batchnorm(builder.nodes, builder.output), builder.output)


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
