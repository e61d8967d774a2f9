"""Training end to end on real MNIST (tiny budgets): resume, CLI, plots, export."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from certkit.cli import main
from certkit.export import ExportCheckFailed, export_checkpoint, read_metadata
from certkit.train.loop import config_from, train
from certkit.train.metrics import MetricsFile

TINY = dict(model="mlp", limit=700, val_size=100, eval_limit=200, batch_size=100, schedule_start=1,
            schedule_length=1, eps=0.1, milestones=(2,))


def test_resume_is_bit_for_bit(tmp_path, data_dir):
    for method in ("fast", "crown-ibp"):
        straight, split = tmp_path / f"{method}-a", tmp_path / f"{method}-b"
        cfg2 = config_from("mnist", method=method, epochs=3, data_dir=str(data_dir), **TINY)
        cfg1 = config_from("mnist", method=method, epochs=1, data_dir=str(data_dir), **TINY)
        train(cfg2, straight, log=lambda *_: None)
        train(cfg1, split, log=lambda *_: None)
        train(cfg2, split, resume=True, log=lambda *_: None)
        a = torch.load(straight / "last.pt", weights_only=False)
        b = torch.load(split / "last.pt", weights_only=False)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (method, k)
        ma, mb = MetricsFile(straight / "metrics.h5").read(), MetricsFile(split / "metrics.h5").read()
        assert list(ma["epoch"]) == list(mb["epoch"]) == [1, 2, 3]
        for k in ("loss", "test_verified_err", "tightness", "unstable"):
            assert (ma[k] == mb[k]).all(), (method, k)


def test_metrics_file_contents(tmp_path, data_dir):
    cfg = config_from("mnist", method="fast", epochs=2, data_dir=str(data_dir), **TINY)
    last = train(cfg, tmp_path / "run", log=lambda *_: None)
    m = MetricsFile(tmp_path / "run" / "metrics.h5").read()
    assert m["active"].shape == (2, 2) and m["unstable"].shape == (2, 2)  # mlp: two ReLU layers
    assert ((m["active"] + m["inactive"] + m["unstable"]) == pytest.approx(1.0))
    assert m["eps"][-1] == pytest.approx(0.1) and 0 <= last["test_verified_err"] <= 100
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()
    cfg_saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_saved["method"] == "fast" and cfg_saved["eps"] == 0.1


def test_cli_train_plot_export(tmp_path, data_dir):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--model", "cnn-small", "--epochs", "1",
                                  "--limit", "700", "--val-size", "100", "--eval-limit", "200", "--batch-size",
                                  "100", "--eps", "0.1", "--schedule", "1,1", "--data-dir", str(data_dir),
                                  "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "verified error" in r.output
    r = CliRunner().invoke(main, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    for name in ("regularizers", "relu_ratios", "eps_schedule", "errors"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(run / "best.pt"), str(out), "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(out))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    meta = read_metadata(out)
    assert meta["dataset"] == "mnist" and float(meta["eps"]) == 0.1 and meta["training_method"] == "fast"
    assert json.loads(meta["input_shape"]) == [1, 28, 28] and json.loads(meta["pixel_range"]) == [0.0, 1.0]
    assert len(json.loads(meta["class_names"])) == 10 and meta["certkit_version"]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_export_refuses_a_file_that_fails_its_check(tmp_path, data_dir, monkeypatch):
    cfg = config_from("mnist", method="vanilla", epochs=1, data_dir=str(data_dir), **TINY)
    train(cfg, tmp_path / "run", log=lambda *_: None)
    import certkit.ort_session

    real = certkit.ort_session.run_onnxruntime
    monkeypatch.setattr(certkit.ort_session, "run_onnxruntime", lambda p, x: real(p, x) + 1e-3)
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportCheckFailed, match="onnxruntime differs"):
        export_checkpoint(tmp_path / "run" / "last.pt", out, data_dir=str(data_dir))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_train_errors_are_one_line(tmp_path, data_dir):
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--dataset", "mnist", "--eps", "x", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "bad epsilon" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"),
                             "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "train-images-idx3-ubyte" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()
    r = runner.invoke(main, ["train", "--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no run to resume" in r.output
    r = runner.invoke(main, ["export", "--onnx", str(tmp_path / "x.pt"), str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output


def test_ablation_switches(tmp_path, data_dir):
    """--default-init / --regularizers: fast without both trains exactly like vanilla; each switch
    alone changes the run; the CLI passes them through and rejects unknown regularisers."""
    runs = {}
    for name, kw in {"vanilla": dict(method="vanilla"),
                     "fast-bare": dict(method="fast", ibp_init=False, regularizers=()),
                     "fast-no-reg": dict(method="fast", regularizers=()),
                     "vanilla-reg": dict(method="vanilla", regularizers=("tightness",))}.items():
        cfg = config_from("mnist", epochs=1, data_dir=str(data_dir), **TINY, **kw)
        train(cfg, tmp_path / name, log=lambda *_: None)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(runs["vanilla"][k], runs["fast-bare"][k]) for k in runs["vanilla"])
    assert not all(torch.equal(runs["vanilla"][k], runs["fast-no-reg"][k]) for k in runs["vanilla"])
    assert not all(torch.equal(runs["vanilla"][k], runs["vanilla-reg"][k]) for k in runs["vanilla"])
    r = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--regularizers", "tightness,bogus",
                                  "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "unknown regulariser 'bogus'" in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert "--default-init" in r.output and "--regularizers" in r.output
