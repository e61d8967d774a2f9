"""The child process of ``run-instance``: solve, write the result file, exit.

Usage (internal): ``python -m certkit.vnncomp.worker ONNX VNNLIB RESULTS END_TIME CATEGORY THREADS DEVICE``
where END_TIME is a ``time.time()`` value by which the solver stops on its own and DEVICE is
cpu, cuda or auto.
"""

from __future__ import annotations

import sys
import time
import traceback


def main(argv: list[str]) -> int:
    onnx, vnnlib, results, end, category, threads, device = argv
    end = float(end)
    from certkit.errors import CertkitError
    from certkit.vnncomp.instance import write_result
    from certkit.vnncomp.oracle import format_result

    def log(msg: str) -> None:
        print(f"[certkit {category or 'instance'}] {msg}", file=sys.stderr, flush=True)

    try:
        import torch

        from certkit.train.loop import resolve_device
        from certkit.vnncomp.solver import Solver
        from certkit.vnnlib import read_vnnlib

        prop = read_vnnlib(vnnlib)
        solver = Solver(onnx, device=resolve_device(device))
        # 0 keeps PyTorch's default (every core): on this 2-core CPU ReLU splitting bounds 1.7× the
        # domains per second on mnist_fc 256x4 (#56), oval21 #8 takes 37 s instead of 51 s, and
        # ACAS Xu #13 and reach_prob robot_0 take the same time as on one thread
        if int(threads) > 0:
            torch.set_num_threads(int(threads))
        result = solver.solve(prop, end - time.time(), log=log)
    except CertkitError as e:
        log(f"error: {e}")
        write_result(results, format_result("error"))
        return 2
    except Exception:  # a bug: say so in the log, answer nothing
        log("internal error:\n" + traceback.format_exc())
        write_result(results, format_result("error"))
        return 3
    write_result(results, format_result(result.status, result.x, result.y))
    log(f"{result.status}" + (f" ({result.stage})" if result.stage else ""))
    return 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash in native code (torch, onnxruntime) leaves its stack in the log
    sys.exit(main(sys.argv[1:]))
