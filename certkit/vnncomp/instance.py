"""``certkit run-instance``: one ONNX + VNN-LIB pair in, the competition's result file out.

The solver runs in a child process (:mod:`certkit.vnncomp.worker`) so that the time limit
is hard: at the deadline the parent kills the child, whatever it is doing, and writes
``timeout`` itself. The result file is written atomically (by the child or the parent),
so a reader never sees a partial one and a killed run never leaves a stale answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from certkit.files import write_atomically
from certkit.status import Status
from certkit.vnncomp.result_file import format_result

if TYPE_CHECKING:
    from certkit.complete.config import SolverConfig

KILL_MARGIN = 0.25  # seconds before the limit at which the parent kills the child
SOLVE_MARGIN = 1.0  # seconds before the limit at which the solver stops on its own


def write_result(path: str | Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def read_status(path: str | Path) -> Status | None:
    """The status a result file's first line names (None when the file is missing or the
    line names none)."""
    try:
        with open(path) as f:
            return Status.from_vnncomp(f.readline())
    except FileNotFoundError:
        return None


def run_instance(onnx: str | Path, vnnlib: str | Path, timeout: float, results: str | Path,
                 category: str = "", quiet: bool = False, threads: int | None = None,
                 log_file: str | Path | None = None, pidfile: str | Path | None = None, device: str = "cpu",
                 max_memory: int | None = None, config: SolverConfig | None = None) -> Status:
    """Solve one instance within ``timeout`` wall-clock seconds, its bounds on ``device`` (cpu,
    cuda, or auto: cuda where present); returns the status written. ``max_memory`` (bytes) is
    the bound computations' memory budget (see :mod:`certkit.memory`); over it the answer is
    ``unknown``. ``config`` holds the solver's settings (None: the defaults); the child logs the
    effective ones in one line before it starts.

    The child's log (stages, bounds, any traceback) goes to stderr, to ``log_file`` when given,
    or nowhere when ``quiet``. ``pidfile`` holds the child's process id while it runs, so that
    the harness's prepare step can stop exactly this solver if it outlived its caller."""
    start = time.monotonic()
    results = Path(results)
    results.unlink(missing_ok=True)
    end = time.time() + timeout
    cmd = [sys.executable, "-m", "certkit.vnncomp.worker", str(onnx), str(vnnlib), str(results),
           f"{end - SOLVE_MARGIN!r}", category, str(threads or 0), device] + ([str(max_memory)] if max_memory else [])
    if config is not None:
        cmd.append("--config=" + json.dumps(dataclasses.asdict(config), separators=(",", ":")))
    with open(log_file, "w") if log_file is not None else contextlib.nullcontext() as log:
        stderr = log if log is not None else subprocess.DEVNULL if quiet else None
        # the worker dies with this process (see worker.die_with_parent), even when it is killed with -9
        env = {**os.environ, "CERTKIT_WORKER_PARENT": str(os.getpid())}
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        if pidfile is not None:
            write_atomically(pidfile, lambda tmp: Path(tmp).write_text(f"{proc.pid}\n"))
        try:
            timed_out = _wait(proc, timeout - KILL_MARGIN - (time.monotonic() - start))
        finally:
            if pidfile is not None:
                Path(pidfile).unlink(missing_ok=True)
    status = read_status(results)
    if status is None:
        status = Status.TIMEOUT if timed_out else Status.ERROR
        if not timed_out and not (quiet and log_file is None):
            rc = proc.returncode
            why = f"killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit status {rc}"
            line = f"[certkit instance] the worker exited without a result: {why}\n"
            if log_file is None:
                sys.stderr.write(line)
            else:
                with open(log_file, "a") as log:
                    log.write(line)
        write_result(results, format_result(status))
    return status


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait for the child; kill its process group after ``seconds``. True when it was killed."""
    try:
        proc.wait(timeout=max(0.05, seconds))
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    except BaseException:  # interrupted: take the child down with us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
