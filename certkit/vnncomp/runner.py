"""``certkit vnncomp``: run a benchmark (one family, or a directory of families) instance by
instance with its published timeouts, and score the answers against a ground truth.

Each instance runs through :func:`run_instance` (a child process with a hard deadline),
writes its competition result file, and appends one row to the results CSV at once, so
an interrupted run resumes where it stopped (rows already in the CSV are skipped). The
HDF5 summary is rewritten (atomically) after every instance and at the end.

A run killed at any moment (``kill -9``) leaves at most a torn last line in the CSV: a row
counts only once its line ends, so a torn line is ignored when the CSV is read and cut
off before the next row is appended, and its instance runs again.

Scoring as in VNN-COMP 2023 (2022 still added a time bonus): +10 per correct ``sat``/``unsat``,
−150 per wrong one (an answer that contradicts a ``sat``/``unsat`` ground truth), 0 otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from certkit.errors import InvalidInput
from certkit.files import remove_stale_temporaries, write_atomically
from certkit.status import Status
from certkit.vnncomp.instance import run_instance

if TYPE_CHECKING:
    from certkit.complete.config import SolverConfig

CORRECT_POINTS, WRONG_POINTS = 10, -150


@dataclass
class Instance:
    family: str
    index: int
    onnx: str  # as written in instances.csv (relative to the family directory)
    vnnlib: str
    timeout: float
    ground_truth: Status | None = None  # None: none given
    winner: Status | None = None  # the reference tool's answer (alpha-beta-CROWN's, when the file has it)
    winner_time: float = float("nan")
    directory: str = ""


@dataclass
class Outcome:
    family: str
    index: int
    onnx: str
    vnnlib: str
    timeout: float
    status: Status
    seconds: float
    ground_truth: Status | None
    verdict: str  # correct / wrong / unchecked / none (no sat/unsat answer)
    result_file: str

    def row(self) -> list:
        """The CSV row: statuses in VNN-COMP's words ('' for no ground truth)."""
        return ["" if v is None else v.vnncomp if isinstance(v, Status) else v for v in asdict(self).values()]


ANSWERS = (Status.FALSIFIED, Status.VERIFIED)  # sat, unsat: the answers that score


def verdict(status: Status, truth: Status | None) -> str:
    if status not in ANSWERS:
        return "none"
    if truth not in ANSWERS:
        return "unchecked"
    return "correct" if status is truth else "wrong"


def _read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [r for r in csv.reader(f) if r and not r[0].startswith("#")]


def _read_instances(directory: Path, instances: Path) -> list[Instance]:
    """The rows of an instances.csv (onnx, vnnlib, timeout) as instances of ``directory``'s family."""
    if not instances.is_file():
        raise InvalidInput(f"{instances}: no such file (a benchmark needs an instances.csv)")
    out = []
    for i, r in enumerate(_read_csv_rows(instances)):
        if len(r) < 3:
            raise InvalidInput(f"{instances}:{i + 1}: expected onnx,vnnlib,timeout; got {','.join(r)!r}")
        try:
            timeout = float(r[2])
        except ValueError:
            raise InvalidInput(f"{instances}:{i + 1}: timeout {r[2]!r} is not a number") from None
        out.append(Instance(directory.name, i, r[0].strip(), r[1].strip(), timeout, directory=str(directory)))
    return out


def _read_ground_truth(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        gt = list(csv.DictReader(f))
    if "ground_truth" not in (gt[0] if gt else {}):
        raise InvalidInput(f"{path}: no ground_truth column")
    return gt


def _truth_row(inst: Instance, gt: list[dict[str, str]], by_key: dict[tuple[str, str], list[dict]]) -> dict | None:
    """The ground-truth row of ``inst``: the row at its index when that names the same files (or
    names none), else the first row for its (onnx, vnnlib)."""
    same = gt[inst.index] if inst.index < len(gt) else None
    if same is not None and (same.get("onnx", inst.onnx), same.get("vnnlib", inst.vnnlib)) == (inst.onnx,
                                                                                             inst.vnnlib):
        return same
    return (by_key.get((inst.onnx, inst.vnnlib)) or [None])[0]


def _join_truth(inst: Instance, row: dict[str, str]) -> None:
    inst.ground_truth = Status.from_vnncomp(row["ground_truth"])
    inst.winner = Status.from_vnncomp(row.get("abcrown_result", ""))
    try:
        inst.winner_time = float(row.get("abcrown_runtime_s", "nan") or "nan")
    except ValueError:
        pass


def load_family(directory: Path, instances: Path | None = None, ground_truth: Path | None = None) -> list[Instance]:
    """The instances of one family, with the ground truth joined by (onnx, vnnlib) and order."""
    out = _read_instances(directory, instances or directory / "instances.csv")
    gt_path = ground_truth or directory / "ground_truth.csv"
    if not gt_path.is_file():
        if ground_truth is not None:
            raise InvalidInput(f"{ground_truth}: no such file")
        return out
    gt = _read_ground_truth(gt_path)
    by_key: dict[tuple[str, str], list[dict]] = {}
    for g in gt:
        by_key.setdefault((g.get("onnx", ""), g.get("vnnlib", "")), []).append(g)
    for inst in out:
        row = _truth_row(inst, gt, by_key)
        if row is not None:
            _join_truth(inst, row)
    return out


def discover(bench_dir: str | Path, instances: str | Path | None = None, ground_truth: str | Path | None = None,
             families: list[str] | None = None) -> list[Instance]:
    """A family directory (with instances.csv) or a directory of families."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        raise InvalidInput(f"{bench_dir}: no such directory")
    if instances is not None or (bench_dir / "instances.csv").is_file():
        return load_family(bench_dir, Path(instances) if instances else None,
                           Path(ground_truth) if ground_truth else None)
    dirs = sorted(p for p in bench_dir.iterdir() if (p / "instances.csv").is_file())
    if not dirs:
        raise InvalidInput(f"{bench_dir}: neither an instances.csv nor family directories with one")
    if families:
        known = {p.name for p in dirs}
        missing = [f for f in families if f not in known]
        if missing:
            raise InvalidInput(f"unknown famil{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}; "
                               f"{bench_dir} has {', '.join(sorted(known))}")
        dirs = [p for p in dirs if p.name in families]
    if ground_truth is not None:
        raise InvalidInput("--ground-truth needs a single family directory (families use their ground_truth.csv)")
    return [inst for d in dirs for inst in load_family(d)]


def _committed(path: Path) -> bytes:
    """The CSV's bytes up to the end of its last complete line (a killed append leaves a torn one)."""
    if not path.is_file():
        return b""
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    header = ",".join(f.name for f in fields(Outcome)).encode()
    if data and not keep and not header.startswith(data):  # not the torn header of a killed first append
        raise InvalidInput(f"{path}: not a certkit vnncomp results file (remove it or pick another --out)")
    return keep


def read_outcomes(path: Path) -> list[Outcome]:
    """The rows of a results CSV, without a torn last line."""
    try:
        rows = list(csv.DictReader(io.StringIO(_committed(path).decode(), newline="")))
    except (UnicodeDecodeError, csv.Error):
        rows = [{}]
    out = []
    for r in rows:
        try:
            status = Status.from_vnncomp(r["status"])
            if status is None:
                raise ValueError(r["status"])
            truth = Status.from_vnncomp(r["ground_truth"])
            out.append(Outcome(r["family"], int(r["index"]), r["onnx"], r["vnnlib"], float(r["timeout"]), status,
                               float(r["seconds"]), truth, r["verdict"], r["result_file"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            raise InvalidInput(f"{path}: not a certkit vnncomp results file (remove it or pick another --out)") \
                from None
    return out


def _csv_bytes(outcomes: list[Outcome], header: bool) -> bytes:
    """The CSV lines of ``outcomes`` (after the header line when ``header``)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    if header:
        w.writerow([f.name for f in fields(Outcome)])
    w.writerows(o.row() for o in outcomes)
    return buf.getvalue().encode()


def _append(path: Path, outcome: Outcome) -> None:
    """Add one row (the header first in a new file) after the last complete line, in one write,
    flushed to disk."""
    keep = len(_committed(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.is_file() else "wb") as f:
        f.truncate(keep)  # a torn line of a killed run
        f.seek(keep)
        f.write(_csv_bytes([outcome], header=keep == 0))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class FamilySummary:
    family: str
    instances: int
    run: int
    sat: int
    unsat: int
    unknown: int
    timeout: int
    error: int
    correct: int
    wrong: int
    unchecked: int
    score: int
    total_seconds: float
    median_seconds: float
    truth_solved: int  # instances whose ground truth is sat or unsat
    winner_solved: int  # instances the reference tool answered correctly


def summarize(instances: list[Instance], outcomes: list[Outcome]) -> list[FamilySummary]:
    by = {(o.family, o.index): o for o in outcomes}
    out = []
    for fam in dict.fromkeys(i.family for i in instances):
        insts = [i for i in instances if i.family == fam]
        done = [by[(i.family, i.index)] for i in insts if (i.family, i.index) in by]
        count = {s: sum(o.status is s for o in done) for s in (Status.FALSIFIED, Status.VERIFIED, Status.UNKNOWN,
                                                                 Status.TIMEOUT, Status.ERROR)}
        v = {k: sum(o.verdict == k for o in done) for k in ("correct", "wrong", "unchecked")}
        secs = [o.seconds for o in done]
        out.append(FamilySummary(
            fam, len(insts), len(done), *count.values(), *v.values(),
            CORRECT_POINTS * v["correct"] + WRONG_POINTS * v["wrong"], sum(secs),
            statistics.median(secs) if secs else float("nan"),
            sum(i.ground_truth in ANSWERS for i in insts),
            sum(i.winner in ANSWERS and i.winner is i.ground_truth for i in insts)))
    return out


def write_h5(path: Path, outcomes: list[Outcome], summary: list[FamilySummary],
             config: SolverConfig | None = None) -> None:
    """The summary file: per instance its outcome, per family its counts; attribute ``config``
    holds the solver's settings as JSON (the defaults when ``config`` is None)."""
    import json

    import h5py
    import numpy as np

    from certkit.complete.config import SolverConfig
    from certkit.settings import plain

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["config"] = json.dumps(plain(config or SolverConfig()))
            g = f.create_group("instances")
            rows = [o.row() for o in outcomes]
            for k, fld in enumerate(fields(Outcome)):
                vals = [r[k] for r in rows]
                if fld.type in ("int", "float"):
                    g.create_dataset(fld.name, data=np.asarray(vals, dtype=float if fld.type == "float" else int))
                else:
                    g.create_dataset(fld.name, data=np.asarray(vals, dtype=object), dtype=h5py.string_dtype())
            s = f.create_group("families")
            for fs in summary:
                fg = s.create_group(fs.family)
                for k, val in asdict(fs).items():
                    if k != "family":
                        fg.attrs[k] = val

    write_atomically(path, write)


def config_file(out_csv: Path) -> Path:
    """Where a run records its solver settings: ``config.yaml`` beside the results CSV."""
    return out_csv.parent / "config.yaml"


def record_config(out_csv: Path, config: SolverConfig, resuming: bool) -> None:
    """Write the run's settings to :func:`config_file` (a ``--config`` file for the same run);
    when ``resuming`` rows of a CSV whose recorded settings differ, refuse in one line naming
    the settings that differ. A CSV with rows but no config.yaml (an older certkit's) resumes
    with the settings given, which are then recorded."""
    from certkit.settings import Resolved, differences, load_config, plain, to_yaml

    path = config_file(out_csv)
    remove_stale_temporaries(path)  # what a killed run left half-written
    if resuming and path.is_file():
        before = plain(load_config(path, (), ("solver",))["solver"].build())
        changed = differences(before, plain(config))
        if changed:
            raise InvalidInput(f"{out_csv}: cannot resume, its rows were run with other solver settings "
                               f"({path}): {'; '.join(changed)}; use the same --config/--set, or another --out")
        return
    resolved = Resolved.defaults("solver")
    resolved.update(plain(config), "the run")
    text = to_yaml({"solver": resolved}, f"certkit vnncomp: the solver settings of {out_csv.name}\n"
                                         "(certkit vnncomp --config this file reruns with them)")
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _result_file(inst: Instance, results_dir: Path) -> Path:
    """Where ``inst``'s competition result file goes (its log beside it, ``.log``)."""
    name = f"{inst.index:04d}_{Path(inst.onnx).stem}__{Path(inst.vnnlib).stem}.txt"
    result_file = results_dir / inst.family / name
    result_file.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(result_file)
    return result_file


def run_benchmark(instances: list[Instance], out_csv: Path, results_dir: Path, h5: Path | None = None,
                  timeout_scale: float = 1.0, on_done: Callable[[Instance, Outcome, bool], None] | None = None,
                  device: str = "cpu", max_memory: int | None = None,
                  config: SolverConfig | None = None, workers: int | None = None,
                  address: str | None = None) -> list[Outcome]:
    """Run every instance not yet in ``out_csv`` (bounds on ``device``: cpu, cuda or auto, within
    ``max_memory`` bytes per bound pass, see :mod:`certkit.memory`) with the solver settings
    ``config`` (None: the defaults); returns the outcomes of all instances run so far.

    The settings are recorded in config.yaml beside ``out_csv`` and in ``h5``'s ``config``
    attribute; resuming a CSV that was run with other settings is refused.

    ``workers`` (or ``address``) spreads the instances over that many worker processes of a Ray
    cluster (:mod:`certkit.scale_out`), each instance under its own deadline as here. Rows are
    appended as instances finish; at the end the CSV and the summary hold them in instance order,
    as a run in one process writes them."""
    from certkit.complete.config import SolverConfig

    if timeout_scale <= 0:
        raise InvalidInput(f"--timeout-scale must be positive; got {timeout_scale}")
    config = config or SolverConfig()
    outcomes = read_outcomes(out_csv)
    record_config(out_csv, config, resuming=bool(outcomes))
    if h5 is not None:
        remove_stale_temporaries(h5)  # what a killed run left half-written
    done = {(o.family, o.index): o for o in outcomes}
    sharded = workers is not None or address is not None
    if sharded:
        from certkit.scale_out import check_options

        check_options(workers, address)  # before any instance runs
    order = {(inst.family, inst.index): i for i, inst in enumerate(instances)}

    def finish(inst: Instance, status: Status, seconds: float, result_file: Path) -> None:
        outcome = Outcome(inst.family, inst.index, inst.onnx, inst.vnnlib, inst.timeout * timeout_scale, status,
                          round(seconds, 3), inst.ground_truth, verdict(status, inst.ground_truth), str(result_file))
        _append(out_csv, outcome)
        outcomes.append(outcome)
        if sharded:  # finished in any order; the summary lists them in instance order
            outcomes.sort(key=lambda o: order.get((o.family, o.index), len(order)))
        if h5 is not None:
            write_h5(h5, outcomes, summarize(instances, outcomes), config)
        if on_done:
            on_done(inst, outcome, False)

    todo = _pending(instances, done, on_done)
    if not sharded:
        _run_here(todo, results_dir, timeout_scale, device, max_memory, config, finish)
    else:
        remove_stale_temporaries(out_csv)  # a killed rewrite's (below)
        _run_sharded(todo, results_dir, timeout_scale, device, max_memory, config, workers, address, finish)
        outcomes.sort(key=lambda o: order.get((o.family, o.index), len(order)))
        _rewrite_in_order(out_csv, outcomes)
    if h5 is not None:  # also when a killed run had appended its last row but not yet rewritten the summary
        write_h5(h5, outcomes, summarize(instances, outcomes), config)
    return outcomes


def _pending(instances: list[Instance], done: dict[tuple[str, int], Outcome],
             on_done: Callable[[Instance, Outcome, bool], None] | None) -> list[Instance]:
    """The instances not ``done`` yet (``on_done`` is told about the others)."""
    todo = []
    for inst in instances:
        key = (inst.family, inst.index)
        if key not in done:
            todo.append(inst)
        elif on_done:
            on_done(inst, done[key], True)
    return todo


def _run_here(todo: list[Instance], results_dir: Path, timeout_scale: float, device: str, max_memory: int | None,
              config: SolverConfig, finish: Callable[[Instance, Status, float, Path], None]) -> None:
    """Solve ``todo`` one after the other in this process (each in its child), then ``finish`` each."""
    for inst in todo:
        result_file = _result_file(inst, results_dir)
        base = Path(inst.directory)
        start = time.monotonic()
        status = run_instance(base / inst.onnx, base / inst.vnnlib, inst.timeout * timeout_scale, result_file,
                              category=inst.family, log_file=result_file.with_suffix(".log"), device=device,
                              max_memory=max_memory, config=config)
        finish(inst, status, time.monotonic() - start, result_file)


def _run_sharded(todo: list[Instance], results_dir: Path, timeout_scale: float, device: str,
                 max_memory: int | None, config: SolverConfig, workers: int | None, address: str | None,
                 finish: Callable[[Instance, Status, float, Path], None]) -> None:
    """Solve ``todo`` on Ray workers; write each one's result file and log as it comes back, then
    ``finish`` it."""
    from certkit.scale_out import Cluster
    from certkit.vnncomp.instance import write_result

    if not todo:
        return
    with Cluster(workers, address, device) as cluster:
        jobs = [(i, Path(inst.directory) / inst.onnx, Path(inst.directory) / inst.vnnlib,
                 inst.timeout * timeout_scale, inst.family) for i, inst in enumerate(todo)]
        solved = cluster.solve(jobs, max_memory, config)
        with contextlib.closing(solved):  # a failed write stops the workers before the cluster goes
            for i, status, seconds, result, log in solved:
                inst = todo[i]
                result_file = _result_file(inst, results_dir)
                write_atomically(result_file.with_suffix(".log"), lambda tmp: Path(tmp).write_text(log))  # noqa: B023
                write_result(result_file, result)
                finish(inst, Status.from_vnncomp(status) or Status.ERROR, seconds, result_file)


def _rewrite_in_order(out_csv: Path, outcomes: list[Outcome]) -> None:
    """Rewrite the CSV (atomically) with ``outcomes``' rows in their order, unless it holds them so."""
    if not out_csv.is_file() or [(o.family, o.index) for o in read_outcomes(out_csv)] == \
            [(o.family, o.index) for o in outcomes]:
        return
    text = _csv_bytes(outcomes, header=True)
    write_atomically(out_csv, lambda tmp: Path(tmp).write_bytes(text))
