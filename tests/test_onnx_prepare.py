"""The ONNX loader's preparation: shape and constant subgraphs folded (dynamic batch included),
exporter quirks normalised (Reshape allowzero, Clip without min), unsupported operators still
named with their node after folding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from certkit.bounds import BoundedModel
from certkit.cli import main
from certkit.errors import InvalidModel, UnsupportedOperator
from certkit.onnx_io import prepare_proto, read_proto
from tests.conftest import assert_matches_onnxruntime


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _shape_arithmetic_model(tmp_path, tail: str = "Relu") -> str:
    """x (batch, 4, 3) → Shape → Gather(0) → Concat([b, 12]) → Reshape → Gemm → ``tail``:
    the reshape target is computed from the input's shape at run time, with a symbolic batch."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch_dim", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="batch_vec"),
        helper.make_node("Concat", ["batch1", "twelve"], ["target"], name="target_shape", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="flatten_by_shape"),
        helper.make_node("MatMul", ["flat", "w"], ["h"], name="matmul"),
        helper.make_node(tail, ["h"], ["y"], name=f"{tail}_out"),
    ]
    inits = [w, numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([12], np.int64), "twelve")]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / f"{tail}.onnx")


def test_shape_subgraph_is_folded_with_a_dynamic_batch(tmp_path):
    path = _shape_arithmetic_model(tmp_path)
    prepared = prepare_proto(read_proto(path))
    assert {n.op_type for n in prepared.graph.node} == {"Reshape", "MatMul", "Relu"}
    bm, x = assert_matches_onnxruntime(path)  # a batch of 3 through a graph folded at batch 1
    lb, ub = bm.compute_bounds(x - 0.05, x + 0.05, "crown")
    with torch.no_grad():
        y = bm(x)
    assert (lb <= y).all() and (y <= ub).all()
    r = CliRunner().invoke(main, ["inspect", path])
    assert r.exit_code == 0 and "folded: 7 → 3 ONNX nodes" in r.output, r.output


def test_unsupported_operator_is_named_after_folding(tmp_path):
    path = _shape_arithmetic_model(tmp_path, tail="Hardmax")
    with pytest.raises(UnsupportedOperator) as info:
        BoundedModel(path)
    assert info.value.op_type == "Hardmax" and info.value.node == "Hardmax_out"


def test_reshape_allowzero_and_clip_without_min(tmp_path):
    """Reshape allowzero=1 with a shape without zeros (dynamo exports) and Clip with only a max
    (``torch.clamp(x, max=c)``), both of which onnx2torch refuses as they are."""
    w = numpy_helper.from_array(np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"], allowzero=1),
             helper.make_node("MatMul", ["flat", "w"], ["h"]),
             helper.make_node("Clip", ["h", "", "cmax"], ["y"], name="clip_max_only")]
    inits = [w, numpy_helper.from_array(np.array([1, 6], np.int64), "shape"),
             numpy_helper.from_array(np.array(0.2, np.float32), "cmax")]
    graph = helper.make_graph(nodes, "quirks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "quirks.onnx")
    bm, x = assert_matches_onnxruntime(path)
    lb, ub = bm.compute_bounds(x - 1, x + 1, "crown")
    assert (ub <= 0.2 + 1e-6).all() and (lb <= 0.2).all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onnx_gelu_is_expanded_into_primitives(tmp_path, approximate):
    """ONNX Gelu (opset 20), which onnx2torch cannot convert, is bounded through its definition."""
    w = numpy_helper.from_array(np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Gelu", ["h"], ["y"], name="gelu", approximate=approximate)]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], [w])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tmp_path / "gelu.onnx")
    bm, x = assert_matches_onnxruntime(path)
    box = (x - 0.3, x + 0.3)
    pts = box[0] + (box[1] - box[0]) * torch.rand(500, *x.shape)
    with torch.no_grad():
        ys = bm(pts.reshape(-1, 4)).reshape(500, *x.shape[:1], 6)
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = bm.compute_bounds(*box, method)
        assert (ys >= lb.detach() - 1e-5).all() and (ys <= ub.detach() + 1e-5).all(), method


def test_a_hostile_constant_of_shape_is_refused_before_allocation(tmp_path):
    """ConstantOfShape of 10^11 elements (400 GB) added to the activations: refused by name from
    shape inference, before folding or conversion could try to allocate it."""
    from certkit.memory import peak_rss

    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="huge_constant"),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    inits = [numpy_helper.from_array(np.array([1, 100_000, 1_000_000], np.int64), "shape")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "a", "b"])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "big.onnx")
    before = peak_rss()
    with pytest.raises(InvalidModel, match="limit"):
        BoundedModel(path)
    r = CliRunner().invoke(main, ["inspect", path])
    assert r.exit_code == 2 and "limit" in r.output and "Traceback" not in r.output
    assert peak_rss() - before < 500 * 2**20
