"""The child process of ``run-instance``: solve, write the result file, exit.

Usage (internal): ``python -m certkit.vnncomp.worker ONNX VNNLIB RESULTS END_TIME CATEGORY THREADS DEVICE
[MAX_MEMORY] [--config=JSON]`` where END_TIME is a ``time.time()`` value by which the solver stops
on its own, DEVICE is cpu, cuda or auto, MAX_MEMORY the bound passes' budget in bytes and JSON
the solver's settings (:class:`~certkit.complete.config.SolverConfig`; absent: the defaults),
checked as a configuration file's. The first line of the log names the settings used.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when the process that started it dies.

    A ``certkit vnncomp`` or ``run-instance`` killed with ``kill -9`` cannot stop its worker
    (which runs in its own session, for the deadline's process-group kill): without this, the
    orphan would keep solving, competing for the CPU with a resumed run and possibly writing
    the result file that run is producing. The parent's id comes in ``CERTKIT_WORKER_PARENT``,
    so a parent that died before the request took effect is noticed too.
    """
    parent = os.environ.get("CERTKIT_WORKER_PARENT")
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):
        os._exit(1)


def _options(extra: list[str]) -> tuple[int | None, str | None]:
    """The optional arguments after the seven positional ones: MAX_MEMORY (bytes; absent: the
    default budget) and ``--config=JSON`` (absent: the default settings)."""
    max_memory, config = None, None
    for arg in extra:
        if arg.startswith("--config="):
            config = arg[len("--config="):]
        else:
            max_memory = int(arg)
    return max_memory, config


def _solver_config(text: str | None):
    from certkit.complete.config import SolverConfig
    from certkit.errors import InvalidInput
    from certkit.settings import config_from_mapping

    if text is None:
        return SolverConfig()
    try:
        mapping = json.loads(text)
    except ValueError:
        raise InvalidInput("the worker's --config is not JSON") from None
    return config_from_mapping(SolverConfig, mapping, "the worker's --config")


def main(argv: list[str]) -> int:
    onnx, vnnlib, results, end, category, threads, device = argv[:7]
    max_memory, config_text = _options(argv[7:])
    end = float(end)
    from certkit.errors import CertkitError
    from certkit.memory import MemoryBudgetExceeded
    from certkit.status import Status
    from certkit.vnncomp.instance import write_result
    from certkit.vnncomp.result_file import format_result

    def log(msg: str) -> None:
        print(f"[certkit {category or 'instance'}] {msg}", file=sys.stderr, flush=True)

    try:
        import torch

        from certkit.complete.solver import Solver
        from certkit.device import resolve_device
        from certkit.settings import one_line
        from certkit.vnnlib import read_vnnlib

        config = _solver_config(config_text)
        log(f"config: {one_line(config)}")
        prop = read_vnnlib(vnnlib)
        solver = Solver(onnx, config, device=resolve_device(device))
        solver.bm.max_memory = max_memory
        # 0 keeps PyTorch's default (every core): on this 2-core CPU ReLU splitting bounds 1.7× the
        # domains per second on mnist_fc 256x4 (#56), oval21 #8 takes 37 s instead of 51 s, and
        # ACAS Xu #13 and reach_prob robot_0 take the same time as on one thread
        if int(threads) > 0:
            torch.set_num_threads(int(threads))
        result = solver.solve(prop, end - time.time(), log=log)
    except MemoryBudgetExceeded as e:  # not the instance's fault: a bound that needs more memory than allowed
        log(f"unknown: {e}")
        write_result(results, format_result(Status.UNKNOWN))
        return 0
    except CertkitError as e:
        log(f"error: {e}")
        write_result(results, format_result(Status.ERROR))
        return 2
    except Exception:  # a bug: say so in the log, answer nothing
        log("internal error:\n" + traceback.format_exc())
        write_result(results, format_result(Status.ERROR))
        return 3
    write_result(results, format_result(result.status, result.x, result.y))
    log(f"{result.status.vnncomp}" + (f" ({result.stage})" if result.stage else ""))
    return 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash in native code (torch, onnxruntime) leaves its stack in the log
    die_with_parent()
    from certkit.memory import reuse_freed_memory

    reuse_freed_memory()
    code = main(sys.argv[1:])
    # the result file is written and renamed into place: end now, without the interpreter's
    # shutdown (about 1 s of torch and onnx2torch tearing down, counted against the limit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
