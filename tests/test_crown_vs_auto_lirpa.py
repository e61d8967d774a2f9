"""benchmarks/crown_vs_auto_lirpa.py's pure parts (no auto_LiRPA needed): boxes, repeat sizing,
bound differences, the table, the model copy given to auto_LiRPA, and the exit without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from certkit.train.models import build_model
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import crown_vs_auto_lirpa as bench  # noqa: E402  (benchmarks/crown_vs_auto_lirpa.py)


def test_boxes_are_fixed_clamped_and_of_radius_eps():
    lo, up = bench.boxes((3, 4, 4), 5)
    lo2, up2 = bench.boxes((3, 4, 4), 5)
    assert torch.equal(lo, lo2) and torch.equal(up, up2)
    assert lo.shape == (5, 3, 4, 4)
    assert float(lo.min()) >= 0 and float(up.max()) <= 1
    assert float((up - lo).max()) <= 2 * bench.EPS + 1e-7
    assert not torch.equal(bench.boxes((3, 4, 4), 5, seed=1)[0], lo)


@pytest.mark.parametrize(("per_round", "repeats", "budget", "expected"),
                         [(1.0, 5, 60, 5), (20.0, 5, 60, 3), (100.0, 5, 60, 1), (0.0, 4, 1, 4)])
def test_repeats_within_budget(per_round, repeats, budget, expected):
    assert bench.repeats_within(per_round, repeats, budget) == expected


def test_measure_alternates_and_returns_warmup_results():
    calls = []
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    med, outs, n = bench.measure(fns, repeats=3, budget=1e9)
    assert n == 3 and outs == {"a": 1, "b": 2}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(med) == {"a", "b"} and all(t >= 0 for t in med.values())


def test_bound_difference_covers_both_sides_and_shapes():
    lo, up = torch.zeros(2, 3), torch.ones(2, 3)
    assert bench.bound_difference((lo, up), (lo, up)) == 0
    assert bench.bound_difference((lo, up), (lo - 0.5, up)) == pytest.approx(0.5)
    assert bench.bound_difference((lo, up), (lo, up.reshape(2, 3, 1) + 0.25)) == pytest.approx(0.25)


def test_format_table_rows_and_summary():
    rows = [bench.Row("cnn-small", 1, 0.5, 1.0, 1e-7, 0.6, 5), bench.Row("resblock", 32, 3.0, 2.0, 2e-7, 0.1, 1)]
    text = bench.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["network", "batch", "certkit"]
    assert "0.50" in lines[2] and "1.50" in lines[3]
    assert lines[-1] == ("ratio certkit/auto_LiRPA: median 1.00, worst 1.50 (resblock, batch 32); "
                         "1/2 cases at <= 0.5")
    assert bench.format_table([]).count("\n") == 1  # header and rule only


def test_lirpa_copy_keeps_the_function_and_leaves_the_original():
    torch.manual_seed(0)
    model = build_model("cnn-small", "cifar10").eval()
    copy = bench.lirpa_copy(model)
    assert model[0].mean.shape == (3, 1, 1) and copy[0].mean.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), copy(x))


def test_resblock_net_shape():
    assert bench.ResBlockNet().eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_exits_2_naming_the_setup_script_without_auto_lirpa():
    code = "import sys; sys.modules['auto_LiRPA'] = None; import runpy; " \
           f"sys.argv = ['x', '--quick']; runpy.run_path({str(REPO / 'benchmarks' / 'crown_vs_auto_lirpa.py')!r}, " \
           "run_name='__main__')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert "setup_auto_lirpa.sh" in res.stderr
