"""ONNX in: fold constant and shape subgraphs, check operators up front, upgrade old
opsets, convert with onnx2torch.

Exporters leave shape arithmetic in the graph (Shape → Gather → Concat → Reshape, ...).
A file with operators outside the registry is first folded by onnxsim (constant folding
and shape inference only, with the batch dimension fixed to 1, no fusions), which turns
every subgraph that depends only on initializers, constants and static shapes into
constants; files whose operators are all supported are used as they are. Many published
ONNX files use opsets that onnx2torch cannot read directly (Flatten-1, Dropout-7, ...);
those are upgraded with onnx's version converter first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from certkit.bounds.graph import check_input_shape
from certkit.bounds.ops import supported_onnx
from certkit.errors import InvalidModel, UnsupportedOperator

# ONNX operators the bound engine has sound rules for: the registry's table (the graph
# builder checks each node's details, e.g. which operands are constant).
SUPPORTED_OPS = supported_onnx()
FLOAT_INPUTS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}  # input types certkit feeds
UPGRADE_OPSET = 11


@dataclass
class LoadedOnnx:
    """An ONNX file converted to a torch.fx module, with its input description."""

    module: torch.nn.Module
    proto: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]  # per sample (the first dimension is the batch)
    opset: int


def read_proto(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, with a one-line error for a missing or malformed file.

    External data is read only after :func:`check_external_data` found every location inside
    the model's folder (``load_external_data=False``: checked, not read).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InvalidModel(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    check_external_data(proto, path)
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(proto, str(path.parent))
        except Exception as e:
            raise InvalidModel(f"{path}: cannot read its external data ({type(e).__name__}: {e})") from None
    return proto


def _all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(name, tensor) of every tensor a model holds: dense and sparse initializers (their own
    names) and attribute tensors (the name of their node's first output, which is what the graph
    calls a Constant's value), in subgraphs and functions too (walked with a stack, so deep
    nesting costs no recursion)."""
    stack: list[onnx.GraphProto | onnx.FunctionProto] = [proto.graph, *proto.functions]
    while stack:
        graph = stack.pop()
        sparse: list[onnx.SparseTensorProto] = []
        if isinstance(graph, onnx.GraphProto):
            yield from ((t.name, t) for t in graph.initializer)
            sparse.extend(graph.sparse_initializer)
        for node in graph.node:
            owner = node.output[0] if node.output else node.name
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield owner, attr.t
                yield from ((owner, t) for t in attr.tensors)
                if attr.HasField("sparse_tensor"):
                    sparse.append(attr.sparse_tensor)
                sparse.extend(attr.sparse_tensors)
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
        for sp in sparse:
            yield sp.values.name, sp.values
            yield sp.indices.name, sp.indices


def check_external_data(proto: onnx.ModelProto, path: str | Path) -> None:
    """Refuse (InvalidModel) external-data locations that are absolute or lead outside the
    model's folder (``..``, symlinks): a model file must not make certkit read other files."""
    folder = Path(path).parent.resolve()
    for name, tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder) or target == folder:
            raise InvalidModel(f"{path}: refused: tensor {tensor.name or name!r} keeps its data at {location!r}, not a "
                               "file inside the model's folder (external data must lie beside the model)")


def uses_external_data(path: str | Path) -> bool:
    """Whether some tensor of the file keeps its data in another file."""
    proto = read_proto(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for _, t in _all_tensors(proto))


def opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def graph_input(proto: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    """Name and per-sample shape of the single real input (symbolic batch dims count as 1)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InvalidModel(f"certkit needs a network with exactly one input; this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
    if len(shape) < 2:
        raise InvalidModel(f"input {inputs[0].name!r} has shape {shape}; expected (batch, ...)")
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in FLOAT_INPUTS:
        kind = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise InvalidModel(f"input {inputs[0].name!r} has element type {kind}; certkit bounds networks whose input "
                           "is float32 or float64 (a float16 or integer input cannot hold the box's points exactly)")
    return inputs[0].name, check_input_shape(shape[1:], f"input {inputs[0].name!r}")


def unsupported_nodes(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op type) of every node without a bound rule (Gelu: see :func:`_expand_gelu`)."""
    return [(n.name or f"#{i}", n.op_type) for i, n in enumerate(proto.graph.node) if n.op_type not in SUPPORTED_OPS]


def check_supported(proto: onnx.ModelProto) -> None:
    """Raise UnsupportedOperator naming the first unsupported node (and counting the rest)."""
    bad = unsupported_nodes(proto)
    if bad:
        name, op = bad[0]
        others = sorted({o for _, o in bad[1:] if o != op})
        detail = f"{len(bad)} unsupported node(s)" + (f"; also {', '.join(others)}" if others else "")
        raise UnsupportedOperator(name, op, detail)


def check_faithful(proto: onnx.ModelProto) -> None:
    """Refuse nodes whose onnx2torch conversion computes another function than ONNX defines
    (Resize coordinate and rounding modes, ConvTranspose's output_shape): bounds would hold
    for the wrong network."""
    from certkit.bounds.ops.resampling import unfaithful_nodes

    bad = unfaithful_nodes(proto)
    if bad:
        name, op, why = bad[0]
        raise UnsupportedOperator(name, op, f"onnx2torch would compute a different function: {why}")


def _convert(proto: onnx.ModelProto) -> torch.nn.Module:
    from onnx2torch import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return convert(proto)
        except Exception as first:
            if opset_of(proto) > 17:  # onnx2torch lacks opset-18 converters (Reduce* with an axes input, ...)
                try:
                    return convert(onnx.version_converter.convert_version(proto, 17))
                except Exception:
                    pass
            if opset_of(proto) >= UPGRADE_OPSET:
                raise InvalidModel(f"onnx2torch cannot convert this model: {first}") from None
        try:
            upgraded = onnx.version_converter.convert_version(proto, UPGRADE_OPSET)
            return convert(upgraded)
        except Exception as e:
            raise InvalidModel(f"cannot convert opset {opset_of(proto)} model (also after upgrading to "
                               f"opset {UPGRADE_OPSET}): {e}") from None


def _at_batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose inputs' symbolic (or zero) leading dimension is 1: certkit
    bounds one sample at a time, and folding and size checks need static shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inits = {i.name for i in fixed.graph.initializer}
    for inp in fixed.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in inits and len(dims) and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = 1
    return fixed


def _drop_allowzero(proto: onnx.ModelProto) -> None:
    """Reshape's allowzero=1 (dynamo exports) means nothing for a constant shape without zeros;
    onnx2torch refuses the attribute, so it is removed there, in place."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    for n in proto.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        if not (consts[n.input[1]] == 0).any():
            keep = [a for a in n.attribute if a.name != "allowzero"]
            del n.attribute[:]
            n.attribute.extend(keep)


def _expand_gelu(proto: onnx.ModelProto) -> None:
    """Replace each Gelu node (opset 20) by its definition in ONNX primitives, in place, since
    onnx2torch has no converter for it: ``x · ½ · (1 + erf(x / √2))``, or with
    ``approximate="tanh"`` ``x · ½ · (1 + tanh(√(2/π) · (x + 0.044715 x³)))``. Each primitive
    then has its own rule."""
    nodes = list(proto.graph.node)
    if not any(n.op_type == "Gelu" for n in nodes):
        return
    consts = {"certkit_gelu_half": 0.5, "certkit_gelu_one": 1.0, "certkit_gelu_sqrt2": float(np.sqrt(2.0)),
              "certkit_gelu_k": float(np.sqrt(2.0 / np.pi)), "certkit_gelu_c": 0.044715, "certkit_gelu_three": 3.0}
    have = {i.name for i in proto.graph.initializer}
    for name, value in consts.items():
        if name not in have:
            proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), name))
    out = []
    for k, n in enumerate(nodes):
        if n.op_type != "Gelu":
            out.append(n)
            continue
        x, y, p = n.input[0], n.output[0], f"{n.name or 'gelu'}_{k}"
        approx = next((a.s.decode() for a in n.attribute if a.name == "approximate"), "none")
        mk = onnx.helper.make_node
        if approx == "tanh":
            inner = [mk("Pow", [x, "certkit_gelu_three"], [f"{p}_cube"]),
                     mk("Mul", [f"{p}_cube", "certkit_gelu_c"], [f"{p}_cube_c"]),
                     mk("Add", [x, f"{p}_cube_c"], [f"{p}_poly"]),
                     mk("Mul", [f"{p}_poly", "certkit_gelu_k"], [f"{p}_arg"]),
                     mk("Tanh", [f"{p}_arg"], [f"{p}_s"])]
        else:
            inner = [mk("Div", [x, "certkit_gelu_sqrt2"], [f"{p}_arg"]), mk("Erf", [f"{p}_arg"], [f"{p}_s"])]
        out += inner + [mk("Add", [f"{p}_s", "certkit_gelu_one"], [f"{p}_1ps"]),
                        mk("Mul", [x, f"{p}_1ps"], [f"{p}_x1ps"]),
                        mk("Mul", [f"{p}_x1ps", "certkit_gelu_half"], [y], name=n.name)]
    del proto.graph.node[:]
    proto.graph.node.extend(out)


def _fill_clip_bounds(proto: onnx.ModelProto) -> None:
    """Give a Clip (opset 11+) without a min input (``clamp(x, max=c)`` exports an empty
    name there) an explicit −inf initializer, in place: onnx2torch cannot convert the gap."""
    names = {i.name for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Clip" and len(n.input) >= 3 and n.input[1] == "":
            name = "certkit_clip_no_min"
            if name not in names:
                proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(-np.inf, np.float32), name))
                names.add(name)
            n.input[1] = name


def fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every constant and static-shape subgraph folded (onnxsim: constant
    folding and shape inference only), batch fixed to 1. Returned unchanged when onnxsim
    cannot process it (the operator check then names what is left)."""
    from onnxsim import simplify

    fixed = _at_batch_one(proto)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded, _ = simplify(fixed, perform_optimization=False, certify=False)
    except Exception:
        return fixed
    return folded


def _constant_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes other than Constant whose inputs are all initializers or outputs of such nodes
    (exporters emit Identity copies of shared weights, Shape → Gather chains, ...)."""
    const = {i.name for i in proto.graph.initializer} | {""}
    found = []
    for n in proto.graph.node:
        if all(i in const for i in n.input):
            const.update(n.output)
            if n.op_type != "Constant":
                found.append(n)
    return found


MAX_TENSOR_ELEMENTS = 2**28  # one intermediate value (1 GiB as float32), at batch 1


def check_tensor_sizes(proto: onnx.ModelProto) -> None:
    """Refuse a model one of whose values, as ONNX shape inference sees them at batch 1, holds
    more than ``MAX_TENSOR_ELEMENTS``: a hostile ConstantOfShape, Expand or Tile would otherwise
    be allocated while folding or converting, and could exhaust memory before any message."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_at_batch_one(proto), data_prop=True)
    except Exception:  # inference fails on some valid files; the other guards still apply
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            size = int(np.prod([d.dim_value for d in dims], dtype=object))
            if size > MAX_TENSOR_ELEMENTS:
                raise InvalidModel(f"value {vi.name!r} has shape {[d.dim_value for d in dims]} ({size:,} elements at "
                                   f"batch 1), more than certkit's limit of {MAX_TENSOR_ELEMENTS:,}")


def prepare_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model as certkit bounds it: folded when it has operators outside the registry or
    subgraphs that compute constants (shape arithmetic, copies of weights), unchanged
    otherwise; Reshape's allowzero dropped where it means nothing (see :func:`_drop_allowzero`).
    Values too large to allocate are refused first (:func:`check_tensor_sizes`)."""
    check_tensor_sizes(proto)
    if unsupported_nodes(proto) or _constant_nodes(proto):
        proto = fold_constants(proto)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
    try:
        _drop_allowzero(proto)
    except ValueError as e:  # numpy_helper.to_array: data that does not fill the declared dims or type
        raise InvalidModel(f"an initializer or constant does not match its declared shape or type ({e})") from None
    _fill_clip_bounds(proto)
    _expand_gelu(proto)
    return proto


def load_onnx(path: str | Path) -> LoadedOnnx:
    """Load an ONNX network for bounding: folded, and operators checked before anything is computed."""
    proto = prepare_proto(read_proto(path))
    check_supported(proto)
    check_faithful(proto)
    name, shape = graph_input(proto)
    module = _convert(proto).eval()
    return LoadedOnnx(module, proto, name, shape, opset_of(proto))


@dataclass
class OnnxSummary:
    """What ``certkit inspect`` shows about a file, readable even when conversion fails."""

    path: Path
    opset: int
    input_name: str
    input_shape: tuple[int, ...]
    nodes: list[tuple[str, str, str]]  # (name, op type, output shape)
    num_params: int
    unsupported: list[tuple[str, str]]
    folded_from: int | None = None  # the node count before constant folding, when it was folded


def summarize_onnx(path: str | Path) -> OnnxSummary:
    """Nodes, op types, inferred shapes and parameter count of an ONNX file, as certkit bounds
    it (after folding, where folding applies)."""
    original = read_proto(path)
    proto = prepare_proto(original)
    name, shape = graph_input(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = "×".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    nodes = [(n.name or f"#{i}", n.op_type, shapes.get(n.output[0], "?") if n.output else "")
             for i, n in enumerate(proto.graph.node)]
    n_params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    folded = len(original.graph.node) if len(original.graph.node) != len(proto.graph.node) else None
    return OnnxSummary(Path(path), opset_of(proto), name, shape, nodes, n_params, unsupported_nodes(proto), folded)


def nonfinite_initializers(proto: onnx.ModelProto) -> list[tuple[str, int]]:
    """(name, count) of every weight holding NaN or ±Inf values: the float tensors of
    :func:`_all_tensors` (initializers, Constant nodes, subgraphs). Bounds through such weights are NaN
    or meaningless, so ``inspect`` warns and ``verify`` / ``run-instance`` answer unknown."""
    from onnx import numpy_helper

    found = []

    def check(name: str, tensor: onnx.TensorProto) -> None:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                    onnx.TensorProto.BFLOAT16) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return
        try:
            values = numpy_helper.to_array(tensor)
        except Exception:  # a malformed tensor: the loader reports it
            return
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            found.append((name, bad))

    for name, tensor in _all_tensors(proto):
        check(name, tensor)
    return found


def nonfinite_weights_reason(onnx_path: str | Path) -> str:
    """'' for a model whose weights are all finite; else the reason its samples end unknown,
    naming the first few initializers that hold NaN/Inf and their counts."""
    bad = nonfinite_initializers(read_proto(onnx_path))
    if not bad:
        return ""
    names = ", ".join(f"{name} ({count})" for name, count in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"the model's weights contain NaN or Inf: {names}{more}"
