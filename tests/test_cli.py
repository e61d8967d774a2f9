"""The command line: real outputs, and one clear line with exit code 2 on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.cli import main
from tests.conftest import REPO

DEMO = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"


@pytest.fixture(scope="module")
def demo_x(tmp_path_factory):
    """The first MNIST test image (a 7) as a .npy file, from the images shipped for the demo."""
    path = tmp_path_factory.mktemp("x") / "x.npy"
    np.save(path, np.load(REPO / "data" / "mnist_test_100.npz")["x"][0].astype(np.float32) / 255)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") or "Error:" in result.output, result.output
    for w in words:
        assert w in result.output, (w, result.output)


def test_inspect_prints_the_graph():
    r = run("inspect", DEMO)
    assert r.exit_code == 0, r.output
    for word in ("conv", "relu", "linear", "all operators supported", "parameters"):
        assert word in r.output


def test_inspect_names_unsupported_operator(unsupported_onnx):
    r = run("inspect", unsupported_onnx)
    assert_clean_error(r, "Hardmax", "Hardmax_2")


def test_bounds_center_eps_with_label_writes_npz(demo_x, tmp_path):
    out = tmp_path / "b.npz"
    r = run("bounds", DEMO, "--center", demo_x, "--eps", "0.1", "--clip", "0,1", "--label", "7", "--out", out)
    assert r.exit_code == 0, r.output
    assert "proved positive" in r.output
    data = np.load(out)
    assert data["lb"].shape == (1, 9) and (data["lb"] <= data["ub"]).all()
    assert str(data["method"]) == "crown"


def test_bounds_lower_upper_files_match_library(demo_x, tmp_path):
    from certkit.bounds import compute_bounds

    x = np.load(demo_x)
    np.save(tmp_path / "lo.npy", np.clip(x - 0.05, 0, 1))
    np.save(tmp_path / "hi.npy", np.clip(x + 0.05, 0, 1))
    out = tmp_path / "b.npz"
    r = run("bounds", DEMO, "--lower", tmp_path / "lo.npy", "--upper", tmp_path / "hi.npy", "--method", "ibp",
            "--out", out)
    assert r.exit_code == 0, r.output
    lb, ub = compute_bounds(str(DEMO), torch.tensor(np.clip(x - 0.05, 0, 1))[None],
                            torch.tensor(np.clip(x + 0.05, 0, 1))[None], method="ibp")
    np.testing.assert_allclose(np.load(out)["lb"], lb.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("eps", ["-1", "abc", "1/0", "nan"])
def test_bad_eps(demo_x, eps, tmp_path):
    out = tmp_path / "b.npz"
    r = run("bounds", DEMO, "--center", demo_x, "--eps", eps, "--out", out)
    assert_clean_error(r, "epsilon")
    assert not out.exists()


def test_wrong_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 32, 32), np.float32))
    out = tmp_path / "b.npz"
    r = run("bounds", DEMO, "--center", tmp_path / "x.npy", "--eps", "0.1", "--out", out)
    assert_clean_error(r, "(3, 32, 32)", "(1, 28, 28)")
    assert not out.exists()


def test_not_onnx(demo_x, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    assert_clean_error(run("inspect", bad), "not a readable ONNX model")
    assert_clean_error(run("bounds", bad, "--center", demo_x, "--eps", "0.1"), "not a readable ONNX model")


def test_missing_files(tmp_path):
    assert_clean_error(run("inspect", tmp_path / "nope.onnx"), "no such file")
    assert_clean_error(run("bounds", DEMO, "--center", tmp_path / "nope.npy", "--eps", "0.1"), "no such file")


def test_box_options_are_checked(demo_x, tmp_path):
    assert_clean_error(run("bounds", DEMO, "--center", demo_x), "--center and --eps")
    assert_clean_error(run("bounds", DEMO, "--center", demo_x, "--eps", "0.1", "--label", "12"), "--label 12")
    np.save(tmp_path / "lo.npy", np.ones((1, 28, 28), np.float32))
    np.save(tmp_path / "hi.npy", np.zeros((1, 28, 28), np.float32))
    assert_clean_error(run("bounds", DEMO, "--lower", tmp_path / "lo.npy", "--upper", tmp_path / "hi.npy"),
                       "lower bound above upper")


def test_unsupported_operator_from_bounds_command(unsupported_onnx, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.float32))
    out = tmp_path / "b.npz"
    r = run("bounds", unsupported_onnx, "--center", tmp_path / "x.npy", "--eps", "0.1", "--out", out)
    assert_clean_error(r, "Hardmax", "Hardmax_2")
    assert not out.exists()


def test_help_teaches():
    r = run("bounds", "--help")
    assert r.exit_code == 0 and "--eps" in r.output and "crown-ibp" in r.output


def test_operators_command_and_readme_list_match_the_registry():
    """`certkit operators` lists every registered ONNX operator, and the README's table is its output."""
    from certkit.onnx_io import SUPPORTED_OPS

    r = run("operators", "--markdown")
    assert r.exit_code == 0, r.output
    listed = {op.strip() for line in r.output.splitlines()[2:] for op in line.split("|")[3].split(",")}
    assert listed == set(SUPPORTED_OPS)
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- operators:begin -->\n")[1].split("<!-- operators:end -->")[0]
    assert block.strip() == r.output.strip(), "README's operator table is stale: paste `certkit operators --markdown`"
    plain = run("operators")
    assert plain.exit_code == 0 and "LayerNormalization" in plain.output
