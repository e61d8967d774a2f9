"""Figures of VNN-COMP runs (cactus plots, per-family tables beside the published winner) and
of training runs (several runs overlaid, seeds as bands), checked against the files they
are drawn from."""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.train.metrics import MetricsFile
from certkit.train.plot import PANELS, training_series
from certkit.vnncomp.figures import report_csv, vnncomp_series

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COMMITTED = RESULTS / "vnncomp-5pct-after-complete-package.csv"  # 10 families, --timeout-scale 0.05
SMALL = RESULTS / "vnncomp-5pct-upper-first-cifar-oval.csv"  # 2 families, --timeout-scale 0.05
ANSWERS = ("sat", "unsat")


def _figures_exist(paths, *names: str) -> None:
    """Each named figure exists as a non-empty PNG and SVG among ``paths``."""
    got = {Path(p).name for p in paths}
    for name in names:
        for ext in ("png", "svg"):
            assert f"{name}.{ext}" in got
    for p in paths:
        head = Path(p).read_bytes()[:400]
        assert Path(p).stat().st_size > 1000 and (b"PNG" in head[:8] or b"<svg" in head)


# ------------------------------------------------------------------ VNN-COMP: expected values from the files


@functools.cache
def _ground_truth(vnncomp_dir: Path, family: str) -> list[dict[str, str]]:
    with open(vnncomp_dir / family / "ground_truth.csv", newline="") as f:
        return list(csv.DictReader(f))


def _truth_row(vnncomp_dir: Path, row: dict[str, str]) -> dict[str, str]:
    """The ground-truth row of a results row, found by its files (an --instances run renumbers)."""
    return next(g for g in _ground_truth(vnncomp_dir, row["family"])
                if (g["onnx"], g["vnnlib"]) == (row["onnx"], row["vnnlib"]))


def _winner_time(g: dict[str, str], timeout: float) -> float | None:
    """α,β-CROWN's time when it answered right within ``timeout``, else None."""
    t = float(g["abcrown_runtime_s"] or "nan")
    right = g["abcrown_result"] == g["ground_truth"] and g["ground_truth"] in ANSWERS
    return t if right and t <= timeout else None


def _expected_panel(rows: list[dict[str, str]], vnncomp_dir: Path | None) -> dict:
    """The cactus lines and table of ``rows`` (of a results CSV), computed from the files."""
    solved = [r for r in rows if r["verdict"] == "correct"]
    wrong = sum(r["verdict"] == "wrong" for r in rows)
    table = {"instances": len(rows), "wrong": wrong,
             "solved_sat": sum(r["status"] == "sat" for r in solved),
             "solved_unsat": sum(r["status"] == "unsat" for r in solved),
             "score": 10 * len(solved) - 150 * wrong}
    for word in ("timeout", "unknown", "error"):
        table[word] = sum(r["status"] == word for r in rows)
    out = {"certkit": sorted(float(r["seconds"]) for r in solved), "table": table}
    if vnncomp_dir is not None:
        times = [_winner_time(_truth_row(vnncomp_dir, r), float(r["timeout"])) for r in rows]
        out["winner"] = sorted(t for t in times if t is not None)
    return out


def _check_series(series: dict, rows: list[dict[str, str]], vnncomp_dir: Path | None) -> None:
    """Every family's panel and the overall one equal what the CSV and ground truth say."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    assert list(series["families"]) == families
    for name, panel in [*series["families"].items(), ("overall", series["overall"])]:
        mine = rows if name == "overall" else [r for r in rows if r["family"] == name]
        expected = _expected_panel(mine, vnncomp_dir)
        assert panel["certkit"] == expected["certkit"], name
        assert panel["winner"] == expected.get("winner"), name
        t = panel["table"]
        assert {k: t[k] for k in expected["table"]} == expected["table"], name
        assert sum(t[k] for k in ("solved_sat", "solved_unsat", "wrong", "unchecked", "timeout", "unknown",
                                  "error")) == t["instances"], name
    json.dumps(series, allow_nan=False)  # plain JSON


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cactus_of_committed_runs_matches_their_csv_and_the_published_winner(vnncomp_dir, tmp_path):
    rows = _read_rows(COMMITTED)
    series = vnncomp_series(COMMITTED, vnncomp_dir)
    _check_series(series, rows, vnncomp_dir)
    assert series["timeout_scale"] == pytest.approx(0.05) and "× 0.05" in series["caption"]
    assert "+10" in series["score_formula"] and "-150" in series["score_formula"]
    # the fairness rule bites: some of the winner's right answers came after this run's timeouts
    right = [_winner_time(_truth_row(vnncomp_dir, r), float("inf")) for r in rows]
    assert series["overall"]["table"]["winner_solved"] < sum(t is not None for t in right)
    without = vnncomp_series(COMMITTED)  # no ground truth: certkit's line and table alone
    _check_series(without, rows, None)
    assert without["overall"]["table"]["score"] == series["overall"]["table"]["score"]
    drawn = report_csv(SMALL, tmp_path / "plots", vnncomp_dir / "all_ground_truth.csv")
    _check_series(drawn, _read_rows(SMALL), vnncomp_dir)
    _figures_exist(drawn["plots"], "cactus")


def test_a_wrong_answer_is_not_solved_and_costs_150(vnncomp_dir, tmp_path):
    rows = [r for r in _read_rows(COMMITTED) if r["family"] == "tllverifybench_2022"]
    flipped = next(r for r in rows if r["verdict"] == "correct")
    flipped.update(status="unsat" if flipped["status"] == "sat" else "sat", verdict="wrong")
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    series = vnncomp_series(path, vnncomp_dir / "tllverifybench_2022" / "ground_truth.csv")
    _check_series(series, rows, vnncomp_dir)
    table = series["families"]["tllverifybench_2022"]["table"]
    assert table["wrong"] == 1 and float(flipped["seconds"]) not in series["overall"]["certkit"]


def test_report_of_a_results_csv(vnncomp_dir, tmp_path):
    """`certkit report RESULTS.csv`: the JSON is vnncomp_series's, the table names every family
    and the formula, --plots draws the cactus plot; --html or a CSV beside .h5 files is refused."""
    cli = CliRunner()
    r = cli.invoke(main, ["report", str(SMALL), "--ground-truth", str(vnncomp_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads(json.dumps(vnncomp_series(SMALL, vnncomp_dir)))
    r = cli.invoke(main, ["report", str(SMALL), "--ground-truth", str(vnncomp_dir), "--plots", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    families = {row["family"] for row in _read_rows(SMALL)}
    assert all(f[:10] in r.output for f in families) and "-150" in r.output
    _figures_exist([tmp_path / "p" / "cactus.png", tmp_path / "p" / "cactus.svg"], "cactus")
    for args in (["--html", str(tmp_path / "r.html")], [str(tmp_path / "other.h5")]):
        r = cli.invoke(main, ["report", str(SMALL), *args])
        assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_vnncomp_plots_after_a_real_run(vnncomp_dir, tmp_path):
    """Two rl instances at 20 % of their timeouts: at 6 s the winner's 7 s answer does not
    count, at 25 s it does."""
    fam = vnncomp_dir / "rl_benchmarks_2022"
    gt = _ground_truth(vnncomp_dir, "rl_benchmarks_2022")
    pick = [0, next(i for i, g in enumerate(gt) if float(g["timeout"]) >= 100)]
    rows = list(csv.reader(open(fam / "instances.csv")))
    instances = tmp_path / "instances.csv"
    with open(instances, "w", newline="") as f:
        csv.writer(f).writerows(rows[i] for i in pick)
    out, plots = tmp_path / "res" / "results.csv", tmp_path / "plots"
    r = CliRunner().invoke(main, ["vnncomp", str(fam), "--instances", str(instances), "--timeout-scale", "0.2",
                                  "--out", str(out), "--plots", str(plots)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "-150 per wrong" in r.output and "× 0.2" in r.output and "cactus.png" in r.output
    _figures_exist(list(plots.iterdir()), "cactus")
    series = report_csv(out, ground_truth=fam)
    _check_series(series, _read_rows(out), vnncomp_dir)
    winner = series["overall"]["winner"]
    assert winner == [float(gt[pick[1]]["abcrown_runtime_s"])]  # instance 0's came after its 6 s


def test_bad_results_files_are_one_readable_error(vnncomp_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text(COMMITTED.read_text().splitlines()[0] + "\n")
    cases = {tmp_path / "missing.csv": "no such file", empty: "no instances", header_only: "no instances",
             vnncomp_dir / "acasxu" / "ground_truth.csv": "not a certkit vnncomp results file"}
    for path, words in cases.items():
        with pytest.raises(InvalidInput, match=words):
            report_csv(path)
    with pytest.raises(InvalidInput, match="no such benchmark"):
        report_csv(COMMITTED, ground_truth=tmp_path / "nothing")
    with pytest.raises(InvalidInput, match="has no instance"):
        report_csv(COMMITTED, ground_truth=vnncomp_dir / "acasxu")  # a family directory, the CSV has ten


# ------------------------------------------------------------------ training runs


TINY = dict(model="mlp", limit=300, val_size=100, eval_limit=100, batch_size=100, eps=0.1, schedule_start=2,
            schedule_length=1, milestones=(3,))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two seeds of fast (3 and 2 epochs: a run still going is shorter) and one vanilla (1 epoch)."""
    from certkit.train.loop import config_from, train

    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, kw in {"fast-s0": dict(method="fast", seed=0, epochs=3), "fast-s1": dict(method="fast", seed=1,
                                                                                      epochs=2),
                     "vanilla": dict(method="vanilla", seed=0, epochs=1)}.items():
        train(config_from("mnist", data_dir=str(data_dir), **TINY, **kw), root / name, log=lambda *_: None)
        made[name] = root / name
    return made


def _metric(run: Path, key: str) -> np.ndarray:
    return MetricsFile(run / "metrics.h5").read()[key]


def test_seeds_of_one_setting_make_one_band(runs):
    series = training_series([runs["fast-s0"], runs["fast-s1"], runs["vanilla"]])
    fast, vanilla = series["groups"]
    assert (fast["label"], vanilla["label"]) == ("fast", "vanilla") and series["note"] is None
    assert fast["seeds"] == [0, 1] and fast["epoch"] == [1, 2, 3] and vanilla["epoch"] == [1]
    for key in PANELS:
        a, b = _metric(runs["fast-s0"], key), _metric(runs["fast-s1"], key)
        both = np.stack([a[:2], b])
        band = fast["series"][key]
        assert band["mean"] == pytest.approx([*both.mean(0), a[2]], nan_ok=True)  # epoch 3: seed 0 alone
        assert band["min"] == pytest.approx([*both.min(0), a[2]], nan_ok=True)
        assert band["max"] == pytest.approx([*both.max(0), a[2]], nan_ok=True)
        assert vanilla["series"][key]["mean"] == pytest.approx(list(_metric(runs["vanilla"], key)), nan_ok=True)
    # the ramp is the schedule's, and the recorded ε agrees: 0 before it, ε_max after it
    assert fast["ramp"] == {"first_epoch": TINY["schedule_start"],
                            "last_epoch": TINY["schedule_start"] + TINY["schedule_length"] - 1}
    eps = _metric(runs["fast-s0"], "eps")
    first, last = fast["ramp"]["first_epoch"], fast["ramp"]["last_epoch"]
    assert (eps[:first - 1] == 0).all() and (eps[last:] == pytest.approx(TINY["eps"]))
    assert (0 < eps[first - 1:last]).all() and (eps[first - 1:last] < TINY["eps"]).all()


def test_labels_override_the_grouping(runs):
    dirs = [runs["fast-s0"], runs["fast-s1"], runs["vanilla"]]
    split = training_series(dirs, {str(runs["fast-s1"]): "second seed"})
    assert [(g["label"], g["seeds"]) for g in split["groups"]] == [("fast", [0]), ("second seed", [1]),
                                                                    ("vanilla", [0])]
    together = training_series(dirs, {str(d): "all" for d in dirs})
    assert [g["label"] for g in together["groups"]] == ["all"] and len(together["groups"][0]["runs"]) == 3
    with pytest.raises(InvalidInput, match="not one of the runs"):
        training_series(dirs[:1], {"elsewhere": "x"})


def test_runs_of_another_eps_get_a_note_and_their_setting_in_the_label(runs, tmp_path):
    other = tmp_path / "vanilla-eps"
    shutil.copytree(runs["vanilla"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "eps": 0.2}))
    series = training_series([runs["vanilla"], other])
    assert [g["label"] for g in series["groups"]] == ["vanilla eps=0.1", "vanilla eps=0.2"]
    assert "not comparable" in series["note"] and "ε 0.2" in series["note"]
    with pytest.raises(InvalidInput, match="differ in dataset or ε"):  # one line averages one setting's ε only
        training_series([runs["vanilla"], other], {str(runs["vanilla"]): "v", str(other): "v"})


def test_cli_overlay_json_and_single_run(runs, tmp_path):
    dirs = [str(runs["fast-s0"]), str(runs["fast-s1"]), str(runs["vanilla"])]
    cli = CliRunner()
    r = cli.invoke(main, ["plot", *dirs, "--out", str(tmp_path / "cmp"), "--label", f"{dirs[2]}=baseline"])
    assert r.exit_code == 0, r.output
    _figures_exist(list((tmp_path / "cmp").iterdir()), "overlay")
    r = cli.invoke(main, ["plot", *dirs, "--json", "--label", f"{dirs[2]}=baseline"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads(json.dumps(training_series(dirs, {dirs[2]: "baseline"})))
    r = cli.invoke(main, ["plot", dirs[0], "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    _figures_exist(list((tmp_path / "one").iterdir()), "regularizers", "relu_ratios", "eps_schedule", "errors")


def test_plot_errors_are_one_line(runs, tmp_path):
    cli = CliRunner()
    cases = {("plot", str(tmp_path / "none")): "no such run directory",
             ("plot", str(tmp_path)): "no metrics file",
             ("plot", str(runs["fast-s0"]), str(runs["vanilla"])): "give --out",
             ("plot", str(runs["fast-s0"]), "--label", "nameless", "--json"): "expected RUN_DIR=NAME"}
    for args, words in cases.items():
        r = cli.invoke(main, list(args))
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, (args, r.output)
