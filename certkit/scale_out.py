"""``--workers N`` / ``--address``: ``certkit verify`` and ``certkit vnncomp`` on worker processes of
a Ray cluster (the optional extra ``certkit[ray]``).

Without ``--address`` a local cluster of this machine is started for the run and shut down at its
end (nothing to set up); ``--address auto`` or ``ray://HOST:10001`` joins a running one
(``ray start --head``). Each worker is a Ray actor that reserves one CPU (and one GPU with
``--device cuda``), takes one job at a time and runs PyTorch on its node's cores divided among the
workers placed there, so that workers × threads = cores (at most ``$OMP_NUM_THREADS`` when the
driver's environment sets it, as a single process would).

What is sharded, and why the answers do not depend on it:

* ``verify``: a job (shard) is whole batches, contiguous, on the batch grid of a single-process run
  (shard boundaries are multiples of the batch size from the first sample not yet written). Each
  batch is therefore the same batch, bounded together with the same samples and attacked with the
  same seed (per batch start index) as in one process, so every row is the same (bit for bit with
  the same number of threads: another sums in another order); bounds may depend on which samples
  share a batch, which is why shards never split one. A worker loads the model once, for every
  radius of a sweep (``--eps 0.1,0.2``), which runs its radii one after the other, each sharded so
  (a job carries its ε), over the samples whose answer is not carried over from another ε.
  The driver writes the rows in index order, appending the contiguous prefix of finished shards and
  holding later ones back, so the results file stays what ``--resume`` expects (rows before
  ``rows_committed`` are done, the rest is redone): a driver killed at any moment loses only the
  shards not yet written, which the rerun recomputes.
* ``vnncomp``: a job is an instance, solved by :func:`certkit.vnncomp.instance.run_instance` in the
  worker (a child process killed at the instance's deadline, scored ``timeout``). A worker that
  overruns the deadline by :data:`GRACE` seconds anyway is killed from here and the instance scored
  ``timeout``. The result file and log come back to the driver, which writes them and the CSV row.

A worker that dies (killed, out of memory, node lost) is replaced by a fresh one and its job is
retried, up to :data:`MAX_ATTEMPTS` tries in all; then its samples are recorded as ``error`` (its
instance scored ``error``) with the reason. An exception raised by certkit's own code in a worker is
raised here, as it would be in one process.

Files (the model, an instance's ONNX and VNN-LIB) are read in place where a worker's machine has the
same file at the same path (same SHA-256), else shipped through Ray's object store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from certkit.errors import CertkitError, InvalidInput
from certkit.files import file_sha256

RAY_MISSING = "--workers needs Ray: pip install 'certkit[ray]'"
MAX_ATTEMPTS = 3  # tries of a job whose worker dies, before its samples/instance are recorded as error
SHARDS_PER_WORKER = 4  # verify: at least this many shards per worker where the data allows (smooth progress,
MAX_SHARD_BATCHES = 8  # balanced ends), and at most this many batches per shard
GRACE = 30.0  # vnncomp: seconds past an instance's timeout after which its worker is killed from the driver
PACKAGE = Path(__file__).resolve().parent  # the certkit the workers must run: this one


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InvalidInput(RAY_MISSING) from None
    return ray


def check_options(workers: int | None, address: str | None) -> None:
    """The command line's check of ``--workers``/``--address``, before any work: Ray installed (not
    imported yet: see :meth:`Cluster._connect`), a worker count given and positive."""
    import importlib.util

    if workers is None and address is None:
        return
    if workers is None:
        raise InvalidInput("--address needs --workers N: how many worker processes to start in the cluster")
    if workers < 1:
        raise InvalidInput(f"--workers must be at least 1; got {workers}")
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: a ray module without a spec (sys.modules["ray"] = None)
        found = False
    if not found:
        raise InvalidInput(RAY_MISSING)


@dataclass
class Shipped:
    """A file of the driver's machine as a worker sees it: the same path where that holds the same
    bytes (this machine, a shared file system), else a copy of the bytes from the object store."""

    path: str
    sha256: str
    data: Any  # an ObjectRef to the bytes; None on a local cluster, whose workers see the driver's files

    def local(self, directory: str) -> Path:
        """A path on this machine holding the file's bytes (written into ``directory`` if needed;
        found again without reading it when this process asked before)."""
        import ray

        key = (self.path, self.sha256, directory)
        if key in _LOCAL and _LOCAL[key].is_file():
            return _LOCAL[key]
        path = Path(self.path)
        try:
            same = path.is_file() and file_sha256(path) == self.sha256
        except OSError:
            same = False
        if not same:
            if self.data is None:
                raise CertkitError(f"{self.path} changed or vanished during the run")
            path = Path(directory) / self.sha256[:16] / path.name  # the name kept: .onnx, .vnnlib(.gz)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(ray.get(self.data))
        _LOCAL[key] = path
        return path


_LOCAL: dict[tuple[str, str, str], Path] = {}  # a worker's files, by (driver's path, SHA-256, directory)


class _Worker:
    """What every worker does besides its jobs: say where it runs, take its thread count."""

    threads = 1

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def set_threads(self, threads: int) -> None:
        self.threads = threads


class VerifyWorker(_Worker):
    """A ``verify`` worker: loads the model once, then verifies shards of whole batches."""

    def __init__(self, model: Shipped, cfg: Any, device: str):
        import torch

        from certkit.verify import Verifier, bounded_model

        self._files = tempfile.TemporaryDirectory(prefix="certkit-worker-")
        path = model.local(self._files.name)
        self.cfg = replace(cfg, device=device)
        self.verifier = Verifier.load(path, bounded_model(path)[0], self.cfg, torch.device(device))

    def set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = threads

    def verify(self, x: Any, y: Any, indices: np.ndarray, eps: float) -> dict[str, np.ndarray]:
        """The rows of a shard at radius ``eps`` (its batches' rows, concatenated)."""
        return _concat(list(self.verifier.batches(x, y, indices, replace(self.cfg, eps=eps))))


class InstanceWorker(_Worker):
    """A ``vnncomp`` worker: solves instances one at a time, each in a child process with a hard deadline.
    It imports no torch (the child does), as run-instance's parent."""

    def __init__(self) -> None:
        self._files = tempfile.TemporaryDirectory(prefix="certkit-worker-")

    def solve(self, onnx: Shipped, vnnlib: Shipped, timeout: float, category: str, device: str,
              max_memory: int | None, config: Any) -> tuple[str, float, str, str]:
        """(status in VNN-COMP's words, seconds, the result file's text, the log's text)."""
        from certkit.vnncomp.instance import run_instance

        files = onnx.local(self._files.name), vnnlib.local(self._files.name)
        with tempfile.TemporaryDirectory(dir=self._files.name) as tmp:
            result, log = Path(tmp) / "result.txt", Path(tmp) / "result.log"
            start = time.monotonic()
            status = run_instance(*files, timeout, result, category=category, threads=self.threads, log_file=log,
                                  device=device, max_memory=max_memory, config=config)
            seconds = time.monotonic() - start
            return status.vnncomp, seconds, result.read_text(), log.read_text(errors="replace")


def _concat(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@dataclass
class _Job:
    key: Any
    args: tuple
    limit: float | None = None  # seconds it may run before its worker is killed (None: no limit)
    attempts: int = 0


@dataclass
class Failed:
    """A job not done: its worker kept dying (``overran`` False) or ran past the job's limit;
    ``seconds`` it ran the last time."""

    reason: str
    seconds: float
    overran: bool = False


def shards(first: int, n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Sample ranges [start, stop) of whole batches from ``first`` (a multiple of ``batch_size``)
    to ``n``: at least :data:`SHARDS_PER_WORKER` per worker where the data allows, at most
    :data:`MAX_SHARD_BATCHES` batches each."""
    batches = -(-(n - first) // batch_size)
    size = batch_size * max(1, min(MAX_SHARD_BATCHES, batches // (SHARDS_PER_WORKER * workers)))
    return [(s, min(s + size, n)) for s in range(first, n, size)]


def _short(e: BaseException) -> str:
    """An exception in one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines)[:300]}" if lines else type(e).__name__


def _get(ray: Any, refs: list) -> list:
    """``ray.get(refs)``, waiting in slices of 0.5 s so that Ctrl-C is seen (a wait in Ray's C++ core
    without a limit would not return to Python for it)."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    return ray.get(refs)


def _thread_cap() -> int:
    """The most threads per worker: ``$OMP_NUM_THREADS`` where the driver's environment sets it (a
    single process would use that many), else no cap. The thread count changes a bound's last bits
    (the order of its sums), so a run matches a single-process one bit for bit only with the same."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return 1 << 30


class _Pool:
    """``workers`` actors of one class, each doing one job at a time (so a death is blamed on the job
    it was doing, not on a queued one). A dead worker is replaced by a fresh one, up to
    ``MAX_ATTEMPTS`` per worker slot in all."""

    def __init__(self, cluster: Cluster, cls: type, args: tuple):
        ray = cluster.ray
        self.ray = ray
        self.remote = ray.remote(cls).options(num_cpus=1, num_gpus=1 if cluster.device == "cuda" else 0,
                                              max_restarts=0, scheduling_strategy="SPREAD")
        self.args = args
        self.replacements = cluster.workers * MAX_ATTEMPTS
        self.deaths = 0
        self.actors = [self.remote.remote(*args) for _ in range(cluster.workers)]
        self.threads: dict[Any, int] = {}
        try:
            nodes = _get(ray, [a.node.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise CertkitError(f"a Ray worker could not start: {_short(e)}") from None
        cpus = {n["NodeID"]: n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")}
        placed, cap = Counter(nodes), _thread_cap()
        for actor, node in zip(self.actors, nodes):  # workers × threads = the cores of each node
            self.threads[actor] = max(1, min(int(cpus.get(node, 1) // placed[node]), cap))
        _get(ray, [a.set_threads.remote(self.threads[a]) for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def _replace(self, actor: Any) -> Any | None:
        """Kill ``actor`` (if still alive) and start another with its thread count; None when the
        replacements are used up."""
        self.ray.kill(actor)
        self.actors.remove(actor)
        self.deaths += 1
        if self.replacements <= 0:
            return None
        self.replacements -= 1
        new = self.remote.remote(*self.args)
        self.threads[new] = self.threads.pop(actor)
        new.set_threads.remote(self.threads[new])  # queued before any job
        self.actors.append(new)
        return new

    def run(self, jobs: list[_Job], method: str) -> Iterator[tuple[_Job, Any]]:
        """(job, what ``method`` returned, or :class:`Failed`), as jobs finish."""
        ray = self.ray
        queue, idle = deque(jobs), deque(self.actors)
        busy: dict[Any, tuple[Any, _Job, float]] = {}
        while queue or busy:
            while queue and idle:
                actor, job = idle.popleft(), queue.popleft()
                busy[getattr(actor, method).remote(*job.args)] = (actor, job, time.monotonic())
            if not busy:  # every worker died and none may replace them
                for job in queue:
                    yield job, Failed(f"no worker left: workers died {self.deaths} times", 0.0)
                return
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=self._next_limit(busy))  # ≤ 0.5 s: see there
            if not ready:
                yield from self._overran(busy, idle)
                continue
            actor, job, t0 = busy.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:  # certkit's own exception: raised as in one process
                raise (e.cause if isinstance(e.cause, Exception) else e) from None
            except ray.exceptions.RayError as e:  # the worker died
                if isinstance(e, ray.exceptions.RayActorError) and e.actor_init_failed:
                    raise CertkitError(f"a Ray worker could not start: {_short(e)}") from None
                new = self._replace(actor)
                if new is not None:
                    idle.append(new)
                job.attempts += 1
                if job.attempts < MAX_ATTEMPTS:
                    queue.appendleft(job)
                    logging.getLogger("certkit.scale_out").warning("a worker died (%s); retrying", _short(e))
                else:
                    yield job, Failed(f"its worker died {job.attempts} times; last: {_short(e)}",
                                      time.monotonic() - t0)
                continue
            idle.append(actor)
            yield job, result

    @staticmethod
    def _next_limit(busy: dict[Any, tuple[Any, _Job, float]]) -> float:
        """Seconds until the first busy job's limit, at most 0.5: Ctrl-C is seen only between two
        waits (a wait without a limit would never return to Python)."""
        ends = [t0 + job.limit for _, job, t0 in busy.values() if job.limit is not None]
        return min(0.5, max(0.0, min(ends, default=float("inf")) - time.monotonic()))

    def _overran(self, busy: dict[Any, tuple[Any, _Job, float]], idle: deque) -> Iterator[tuple[_Job, Any]]:
        """Kill the workers whose job ran past its limit; those jobs end :class:`Failed` (overran)."""
        now = time.monotonic()
        for ref, (actor, job, t0) in list(busy.items()):
            if job.limit is not None and now - t0 >= job.limit:
                del busy[ref]
                new = self._replace(actor)
                if new is not None:
                    idle.append(new)
                yield job, Failed(f"the worker ran {now - t0:.0f} s, past the limit of {job.limit:.0f} s: "
                                  "killed", now - t0, overran=True)


def _reload_ray_config() -> None:
    """Make an already imported Ray read its settings from the environment again (as ``ray.init``
    does when it turns token authentication on); nothing to do before Ray's import."""
    import sys

    if "ray" in sys.modules:
        try:
            from ray._raylet import AuthenticationTokenLoader, Config
        except ImportError:  # a Ray without token authentication
            return
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


class Cluster:
    """A Ray cluster for one run: a local one started on entry and shut down on exit (``address``
    None), or the running one at ``address`` (``auto``, ``ray://HOST:10001``), joined and left.

    ``device`` (auto, cpu, cuda) is where the workers compute: ``cuda`` reserves one GPU per worker,
    ``auto`` means cuda when the cluster has a GPU for every worker."""

    def __init__(self, workers: int | None, address: str | None = None, device: str = "cpu"):
        check_options(workers, address or "local")  # the one-line errors
        self.ray: Any = None  # imported on entry (see _connect)
        self.workers: int = workers  # type: ignore[assignment]
        self.address = address or "local"
        self.requested_device = device
        self.device = "cpu"
        self._environ: dict[str, str | None] = {}
        self._files: dict[str, Shipped] = {}
        self._verify_pool: _Pool | None = None  # verify's workers, kept for every radius of a sweep

    def __enter__(self) -> Cluster:
        import warnings

        try:
            with warnings.catch_warnings():  # Ray's own (a client timeout, ...): the error says it in one line
                warnings.simplefilter("ignore")
                self._connect()
            self._check_resources()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._verify_pool is not None:
            self._verify_pool.close()
            self._verify_pool = None
        self._files.clear()
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()
        if self._environ:
            for k, v in self._environ.items():  # as before the run
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._environ.clear()
            _reload_ray_config()

    def _setenv(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self._environ.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def _connect(self) -> None:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address == "local":
            # Ray's default token authentication, with a token of this run (in the environment the
            # cluster's processes inherit) instead of one written to ~/.ray, and no warning about it.
            # Ray reads the mode when it is imported: set it first (or have Ray read it again).
            if "RAY_AUTH_MODE" not in os.environ:
                self._setenv({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
                _reload_ray_config()
            # the workers import this certkit (a source tree too): through the environment they inherit,
            # which costs nothing, where a runtime_env would have Ray start new workers for it (seconds)
            self._setenv({"PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE.parent),
                                                                    os.environ.get("PYTHONPATH")) if p)})
            self.ray = ray = import_ray()
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, self.workers), include_dashboard=False,
                     **quiet)  # "local": a new cluster, whatever $RAY_ADDRESS says
            return
        self.ray = ray = import_ray()
        try:  # the nodes run the driver's certkit (its dependencies must be installed there)
            ray.init(address=self.address, runtime_env={"py_modules": [str(PACKAGE)]}, **quiet)
        except Exception as e:
            raise InvalidInput(f"--address {self.address}: cannot join the Ray cluster ({_short(e)})") from None

    def _check_resources(self) -> None:
        resources = self.ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        where = "this machine" if self.address == "local" else f"the Ray cluster at {self.address}"
        if self.workers > cpus:
            raise InvalidInput(f"--workers {self.workers}: {where} has {cpus} CPU(s), one per worker is needed")
        if self.requested_device.startswith("cuda") and gpus < self.workers:
            raise InvalidInput(f"--device cuda --workers {self.workers}: {where} has {gpus} GPU(s), one per "
                               "worker is needed")
        self.device = "cuda" if self.requested_device.startswith("cuda") or (
            self.requested_device == "auto" and gpus >= self.workers) else "cpu"

    def ship(self, path: str | Path) -> Shipped:
        """``path`` as the workers see it (on a cluster of several machines, its bytes put into the
        object store once)."""
        key = str(Path(path).resolve())
        if key not in self._files:
            data = Path(key).read_bytes()
            self._files[key] = Shipped(key, hashlib.sha256(data).hexdigest(),
                                       None if self.address == "local" else self.ray.put(data))
        return self._files[key]

    # ------------------------------------------------------------------------------------ verify

    def verify(self, onnx_path: Path, x: Any, y: Any, indices: np.ndarray, cfg: Any, first: int,
               num_outputs: int) -> Iterator[dict[str, np.ndarray]]:
        """The rows of samples ``first``… of ``x`` at radius ``cfg.eps``, in index order, in runs of
        finished shards.

        The workers start on the first call and serve the later ones of the run (a sweep's other
        radii, with the same model and settings but ε); they stop with the cluster, or at once when
        a call is abandoned (an error while its rows are written)."""
        from certkit.verify import error_rows

        jobs = [_Job((s, e), (x[s:e].clone(), y[s:e].clone(), indices[s:e], cfg.eps))  # clone: not the whole storage
                for s, e in shards(first, len(x), cfg.batch_size, self.workers)]
        if not jobs:
            return
        if self._verify_pool is None:
            self._verify_pool = _Pool(self, VerifyWorker, (self.ship(onnx_path), cfg, self.device))
        done: dict[int, dict[str, np.ndarray]] = {}
        nxt = first
        finished = False
        try:
            for job, rows in self._verify_pool.run(jobs, "verify"):
                s, e = job.key
                if isinstance(rows, Failed):
                    rows = error_rows(y[s:e].numpy(), indices[s:e], cfg.stages(), num_outputs,
                                      int(np.prod(x.shape[1:])), rows.reason)
                done[s] = rows
                ready = []
                while nxt in done:  # the contiguous prefix: written now, in index order
                    ready.append(done.pop(nxt))
                    nxt += len(ready[-1]["index"])
                if ready:
                    yield _concat(ready)
            finished = True
        finally:
            if not finished:  # jobs may still run: stop them now, not when the cluster goes
                self._verify_pool.close()
                self._verify_pool = None

    # ----------------------------------------------------------------------------------- vnncomp

    def solve(self, instances: list[tuple[Any, Path, Path, float, str]], max_memory: int | None,
              config: Any) -> Iterator[tuple[Any, str, float, str, str]]:
        """Solve (key, onnx, vnnlib, timeout, category) instances; yields (key, status in VNN-COMP's
        words, seconds, the result file's text, the log's text) as they finish. An instance whose
        worker kept dying is ``error``, one whose worker overran its deadline ``timeout``, with the
        reason in its log."""
        from certkit.status import Status
        from certkit.vnncomp.result_file import format_result

        jobs = [_Job(key, (self.ship(onnx), self.ship(vnnlib), timeout, category, self.device, max_memory, config),
                     limit=timeout + GRACE) for key, onnx, vnnlib, timeout, category in instances]
        if not jobs:
            return
        pool = _Pool(self, InstanceWorker, ())
        try:
            for job, result in pool.run(jobs, "solve"):
                if isinstance(result, Failed):
                    status = Status.TIMEOUT if result.overran else Status.ERROR
                    yield (job.key, status.vnncomp, result.seconds, format_result(status),
                           f"[certkit scale-out] {result.reason}\n")
                else:
                    yield (job.key, *result)
        finally:
            pool.close()
