"""Configuration: YAML files and --set for run-instance, vnncomp and verify, their precedence,
one-line errors, `certkit config show` and its round trip, the worker using the settings it is
given, and results that record them."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from click.testing import CliRunner

from certkit.cli import main
from certkit.complete.config import SolverConfig
from certkit.errors import InvalidInput
from certkit.settings import MAX_CONFIG_BYTES, load_config, solver_config
from certkit.vnnlib import Case, Property, format_vnnlib
from tests.conftest import REPO

DEMO = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"
DEMO_DATA = REPO / "data" / "mnist_test_100.npz"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for w in words:
        assert w in lines[0], (w, result.output)


@pytest.fixture(scope="module")
def sat_instance(tmp_path_factory):
    """A 2-input ReLU network and a property whose box centre is a counterexample: the first
    attack finds it at once; without attack steps, only input splitting does."""
    folder = tmp_path_factory.mktemp("sat")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    torch.onnx.export(model, torch.zeros(1, 2), str(folder / "net.onnx"), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["output"])
    with torch.no_grad():
        y = model(torch.zeros(1, 2)).numpy()[0]
    prop = Property(2, 3, [Case(-np.ones(2), np.ones(2), [(np.array([[1.0, -1.0, 0.0]]),
                                                           np.array([y[0] - y[1] + 0.1]))])])
    (folder / "p.vnnlib").write_text(format_vnnlib(prop))
    return folder


NO_ATTACK = ("--set", "attack_steps=0", "--set", "attack_time=0")


# ---------------------------------------------------------------------------------- the loader


def test_defaults_then_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("solver:\n  attack_steps: 5\n  seed: 2\n  milp_time: 0\nverify:\n  pgd_steps: 7\n")
    cfg = solver_config(f, ["attack_steps=9", "solver.milp_workers=3", "milp_workers=4"])
    assert (cfg.attack_steps, cfg.seed, cfg.milp_time, cfg.milp_workers) == (9, 2, 0.0, 4)  # --set, file, last --set
    assert cfg.attack_restarts == SolverConfig().attack_restarts == 16  # untouched: the default
    assert isinstance(cfg.milp_time, float)
    verify = load_config(f, ["pixel_range=0,255", "timeout_per_sample=null"], ("verify",))["verify"]
    assert verify.values["pgd_steps"] == 7 and verify.values["pixel_range"] == (0.0, 255.0)
    assert verify.origin["pgd_steps"] == str(f) and verify.origin["pixel_range"] == "--set"
    assert verify.values["timeout_per_sample"] is None
    bools = [solver_config(None, [f"float32_steps={t}"]).float32_steps for t in ("yes", "No", "1", "0", "TRUE")]
    assert bools == [True, False, True, False, True]


@pytest.mark.parametrize("text,sets,words", [
    ("solver:\n  atack_steps: 3\n", [], ["'atack_steps'", "nearest: attack_steps"]),
    ("attack_steps: 3\n", [], ["not a section", "attack_steps is a solver setting"]),
    ("solver:\n  attack_steps: 1.5\n", [], ["solver.attack_steps", "1.5", "expected an integer"]),
    ("verify:\n  method: magic\n", [], ["verify.method", "'magic'", "auto, ibp"]),  # checked: the file's every section
    ("solver: [1\n", [], ["not valid YAML", "line 2"]),
    ("- 1\n", [], ["expected a mapping"]),
    ("solver:\n  seed: !!python/object/apply:os.system [echo]\n", [], ["not valid YAML"]),
    ("", ["attack_time=nan"], ["solver.attack_time", "'nan'", "expected a number"]),
    ("", ["attack_restarts=0"], ["at least 1"]),
    ("", ["seed"], ["expected KEY=VALUE"]),
    ("", ["verify.eps=0.1"], ["takes solver. settings"]),
    ("", ["reuse_parent_bounds=maybe"], ["true or false"]),
])
def test_bad_files_and_settings_are_one_readable_error(tmp_path, text, sets, words):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(InvalidInput) as e:
        solver_config(f, sets)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_files_over_one_mebibyte_are_refused(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("solver:\n" + "  # padding\n" * (MAX_CONFIG_BYTES // 10))
    with pytest.raises(InvalidInput, match="at most 1,048,576"):
        solver_config(f)


# ---------------------------------------------------------------------------------- the command line


def test_config_show_round_trip(tmp_path):
    """What `config show` prints is a configuration file: read back, it shows the same settings."""
    first = run("config", "show", "--set", "attack_steps=7", "--set", "verify.pixel_range=0,255",
                "--set", "verify.eps=8/255", "--set", "max_memory=2G")
    assert first.exit_code == 0, first.output
    data = yaml.safe_load(first.output)
    assert data["solver"]["attack_steps"] == 7 and data["solver"]["attack_restarts"] == 16
    assert data["verify"]["pixel_range"] == [0.0, 255.0] and data["verify"]["max_memory"] == 2 << 30
    assert data["verify"]["eps"] == pytest.approx(8 / 255)
    assert "  # PGD: steps per round\n  attack_steps: 7\n" in first.output  # each key under its help
    saved = tmp_path / "saved.yaml"
    saved.write_text(first.output)
    again = run("config", "show", "--config", saved)
    assert again.exit_code == 0 and again.output == first.output
    saved.write_text(first.output.replace("attack_steps: 7", "attack_steps: 3"))  # edited by hand
    assert solver_config(saved).attack_steps == 3
    defaults = run("config", "show")
    assert "eps: null" in defaults.output and "seed: 0" in defaults.output
    (tmp_path / "d.yaml").write_text(defaults.output)
    assert solver_config(tmp_path / "d.yaml") == SolverConfig()


def test_config_show_errors(tmp_path):
    assert_one_line_error(run("config", "show", "--set", "seed=1"), "solver.seed or verify.seed")
    assert_one_line_error(run("config", "show", "--set", "pgd_stesp=1"), "nearest: pgd_steps")
    assert_one_line_error(run("config", "show", "--config", tmp_path / "none.yaml"), "no such file")


@pytest.mark.parametrize("bad", [("--set", "atack_restarts=3"), ("--set", "attack_restarts=many")])
def test_run_instance_and_vnncomp_refuse_bad_settings_before_any_output(tmp_path, sat_instance, bad):
    results = tmp_path / "out" / "r.txt"
    words = ["attack_restarts"] + (["'many'", "an integer"] if "many" in bad[1] else ["unknown solver setting"])
    assert_one_line_error(run("run-instance", sat_instance / "net.onnx", sat_instance / "p.vnnlib", "--timeout", 30,
                              "--results", results, *bad), *words)
    assert_one_line_error(run("vnncomp", sat_instance, "--out", results, *bad), *words)
    assert not results.parent.exists()


def test_run_instance_help_is_generated_from_the_settings(monkeypatch):
    field = {f.name: f for f in dataclasses.fields(SolverConfig)}["milp_max_neurons"]
    monkeypatch.setattr(field, "default", 4096)
    r = run("run-instance", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "at most 4,096 ReLU neurons" in text and "milp_max_neurons=4096" in text
    assert "within 10% of the time left" in text and "for 25% of the time left" in text


def test_worker_uses_the_settings_and_logs_them(tmp_path, sat_instance, capfd):
    """With the defaults the first attack answers sat at once (the vnncomp test below); with no
    attack steps input splitting must find it. The log's first line names the settings used."""
    (tmp_path / "c.yaml").write_text("solver:\n  attack_steps: 0\n")
    r = run("run-instance", sat_instance / "net.onnx", sat_instance / "p.vnnlib", "--timeout", 60, "--threads", 1,
            "--results", tmp_path / "r.txt", "--config", tmp_path / "c.yaml", "--set", "attack_time=0")
    assert r.exit_code == 0 and r.output.strip() == "sat", r.output
    log = capfd.readouterr().err
    first = log.splitlines()[0]
    assert "config:" in first and "attack_steps=0 " in first and "attack_time=0.0 " in first, log
    assert "sat (input-split)" in log and "counterexample from PGD" not in log, log
    assert (tmp_path / "r.txt").read_text().startswith("sat\n")


def test_worker_keeps_its_positional_arguments_and_checks_the_settings(tmp_path, sat_instance, capfd):
    from certkit.vnncomp import worker

    out = tmp_path / "r.txt"
    base = [str(sat_instance / "net.onnx"), str(sat_instance / "p.vnnlib"), str(out), str(time.time() + 30), "t",
            "1", "cpu"]
    assert worker.main(base + [str(1 << 30), '--config={"attack_steps": -1}']) == 2
    assert out.read_text() == "error\n"
    assert "attack_steps" in capfd.readouterr().err


def test_vnncomp_records_the_settings_and_refuses_to_resume_with_others(tmp_path, sat_instance):
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "instances.csv", "w", newline="") as f:
        csv.writer(f).writerow([str(sat_instance / "net.onnx"), str(sat_instance / "p.vnnlib"), "60"])
    out, h5 = tmp_path / "res" / "results.csv", tmp_path / "res" / "results.h5"
    r = run("vnncomp", bench, "--out", out, "--h5", h5)
    assert r.exit_code == 0, r.output
    recorded = out.parent / "config.yaml"
    assert solver_config(recorded) == SolverConfig()  # a --config file of the settings used
    with h5py.File(h5) as f:
        assert json.loads(f.attrs["config"]) == dataclasses.asdict(SolverConfig())
    log = next((out.parent / "bench").glob("*.log")).read_text()
    assert "attack_steps=60 " in log.splitlines()[0] and "sat (attack)" in log, log
    stamp = out.stat().st_mtime_ns
    refused = run("vnncomp", bench, "--out", out, *NO_ATTACK, "--set", "attack_time_max=5")
    assert_one_line_error(refused, "cannot resume", "attack_steps: 60 → 0", "attack_time: 0.03 → 0.0")
    assert "attack_time_max" not in refused.output  # the same on both sides
    again = run("vnncomp", bench, "--out", out, "--config", recorded)
    assert again.exit_code == 0, again.output
    assert out.stat().st_mtime_ns == stamp and len(list(csv.reader(open(out)))) == 2  # header + the one row


def test_the_recorded_settings_are_the_ones_given(tmp_path):
    from certkit.vnncomp.runner import record_config, write_h5

    out = tmp_path / "results.csv"
    given = SolverConfig(attack_steps=0, milp_time=0.5, float32_steps=False)
    record_config(out, given, resuming=False)
    assert solver_config(tmp_path / "config.yaml") == given
    record_config(out, given, resuming=True)  # the same settings: fine
    with pytest.raises(InvalidInput, match="milp_time: 0.5 → 0.25"):
        record_config(out, SolverConfig(attack_steps=0, float32_steps=False), resuming=True)
    write_h5(tmp_path / "r.h5", [], [], given)
    with h5py.File(tmp_path / "r.h5") as f:
        assert json.loads(f.attrs["config"]) == dataclasses.asdict(given)


def test_verify_precedence_defaults_file_set_flags(tmp_path):
    """defaults < file < --set < flags given; eps may come from the file; the results record the
    effective settings."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("verify:\n  eps: 0.05\n  method: crown\n  batch_size: 3\n  pgd_steps: 4\n")
    out = tmp_path / "r.h5"
    r = run("verify", DEMO, "--dataset", f"npz:{DEMO_DATA}", "-n", 2, "--out", out, "--device", "cpu",
            "--config", cfg, "--set", "method=alpha-crown", "--set", "batch_size=2", "--method", "ibp", "--no-attack")
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        options = json.loads(f.attrs["options"])
        assert f.attrs["method"] == "ibp"
    assert options["method"] == "ibp" and options["attack"] is False  # flags given
    assert options["batch_size"] == 2  # --set over the file
    assert options["eps"] == 0.05 and options["pgd_steps"] == 4  # the file
    assert options["pgd_restarts"] == 5 and options["pixel_range"] == [0.0, 1.0]  # default; the model's metadata
    assert_one_line_error(run("verify", DEMO, "--dataset", f"npz:{DEMO_DATA}", "-n", 2, "--set", "eps=0.1",
                              "--set", "pgd_step=3"), "unknown verify setting", "pgd_steps")
    assert_one_line_error(run("verify", DEMO, "--dataset", f"npz:{DEMO_DATA}", "-n", 2), "give --eps")
    assert_one_line_error(run("verify", DEMO, "--eps", "0.1", "--dataset", f"npz:{DEMO_DATA}", "--config", cfg,
                              "--set", "batch_size=0"), "verify.batch_size", "at least 1")


def test_reading_the_solver_settings_imports_neither_torch_nor_onnx():
    """run-instance's parent process reads the settings and spawns the solver: it must stay light."""
    code = ("import sys\nfrom certkit.settings import solver_config\nimport certkit.vnncomp.instance\n"
            "solver_config()\nprint(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
