"""`certkit report ... --plots/--html/--json`: figures of real verify results, the numbers behind
them, the self-contained HTML page, and refusing files that cannot be compared."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from certkit.cli import main
from certkit.figures import draw_figures, load_runs, report_series
from certkit.onnx_io import graph_input, read_proto
from certkit.results import STATUS, read_sweep, summarize
from certkit.verify import load_verify_data

REPO = Path(__file__).resolve().parents[1]
STRONG = "models/mnist_cnn_small_eps0.3.onnx"  # mostly verified up to ε = 0.3
WEAK = "models/mnist_cnn_small_eps0.1.onnx"  # falsified at larger ε: the counterexamples
DATA = "npz:data/mnist_test_100.npz"
EPS = "0.1,0.2,0.3"
N = 100  # every image of data/
FAST = ["--device", "cpu", "--set", "pgd_steps=10", "--set", "pgd_restarts=2"]


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _verify(model: str, out: Path, *options: str) -> Path:
    r = _cli("verify", model, "--dataset", DATA, "--out", out, *FAST, *options)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Real sweeps at three ε of both shipped MNIST models on the N test images of data/ (run from
    the repository, whose relative paths the files record; the weak model by IBP and the attack
    alone, which falsify most of it), and two cheap IBP-only files that differ from them in the
    data slice or in the radii."""
    d = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        return {"strong": _verify(STRONG, d / "strong.h5", "--eps", EPS, "-n", str(N)),
                "weak": _verify(WEAK, d / "weak.h5", "--eps", EPS, "-n", str(N), "--method", "ibp"),
                "other_data": _verify(STRONG, d / "other_data.h5", "--eps", EPS, "-n", "4", "--start", "5",
                                      "--method", "ibp", "--no-attack"),
                "other_eps": _verify(STRONG, d / "other_eps.h5", "--eps", "0.1,0.2", "-n", str(N),
                                     "--method", "ibp", "--no-attack")}


@pytest.fixture(scope="module")
def report(files, tmp_path_factory) -> dict:
    """One `report strong weak --plots --html --json` run: its output folder, page and printed JSON."""
    d = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        r = _cli("report", files["strong"], files["weak"], "--plots", d / "plots", "--html", d / "report.html",
                 "--json")
    assert r.exit_code == 0, r.output
    return {"dir": d, "json": json.loads(r.output), "html": (d / "report.html").read_text(encoding="utf-8")}


def test_every_figure_is_written_as_png_and_svg(report):
    plots = report["dir"] / "plots"
    models = [p["model"] for p in report["json"]["series"]["counterexamples"] if p["examples"]]
    assert models, "the weak model is falsified at ε = 0.3: there are counterexamples to draw"
    names = ["accuracy", "stages", "margins", "times"] + [f"counterexamples_{m}" for m in models]
    for name in names:
        for fmt in ("png", "svg"):
            assert (plots / f"{name}.{fmt}").stat().st_size > 1000, (name, fmt)
    assert (plots / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (plots / "accuracy.svg").read_bytes()[:2000]
    assert not list(plots.glob(".*.tmp")) and not list(report["dir"].glob(".*.tmp"))


def test_json_summaries_are_summarize_per_eps(report, files):
    printed = report["json"]["files"]
    assert [f["path"] for f in printed] == [str(files["strong"]), str(files["weak"])]
    for f in printed:
        levels = read_sweep(f["path"])
        assert f["eps"] == pytest.approx([0.1, 0.2, 0.3])
        assert f["summaries"] == json.loads(json.dumps([summarize(a, d) for a, d in levels]))
        assert all(s["samples"] == N for s in f["summaries"])


def test_accuracy_lines_are_the_printed_accuracies(report):
    series, printed = report["json"]["series"]["accuracy"], report["json"]["files"]
    keys = {"verified": "verified_accuracy", "PGD-robust": "pgd_robust_accuracy", "clean": "clean_accuracy"}
    assert len(series["lines"]) == 3 * len(printed)
    for line in series["lines"]:
        (f,) = [f for f in printed if f["path"] == line["file"]]
        assert line["x"] == f["eps"]
        assert line["y"] == [s[keys[line["quantity"]]] for s in f["summaries"]]
    strong = [ln["y"] for ln in series["lines"] if ln["model"] == "mnist_cnn_small_eps0.3"]
    weak = [ln["y"] for ln in series["lines"] if ln["model"] == "mnist_cnn_small_eps0.1"]
    assert strong[0][-1] > weak[0][-1], "the model trained at ε = 0.3 verifies more at ε = 0.3"


def _decider(attrs: dict, row: int, data: dict) -> str:
    """Straight from the schema: ``reused`` for an answer a sweep carried over, else the deciding
    stage's name, else the status name."""
    if np.isfinite(data["reused_from"][row]) and STATUS[int(data["status"][row])] in ("verified", "falsified"):
        return "reused"
    stage = int(data["stage"][row])
    return attrs["stages"][stage] if stage >= 0 else STATUS[int(data["status"][row])]


def test_stage_bars_count_the_deciding_stage_of_each_sample(report):
    for panel, f in zip(report["json"]["series"]["stages"]["panels"], report["json"]["files"]):
        for k, ((attrs, data), summary) in enumerate(zip(read_sweep(f["path"]), f["summaries"])):
            heights = {c: v[k] for c, v in panel["bars"].items()}
            assert sum(heights.values()) == pytest.approx(100.0)
            deciders = [_decider(attrs, r, data) for r in range(len(data["index"]))]
            for category, height in heights.items():
                assert height == pytest.approx(100.0 * deciders.count(category) / len(deciders)), category
            bound = sum(v for c, v in heights.items() if c not in ("attack", "reused", *STATUS))
            reused_verified = 100.0 * np.sum(np.isfinite(data["reused_from"]) & (data["status"] == 0)) / N
            assert bound + reused_verified == pytest.approx(summary["verified_accuracy"])


def test_margin_histograms_hold_the_best_bound_of_every_sample(report):
    for panel, f in zip(report["json"]["series"]["margins"]["panels"], report["json"]["files"]):
        edges = np.array(panel["edges"])
        for h, (_, data) in zip(panel["histograms"], read_sweep(f["path"])):
            best = []
            for row in data["margins"]:  # per stage the smallest spec bound; the best finite stage
                mins = [m.min() for m in row if np.isfinite(m).all()]
                best.append(max(mins) if mins else None)
            finite = np.array([b for b in best if b is not None])
            assert h["excluded"] == best.count(None)
            assert h["counts"] == np.histogram(finite, bins=edges)[0].tolist()
            proved_here = (data["status"] == STATUS.index("verified")) & np.isnan(data["reused_from"])
            assert all(b is not None and b > 0 for b, v in zip(best, proved_here) if v)


def test_time_bars_are_the_summed_stage_times(report):
    for panel, f in zip(report["json"]["series"]["times"]["panels"], report["json"]["files"]):
        for k, ((attrs, data), summary) in enumerate(zip(read_sweep(f["path"]), f["summaries"])):
            for i, stage in enumerate(attrs["stages"]):
                assert panel["seconds"][stage][k] == pytest.approx(float(np.nansum(data["times"][:, i])))
                assert panel["seconds"][stage][k] == summary["time_by_stage"][stage]


def test_the_figures_draw_their_series(files):
    runs, _ = load_runs([files["strong"], files["weak"]])
    series = report_series(runs, max_counterexamples=2)
    figures = draw_figures(series)
    plotted = [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in figures["accuracy"].axes[0].lines]
    assert plotted == [(ln["x"], ln["y"]) for ln in series["accuracy"]["lines"]]
    for ax, panel in zip(figures["stages"].axes, series["stages"]["panels"]):
        drawn = [round(p.get_height(), 9) for p in ax.patches]
        assert drawn == [round(v, 9) for values in panel["bars"].values() for v in values]
    for ax, panel in zip(figures["times"].axes, series["times"]["panels"]):
        drawn = [round(p.get_height(), 9) for p in ax.patches]
        assert drawn == [round(v, 9) for values in panel["seconds"].values() for v in values]


def test_counterexamples_are_confirmed_in_their_box_with_the_scores_of_the_model(report):
    import onnxruntime as ort

    panels = [p for p in report["json"]["series"]["counterexamples"] if p["examples"]]
    _, shape = graph_input(read_proto(REPO / WEAK))
    x, _, _ = load_verify_data(f"npz:{REPO / DATA[4:]}", None, 0, N, shape)
    for panel in panels:
        assert panel["note"] is None and 0 < len(panel["examples"]) <= 8
        session = ort.InferenceSession(str(REPO / f"models/{panel['model']}.onnx"))
        name = session.get_inputs()[0].name
        lo, hi = panel["pixel_range"]
        for e in panel["examples"]:
            original, counter = np.array(e["original"]), np.array(e["counterexample"])
            np.testing.assert_array_equal(original, x[e["index"]].numpy())
            assert e["predicted"] != e["label"]
            assert np.all(counter >= np.maximum(original - e["eps"], lo) - 1e-6)
            assert np.all(counter <= np.minimum(original + e["eps"], hi) + 1e-6)
            scores = session.run(None, {name: np.stack([original, counter]).astype(np.float32)})[0]
            np.testing.assert_allclose(scores, [e["scores_original"], e["scores_counterexample"]], rtol=1e-5)
            assert int(np.argmax(scores[1])) == e["predicted"] and int(np.argmax(scores[0])) == e["prediction"]


def test_max_counterexamples_caps_the_grid(files):
    runs, _ = load_runs([files["weak"]])
    (panel,) = report_series(runs, max_counterexamples=3)["counterexamples"]
    assert len(panel["examples"]) == 3
    assert [e["eps"] for e in panel["examples"]] == sorted(e["eps"] for e in panel["examples"])


def test_without_the_model_file_the_grid_says_so_and_keeps_the_images(files, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / DATA[4:], tmp_path / DATA[4:])  # the data is found, the model (models/...) is not
    monkeypatch.chdir(tmp_path)
    runs, _ = load_runs([files["weak"]])
    (panel,) = report_series(runs, max_counterexamples=2)["counterexamples"]
    assert "not there" in panel["note"] and "no scores" in panel["note"]
    assert len(panel["examples"]) == 2 and all(e["scores_counterexample"] is None for e in panel["examples"])
    assert np.array(panel["examples"][0]["original"]).shape == (1, 28, 28)


class _Page(HTMLParser):
    """Tags, attributes and script text of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def test_the_html_page_is_self_contained_with_every_figure_and_a_sortable_row_per_sample(report):
    page = _Page()
    page.feed(report["html"])
    page.close()
    for bad in ("http://", "https://", 'src="//', "src='//"):
        assert bad not in report["html"]
    assert not [a for t, a in page.tags if t in ("link", "iframe", "object") or (t == "script" and "src" in a)]
    images = [a["src"] for t, a in page.tags if t == "img"]
    figures = sorted(p.stem for p in (report["dir"] / "plots").glob("*.png"))
    assert sorted(a["alt"] for t, a in page.tags if t == "img") == figures
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in images)
    assert "addEventListener" in "".join(page.scripts) and "sortable" in "".join(page.scripts)
    tables = report["html"].split('<table class="sortable samples">')[1:]
    assert len(tables) == 2
    for table in tables:
        body = table.split("<tbody>")[1].split("</tbody>")[0]
        assert body.count("<tr>") == N
        head = table.split("</thead>")[0]
        assert all(f"{c} ε=0.3" in head for c in ("status", "stage", "best margin", "time (s)"))
    for key in ("model_sha256", "created", "certkit_version", "options", "mnist_cnn_small_eps0.1.onnx"):
        assert key in report["html"]


def test_a_failed_write_leaves_the_previous_page_and_no_temporary(files, tmp_path, monkeypatch):
    page = tmp_path / "r.html"
    page.write_text("the previous report")

    def disk_full(self, text, encoding=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(text[:100])
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    r = _cli("report", files["strong"], "--html", page, "--max-counterexamples", "0")
    assert r.exit_code == 2 and "No space left on device" in r.output and "Traceback" not in r.output, r.output
    assert page.read_text() == "the previous report" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


@pytest.mark.parametrize("other, words", [("other_data", ["different data", "start 5", "n 4"]),
                                          ("other_eps", ["different ε", "0.1, 0.2, 0.3 vs 0.1, 0.2"])])
def test_files_that_cannot_be_compared_are_refused_in_one_line(files, tmp_path, other, words):
    page = tmp_path / "r.html"
    r = _cli("report", files["strong"], files[other], "--html", page)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:"), r.output
    assert all(w in r.output for w in words + ["--allow-mixed"]), r.output
    assert not page.exists() and not list(tmp_path.iterdir())


def test_allow_mixed_reports_them_with_a_note(files, tmp_path):
    page = tmp_path / "r.html"
    r = _cli("report", files["strong"], files["other_data"], "--allow-mixed", "--html", page,
             "--max-counterexamples", "0", "--json")
    assert r.exit_code == 0, r.output
    (note,) = json.loads(r.output)["notes"]
    assert "different data" in note and note in page.read_text(encoding="utf-8")
    r = _cli("report", files["strong"], files["other_data"], "--allow-mixed")
    assert r.exit_code == 0 and "different data" in " ".join(r.output.split()), r.output
    assert r.output.count("clean accuracy") == 2 and r.output.count("ε = 0.2") == 2  # a table per file


def test_terminal_summaries_one_table_per_file(files):
    r = _cli("report", files["strong"], files["weak"])
    assert r.exit_code == 0, r.output
    assert r.output.count("clean accuracy") == 2 and r.output.count("ε = 0.3") == 2
    assert "mnist_cnn_small_eps0.1" in r.output and "mnist_cnn_small_eps0.3" in r.output


def test_a_foreign_csv_is_one_readable_error(tmp_path):
    csv = tmp_path / "results.csv"  # a CSV goes to the VNN-COMP report, which names what it lacks
    csv.write_text("benchmark,instance,result\n")
    r = _cli("report", csv)
    assert r.exit_code == 2 and "results.csv" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_help_teaches_with_examples():
    r = _cli("report", "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and "--plots" in r.output and "--allow-mixed" in r.output
