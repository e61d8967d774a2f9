"""Shared fixtures: where the real data and VNN-COMP files live (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VNNCOMP = SHARED / "vnncomp"
# CERTKIT_TEST_DATA points elsewhere where ../shared is absent (a GPU machine with a copy of the data)
DATA = Path(os.environ.get("CERTKIT_TEST_DATA", SHARED / "data"))


def require(path: Path) -> Path:
    """Skip (loudly) when the shared folder is absent: it is beside every CI checkout."""
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared)")
    return path


@pytest.fixture(scope="session", autouse=True)
def graph_cache_dir(tmp_path_factory) -> Path:
    """Converted graphs go to a fresh directory of this test run (also for the solver processes
    tests start), never to the user's cache."""
    path = tmp_path_factory.mktemp("graph-cache")
    os.environ["CERTKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def vnncomp_dir() -> Path:
    return require(VNNCOMP)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_matches_onnxruntime(path: Path):
    """Load an ONNX file for bounding and check its outputs against onnxruntime's on 3 random
    inputs in [0, 1); returns (the BoundedModel, those inputs)."""
    import numpy as np

    from certkit.bounds import BoundedModel
    from certkit.ort_session import run_onnxruntime

    torch.manual_seed(0)
    bm = BoundedModel(path)
    x = torch.rand(3, *bm.graph.input_shape)
    ref = run_onnxruntime(path, x.numpy())
    with torch.no_grad():
        out = bm(x).numpy()
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(ref).max()))
    assert_stores_identically(bm, x)
    return bm, x


def assert_stores_identically(bm, x: torch.Tensor) -> None:
    """The graph as the graph cache stores it (encoded to plain data, saved, loaded with
    weights_only, decoded) computes exactly the same outputs and IBP bounds as the original."""
    import io

    from certkit.bounds import BoundedModel
    from certkit.bounds.frozen import decode, encode

    buffer = io.BytesIO()
    torch.save(encode(bm.graph, bm.dtype), buffer)
    buffer.seek(0)
    stored = BoundedModel.from_graph(*decode(torch.load(buffer, weights_only=True)))
    lo, up = x - 0.01, x + 0.01
    with torch.no_grad():
        assert torch.equal(stored(x), bm(x))
        for a, b in zip(stored.compute_bounds(lo, up, "ibp"), bm.compute_bounds(lo, up, "ibp")):
            assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num()))


def _mnist_classifier_ending_in(op_type: str, folder: Path, seed: int = 0) -> Path:
    """An MNIST-shaped linear classifier whose output passes through ``op_type`` (node
    '<op_type>_2', over the class axis), with seeded random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).normal(0, 0.05, (784, 10)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="Flatten_0"),
             helper.make_node("MatMul", ["flat", "w"], ["logits"], name="MatMul_1"),
             helper.make_node(op_type, ["logits"], ["output"], name=f"{op_type}_2", axis=1)]
    graph = helper.make_graph(nodes, op_type.lower(), [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                      [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = folder / f"{op_type.lower()}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def unsupported_onnx(tmp_path_factory) -> Path:
    """An MNIST-shaped classifier ending in Hardmax (node 'Hardmax_2'): an operator with no bound rule."""
    return _mnist_classifier_ending_in("Hardmax", tmp_path_factory.mktemp("hardmax"))


@pytest.fixture(scope="session")
def softmax_onnx(tmp_path_factory) -> Path:
    """An MNIST-shaped classifier ending in Softmax (node 'Softmax_2')."""
    return _mnist_classifier_ending_in("Softmax", tmp_path_factory.mktemp("softmax"))


def onnx_model_file(folder: Path, name: str, nodes: list, inits: list, in_shape, out_shape, opset: int = 17) -> Path:
    """``folder/name.onnx``: a checked one-input ('x') one-output ('y') float model of ``nodes``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(folder) / f"{name}.onnx"
    onnx.save(model, str(path))
    return path
