"""``--workers`` / ``--address`` (certkit.scale_out, on Ray): the answers do not depend on how the work
is spread, a driver killed half-way resumes to the same file, a worker that dies is retried and then
recorded as an error, a worker that overruns is killed, and without Ray the error is one line.

The runs that start Ray go through the command line in a subprocess each (a local cluster of this
machine, started and shut down by the run); they take most of this file's time (about 4 s to start
Ray and 3 s to start the workers on 2 cores).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from certkit.cli import main
from certkit.results import STATUS, ResultsFile, read_results, summarize
from certkit.scale_out import MAX_ATTEMPTS, RAY_MISSING, Failed, shards
from certkit.vnncomp.runner import discover, read_outcomes, run_benchmark
from tests.conftest import REPO

ray = pytest.importorskip("ray")  # installed by the setup (certkit[ray]): this runs in CI

MODEL = REPO / "models" / "mnist_cnn_small_eps0.3.onnx"
# ε 0.4, above the trained radius: 53 verified (IBP), 9 falsified, 2 unknown after every stage (CROWN and
# α-CROWN run on them), in 8 batches of 8
VERIFY = [str(MODEL), "--eps", "0.4", "--dataset", f"npz:{REPO / 'data' / 'mnist_test_100.npz'}", "-n", "64",
          "--batch-size", "8", "--device", "cpu"]

# the certkit CLI, SIGKILLed right after the nth append of rows to the results file (a kill of the driver
# half-way, at a known point)
KILL_AFTER_APPEND = r"""
import os, signal, sys
from certkit.results import ResultsFile

original, calls, nth = ResultsFile.append, [0], int(sys.argv[1])

def append(self, rows):
    original(self, rows)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)

ResultsFile.append = append
from certkit.cli import main
sys.argv = ["certkit", *sys.argv[2:]]
main()
"""


def _env() -> dict[str, str]:
    """The environment of a run: this one's (its graph cache) with one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _certkit(args: list[str], log: Path, limit: float = 240) -> None:
    with open(log, "ab") as f:
        rc = subprocess.run([sys.executable, "-m", "certkit.cli", *args], cwd=REPO, env=_env(), stdout=f,
                            stderr=subprocess.STDOUT, timeout=limit).returncode
    assert rc == 0, log.read_text()[-3000:]


def _same_rows(got: dict, want: dict) -> None:
    """Every dataset equal (NaN equal to NaN), timings aside."""
    assert got.keys() == want.keys()
    for k in want:
        if k != "times":
            assert np.array_equal(got[k], want[k], equal_nan=got[k].dtype.kind == "f"), k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, dict]:
    """The single-process run (the default): its attributes and rows. In a process of its own with
    one thread, as each worker has (another thread count moves the margins' last bits)."""
    out = tmp_path_factory.mktemp("one") / "r.h5"
    _certkit(["verify", *VERIFY, "--out", str(out)], out.with_suffix(".log"))
    attrs, data = read_results(out)
    assert attrs["complete"] and "workers" not in attrs and "cluster_address" not in attrs
    counts = np.bincount(data["status"], minlength=len(STATUS))
    assert counts[STATUS.index("verified")] and counts[STATUS.index("falsified")] and counts[STATUS.index("unknown")]
    return attrs, data


def test_shards_are_whole_batches_on_the_single_process_grid():
    assert shards(0, 64, 8, 2) == [(s, s + 8) for s in range(0, 64, 8)]
    assert shards(16, 1000, 8, 2) == [(s, min(s + 64, 1000)) for s in range(16, 1000, 64)]  # 123 batches: at most 8
    assert shards(0, 30, 8, 3)[-1] == (24, 30)
    for first, n, b, w in ((0, 64, 8, 2), (24, 1000, 8, 3), (32, 33, 32, 4), (0, 10_000, 32, 1)):
        s = shards(first, n, b, w)
        assert s[0][0] == first and s[-1][1] == n and all(e == s2 for (_, e), (s2, _) in zip(s, s[1:]))
        assert all((a - first) % b == 0 for a, _ in s)


def test_verify_on_two_workers_gives_the_rows_of_one_process(one_process, tmp_path):
    want_attrs, want = one_process
    out = tmp_path / "r.h5"
    _certkit(["verify", *VERIFY, "--out", str(out), "--workers", "2"], tmp_path / "log")
    attrs, data = read_results(out)
    assert attrs["complete"] and attrs["workers"] == 2 and attrs["cluster_address"] == "local"
    assert {k: attrs[k] for k in ("model_sha256", "eps", "n", "options", "stages")} == \
        {k: want_attrs[k] for k in ("model_sha256", "eps", "n", "options", "stages")}
    _same_rows(data, want)


def _descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below ``pid``."""
    parent, start = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)], start[int(stat.parent.name)] = int(fields[1]), fields[19]
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for child, par in parent.items():
            if par == p:
                found.add((child, start[child]))
                todo.append(child)
    return found


def _kill_leftovers(processes: set[tuple[int, str]]) -> None:
    """SIGKILL those of ``processes`` still running (the same process: same start time). A local Ray
    cluster whose driver was killed ends by itself, except two idle agents that wait about a minute."""
    for pid, started in processes:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            pass


def test_a_killed_driver_resumes_to_the_same_file_with_no_sample_twice_or_missing(one_process, tmp_path):
    """One worker (shards of two batches) killed after its second write, resumed with two workers."""
    _, want = one_process
    out, log = tmp_path / "r.h5", tmp_path / "log"
    args = ["verify", *VERIFY, "--out", str(out)]
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_APPEND, "2", *args, "--workers", "1"], cwd=REPO,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT)
    seen: set[tuple[int, str]] = set()
    end = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < end:
        seen |= _descendants(proc.pid)  # the local cluster's processes, to clean up after the kill
        time.sleep(0.05)
    try:
        assert proc.wait(1) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        _kill_leftovers(seen)
    attrs, data = read_results(out)
    assert not attrs["complete"] and attrs["workers"] == 1
    assert list(data["index"]) == list(range(32))  # two shards of two batches: half
    _same_rows(data, {k: v[:32] for k, v in want.items()})
    _certkit([*args, "--resume", "--workers", "2"], log)
    attrs, data = read_results(out)
    assert attrs["complete"] and attrs["workers"] == 2  # the last run's
    assert list(data["index"]) == list(range(64))
    _same_rows(data, want)
    assert not [p.name for p in tmp_path.glob(".*.tmp")]


# ----------------------------------------------------------------------------------------- vnncomp


def _bench(tmp_path: Path, vnncomp_dir: Path) -> Path:
    """Three quick rl_benchmarks instances (unsat, sat, unsat) and an ACAS Xu one with a limit of 1 s,
    shorter than loading the network: a timeout, however fast the machine."""
    fam, acas = vnncomp_dir / "rl_benchmarks_2022", vnncomp_dir / "acasxu"
    rows = list(csv.reader(open(fam / "instances.csv")))
    gt = list(csv.DictReader(open(fam / "ground_truth.csv")))
    onnx, vnnlib, _ = list(csv.reader(open(acas / "instances.csv")))[0]
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "instances.csv", "w", newline="") as f, open(bench / "ground_truth.csv", "w", newline="") as g:
        csv.writer(g).writerow(["onnx", "vnnlib", "ground_truth"])
        for i in (0, 50, 1):
            csv.writer(f).writerow([fam / rows[i][0], fam / rows[i][1], "30"])
            csv.writer(g).writerow([fam / rows[i][0], fam / rows[i][1], gt[i]["ground_truth"]])
        csv.writer(f).writerow([acas / onnx, acas / vnnlib, "1"])
        csv.writer(g).writerow([acas / onnx, acas / vnnlib, "unsat"])
    return bench


def _summary(h5: Path) -> tuple[list[str], dict]:
    with h5py.File(h5, "r") as f:
        fam = {k: v for k, v in f["families"]["bench"].attrs.items() if not k.endswith("seconds")}
        return [s.decode() for s in f["instances"]["status"][()]], fam


def test_vnncomp_on_two_workers_answers_as_one_process(tmp_path, vnncomp_dir):
    bench = _bench(tmp_path, vnncomp_dir)
    one = tmp_path / "one" / "results.csv"
    run_benchmark(discover(bench), one, one.parent, one.parent / "results.h5")
    two = tmp_path / "two" / "results.csv"
    _certkit(["vnncomp", str(bench), "--out", str(two), "--h5", str(two.parent / "results.h5"), "--workers", "2"],
             tmp_path / "log")
    want, got = read_outcomes(one), read_outcomes(two)
    assert [o.status.vnncomp for o in want] == ["unsat", "sat", "unsat", "timeout"]
    assert got[3].seconds < 1.5  # the instance's own deadline held on the worker
    keep = ("family", "index", "onnx", "vnnlib", "timeout", "status", "ground_truth", "verdict")
    assert [[getattr(o, k) for k in keep] for o in got] == [[getattr(o, k) for k in keep] for o in want]
    assert [Path(o.result_file).relative_to(two.parent) for o in got] == \
        [Path(o.result_file).relative_to(one.parent) for o in want]
    for a, b in zip(want, got):
        assert Path(a.result_file).read_text() == Path(b.result_file).read_text()  # counterexample included
        if b.status.vnncomp in ("sat", "unsat"):
            assert Path(b.result_file).with_suffix(".log").read_text().strip().endswith(")")  # "sat (attack)"
    lines = [f.read_bytes().split(b"\r\n") for f in (one, two)]
    assert lines[0][0] == lines[1][0] and len(lines[0]) == len(lines[1]) == 6  # the header, 4 rows, ''
    assert _summary(one.parent / "results.h5") == _summary(two.parent / "results.h5")
    assert (two.parent / "config.yaml").read_text() == (one.parent / "config.yaml").read_text()


# ---------------------------------------------------------------------------- dying and overrunning


class Flaky:
    """A worker that dies on some jobs (test double of scale_out's workers)."""

    threads = 1

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def work(self, key: str, marker: str) -> str:
        if key == "always" or (key == "once" and not os.path.exists(marker)):
            Path(marker).touch()
            os._exit(1)
        if key == "slow":
            time.sleep(120)
        return f"{key} done"


def test_a_dying_worker_is_retried_then_its_job_fails_and_an_overrunning_one_is_killed(tmp_path):
    from ray import cloudpickle

    from certkit.scale_out import Cluster, Shipped, _Job, _Pool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this file
    jobs = [_Job(k, (k, str(tmp_path / f"{k}.marker")), limit=3.0 if k == "slow" else None)
            for k in ("fine", "once", "always", "slow", "last")]
    start = time.monotonic()
    with Cluster(2, None, "cpu") as cluster:
        pool = _Pool(cluster, Flaky, ())
        results = {job.key: (result, job.attempts) for job, result in pool.run(jobs, "work")}
        deaths = pool.deaths
        pool.close()
        # a file a worker's machine lacks (or holds other bytes of) comes from the object store (on a
        # cluster of several machines: a local one's workers read the driver's files)
        here = cluster.ship(MODEL)
        assert here.local(str(tmp_path)) == MODEL.resolve() and here.data is None
        elsewhere = Shipped(str(tmp_path / "absent" / MODEL.name), here.sha256, ray.put(MODEL.read_bytes()))
        copy = elsewhere.local(str(tmp_path / "copies"))
        assert copy.name == MODEL.name and copy.read_bytes() == MODEL.read_bytes()
    assert results["fine"] == ("fine done", 0) and results["last"] == ("last done", 0)
    assert results["once"] == ("once done", 1)  # died once, then done by a fresh worker
    failed, attempts = results["always"]
    assert isinstance(failed, Failed) and not failed.overran and attempts == MAX_ATTEMPTS
    assert f"died {MAX_ATTEMPTS} times" in failed.reason
    slow, _ = results["slow"]
    assert isinstance(slow, Failed) and slow.overran and 3.0 <= slow.seconds < 10, slow
    assert deaths == 1 + MAX_ATTEMPTS + 1  # once, always (each try), slow (killed)
    assert time.monotonic() - start < 90


def test_error_rows_are_recorded_with_their_reason(tmp_path):
    from certkit.verify import error_rows

    attrs = {"model_sha256": "0" * 64, "eps": 0.1, "method": "ibp", "dataset": "mnist", "start": 0, "n": 4}
    f = ResultsFile(tmp_path / "r.h5", {**attrs, "workers": 2, "cluster_address": "local"}, ["ibp"], 9, 4)
    with h5py.File(tmp_path / "r.h5", "r+") as h:  # a file of a certkit before the error code
        h.attrs["status_names"] = '["verified", "falsified", "unknown", "misclassified"]'
    f = ResultsFile(tmp_path / "r.h5", attrs, ["ibp"], 9, 4, resume=True)  # resumed in one process
    f.append(error_rows(np.array([3, 1, 4, 1]), np.arange(4), ["ibp"], 10, 4, "its worker died 3 times"))
    got, data = read_results(tmp_path / "r.h5")
    assert got["status_names"] == list(STATUS) and STATUS[4] == "error" and "workers" not in got
    assert list(data["status"]) == [4] * 4 and list(data["prediction"]) == [-1] * 4
    assert set(data["reason"]) == {"its worker died 3 times"} and np.isnan(data["margins"]).all()
    s = summarize(got, data)
    assert s["error"] == 100.0 and s["clean_accuracy"] == 0.0


# ----------------------------------------------------------------------------------- clean errors


@pytest.mark.parametrize("command", ["verify", "vnncomp"])
def test_without_ray_the_error_is_one_line(command, monkeypatch, tmp_path, vnncomp_dir):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    args = VERIFY if command == "verify" else [str(vnncomp_dir / "acasxu"), "--out", str(tmp_path / "r.csv")]
    r = CliRunner().invoke(main, [command, *args, "--workers", "2"])
    assert r.exit_code == 2 and r.output.strip() == f"error: {RAY_MISSING}", r.output
    r = CliRunner().invoke(main, [command, *args, "--address", "auto"])
    assert r.exit_code == 2 and "--address needs --workers" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.csv").exists()
