"""ε sweeps (`certkit verify --eps 0.1,0.2,0.3`): parsing, one results file with a group per ε,
answers carried between radii only where sound, resume, old single-ε files, the command line."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.boxes import parse_eps_list
from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.ort_session import run_onnxruntime
from certkit.results import STATUS, SweepFile, read_results, read_sweep, summarize
from certkit.verify import (
    VerifyConfig,
    _Answers,
    _carry_over,
    _settle,
    load_verify_data,
    run_sweep,
    run_verify,
    sweep_order,
)
from tests.conftest import REPO

MODEL = REPO / "models" / "mnist_cnn_small_eps0.3.onnx"
DATA = REPO / "data" / "mnist_test_100.npz"
FAST = dict(pgd_steps=20, pgd_restarts=3, batch_size=8)
RADII = (0.3, 0.35, 0.4)  # the first 24 images: falsified at 0.3 (carried up), verified at 0.4 (carried down)
VERIFIED, FALSIFIED, UNKNOWN, MISCLASSIFIED = (STATUS.index(s) for s in ("verified", "falsified", "unknown",
                                                                         "misclassified"))


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, radii", [
    ("0.1,0.2,0.3", (0.1, 0.2, 0.3)),
    ("0.3, 0.1", (0.1, 0.3)),  # ascending, whatever the order given
    ("1/255:8/255:1/255", tuple(k / 255 for k in range(1, 9))),  # the same floats as k/255 typed one by one
    ("0.1:0.3:0.1", (0.1, 0.2, 0.3)),  # STOP included: 0.3 itself, not 0.30000000000000004
    ("0:0.1:0.0333333333333", (0.0, 0.0333333333333, 0.0666666666666, 0.1)),  # STOP reached within rounding
    ("0:1:0.3", (0.0, 0.3, 0.6, 0.9)),  # STOP not reached: not included
    ("0.1,2/255:4/255:1/255", (2 / 255, 3 / 255, 4 / 255, 0.1)),
    ("8/255", (8 / 255,)),
    (["0.1", 0.3], (0.1, 0.3)),  # a YAML list
])
def test_eps_lists_and_ranges(text, radii):
    assert parse_eps_list(text) == radii


@pytest.mark.parametrize("text, words", [
    ("0.1,0.1", ["given twice"]),
    ("0.1,1/10", ["given twice", "'1/10'"]),
    ("0.1:0.3:0.1,0.2", ["given twice"]),
    ("0.1,,0.2", ["empty item"]),
    ("0.1,", ["empty item"]),
    ("", ["no epsilon given"]),
    ("0.3:0.1:0.1", ["empty", "STOP is below START"]),
    ("0.1:0.1:0.01", ["a single radius"]),
    ("0:1:0", ["STEP must be > 0"]),
    ("0:1", ["START:STOP:STEP"]),
    ("0:1:1e-9", ["at most 1000"]),
    ("0.1,abc", ["bad epsilon 'abc'"]),
    ("0.1,-0.2", ["must be a finite number >= 0"]),
    ("0:nan:0.1", ["bad epsilon 'nan'"]),
])
def test_bad_eps_lists_are_one_clear_error(text, words):
    with pytest.raises(InvalidInput) as e:
        parse_eps_list(text)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_sweep_is_a_setting_too():
    assert VerifyConfig(eps=parse_eps_list("0.2,0.1")).radii() == (0.1, 0.2)
    assert VerifyConfig(eps=0.1).radii() == (0.1,)


def test_order_smallest_then_largest_then_ascending():
    assert sweep_order(1) == [0] and sweep_order(2) == [0, 1] and sweep_order(3) == [0, 2, 1]
    assert sweep_order(5) == [0, 4, 1, 2, 3]


# ---------------------------------------------------------------------------------- carrying answers over


def _answers(eps: float, status: list[int], origin: list[float] | None = None) -> _Answers:
    a = _Answers.empty(eps, len(status))
    a.status[:] = status
    a.stage[:] = [4 if s == FALSIFIED else 0 if s == VERIFIED else -1 for s in status]
    a.origin[:] = eps if origin is None else origin
    a.cex.update((i, np.full(3, eps, np.float32)) for i, s in enumerate(status) if s == FALSIFIED)
    return a


def test_carry_over_takes_only_the_sound_direction_from_the_nearest_radius():
    small = _answers(0.1, [FALSIFIED, VERIFIED, MISCLASSIFIED, UNKNOWN, UNKNOWN])
    mid = _answers(0.2, [FALSIFIED, UNKNOWN, MISCLASSIFIED, FALSIFIED, UNKNOWN], [0.1, 0.2, 0.2, 0.2, 0.2])
    large = _answers(0.4, [FALSIFIED, VERIFIED, MISCLASSIFIED, FALSIFIED, VERIFIED])
    c = _carry_over(0.3, [small, large, mid], 5)
    # falsified from a smaller ε (the nearest, 0.2, carrying 0.1's for sample 0), verified from a larger one
    assert c.status.tolist() == [FALSIFIED, VERIFIED, MISCLASSIFIED, FALSIFIED, VERIFIED]
    assert c.origin.tolist() == [0.1, 0.4, 0.2, 0.2, 0.4]
    assert c.stage.tolist() == [4, 0, -1, 4, 0]
    assert np.array_equal(c.cex[3], np.full(3, 0.2, np.float32))
    # at the smallest ε nothing is carried but misclassified: a counterexample of a larger box proves nothing
    assert _carry_over(0.05, [mid], 5).status.tolist() == [UNKNOWN] * 2 + [MISCLASSIFIED] + [UNKNOWN] * 2


def test_a_contradiction_is_reported_and_the_counterexample_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="certkit.verify"):
        c = _carry_over(0.2, [_answers(0.1, [FALSIFIED]), _answers(0.3, [VERIFIED])], 1)
    assert c.status.tolist() == [FALSIFIED] and "one of the two answers is wrong" in caplog.text


# --------------------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def samples():
    return load_verify_data(f"npz:{DATA}", None, 0, 24, (1, 28, 28))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, samples, one_thread):
    """The sweep's file, and the rows of a separate single-ε run per radius."""
    x, y, idx = samples
    out = tmp_path_factory.mktemp("sweep") / "sweep.h5"
    counts = run_sweep(MODEL, x, y, idx, VerifyConfig(eps=RADII, **FAST), f"npz:{DATA}", 0, out=out)
    separate = {}
    for e in RADII:
        single = out.parent / f"single_{e}.h5"
        run_verify(MODEL, x, y, idx, VerifyConfig(eps=e, **FAST), f"npz:{DATA}", 0, out=single)
        separate[e] = read_results(single)
    return out, counts, separate


def test_one_group_per_eps_with_the_single_file_schema(sweep):
    out, counts, separate = sweep
    with h5py.File(out) as f:
        assert list(f.attrs["eps"]) == list(RADII) and bool(f.attrs["complete"])
        names = json.loads(f.attrs["groups"])
        assert names == sorted(f) and len(names) == 3
        with h5py.File(out.parent / "single_0.3.h5") as single:
            for name in names:
                g = f[name]
                assert set(g) == set(single) | {"reused_from"} and g["reused_from"].dtype == np.float32
                assert all(g[k].dtype == single[k].dtype and g[k].shape[1:] == single[k].shape[1:] for k in single)
    levels = read_sweep(out)
    assert [a["eps"] for a, _ in levels] == list(RADII)
    for (attrs, data), e in zip(levels, RADII):
        single_attrs = separate[e][0]
        assert set(single_attrs) - {"rows_committed"} <= set(attrs) and attrs["complete"]
        assert attrs["stages"] == single_attrs["stages"] and attrs["options"]["eps"] == e
        assert attrs["sweep_eps"] == list(RADII) and len(data["index"]) == 24
        assert counts[e] == {name: int((data["status"] == i).sum()) for i, name in enumerate(STATUS)}
        assert "reused" in summarize(attrs, data)


def test_statuses_agree_with_separate_runs_where_both_decided(sweep):
    out, _, separate = sweep
    for attrs, data in read_sweep(out):
        mine, theirs = data["status"], separate[attrs["eps"]][1]["status"]
        assert not ((mine == VERIFIED) & (theirs == FALSIFIED)).any()
        assert not ((mine == FALSIFIED) & (theirs == VERIFIED)).any()
        assert ((mine == MISCLASSIFIED) == (theirs == MISCLASSIFIED)).all()
        reused = np.isfinite(data["reused_from"])
        # a carried answer is the separate run's, or decides what the separate run left unknown
        assert ((mine[reused] == theirs[reused]) | (theirs[reused] == UNKNOWN)).all()
        assert (np.isnan(data["counterexample"][mine != FALSIFIED])).all()


def test_carried_rows_say_where_they_come_from(sweep, samples):
    out, _, _ = sweep
    x, y, _ = samples
    levels = {attrs["eps"]: (attrs, data) for attrs, data in read_sweep(out)}
    carried = {s: 0 for s in (VERIFIED, FALSIFIED)}
    for e, (_, data) in levels.items():
        for i in np.flatnonzero(np.isfinite(data["reused_from"])):
            source = float(np.float32(data["reused_from"][i]))
            origin = next(d for a, d in levels.values() if np.float32(a["eps"]) == np.float32(source))
            status = data["status"][i]
            carried[status] += 1
            assert (source < e) if status == FALSIFIED else (source > e)
            assert origin["status"][i] == status and np.isnan(origin["reused_from"][i])
            assert data["stage"][i] == origin["stage"][i] and data["reason"][i] == ""
            if np.isnan(data["margins"][i]).all():  # carried before computing; a settled row keeps its own
                assert (data["times"][i] == 0).all()
            if status == FALSIFIED:  # the counterexample of the smaller box lies in this one
                cex = data["counterexample"][i]
                assert np.array_equal(cex, origin["counterexample"][i])
                lo, up = ((x[i] - e).clamp(0, 1).reshape(-1).numpy(), (x[i] + e).clamp(0, 1).reshape(-1).numpy())
                assert (lo <= cex).all() and (cex <= up).all()
                assert run_onnxruntime(MODEL, cex.reshape(1, 1, 28, 28)).argmax(1)[0] != int(y[i])
    assert carried[VERIFIED] > 0 and carried[FALSIFIED] > 0  # the slice exercises both directions


def test_the_file_is_monotone_in_eps(sweep):
    out, _, _ = sweep
    levels = [data["status"] for _, data in read_sweep(out)]
    for smaller, larger in zip(levels, levels[1:]):
        assert not ((smaller == FALSIFIED) & (larger != FALSIFIED)).any()
        assert not ((larger == VERIFIED) & (smaller != VERIFIED)).any()


def test_resume_of_an_interrupted_sweep_gives_the_same_file(sweep, samples, tmp_path):
    full, _, _ = sweep
    x, y, idx = samples
    part = tmp_path / "part.h5"
    cfg = VerifyConfig(eps=RADII, **FAST)

    def stop_in_the_second_radius(st):
        if st["eps"] == RADII[-1] and st["done"] >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(MODEL, x, y, idx, cfg, f"npz:{DATA}", 0, out=part, progress=stop_in_the_second_radius)
    before = read_sweep(part)
    assert [a["complete"] for a, _ in before] == [True, False, False]
    assert 0 < len(before[2][1]["index"]) < 24 and len(before[1][1]["index"]) == 0
    run_sweep(MODEL, x, y, idx, cfg, f"npz:{DATA}", 0, out=part, resume=True)
    after = read_sweep(part)
    for (_, d0), (_, d1) in zip(before, after):  # what was written is kept, not computed again (its times too)
        rows = len(d0["index"])
        assert all(np.array_equal(d0[k], d1[k][:rows], equal_nan=True) for k in ("index", "margins", "times"))
    for (a1, d1), (a2, d2) in zip(after, read_sweep(full)):
        assert a1["complete"] and a1["eps"] == a2["eps"]
        for k in d2:
            if k == "margins":
                np.testing.assert_allclose(d1[k], d2[k], rtol=1e-6)
            elif k != "times":
                assert np.array_equal(d1[k], d2[k], equal_nan=k not in ("reason",)), k
    with h5py.File(part) as f:
        assert bool(f.attrs["complete"])
    with pytest.raises(InvalidInput, match="cannot resume"):
        run_sweep(MODEL, x, y, idx, VerifyConfig(eps=(0.3, 0.4), **FAST), f"npz:{DATA}", 0, out=part, resume=True)
    with pytest.raises(InvalidInput, match="cannot resume"):
        run_verify(MODEL, x, y, idx, VerifyConfig(eps=0.3, **FAST), f"npz:{DATA}", 0, out=part, resume=True)


def test_old_single_eps_files_still_read(sweep, samples):
    out, _, _ = sweep
    single = out.parent / "single_0.3.h5"
    attrs, data = read_results(single)
    (only,) = read_sweep(single)
    assert only[0] == attrs and "sweep_eps" not in attrs and np.isnan(data["reused_from"]).all()
    assert "reused" not in summarize(attrs, data)
    assert read_results(single, eps=0.3)[0]["eps"] == 0.3
    with pytest.raises(InvalidInput, match="no ε=0.4"):
        read_results(single, eps=0.4)
    with pytest.raises(InvalidInput, match="read_sweep"):
        read_results(out)
    assert read_results(out, eps=0.35)[0]["eps"] == 0.35
    with pytest.raises(InvalidInput, match="cannot resume"):
        run_sweep(MODEL, *samples, VerifyConfig(eps=RADII, **FAST), f"npz:{DATA}", 0, out=single, resume=True)


# ------------------------------------------------------------------------------------------ command line


def test_cli_sweep_then_report_json(tmp_path, one_thread):
    out, props = tmp_path / "f.h5", tmp_path / "props"
    r = CliRunner().invoke(main, ["verify", str(MODEL), "--eps", "0.1,0.3", "--dataset", f"npz:{DATA}", "-n", "6",
                                  "--method", "ibp", "--no-attack", "--out", str(out), "--emit-vnnlib", str(props)])
    assert r.exit_code == 0, r.output
    assert "ε = 0.1" in r.output and "ε = 0.3" in r.output and "carried over" in r.output
    rows = (props / "instances.csv").read_text().splitlines()
    assert len(rows) == 12 and sum("_eps0.1.vnnlib" in row for row in rows) == 6
    r = CliRunner().invoke(main, ["report", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summaries = json.loads(r.output)
    assert [s["eps"] for s in summaries] == [0.1, 0.3] and all(s["samples"] == 6 for s in summaries)
    r = CliRunner().invoke(main, ["report", str(out.parent / "missing.h5"), "--json"])
    assert r.exit_code == 2


@pytest.mark.parametrize("eps, words", [("0.1,0.1", "given twice"), ("0.2:0.1:0.1", "STOP is below START"),
                                        ("0.1;0.2", "bad epsilon")])
def test_cli_bad_eps_is_one_line(eps, words, tmp_path):
    r = CliRunner().invoke(main, ["verify", str(MODEL), "--eps", eps, "--dataset", f"npz:{DATA}", "-n", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("error:") and words in r.output


def test_a_single_eps_run_writes_the_single_file_layout(tmp_path):
    out = tmp_path / "one.h5"
    r = CliRunner().invoke(main, ["verify", str(MODEL), "--eps", "0.1", "--dataset", f"npz:{DATA}", "-n", "3",
                                  "--method", "ibp", "--no-attack", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert "index" in f and "reused_from" not in f and "groups" not in f.attrs
    assert isinstance(json.loads(CliRunner().invoke(main, ["report", str(out), "--json"]).output), dict)


def test_reused_margins_are_nan_and_time_zero_without_settling(tmp_path, samples):
    """IBP alone, no attack: 0.1, then 0.3, then 0.2, which takes 0.3's proofs as they are carried:
    no margins, no time (nothing is left unknown that a later radius would settle)."""
    x, y, idx = samples
    out = tmp_path / "ibp.h5"
    run_sweep(MODEL, x[:8], y[:8], idx[:8], VerifyConfig(eps=(0.1, 0.2, 0.3), method="ibp", attack=False,
                                                         batch_size=8), f"npz:{DATA}", 0, out=out)
    (_, d1), (_, d2), (_, d3) = read_sweep(out)
    assert np.isnan(d1["reused_from"]).all() and np.isnan(d3["reused_from"]).all()
    reused = np.isfinite(d2["reused_from"])
    assert reused.any() and (d2["reused_from"][reused] == np.float32(0.3)).all()
    assert np.isnan(d2["margins"][reused]).all() and (d2["times"][reused] == 0).all()
    assert (d2["status"][reused] == VERIFIED).all() and (d3["status"][reused] == VERIFIED).all()
    assert torch.isfinite(torch.as_tensor(d2["margins"][~reused])).all()


def test_settle_gives_a_row_left_unknown_the_answer_found_later():
    """The largest ε is computed second: a counterexample found at a middle ε reaches it only now,
    and a proof found at a middle ε reaches a smaller middle one computed before it."""
    small = _answers(0.1, [VERIFIED, VERIFIED, UNKNOWN])
    large = _answers(0.4, [UNKNOWN, UNKNOWN, UNKNOWN])
    mid1 = _answers(0.2, [VERIFIED, UNKNOWN, UNKNOWN])
    mid2 = _answers(0.3, [FALSIFIED, VERIFIED, UNKNOWN])
    for a in (small, large, mid1, mid2):
        a.counts.update({name: int((a.status == i).sum()) for i, name in enumerate(STATUS)})
    _settle([small, large, mid1, mid2], None)
    assert large.status.tolist() == [FALSIFIED, UNKNOWN, UNKNOWN] and large.origin[0] == 0.3
    assert np.array_equal(large.cex[0], mid2.cex[0]) and large.counts["falsified"] == 1
    assert mid1.status.tolist() == [VERIFIED, VERIFIED, UNKNOWN] and mid1.origin.tolist()[:2] == [0.2, 0.3]
    assert mid1.counts == {**dict.fromkeys(STATUS, 0), "verified": 2, "unknown": 1}
    assert small.status.tolist() == [VERIFIED, VERIFIED, UNKNOWN]  # nothing to take: kept as computed


def _sweep_file(path, resume: bool = False) -> SweepFile:
    attrs = {"model_sha256": "0" * 64, "method": "ibp", "dataset": "mnist", "start": 0, "n": 4}
    return SweepFile(path, attrs, {e: {"eps": e} for e in (0.1, 0.2)}, ["ibp"], 9, 4, resume=resume)


def _group_rows(n: int) -> dict[str, np.ndarray]:
    return {"index": np.arange(n), "label": np.zeros(n, "i8"), "prediction": np.zeros(n, "i8"),
            "status": np.full(n, UNKNOWN, "i1"), "stage": np.full(n, -1, "i1"), "margins": np.ones((n, 1, 9), "f4"),
            "times": np.zeros((n, 1), "f4"), "counterexample": np.full((n, 4), np.nan, "f4"),
            "reason": np.full(n, "", dtype=object), "reused_from": np.full(n, np.nan, "f4")}


def test_sweep_file_resume_cuts_torn_groups_and_updates_rows_atomically(tmp_path):
    path = tmp_path / "s.h5"
    f = _sweep_file(path)
    with pytest.raises(InvalidInput, match="exists"):
        _sweep_file(path)
    f.groups[0.1].append(_group_rows(4))
    f.groups[0.1].mark_complete()
    f.groups[0.2].append(_group_rows(2))
    with h5py.File(path, "r+") as h:  # a torn append: one dataset longer than the committed rows
        h["eps_0.2/status"].resize(3, axis=0)
    again = _sweep_file(path, resume=True)
    assert again.finished == {0.1} and again.groups[0.1].done == 4 and again.groups[0.2].done == 2
    with h5py.File(path) as h:
        assert h["eps_0.2/status"].shape == (2,)
    cex = np.arange(4, dtype="f4")
    again.update_rows({0.1: {"status": (np.array([1, 3]), np.array([VERIFIED, FALSIFIED], "i1")),
                             "counterexample": (np.array([3]), cex[None]),
                             "reused_from": (np.array([1, 3]), np.array([0.2, 0.05], "f4"))}})
    (a1, d1), (a2, d2) = read_sweep(path)
    assert d1["status"].tolist() == [UNKNOWN, VERIFIED, UNKNOWN, FALSIFIED]
    assert np.array_equal(d1["counterexample"][3], cex)
    assert np.isnan(d1["reused_from"][[0, 2]]).all() and d1["reused_from"][3] == np.float32(0.05)
    assert a1["complete"] and not a2["complete"] and len(d2["index"]) == 2
    assert not list(tmp_path.glob(".s.h5.*"))  # every change renamed its copy over the file
