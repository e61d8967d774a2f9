"""A bound graph as plain data: tensors, numbers, strings, lists and dicts only.

:func:`encode` turns a :class:`~certkit.bounds.graph.Graph` into data that ``torch.save``
writes and ``torch.load(weights_only=True)`` reads back without running any code from the
file; :func:`decode` rebuilds the graph. Every operator is stored as its class (which must be
a rule of :mod:`certkit.bounds.ops`) and its attributes; the weights a Linear or Conv reads
live from a module are stored as their current values (a frozen graph is for verification:
its weights never change), and the module itself is dropped, except batch norms, which
bound through theirs and are rebuilt from their constructor arguments and state.

Anything else an operator might hold (a function, an unknown module, an object of another
class) makes :func:`encode` raise :class:`Unfreezable`: the caller then keeps the converted
graph without storing it, so an operator the format does not know costs speed, never
soundness.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from certkit.bounds.graph import Graph, Node
from certkit.bounds.ops.base import EMPTY_CACHES, Op

FORMAT = 2  # bump when the layout below changes (operators' attributes included)
_OPS_PACKAGE = "certkit.bounds.ops."
_BATCHNORMS = {cls.__name__: cls for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}
_BN_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


class Unfreezable(Exception):
    """The graph holds something :func:`encode` cannot store as data."""


class Fixed:
    """A weights provider frozen to the value it returned: what an operator's zero-argument
    ``raw()`` (read live from a module while training) becomes in a stored graph."""

    def __init__(self, value: Any):
        self.value = value

    def __call__(self) -> Any:
        return self.value


# ------------------------------------------------------------------ encoding


def encode(graph: Graph, dtype: torch.dtype) -> dict:
    """The graph, whose inputs are cast to ``dtype``, as plain data (see the module doc);
    raises Unfreezable."""
    nodes = [{"name": n.name, "op": None if n.op is None else _encode(n.op, n.name),
              "inputs": list(n.inputs), "shape": list(n.shape), "source": n.source} for n in graph.nodes]
    return {"format": FORMAT, "nodes": nodes, "output": graph.output, "dtype": _encode(dtype, "input")}


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()  # a Parameter is stored as a plain tensor
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, tuple):
        return {"~": "tuple", "items": [_encode(v, where) for v in value]}
    if isinstance(value, dict):
        return {"~": "dict", "items": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"~": "slice", "items": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"~": "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, Fixed):
        return {"~": "fixed", "value": _encode(value.value, where)}
    if isinstance(value, Op):
        return _encode_op(value, where)
    if type(value) in _BATCHNORMS.values():
        return {"~": "batchnorm", "class": type(value).__name__, "args": {a: getattr(value, a) for a in _BN_ARGS},
                "state": {k: v.detach() for k, v in value.state_dict().items()}, "training": value.training}
    raise Unfreezable(f"node {where!r} holds a {type(value).__module__}.{type(value).__qualname__}")


def _encode_op(op: Op, where: str) -> dict:
    cls = type(op)
    state = {}
    for name, value in vars(op).items():
        if name in EMPTY_CACHES:  # recomputed on demand: stored empty
            value = EMPTY_CACHES[name]()
        elif isinstance(value, types.FunctionType) and _takes_no_arguments(value):
            value = Fixed(value())  # a live weights provider: its current value
        elif name == "module" and isinstance(value, nn.Module) and "raw" in vars(op):
            value = None  # the weights are read through raw(); the module serves training only
        state[name] = _encode(value, where)
    return {"~": "op", "class": f"{cls.__module__}.{cls.__qualname__}", "state": state}


def _takes_no_arguments(fn: Callable) -> bool:
    params = inspect.signature(fn).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


# ------------------------------------------------------------------ decoding


def decode(data: dict) -> tuple[Graph, torch.dtype]:
    """The graph :func:`encode` stored, and its input dtype. Builds operator objects of
    certkit's rule classes only (and the batch-norm modules they hold); raises ValueError on
    anything else."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a stored graph of this format")
    nodes = [Node(str(n["name"]), None if n["op"] is None else _decode(n["op"]), [str(i) for i in n["inputs"]],
                  tuple(int(d) for d in n["shape"]), str(n["source"])) for n in data["nodes"]]
    dtype = _decode(data["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError("the stored graph names no input dtype")
    return Graph(nodes, str(data["output"])), dtype


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get("~")
    if kind == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if kind == "dict":
        return {_decode(k): _decode(v) for k, v in value["items"]}
    if kind == "slice":
        return slice(*(_decode(v) for v in value["items"]))
    if kind == "dtype":
        dtype = getattr(torch, str(value["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value['name']!r}")
        return dtype
    if kind == "fixed":
        return Fixed(_decode(value["value"]))
    if kind == "op":
        cls = _op_class(str(value["class"]))
        op = cls.__new__(cls)
        vars(op).update({str(k): _decode(v) for k, v in value["state"].items()})
        return op
    if kind == "batchnorm":
        return _decode_batchnorm(value)
    raise ValueError(f"unknown stored value kind {kind!r}")


def _op_class(qualified: str) -> type[Op]:
    """The operator class named ``module.Class``, which must be defined in certkit's rules."""
    module, _, name = qualified.rpartition(".")
    if not module.startswith(_OPS_PACKAGE) or not name.isidentifier():
        raise ValueError(f"{qualified!r} is not an operator class of certkit")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Op) and cls.__module__ == module):
        raise ValueError(f"{qualified!r} is not an operator class of certkit")
    return cls


def _decode_batchnorm(value: dict) -> nn.Module:
    cls = _BATCHNORMS.get(str(value["class"]))
    if cls is None:
        raise ValueError(f"unknown batch norm {value['class']!r}")
    args = {k: value["args"][k] for k in _BN_ARGS}
    module = cls(**args)
    state = value["state"]
    like = next((t for t in state.values() if t.is_floating_point()), None)
    if like is not None:
        module.to(device=like.device, dtype=like.dtype)
    module.load_state_dict(state)
    return module.train(bool(value["training"]))


# ------------------------------------------------------------------ moving


def map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Encoded data with ``fn`` applied to every tensor (moving or casting a stored graph)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, list):
        return [map_tensors(v, fn) for v in data]
    if isinstance(data, dict):
        return {k: map_tensors(v, fn) for k, v in data.items()}
    return data


def graph_to(graph: Graph, dtype: torch.dtype, *args, **kwargs) -> tuple[Graph, torch.dtype]:
    """A copy of a frozen graph of input dtype ``dtype`` with its tensors moved or cast as
    ``torch.nn.Module.to(*args, **kwargs)`` would (floating tensors take the new dtype, every
    tensor the device), and its new input dtype."""
    device, new_dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=new_dtype if new_dtype is not None and t.is_floating_point() else None)

    return decode(map_tensors(encode(graph, new_dtype or dtype), move))


def graph_device(graph: Graph) -> torch.device:
    """The device of the tensors the graph's operators hold (the CPU when they hold none)."""
    stack: list[Any] = [n.op for n in graph.nodes[1:]]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, Fixed):
            stack.append(value.value)
        elif isinstance(value, Op):
            stack.extend(vars(value).values())
        elif isinstance(value, nn.Module):
            stack.extend(value.state_dict().values())
    return torch.device("cpu")
