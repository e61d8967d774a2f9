"""Bounded memory (issue 35, item 2): ``--max-memory`` chunks every bound pass to fit a budget
without changing the bounds, and a budget that not even one chunk fits ends in a one-line
error (``bounds``), ``unknown`` with the reason (``verify``) or ``unknown`` (``run-instance``)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from certkit.bounds import BoundedModel, margin_matrix
from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.memory import MemoryBudgetExceeded, available_memory, default_budget, format_size, parse_size, peak_rss
from certkit.results import read_results
from certkit.status import Status
from certkit.verify import VerifyConfig, load_verify_data, run_verify

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"
MNIST_DATA = REPO / "data" / "mnist_test_100.npz"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _mlp_onnx(path: Path, scale: float = 0.5, seed: int = 0) -> Path:
    """A 3-16-2 ReLU network built with onnx.helper (Gemm, Relu, Gemm)."""
    rng = np.random.default_rng(seed)
    w1 = (scale * rng.standard_normal((16, 3))).astype(np.float32)
    w2 = (scale * rng.standard_normal((2, 16))).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(2, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


UNSAFE_FAR_AWAY = "".join(f"(declare-const X_{i} Real)\n" for i in range(3)) + \
    "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n" + \
    "".join(f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))\n" for i in range(3)) + \
    "(assert (>= Y_0 1000000.0))\n"


# ---------------------------------------------------------------- sizes and defaults

@pytest.mark.parametrize("text, expected", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                            ("300KB", 300 << 10), ("1000000", 10 ** 6), (" 4 mb ", 4 << 20),
                                            ("1", 1)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2X", "-1G", "0", "0.1B", "1e30T", "G"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidInput, match="memory size"):
        parse_size(text)


def test_default_budget_is_a_share_of_what_is_free():
    free = available_memory("cpu")
    assert 0 < default_budget("cpu") <= free
    assert format_size(3 << 30) == "3 GiB" and format_size(100) == "100 B"
    assert peak_rss() > 10 << 20  # a Python process with torch loaded


# ---------------------------------------------------------------- chunking changes nothing but memory

@pytest.fixture(scope="module")
def mnist64():
    """The shipped MNIST CNN in float64 (chunked and whole passes then agree to rounding, 1e-12)."""
    bm = BoundedModel(MNIST)
    bm.to(torch.float64)
    torch.manual_seed(0)
    x = torch.rand(3, *bm.graph.input_shape, dtype=torch.float64)
    return bm, (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), margin_matrix(torch.tensor([0, 1, 2]), 10).double()


def _count_backward(bm: BoundedModel, monkeypatch) -> list[int]:
    calls = [0]
    inner = bm._backward

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(bm, "_backward", counted)
    return calls


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_tiny_budget_gives_the_same_bounds(mnist64, method, monkeypatch, one_thread):
    bm, lo, up, C = mnist64
    calls = _count_backward(bm, monkeypatch)
    results = []
    for budget in (None, 3 * bm.min_memory()):  # three rows of the largest pass
        bm.max_memory = budget
        calls[0] = 0
        with torch.no_grad():
            results.append((*bm.compute_bounds(lo, up, method=method, C=C), calls[0]))
    bm.max_memory = None
    (lb0, ub0, n0), (lb1, ub1, n1) = results
    assert n1 > 3 * n0  # the tiny budget really split the passes
    torch.testing.assert_close(lb1, lb0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ub1, ub0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_pair", [False, True])
def test_tiny_budget_same_intermediate_bounds(mnist64, per_pair, monkeypatch, one_thread):
    """Both batchings of the CROWN refinement (every loose neuron in every domain, or (domain, neuron) pairs)."""
    bm, lo, up, _ = mnist64
    name = "_8_gemm"
    row = bm._row_cost(name, 0) + 2 * sum(math.prod(n.shape) for n in bm._ancestors_of(name))
    calls = _count_backward(bm, monkeypatch)
    out = []
    for budget in (None, row * 8):
        bm.max_memory = budget
        calls[0] = 0
        with torch.no_grad():
            bounds = bm.intervals(lo, up, "ibp")
            out.append((bm._crown_refine(name, *bounds[name], bounds, per_pair=per_pair), calls[0]))
    bm.max_memory = None
    assert out[1][1] > 3 * out[0][1]
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)


def test_one_domain_per_chunk_when_a_neuron_in_every_domain_is_too_big(mnist64, monkeypatch, one_thread):
    bm, lo, up, _ = mnist64
    name = "_1_conv"
    one_row = bm._row_cost(name, 0) * 8
    ref = None
    for budget in (None, one_row):  # one (domain, neuron) row at a time
        bm.max_memory = budget
        with torch.no_grad():
            bounds = bm.intervals(lo, up, "ibp")
            shapes: list[int] = []
            monkeypatch.setattr(bm, "_backward", _recording(bm._backward, shapes))
            got = bm._crown_refine(name, *bounds[name], bounds, per_pair=False)
            monkeypatch.undo()
        if ref is None:
            ref = got
    bm.max_memory = None
    assert max(shapes) == 1  # domains split too
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _recording(inner, shapes: list[int]):
    def backward(start, A, *args, **kwargs):
        shapes.append(A.shape[0])
        return inner(start, A, *args, **kwargs)

    return backward


def test_final_pass_chunks_keep_record_alphas_and_extra(mnist64, one_thread):
    """Branch and bound's final pass: per-row α, β terms and the recorded coefficients survive chunking."""
    bm, lo, up, C = mnist64
    with torch.no_grad():
        bounds = bm.intervals(lo, up, "crown")
    relu = bm.graph.relus[0]
    gen = torch.Generator().manual_seed(1)
    alphas = {relu.name: torch.rand(3, 9, *relu.shape, generator=gen, dtype=torch.float64)}
    extra = {relu.inputs[0]: torch.randn(3, 9, *relu.shape, generator=gen, dtype=torch.float64) * 1e-3}
    out = []
    for budget in (None, 2 * bm._row_cost(bm.graph.output, 0) * 8):
        bm.max_memory = budget
        rec: dict = {}
        with torch.no_grad():
            lb, _ = bm.spec_bounds(bounds, C, "crown", bound_upper=False, intersect=False, alphas=alphas,
                                   record=rec, extra=extra)
        out.append((lb, rec))
    bm.max_memory = None
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    assert out[1][1].keys() == out[0][1].keys()
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-12, atol=1e-12)


def test_alpha_crown_chunked(mnist64, one_thread):
    bm, lo, up, C = mnist64
    with torch.no_grad():
        bounds = bm.intervals(lo, up, "crown")
    out = []
    for budget in (None, 4 * bm._row_cost(bm.graph.output, 3) * 8):
        bm.max_memory = budget
        out.append(bm.alpha_crown(bounds, C, bound_upper=False, iterations=3)[0])
    bm.max_memory = None
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-10)


def test_float32_chunks_agree_to_rounding(one_thread):
    """In float32 chunked kernels may round differently (other batch sizes): never by more than float32 noise."""
    bm = BoundedModel(MNIST)
    torch.manual_seed(0)
    x = torch.rand(2, *bm.graph.input_shape)
    lo, up = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    ref = bm.compute_bounds(lo, up, "crown")[0]
    bm.max_memory = 5 * bm._row_cost(bm.graph.output, 0) * 4
    torch.testing.assert_close(bm.compute_bounds(lo, up, "crown")[0], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- budgets nothing fits

def test_impossible_budget_raises_a_certkit_error(mnist64):
    bm, lo, up, C = mnist64
    bm.max_memory = 1000
    try:
        for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
            with pytest.raises(MemoryBudgetExceeded, match=r"--max-memory"):
                bm.compute_bounds(lo, up, method=method, C=C)
    finally:
        bm.max_memory = None


def test_bounds_cli_one_line_error(tmp_path):
    center = tmp_path / "x.npy"
    np.save(center, np.full((1, 1, 28, 28), 0.5, np.float32))
    r = _cli("bounds", MNIST, "--center", center, "--eps", "0.1", "--max-memory", "1K", "--out", tmp_path / "b.npz")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "memory budget of 1 KiB" in lines[0]
    assert "Traceback" not in r.output and not (tmp_path / "b.npz").exists()
    r = _cli("bounds", MNIST, "--center", center, "--eps", "0.1", "--max-memory", "lots")
    assert r.exit_code == 2 and "bad memory size 'lots'" in r.output
    r = _cli("bounds", MNIST, "--center", center, "--eps", "0.1", "--max-memory", "64M", "--label", "3")
    assert r.exit_code == 0, r.output


def _verify(tmp_path: Path, name: str, max_memory: int | None, n: int = 6):
    x, y, idx = load_verify_data(f"npz:{MNIST_DATA}", None, 0, n, (1, 28, 28))
    cfg = VerifyConfig(eps=0.02, attack=False, batch_size=4, device="cpu", max_memory=max_memory)
    out = tmp_path / f"{name}.h5"
    counts = run_verify(MNIST, x, y, idx, cfg, f"npz:{MNIST_DATA}", 0, out=out)
    return counts, read_results(out)[1]


def test_verify_impossible_budget_unknown_with_reason(tmp_path, one_thread):
    counts, data = _verify(tmp_path, "normal", None)
    assert counts["verified"] >= 3  # at ε = 0.02 the shipped model proves these
    counts, data = _verify(tmp_path, "tiny", 2000)
    assert counts["verified"] == 0 and counts["unknown"] == 6 - counts["misclassified"]
    unknown = data["status"] == 2
    for reason in data["reason"][unknown]:
        assert isinstance(reason, str)
        for stage in ("ibp", "crown-ibp", "crown", "alpha-crown"):
            assert f"{stage} skipped:" in reason
        assert "memory budget of 1.95 KiB" in reason
    assert all(r == "" for r in data["reason"][~unknown])
    assert np.isnan(data["margins"][unknown]).all()


def test_verify_budget_only_the_heavy_stages_skipped(tmp_path, one_thread):
    """A budget IBP's pass fits but CROWN's refinements (many rows) still fit in chunks: nothing is skipped,
    and the results equal the default budget's."""
    bm = BoundedModel(MNIST)
    budget = 2 * bm._row_cost(bm.graph.output, 20) * 4
    _, ref = _verify(tmp_path, "ref", None, n=4)
    _, got = _verify(tmp_path, "chunked", budget, n=4)
    np.testing.assert_array_equal(got["status"], ref["status"])
    np.testing.assert_allclose(got["margins"], ref["margins"], rtol=1e-4, atol=1e-4)
    assert all(r == "" for r in got["reason"])


def test_verify_cli_flag(tmp_path):
    out = tmp_path / "r.h5"
    r = _cli("verify", MNIST, "--eps", "0.02", "--dataset", f"npz:{MNIST_DATA}", "-n", "2", "--no-attack",
             "--method", "ibp", "--max-memory", "1K", "--out", out)
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert f["reason"].dtype.kind == "O" and f["reason"].shape == (2,)
        assert json_options(f)["max_memory"] == 1024


def json_options(f):
    import json

    return json.loads(f.attrs["options"])


def test_run_instance_over_budget_answers_unknown(tmp_path):
    model = _mlp_onnx(tmp_path / "mlp.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(UNSAFE_FAR_AWAY)
    from certkit.complete.solver import Solver
    from certkit.vnnlib import read_vnnlib

    assert Solver(model).solve(read_vnnlib(prop), 20).status is Status.VERIFIED  # within the default budget
    r = _cli("run-instance", model, prop, "--timeout", "30", "--results", tmp_path / "b.txt", "--max-memory", "8")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b.txt").read_text().split()[0] == "unknown"


def test_run_instance_bad_size_one_line(tmp_path):
    model = _mlp_onnx(tmp_path / "mlp.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(UNSAFE_FAR_AWAY)
    r = _cli("run-instance", model, prop, "--timeout", "5", "--results", tmp_path / "a.txt", "--max-memory", "2Q")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "bad memory size" in r.output


@pytest.mark.slow
def test_resnet18_at_224_stays_near_its_budget(tmp_path):
    """The heaviest case: torchvision's resnet18 at 3×224×224 through CROWN-IBP on a batch of 1,
    each budget in a fresh process (benchmarks/memory.py): a 64 MiB budget keeps the peak RSS
    growth far under the unchunked run's and gives the same bound; 4 MiB is a one-line refusal."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory import export_model

    path = export_model("resnet18", 224, tmp_path)
    rows = {}
    for budget in ("default", "64M", "4M"):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--one", f"{path},{budget}"],
                             capture_output=True, text=True, check=True)
        rows[budget] = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows["64M"]["result"] == rows["default"]["result"] and rows["default"]["result"].startswith("min margin")
    from certkit.memory import parse_size

    growth = {k: parse_size(rows[k]["peak_growth"].replace(" ", "").replace("iB", "")) for k in ("default", "64M")}
    assert growth["64M"] < growth["default"] and growth["64M"] < 64 * 2**20 + 128 * 2**20
    assert rows["4M"]["result"].startswith("error:") and "--max-memory" in rows["4M"]["result"]


def test_certkit_processes_keep_freed_memory_for_the_next_tensors(monkeypatch):
    """The command line and the run-instance worker tune glibc's malloc (where it is the allocator):
    both thresholds or neither, and tensors still allocate and free afterwards."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    import certkit.memory
    import certkit.vnncomp.worker as worker
    from certkit.cli import main

    code = ("from certkit.memory import reuse_freed_memory; import torch; ok = reuse_freed_memory(); "
            "[torch.ones(1 << 23).sum() for _ in range(3)]; print(ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(certkit.memory, "reuse_freed_memory", lambda: calls.append(1))
    assert CliRunner().invoke(main, ["operators"]).exit_code == 0 and calls == [1]
    assert "reuse_freed_memory()" in Path(worker.__file__).read_text().split('if __name__ == "__main__":')[1]
