"""certkit verify: statuses that hold up, resumable HDF5 results, VNN-LIB emission, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.attack import pgd_attack
from certkit.bounds import BoundedModel, margin_matrix
from certkit.cli import main
from certkit.ort_session import run_onnxruntime
from certkit.results import STATUS, read_results, summarize
from certkit.verify import VerifyConfig, load_verify_data, run_verify, verify_batch
from certkit.vnnlib import read_vnnlib
from tests.conftest import REPO, VNNCOMP

DEMO = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"  # trained and exported by certkit
FAST = dict(pgd_steps=20, pgd_restarts=3, batch_size=8)
EPS = 0.15  # above the trained radius: the first 16 images give verified and falsified samples


@pytest.fixture(scope="module")
def mnist_slice(data_dir):
    return load_verify_data("mnist", str(data_dir), 0, 16, (1, 28, 28))


@pytest.fixture(scope="module")
def results(tmp_path_factory, mnist_slice):
    out = tmp_path_factory.mktemp("v") / "r.h5"
    x, y, idx = mnist_slice
    run_verify(DEMO, x, y, idx, VerifyConfig(eps=EPS, **FAST), "mnist", 0, out=out)
    return read_results(out), mnist_slice


def test_stages_are_monotone_and_below_pgd_robust(results):
    (attrs, data), _ = results
    s = summarize(attrs, data)
    assert s["complete"] and s["samples"] == 16
    accs = list(s["verified_by_stage"].values())
    assert accs == sorted(accs)
    assert s["verified_accuracy"] <= s["pgd_robust_accuracy"] <= s["clean_accuracy"]
    assert 0 < s["verified_accuracy"] and s["falsified"] > 0  # the slice exercises both outcomes
    # each stage's margins, where it ran, are what decided: verified ⇔ all > 0 at the deciding stage
    for i in np.flatnonzero(data["status"] == STATUS.index("verified")):
        assert (data["margins"][i, data["stage"][i]] > 0).all()


def test_counterexamples_reproduce_in_onnxruntime(results):
    (attrs, data), (x, y, _) = results
    fals = np.flatnonzero(data["status"] == STATUS.index("falsified"))
    assert len(fals)
    cex = data["counterexample"][fals].reshape(len(fals), 1, 28, 28)
    x0 = x[fals].numpy()
    assert (np.abs(cex - x0) <= EPS + 1e-6).all() and (cex >= 0).all() and (cex <= 1).all()
    out = run_onnxruntime(DEMO, cex)
    assert (out.argmax(1) != y[fals].numpy()).all()
    assert np.isnan(data["counterexample"][data["status"] != STATUS.index("falsified")]).all()


def test_verified_samples_survive_a_strong_attack(results):
    (attrs, data), (x, y, _) = results
    ver = np.flatnonzero(data["status"] == STATUS.index("verified"))
    bm = BoundedModel(DEMO)
    xv, yv = x[ver], y[ver]
    lo, up = (xv - EPS).clamp(0, 1), (xv + EPS).clamp(0, 1)
    _, worst = pgd_attack(bm, lo, up, margin_matrix(yv, 10), steps=100, restarts=10,
                          generator=torch.Generator().manual_seed(1))
    assert (worst > 0).all()


def test_resume_after_interruption_gives_the_same_file(tmp_path, mnist_slice):
    x, y, idx = mnist_slice
    cfg = VerifyConfig(eps=EPS, method="crown", attack=True, batch_size=4, pgd_steps=10, pgd_restarts=2)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    run_verify(DEMO, x[:12], y[:12], idx[:12], cfg, "mnist", 0, out=full)

    def stop_after_first(st):
        if st["done"] >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_verify(DEMO, x[:12], y[:12], idx[:12], cfg, "mnist", 0, out=part, progress=stop_after_first)
    attrs, data = read_results(part)
    assert not attrs["complete"] and len(data["index"]) == 4
    run_verify(DEMO, x[:12], y[:12], idx[:12], cfg, "mnist", 0, out=part, resume=True)
    (_, d1), (a2, d2) = read_results(full), read_results(part)
    assert a2["complete"]
    for k in ("index", "label", "prediction", "status", "stage"):
        assert (d1[k] == d2[k]).all(), k
    np.testing.assert_allclose(d1["margins"], d2["margins"], rtol=1e-6)
    assert (d1["status"] == STATUS.index("falsified")).any()
    np.testing.assert_array_equal(d1["counterexample"], d2["counterexample"])  # the attack is reproducible too
    with pytest.raises(Exception, match="cannot resume"):
        run_verify(DEMO, x[:12], y[:12], idx[:12], VerifyConfig(eps=0.05, method="crown", attack=False), "mnist",
                   0, out=part, resume=True)


def test_nan_bounds_are_never_verified(mnist_slice, monkeypatch):
    x, y, _ = mnist_slice
    bm = BoundedModel(DEMO)
    monkeypatch.setattr(bm, "compute_bounds", lambda lo, up, **kw: (torch.full((len(lo), 9), float("nan")), None))
    rows = verify_batch(bm, None, x[:4], y[:4], VerifyConfig(eps=0.0, method="ibp", attack=False), ["ibp"],
                        torch.Generator())
    assert (rows["status"] != STATUS.index("verified")).all()


def test_emit_vnnlib_and_npz_dataset(tmp_path, mnist_slice):
    x, y, _ = mnist_slice
    np.savez(tmp_path / "d.npz", x=(x[:3].numpy() * 255).astype(np.uint8), y=y[:3].numpy())
    r = CliRunner().invoke(main, ["verify", str(DEMO), "--eps", "1/255", "--dataset", f"npz:{tmp_path / 'd.npz'}",
                                  "--method", "ibp", "--no-attack", "--emit-vnnlib", str(tmp_path / "props"),
                                  "--out", str(tmp_path / "r.h5")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "props" / "instances.csv").read_text().splitlines()
    assert len(rows) == 3
    onnx_rel, prop, timeout = rows[0].split(",")
    assert (tmp_path / "props" / onnx_rel).resolve() == DEMO.resolve() and float(timeout) > 0
    parsed = read_vnnlib(tmp_path / "props" / prop)
    assert parsed.num_inputs == 784 and parsed.num_outputs == 10
    (case,) = parsed.cases
    x0 = np.round(x[0].numpy().reshape(-1) * 255) / 255  # the npz holds uint8 pixels
    np.testing.assert_allclose(case.lower, np.clip(x0 - 1 / 255, 0, 1), atol=1e-6)
    np.testing.assert_allclose(case.upper, np.clip(x0 + 1 / 255, 0, 1), atol=1e-6)
    label = int(y[0])
    rows = {tuple(A[0]) for A, b in case.polytopes}
    assert len(rows) == 9 and all(A.shape == (1, 10) and b[0] == 0 for A, b in case.polytopes)
    assert all(r[label] == 1 and sum(r) == 0 for r in rows)  # Y_label - Y_j <= 0: class j catches up
    r = CliRunner().invoke(main, ["report", str(tmp_path / "r.h5")])
    assert r.exit_code == 0 and "clean accuracy" in r.output


def _clean_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith("error:")
    for w in words:
        assert w in result.output, (w, result.output)


@pytest.mark.parametrize("args,words", [
    (["--eps", "abc"], ["bad epsilon"]),
    (["--eps", "-0.1"], ["bad epsilon"]),
    (["--eps", "0.1", "--dataset", "cifar10"], ["(3, 32, 32)", "(1, 28, 28)"]),
    (["--eps", "0.1", "--data-dir", "/nonexistent/dir"], ["MNIST test split not found"]),
    (["--eps", "0.1", "--method", "magic"], ["magic"]),
])
def test_bad_input_gives_one_line_and_no_results(args, words, tmp_path, data_dir):
    out = tmp_path / "r.h5"
    extra = [] if "--data-dir" in args else ["--data-dir", str(data_dir)]
    r = CliRunner().invoke(main, ["verify", str(DEMO), "-n", "2", "--out", str(out), *args, *extra])
    if "magic" in args:
        assert r.exit_code == 2 and "magic" in r.output
    else:
        _clean_error(r, *words)
    assert not out.exists()


def test_not_onnx_and_unsupported_operator(tmp_path, unsupported_onnx):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    out = tmp_path / "r.h5"
    _clean_error(CliRunner().invoke(main, ["verify", str(bad), "--eps", "0.1", "--out", str(out)]),
                 "not a readable ONNX model")
    _clean_error(CliRunner().invoke(main, ["verify", str(unsupported_onnx), "--eps", "0.1", "--dataset", "mnist", "-n",
                                           "2", "--out", str(out)]), "Hardmax")
    assert not out.exists()


def test_flat_input_model_takes_dataset_images_row_major(data_dir, vnncomp_dir):
    model = VNNCOMP / "mnist_fc_2022" / "onnx" / "mnist-net_256x2.onnx"  # input 1×784×1
    x, y, idx = load_verify_data("mnist", str(data_dir), 0, 4, (784, 1))
    assert x.shape == (4, 784, 1)
    counts = run_verify(model, x, y, idx, VerifyConfig(eps=0.01, method="crown", attack=False), "mnist", 0)
    assert sum(counts.values()) == 4 and counts["misclassified"] <= 1


def test_timeout_per_sample_skips_stages(mnist_slice):
    x, y, idx = mnist_slice
    counts = run_verify(DEMO, x[:4], y[:4], idx[:4], VerifyConfig(eps=EPS, timeout_per_sample=1e-9, **FAST),
                        "mnist", 0)
    assert counts["verified"] == counts["falsified"] == 0 and counts["unknown"] + counts["misclassified"] == 4
    counts = run_verify(DEMO, x[:4], y[:4], idx[:4], VerifyConfig(eps=EPS, timeout_per_sample=60, **FAST),
                        "mnist", 0)
    assert counts["verified"] > 0
