"""NaN and Inf (issue 35, item 5): ``inspect`` warns about non-finite weights, ``verify`` marks
samples with non-finite inputs, weights or bounds ``unknown`` with the reason (never
``verified``), and ``run-instance`` answers ``unknown`` for a model with NaN weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from certkit import verify as verify_mod
from certkit.cli import main
from certkit.onnx_io import nonfinite_initializers, nonfinite_weights_reason, read_proto
from certkit.results import read_results
from certkit.status import Status
from certkit.verify import VerifyConfig, load_verify_data, run_verify

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"
MNIST_DATA = REPO / "data" / "mnist_test_100.npz"
UNKNOWN, VERIFIED = 2, 0


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _poisoned(tmp_path: Path, values=(np.nan,), which: int = 0) -> tuple[Path, str]:
    """The shipped MNIST model with the first len(values) entries of its ``which``-th float
    initializer replaced by ``values``; (path, initializer name)."""
    proto = read_proto(MNIST)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 4]
    init = floats[which]
    arr = numpy_helper.to_array(init).copy()
    arr.reshape(-1)[:len(values)] = values
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    path = tmp_path / f"poisoned{which}.onnx"
    onnx.save(proto, path)
    return path, init.name


def test_scan_finds_initializers_and_constants(tmp_path):
    assert nonfinite_initializers(read_proto(MNIST)) == []
    path, name = _poisoned(tmp_path, (np.nan, np.inf, -np.inf))
    assert nonfinite_initializers(read_proto(path)) == [(name, 3)]
    assert name in nonfinite_weights_reason(path) and "(3)" in nonfinite_weights_reason(path)
    proto = read_proto(MNIST)
    const = onnx.helper.make_node("Constant", [], ["c_out"],
                                  value=numpy_helper.from_array(np.array([1.0, np.nan], np.float32), "c"))
    proto.graph.node.insert(0, const)
    assert nonfinite_initializers(proto) == [("c_out", 1)]


def test_inspect_warns_in_one_yellow_line_and_exits_0(tmp_path):
    path, name = _poisoned(tmp_path, (np.nan, np.nan))
    r = _cli("inspect", path)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and name in warnings[0] and "2 NaN/Inf" in warnings[0]
    clean = _cli("inspect", MNIST)
    assert clean.exit_code == 0 and "warning" not in clean.output


def _data(n: int = 4):
    return load_verify_data(f"npz:{MNIST_DATA}", None, 0, n, (1, 28, 28))


def _run(model: Path, x, y, idx, tmp_path: Path, name: str, attack: bool = False):
    cfg = VerifyConfig(eps=0.02, attack=attack, batch_size=4, device="cpu", pgd_steps=5, pgd_restarts=1)
    out = tmp_path / f"{name}.h5"
    counts = run_verify(model, x, y, idx, cfg, f"npz:{MNIST_DATA}", 0, out=out)
    return counts, read_results(out)[1]


def test_nan_weights_make_every_sample_unknown(tmp_path, one_thread):
    x, y, idx = _data()
    counts, ref = _run(MNIST, x, y, idx, tmp_path, "clean")
    assert counts["verified"] >= 2  # the clean model proves some: what the NaN must take away
    # a NaN in the last layer's bias only: IBP would still see finite margins for the other classes
    path, name = _poisoned(tmp_path, (np.nan,), which=-1)
    counts, data = _run(path, x, y, idx, tmp_path, "nan", attack=True)
    assert counts == {"verified": 0, "falsified": 0, "unknown": 4, "misclassified": 0, "error": 0}
    assert all("weights contain NaN or Inf" in r and name in r for r in data["reason"])


def test_nonfinite_inputs_unknown_with_reason(tmp_path, one_thread):
    x, y, idx = _data()
    x = x.clone()
    x[1, 0, 3, 3] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    counts, data = _run(MNIST, x, y, idx, tmp_path, "inputs", attack=True)
    assert list(data["status"][[1, 2]]) == [UNKNOWN, UNKNOWN]
    assert list(data["reason"][[1, 2]]) == ["the input contains NaN or Inf"] * 2
    assert np.isnan(data["margins"][[1, 2]]).all()  # no stage ran on them
    assert data["status"][0] == VERIFIED and data["reason"][0] == ""  # the others as before


def test_nonfinite_bounds_never_verify(tmp_path, monkeypatch):
    """+Inf passes `> 0`: only the finiteness check keeps these from `verified`."""
    x, y, idx = _data(3)

    def fake_stage(bm, stage, lo, up, C, todo, cache):
        lb = torch.full((len(todo), C.shape[1]), 5.0)
        lb[todo == 0] = float("inf")
        lb[todo == 1, 0] = float("nan")
        return lb

    monkeypatch.setattr(verify_mod, "_bound_stage", fake_stage)
    counts, data = _run(MNIST, x, y, idx, tmp_path, "fake")
    assert list(data["status"]) == [UNKNOWN, UNKNOWN, VERIFIED]
    assert data["reason"][0] == "; ".join(f"{s}: bounds are NaN or Inf" for s in ("ibp", "crown-ibp", "crown",
                                                                                  "alpha-crown"))
    assert data["reason"][1].startswith("ibp: bounds are NaN or Inf") and data["reason"][2] == ""


def test_overflowing_weights_never_verify(tmp_path, one_thread):
    """Finite weights so large that the bounds overflow to Inf/NaN in float32: unknown, never verified."""
    from certkit.bounds import BoundedModel

    x, _, idx = _data(2)
    path, _ = _poisoned(tmp_path, (3e38,) * 8, which=-2)
    with torch.no_grad():
        y = BoundedModel(path)(x).reshape(2, -1).argmax(1)  # labels it predicts: the bounds decide
    counts, data = _run(path, x, y, idx, tmp_path, "huge")
    assert counts == {"verified": 0, "falsified": 0, "unknown": 2, "misclassified": 0, "error": 0}
    assert all("bounds are NaN or Inf" in r for r in data["reason"])


@pytest.fixture
def nan_instance(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_memory_budget import UNSAFE_FAR_AWAY, _mlp_onnx

    model = _mlp_onnx(tmp_path / "mlp.onnx")
    proto = onnx.load(model)
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    arr = numpy_helper.to_array(w2).copy()
    arr[0, 0] = np.nan
    w2.CopyFrom(numpy_helper.from_array(arr, "w2"))
    onnx.save(proto, model)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(UNSAFE_FAR_AWAY)
    return model, prop


def test_run_instance_nan_weights_unknown(nan_instance, tmp_path):
    from certkit.complete.solver import Solver
    from certkit.vnnlib import read_vnnlib

    model, prop = nan_instance
    result = Solver(model).solve(read_vnnlib(prop), 20)
    assert result.status is Status.UNKNOWN and "NaN" in result.log[0]
    r = _cli("run-instance", model, prop, "--timeout", "30", "--results", tmp_path / "r.txt")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.txt").read_text().split()[0] == "unknown"
