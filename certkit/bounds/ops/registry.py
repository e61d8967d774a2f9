"""The operator registry: the one table that says which operators certkit bounds.

Every operator family module (``linear.py``, ``activation.py``, ...) declares its rules
with :func:`register`: the ONNX operator types it covers (what ``SUPPORTED_OPS``,
``certkit inspect`` and the unsupported-operator error read) and the names under which its
nodes appear in the torch.fx graph that onnx2torch makes from an ONNX file, or that
torch.fx traces from a PyTorch module (module class names such as ``"Linear"`` or
``"OnnxGather"``, function and method names such as ``"relu"``). The rule's builder gets a
:class:`Ctx` for one input-dependent fx node and returns the bound operator and the fx
nodes it reads, an :class:`Alias` of an existing node, or a :class:`Tuple` (a node with
several outputs, read through ``getitem``). Adding an operator touches one family file
and its test.

Shapes: the graph's tensors are ``(B, *shape)`` with B the batch of boxes being bounded.
A value of the converted network, traced on one sample, has a *full* shape; its
per-sample ``shape`` is the full shape without its leading axis when that axis has size 1
(the usual batch axis), and the full shape otherwise (a transformer's batch-first to
sequence-first transpose moves the size-1 axis elsewhere). Either way the node computes
the network on one sample; :meth:`Ctx.axis` maps an axis of the full shape to the axis
of the ``(B, *shape)`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from certkit.errors import UnsupportedOperator


@dataclass(frozen=True)
class Alias:
    """The node computes the same tensor as an existing one (Identity, Dropout, ...)."""

    of: fx.Node


@dataclass(frozen=True)
class Tuple:
    """A node with several outputs (Split); ``item(ctx, i)`` builds output i's (op, inputs)
    when a ``getitem`` node reads it."""

    item: Callable[[Ctx, int], tuple[Any, list[fx.Node]]]


@dataclass(frozen=True)
class Rule:
    """How one operator (family) is recognised and built."""

    onnx: tuple[str, ...]
    fx: tuple[str, ...]
    build: Callable[[Ctx], Any]
    family: str


RULES: list[Rule] = []
_BY_FX_NAME: dict[str, Rule] = {}


def register(onnx: Iterable[str] = (), fx: Iterable[str] = ()):
    """Decorator: register ``build(ctx)`` for the given ONNX op types and fx node names."""

    def wrap(build: Callable[[Ctx], Any]):
        rule = Rule(tuple(onnx), tuple(fx), build, build.__module__.rsplit(".", 1)[-1])
        for name in rule.fx:
            if name in _BY_FX_NAME:
                raise RuntimeError(f"fx name {name!r} registered twice ({_BY_FX_NAME[name].family}, {rule.family})")
            _BY_FX_NAME[name] = rule
        RULES.append(rule)
        return build

    return wrap


def rule_for(name: str) -> Rule | None:
    """The rule recognising fx nodes called ``name``, if any."""
    return _BY_FX_NAME.get(name)


def supported_onnx() -> frozenset[str]:
    """Every ONNX operator type some rule covers."""
    return frozenset(op for r in RULES for op in r.onnx)


def families() -> list[tuple[str, str, list[str]]]:
    """(family module, the first sentence of its docstring, its ONNX operators sorted) for every
    family that covers some ONNX operator, in name order."""
    import importlib

    by_family: dict[str, set[str]] = {}
    for r in RULES:
        by_family.setdefault(r.family, set()).update(r.onnx)
    rows = []
    for family in sorted(by_family):
        if by_family[family]:
            doc = importlib.import_module(f"certkit.bounds.ops.{family}").__doc__ or ""
            first = " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".")
            rows.append((family, first, sorted(by_family[family])))
    return rows


def per_sample(full: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape of a value of full (one-sample) shape ``full`` (see the module doc)."""
    return full[1:] if full and full[0] == 1 else full


@dataclass
class Ctx:
    """One input-dependent fx node being converted, with what its rule needs to know."""

    node: fx.Node
    name: str  # the recognised name (module class, function or method name)
    target: Any  # the module or function called
    args: tuple  # the arguments, evaluated on the example sample
    kwargs: dict
    values: dict  # fx node -> its value on the example sample
    bounded: dict  # input-dependent fx node -> graph node name (or a Tuple)
    emit_node: Callable[..., str] | None = None  # set by the graph builder

    # ------------------------------------------------------------ inputs

    def dynamic(self, a: Any) -> bool:
        """Whether ``a`` (an argument, possibly nested in lists) depends on the network input."""
        found = []
        fx.node.map_arg(a, lambda n: found.append(n in self.bounded))
        return any(found)

    @property
    def dyn(self) -> list[fx.Node]:
        """The input-dependent fx nodes among the positional arguments, in order."""
        return [a for a in self.node.args if isinstance(a, fx.Node) and a in self.bounded]

    @property
    def x(self) -> fx.Node:
        """The first input-dependent argument."""
        return self.dyn[0]

    def value(self, a: fx.Node) -> Any:
        return self.values[a]

    # ------------------------------------------------------------ shapes

    def full(self, a: fx.Node | None = None) -> tuple[int, ...]:
        """The full one-sample shape of ``a`` (default: this node's output)."""
        return tuple(self.values[self.node if a is None else a].shape)

    def shape(self, a: fx.Node | None = None) -> tuple[int, ...]:
        """The per-sample shape of ``a`` (default: this node's output)."""
        return per_sample(self.full(a))

    def implicit(self, a: fx.Node | None = None) -> bool:
        """Whether the leading size-1 axis of ``a``'s full shape is dropped in its per-sample shape."""
        full = self.full(a)
        return bool(full) and full[0] == 1

    def axis(self, k: int, a: fx.Node | None = None) -> int:
        """The axis of the batched ``(B, *shape)`` tensor that is axis ``k`` (negative counts from
        the end) of ``a``'s full shape; unsupported for the dropped leading axis."""
        rank = len(self.full(a))
        k = k + rank if k < 0 else k
        if not 0 <= k < rank:
            self.unsupported(f"axis {k} out of range for rank {rank}")
        if self.implicit(a):
            if k == 0:
                self.unsupported("an operation along the batch axis")
            return k
        return k + 1

    def constant(self, c: Any, like: fx.Node | None = None) -> torch.Tensor:
        """A constant operand as a tensor of the example's dtype and device that broadcasts
        against the batched ``(B, *shape)`` tensor of ``like`` (default: this node's output):
        leading size-1 axes beyond the per-sample rank are dropped."""
        ref = self.values[self.node if like is None else like]
        c = torch.as_tensor(c, dtype=ref.dtype, device=ref.device)
        rank = len(self.shape(like))
        while c.dim() > rank:
            if c.shape[0] != 1:
                self.unsupported(f"a constant of shape {tuple(c.shape)} with a batch axis")
            c = c[0]
        return c

    def emit(self, op: Any, inputs: list[fx.Node | str], shape: tuple[int, ...]) -> str:
        """Add an intermediate node computing ``op`` of ``inputs`` (fx nodes or names returned
        by earlier ``emit`` calls), of per-sample ``shape``; returns its name, usable in the
        inputs of later nodes and of the rule's result. For operators built from several
        (LayerNorm, Softmax, ...), each part then keeps its own rule and interval."""
        return self.emit_node(self, op, inputs, tuple(shape))

    def unsupported(self, detail: str = ""):
        """Refuse this node: raises :class:`UnsupportedOperator` naming it."""
        raise UnsupportedOperator(self.node.name, self.name, detail)
