"""kill -9 anywhere: ``train``, ``verify`` and ``vnncomp`` are killed with SIGKILL at random moments
(during start-up, during work) and inside their writes, rerun with ``--resume`` (``vnncomp``: the
same command) after every kill, and must end exactly as an uninterrupted run (timings aside),
with no sample, epoch or instance missing or twice. After every kill the files on disk are
read as a user would: a half-written file must never pass for a complete one.

The default run has one kill sequence per command (seed 0); ``-m slow`` runs more seeds.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.results import ResultsFile, read_results
from certkit.status import Status
from certkit.train.loop import load_checkpoint
from certkit.train.metrics import MetricsFile
from certkit.vnncomp.runner import Outcome, _append, read_outcomes
from tests.conftest import REPO

# one thread: deterministic CPU kernels (weights are compared bit for bit) and no oversubscription
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
DEMO = REPO / "models" / "mnist_cnn_small_eps0.1.onnx"
SLOW_SEEDS = [1, 2, 3, 4]

# Runs the certkit CLI with one function patched to SIGKILL the process right after its nth call:
# a kill that lands inside a write (e.g. between the resizes of an HDF5 append) on purpose.
KILL_INSIDE = r"""
import os, signal, sys
from importlib import import_module

target, nth = sys.argv[1], int(sys.argv[2])
module, _, qualname = target.partition(":")
*parents, name = qualname.split(".")
owner = import_module(module)
for part in parents:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]

def killing(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, killing)
from certkit.cli import main
from certkit.status import Status
sys.argv = ["certkit", *sys.argv[3:]]
main()
"""


@dataclass
class Kill:
    """One SIGKILL: ``delay`` seconds after ``after`` (a path; None: the start) appears or changes
    (the run made progress), or, with ``inside`` = (function, n), right after that function's nth call."""

    delay: float = 0.0
    after: Path | None = None
    inside: tuple[str, int] | None = None
    strict: bool = True  # ``inside``: the call must happen (else: the work it was in may be done already)
    tear: Callable[[], None] | None = None  # then leave what a kill inside a single write() would


@dataclass
class Command:
    """A certkit command under test: how it starts, how it is resumed, what a trigger file is,
    how its state is checked after a kill and what its final result is. ``trigger`` is a path
    that appears or changes once the run makes progress."""

    first: list[str]
    resume: Callable[[], list[str]]
    trigger: Path
    check: Callable[[], None]
    result: Callable[[], dict]


def _popen(args: list[str], log: Path, inside: tuple[str, int] | None = None) -> subprocess.Popen:
    prefix = [sys.executable, "-c", KILL_INSIDE, inside[0], str(inside[1])] if inside else \
        [sys.executable, "-m", "certkit.cli"]
    with open(log, "ab") as f:
        return subprocess.Popen(prefix + args, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> float:
    """Wait until ``path`` appears or changes (the run has made progress) or the process ends."""
    before = _signature(path)
    end = time.monotonic() + limit
    while _signature(path) == before and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    return time.monotonic()


def _finish(proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    try:
        rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, log.read_text()[-3000:]


def reference(cmd: Command, log: Path) -> tuple[dict, float]:
    """An uninterrupted run: its result and the seconds from the trigger to the end (its work)."""
    proc = _popen(cmd.first, log)
    seen = _wait_for(cmd.trigger, proc)
    _finish(proc, log)
    return cmd.result(), time.monotonic() - seen


def kill_and_resume(cmd: Command, kills: list[Kill], log: Path) -> dict:
    """Run ``cmd``, killing it as ``kills`` say (resuming after each), then to the end; its result."""
    args = cmd.first
    for k in kills:
        proc = _popen(args, log, k.inside)
        if k.inside is not None:
            rc = proc.wait(300)
            assert rc == -signal.SIGKILL or (rc == 0 and not k.strict), \
                f"{k.inside} was not called (exit {rc}): {log.read_text()[-2000:]}"
        else:
            if k.after is not None:
                _wait_for(k.after, proc)
            time.sleep(k.delay)
            workers = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
            end = time.monotonic() + 2  # the solver workers of vnncomp die with it (an orphan would solve on)
            while any(map(_alive, workers)) and time.monotonic() < end:
                time.sleep(0.05)
            assert not any(map(_alive, workers)), "a worker outlived its killed parent"
        if k.tear is not None:
            k.tear()
        cmd.check()
        args = cmd.resume()
    proc = _popen(args, log)
    _finish(proc, log)
    cmd.check()
    return cmd.result()


def plan(seed: int, work: float, cmd: Command, inside: list[tuple[str, int]],
         tears: list[Callable[[], None]] = ()) -> list[Kill]:
    """Seed 0: a kill during start-up, one during the work, one inside the write ``inside[0]``.
    Other seeds: two or three kills at random moments (start-up or work) and one inside a random
    write, in a random order."""
    rng = random.Random(seed)
    tear = iter(tears)
    if seed == 0:
        kills = [Kill(delay=rng.uniform(0.2, 1.5), tear=next(tear, None)),
                 Kill(delay=rng.uniform(0.02, 0.15) * work, after=cmd.trigger, tear=next(tear, None)),
                 Kill(inside=inside[0])]
    else:
        kills = [Kill(delay=rng.uniform(0, 2.5)) if rng.random() < 0.4 else
                 Kill(delay=rng.uniform(0, 0.9) * work, after=cmd.trigger) for _ in range(rng.randint(2, 3))]
        kills.insert(rng.randrange(len(kills) + 1), Kill(inside=rng.choice(inside), strict=False))
        for k in kills:
            k.tear = next(tear, None) if rng.random() < 0.5 else None
    return kills


def _no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.rglob(".*.tmp")]
    assert not left, f"temporaries left behind: {left}"


# ---------------------------------------------------------------------------------- train

TRAIN = ["--dataset", "mnist", "--model", "mlp", "--epochs", "8", "--limit", "700", "--val-size", "100",
         "--eval-limit", "200", "--batch-size", "100", "--eps", "0.1", "--schedule", "1,3", "--milestones", "5",
         "--device", "cpu", "--no-compile"]


def train_command(run: Path, data_dir: Path) -> Command:
    def resume() -> list[str]:  # killed before config.json was written: nothing to resume, start again
        return ["train", "--resume", str(run)] if (run / "config.json").exists() else first

    def check() -> None:
        if (run / "metrics.h5").exists():
            epochs = MetricsFile(run / "metrics.h5").read()["epoch"]
            assert list(epochs) == list(range(1, len(epochs) + 1)), epochs
        for name in ("last.pt", "best.pt"):
            if (run / name).exists():
                load_checkpoint(run / name)  # a complete checkpoint, never a torn one

    def result() -> dict:
        metrics = MetricsFile(run / "metrics.h5").read()
        out = {k: v for k, v in metrics.items() if k != "train_time"}
        for name in ("last.pt", "best.pt"):
            out.update({f"{name}:{k}": v for k, v in load_checkpoint(run / name)[0].state_dict().items()})
        _no_temporaries(run)
        return out

    first = ["train", *TRAIN, "--data-dir", str(data_dir), "--out", str(run)]
    return Command(first, resume, run / "metrics.h5", check, result)


# per epoch the metrics append resizes every metric's dataset (16) and torch.save writes last.pt (and best.pt)
TRAIN_INSIDE = [("h5py:Dataset.resize", 16 + 5), ("h5py:Dataset.resize", 16 * 4 + 11), ("torch:save", 3)]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = (np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v) for v in (a[k], b[k]))
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=k)  # NaN equal to NaN; bit-for-bit otherwise
        else:
            assert (x == y).all(), k


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW_SEEDS)])
def test_train_killed_anywhere_resumes_to_the_same_weights_and_metrics(seed, tmp_path, data_dir):
    want, work = reference(train_command(tmp_path / "straight", data_dir), tmp_path / "straight.log")
    assert list(want["epoch"]) == list(range(1, 9))
    cmd = train_command(tmp_path / "killed", data_dir)
    got = kill_and_resume(cmd, plan(seed, work, cmd, TRAIN_INSIDE), tmp_path / "killed.log")
    _assert_same(want, got)


# --------------------------------------------------------------------------------- verify

VERIFY = [str(DEMO), "--eps", "0.15", "--dataset", "mnist", "-n", "24", "--batch-size", "4", "--method", "auto",
          "--device", "cpu"]


def verify_command(out: Path, data_dir: Path) -> Command:
    def check() -> None:
        if not out.exists():
            return
        attrs, data = read_results(out)  # readable after any kill
        rows = len(data["index"])
        assert all(len(v) == rows for v in data.values())
        assert list(data["index"]) == list(range(rows))  # every sample once, in order
        assert rows == 24 or not attrs["complete"]

    def result() -> dict:
        attrs, data = read_results(out)
        assert attrs["complete"]
        _no_temporaries(out.parent)
        return {k: v for k, v in data.items() if k != "times"}

    first = ["verify", *VERIFY, "--data-dir", str(data_dir), "--out", str(out)]
    return Command(first, lambda: [*first, "--resume"], out, check, result)


# an append resizes each dataset of the file (8 or more): kills land between two of them
VERIFY_INSIDE = [("h5py:Dataset.resize", 8 + 3), ("h5py:Dataset.resize", 8 * 2 + 5), ("h5py:Dataset.resize", 8)]


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW_SEEDS)])
def test_verify_killed_anywhere_resumes_to_the_same_results(seed, tmp_path, data_dir):
    want, work = reference(verify_command(tmp_path / "straight" / "r.h5", data_dir), tmp_path / "straight.log")
    assert len(want["index"]) == 24 and len(set(want["status"])) >= 2  # verified and falsified samples
    cmd = verify_command(tmp_path / "killed" / "r.h5", data_dir)
    got = kill_and_resume(cmd, plan(seed, work, cmd, VERIFY_INSIDE), tmp_path / "killed.log")
    _assert_same(want, got)


# -------------------------------------------------------------------------------- vnncomp

def _bench(tmp_path: Path, vnncomp_dir: Path) -> Path:
    """Two quick rl_benchmarks instances (unsat, sat) with their ground truth."""
    fam = vnncomp_dir / "rl_benchmarks_2022"
    rows = list(csv.reader(open(fam / "instances.csv")))
    gt = list(csv.DictReader(open(fam / "ground_truth.csv")))
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "instances.csv", "w", newline="") as f, open(bench / "ground_truth.csv", "w", newline="") as g:
        csv.writer(g).writerow(["onnx", "vnnlib", "ground_truth"])
        for i in (0, 50):
            csv.writer(f).writerow([str(fam / rows[i][0]), str(fam / rows[i][1]), "30"])
            csv.writer(g).writerow([str(fam / rows[i][0]), str(fam / rows[i][1]), gt[i]["ground_truth"]])
    return bench


def vnncomp_command(bench: Path, out: Path) -> Command:
    h5 = out.parent / "results.h5"

    def check() -> None:
        indices = [o.index for o in read_outcomes(out)]
        assert indices == list(range(len(indices)))
        if h5.exists():
            with h5py.File(h5, "r") as f:
                assert len(f["instances"]["status"]) <= len(indices)

    def result() -> dict:
        outcomes = read_outcomes(out)
        with h5py.File(h5, "r") as f:
            stored = [s.decode() for s in f["instances"]["status"][()]]
            correct = int(f["families"]["bench"].attrs["correct"])
        answers = [open(o.result_file).readline().strip() for o in outcomes]
        _no_temporaries(out.parent)
        return {"index": [o.index for o in outcomes], "status": [o.status.vnncomp for o in outcomes],
                "verdict": [o.verdict for o in outcomes], "h5": stored, "correct": correct, "files": answers}

    first = ["vnncomp", str(bench), "--out", str(out), "--h5", str(h5), "--device", "cpu"]
    return Command(first, lambda: first, out.parent / "bench", check, result)


def _tear(out: Path) -> Callable[[], None]:
    """What a kill inside the CSV's single write() would leave: the start of a line (the header's
    in a new file)."""
    def tear() -> None:
        data = out.read_bytes() if out.exists() else b""
        if not data or data.endswith(b"\n"):
            with open(out, "ab") as f:
                f.write(b"bench,1,/some/path.on" if data else b"family,ind")
    return tear


# write_h5 creates 10 datasets per summary: kill in the middle of the second (after the last instance:
# the rerun has nothing left to run but must still rewrite the summary) and of the first
VNNCOMP_INSIDE = [("h5py:Group.create_dataset", 15), ("h5py:Group.create_dataset", 4)]


# an instance takes about 5 s (mostly the worker's start-up): the kills' time scale instead of a reference run
VNNCOMP_WORK = 5.0


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW_SEEDS)])
def test_vnncomp_killed_anywhere_resumes_to_the_same_answers(seed, tmp_path, vnncomp_dir):
    """The uninterrupted run's answers are the ground truth's (test_vnncomp runs these instances
    uninterrupted), which saves a reference run."""
    bench = _bench(tmp_path, vnncomp_dir)
    out = tmp_path / "killed" / "results.csv"
    out.parent.mkdir()
    cmd = vnncomp_command(bench, out)
    got = kill_and_resume(cmd, plan(seed, VNNCOMP_WORK, cmd, VNNCOMP_INSIDE, [_tear(out)] * 4),
                          tmp_path / "killed.log")
    truth = ["unsat", "sat"]
    assert got == {"index": [0, 1], "status": truth, "verdict": ["correct"] * 2, "h5": truth, "correct": 2,
                   "files": truth}


# ------------------------------------------------------------- torn files of other writers


def _results_file(path: Path, n: int = 6) -> ResultsFile:
    attrs = {"model_sha256": "0" * 64, "eps": 0.1, "method": "ibp", "dataset": "mnist", "start": 0, "n": n}
    return ResultsFile(path, attrs, ["ibp"], 9, 4)


def _rows(start: int, n: int) -> dict[str, np.ndarray]:
    return {"index": np.arange(start, start + n), "label": np.zeros(n, "i8"), "prediction": np.zeros(n, "i8"),
            "status": np.zeros(n, "i1"), "stage": np.zeros(n, "i1"), "margins": np.ones((n, 1, 9), "f4"),
            "times": np.zeros((n, 1), "f4"), "counterexample": np.full((n, 4), np.nan, "f4")}


def _all_rows(path: Path, start: int, n: int) -> dict[str, np.ndarray]:
    """Rows for every dataset the file has (datasets other than ``_rows``' get zeros)."""
    rows = _rows(start, n)
    with h5py.File(path, "r") as f:
        shapes = {k: (f[k].shape[1:], f[k].dtype) for k in f}
    return {k: rows[k] if k in rows else np.full((n, *shape), "", object) if h5py.check_string_dtype(dtype)
            else np.zeros((n, *shape), dtype) for k, (shape, dtype) in shapes.items()}


def test_a_torn_append_of_an_older_certkit_is_read_and_resumed_up_to_the_committed_rows(tmp_path):
    """An older certkit resized one dataset after another: a kill between leaves some longer."""
    path = tmp_path / "r.h5"
    writer = _results_file(path)
    writer.append(_all_rows(path, 0, 2))
    with h5py.File(path, "a") as f:  # the old writer: no counter, and killed after two resizes
        del f.attrs["rows_committed"]
        for name in ("index", "label"):
            f[name].resize(4, axis=0)
            f[name][2:] = [2, 3]
    attrs, data = read_results(path)
    assert not attrs["complete"] and {len(v) for v in data.values()} == {2}
    r = CliRunner().invoke(main, ["report", str(path)])
    assert r.exit_code == 0 and "2 of 6 samples (incomplete)" in r.output.replace("\n", " "), r.output
    attrs = {"model_sha256": "0" * 64, "eps": 0.1, "method": "ibp", "dataset": "mnist", "start": 0, "n": 6}
    again = ResultsFile(path, attrs, ["ibp"], 9, 4, resume=True)
    assert again.done == 2
    with h5py.File(path, "r") as f:
        assert {f[k].shape[0] for k in f} == {2}  # cut back to what was committed
    again.append(_all_rows(path, 2, 4))
    again.mark_complete()
    attrs, data = read_results(path)
    assert attrs["complete"] and list(data["index"]) == list(range(6))


def test_the_complete_flag_of_a_short_file_is_not_believed(tmp_path):
    path = tmp_path / "r.h5"
    writer = _results_file(path)
    writer.append(_all_rows(path, 0, 3))
    writer.mark_complete()  # 3 of the 6 samples
    assert not read_results(path)[0]["complete"]


def test_an_append_that_misses_a_dataset_changes_nothing(tmp_path):
    path = tmp_path / "r.h5"
    writer = _results_file(path)
    rows = _rows(0, 2)
    del rows["times"]
    with pytest.raises(ValueError, match="missing"):
        writer.append(rows)
    assert writer.done == 0 and len(read_results(path)[1]["index"]) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_of_a_file_that_is_not_hdf5_is_one_clear_error(tmp_path):
    path = tmp_path / "r.h5"
    path.write_bytes(b"\x89HDF\r\n" + b"\0" * 50)  # what a kill during an in-place create could leave
    attrs = {"model_sha256": "0" * 64, "eps": 0.1, "method": "ibp", "dataset": "mnist", "start": 0, "n": 6}
    with pytest.raises(InvalidInput, match="cannot resume, not a readable results file"):
        ResultsFile(path, attrs, ["ibp"], 9, 4, resume=True)


def _outcome(i: int) -> Outcome:
    unsat = Status.VERIFIED
    return Outcome("fam", i, "a.onnx", "p.vnnlib", 30.0, unsat, 1.5, unsat, "correct", f"/r/{i}.txt")


def test_a_torn_csv_line_is_ignored_and_cut_off_by_the_next_row(tmp_path):
    out = tmp_path / "results.csv"
    out.write_bytes(b"family,ind")  # killed inside the first append
    assert read_outcomes(out) == []
    _append(out, _outcome(0))
    with open(out, "ab") as f:
        f.write(b"fam,1,a.onnx,p.vnnlib,30.0,uns")  # killed inside the second
    assert read_outcomes(out) == [_outcome(0)]
    _append(out, _outcome(1))
    assert read_outcomes(out) == [_outcome(0), _outcome(1)]
    assert out.read_text().count("\n") == 3 and out.read_text().count("family") == 1


def test_a_csv_that_is_not_certkits_is_refused_not_truncated(tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("my notes, without a newline")
    with pytest.raises(InvalidInput, match="not a certkit vnncomp results file"):
        read_outcomes(out)
    with pytest.raises(InvalidInput):
        _append(out, _outcome(0))
    assert out.read_text() == "my notes, without a newline"


def test_metrics_entries_past_the_epoch_counter_are_not_read(tmp_path):
    m = MetricsFile(tmp_path / "metrics.h5")
    for e in (1, 2):
        m.append({"epoch": e, "loss": 1.0 / e, "active": [0.5, 0.5]})
    with h5py.File(tmp_path / "metrics.h5", "a") as f:  # an older certkit killed inside an append
        f["epoch"].resize(3, axis=0)
    got = m.read()
    assert list(got["epoch"]) == [1, 2] and got["active"].shape == (2, 2)
    m.truncate(1)
    assert list(m.read()["epoch"]) == [1]
