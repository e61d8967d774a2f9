"""Data-parallel training: N processes, each a replica holding part of every batch, that train
exactly the run one process trains with the same ``--batch-size`` (docs/training.md,
"Data-parallel training").

What makes the runs equal:

* **Data order.** Every replica draws the same per-epoch permutation (and CIFAR augmentation)
  from the run's generator, forms the same global batch as one process would, and keeps rows
  ``rank::world`` of it. That is the split ``DistributedSampler`` makes (rank r takes indices
  r, r+N, …), without its padding of the last batch with repeated images and without its own
  seeding: the generator stays the run's, so a checkpoint resumes under any number of
  processes, one included.
* **Batch norm: one set of statistics for the whole global batch** (SyncBatchNorm's choice,
  not per-replica statistics). The method bounds each step with the clean batch's mean and
  variance (train-mode batch norm, ``reuse_stats``) and back-propagates through them, so the
  statistics are part of the certified loss: per-replica statistics would bound every shard
  with a different affine map, a different objective from the single-process one (and a
  different network after the step). :class:`SyncedBatchNorm` computes the global mean, then
  the global biased variance around it (two sums over the replicas, the second pass as exact
  as the single-process variance), normalises with them, records them for the bound passes
  and updates the running statistics with them, so every replica's bounds are those of the
  single-process step on its rows.
* **Every other batch reduction is global too.** The robust loss (and the cross-entropy of
  the ε = 0 epochs) is a sum over local rows divided by the global batch size; the warmup
  regularisers, which are nonlinear in batch means and sums, come from summed sums
  (:func:`certkit.train.regularizers.sharded_warmup_regularizers`); the statistics written to
  metrics.h5 are averaged over replicas; evaluation shards the test and validation sets and
  adds the counts.
* **Gradients.** The loss and its bound passes run inside ``DistributedDataParallel``'s
  forward (a module wrapping the model and the step's loss function), so DDP all-reduces and
  averages the gradients during the backward pass. Each replica's loss is N × its share of
  the global robust loss plus the (replicated) regulariser, whose average over replicas is the
  single-process loss. The sums over replicas inside the step are autograd-aware
  (:class:`_TotalSum`: its backward sums the gradients over replicas), so the gradient
  reaching every parameter through another replica's rows (the global BN statistics and
  regulariser sums) arrives too: after DDP's average each replica holds the single-process
  gradient, and clipping and Adam act identically everywhere.
* **Schedules.** The ε schedule, the warmup and the learning-rate milestones count global
  steps and epochs, the same on every replica and as in one process.

So each step's gradient is the single-process one up to floating-point summation order
(~1e-6 relative). Adam amplifies that rounding where a gradient is near zero (it divides by
the gradient's own magnitude): a few weight entries, and the biases feeding a batch norm
(zero gradient: the norm subtracts them), move by up to ~lr a step differently, as they do in
one process that merely sums each batch in another order. tests/test_distributed_train.py
measures both and states the tolerances.

Rank 0 alone writes config.json, metrics.h5 and the checkpoints and prints; ``--resume``
makes every rank read ``last.pt`` (on several nodes RUN_DIR must be on a shared file system).
``certkit train --nproc N`` starts the processes itself (:func:`launch`);
``torchrun --nproc-per-node N -m certkit train …`` starts them with torchrun, for one node or
several (:func:`train_under_torchrun`). The step is not compiled under data parallelism
(``--compile`` is refused): the sums over replicas would split the compiled graph.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from certkit.bounds.graph import Graph
from certkit.bounds.ops import BatchNorm, batchnorm_of
from certkit.device import resolve_device
from certkit.errors import CertkitError, InvalidInput

# seconds the launcher waits for the other processes to stop (SIGTERM) after one failed, before SIGKILL
_STOP_GRACE = 10.0


class ReplicaFailed(CertkitError):
    """A training process died or failed; the launcher stopped the others (one line)."""


# ------------------------------------------------------------------------- replicas


class _TotalSum(torch.autograd.Function):
    """Sum of a tensor over the replicas; the backward pass sums the gradients over the
    replicas too, so each replica's input gets the gradient of every replica's loss."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class Replica:
    """One process of a data-parallel run: its rank among ``world`` processes, its rank on its
    node (its GPU), and the process group of the step's sums."""

    rank: int
    world: int
    local_rank: int
    device: torch.device  # where this replica's tensors (and its collectives' tensors) live
    group: Any

    @property
    def lead(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def shard(self, rows: Tensor) -> Tensor:
        """This replica's rows of a global batch: ``rank::world`` (DistributedSampler's split)."""
        return rows[self.rank::self.world]

    def total(self, t: Tensor) -> Tensor:
        """``t`` summed over the replicas, differentiably (see :class:`_TotalSum`)."""
        return _TotalSum.apply(t, self.group)

    def mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the replicas (no gradient; statistics)."""
        t = t.detach().to(self.device).clone()
        dist.all_reduce(t, group=self.group)
        return t / self.world

    def gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every replica's ``values`` (small integers), indexed by rank."""
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [t.tolist() for t in out]

    def data_parallel(self, model: nn.Module, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn`` run inside DistributedDataParallel's forward over ``model``'s parameters:
        the backward pass of its loss averages the gradients over the replicas."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # every replica's BN running statistics are identical (global statistics): no broadcast per step
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})  # the older name, deprecated in torch 2.14
        return ddp(_StepLoss(model, loss_fn), device_ids=ids, **no_sync)


class _StepLoss(nn.Module):
    """The training step's loss as a module over the model, for DistributedDataParallel."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any) -> Any:
        return self.loss_fn(*args)


class SyncedBatchNorm(BatchNorm):
    """The bound graph's batch norm with the statistics of the global batch (train mode).

    The same values as :class:`certkit.bounds.ops.BatchNorm` on the whole batch: the mean and
    biased variance (two-pass: the variance around the global mean) of every replica's rows,
    recorded for the bound passes, applied to the local rows, and folded into the running
    statistics (unbiased variance, the module's momentum) identically on every replica.
    Gradients flow through the statistics into every replica's rows. Eval mode is unchanged.
    """

    replica: Replica

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        if not m.training:
            return m(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])  # this replica's elements per channel
        first = self.replica.total(torch.cat([x.sum(dims), count]))
        n = first[-1]
        mean = first[:-1] / n
        xc = x - mean.reshape(shape)
        var = self.replica.total((xc * xc).sum(dims)) / n
        self.stats = (mean, var)
        if m.track_running_stats:
            with torch.no_grad():
                m.num_batches_tracked.add_(1)
                f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
                m.running_mean.mul_(1 - f).add_(mean.detach() * f)
                m.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)) * f)
        scale = torch.rsqrt(var + m.eps)
        if m.affine:
            return xc * (scale * m.weight).reshape(shape) + m.bias.reshape(shape)
        return xc * scale.reshape(shape)


def sync_batch_norms(graph: Graph, replica: Replica) -> int:
    """Make every batch norm of ``graph`` (standalone or folded into a Linear/Conv) use global
    batch statistics; returns how many. The operators keep their identity (the graph's
    Linear/Conv nodes hold them), only their class changes to :class:`SyncedBatchNorm`."""
    done = 0
    for node in graph.nodes[1:]:
        bn = batchnorm_of(node.op)
        if bn is not None and type(bn) is BatchNorm:
            bn.__class__ = SyncedBatchNorm
            bn.replica = replica
            done += 1
    return done


def job_fingerprint(cfg: Any, sizes: Sequence[int], labels: Tensor) -> list[int]:
    """Numbers every replica of one run must agree on: its configuration (but where the data
    lives and which device), the split sizes, and a checksum of the training labels."""
    fields = {k: v for k, v in vars(cfg).items() if k not in ("data_dir", "device")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()
    return [int.from_bytes(digest[:7], "big"), *sizes, int(labels.long().sum())]


def check_same_job(replica: Replica, fingerprint: Sequence[int]) -> None:
    """Refuse to train when the replicas were started with different options or data (each
    parses its own command line; torchrun on several nodes reads each node's data)."""
    for rank, theirs in enumerate(replica.gather(fingerprint)):
        if theirs != list(fingerprint) and rank != replica.rank:
            what = "options" if theirs[0] != fingerprint[0] else "training data"
            raise InvalidInput(f"the training processes disagree: rank {rank} has other {what} than rank "
                               f"{replica.rank}; start every process with the same command and data")


# ------------------------------------------------------------------- process groups


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def start_replica(device_name: str, rank: int, world: int, local_rank: int, store: Any = None) -> Replica:
    """Join the process group (``store``: the launcher's; None: torchrun's environment) and
    return this process's :class:`Replica`. On a GPU replica i uses GPU ``local_rank``."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidInput(f"training process {local_rank} of this node needs GPU {local_rank}, but "
                               f"{torch.cuda.device_count()} are visible: one process per GPU (or --device cpu)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = _backend(device)
    if store is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    # the step's sums get their own group: their order never interleaves with DDP's bucket all-reduces
    return Replica(rank, world, local_rank, device, dist.new_group(backend=backend))


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun (or another launcher setting its
    environment variables) started this process as one of several; else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ:
            return None
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InvalidInput("bad RANK / WORLD_SIZE / LOCAL_RANK in the environment") from None


def train_under_torchrun(cfg: Any, run_dir: str | Path, resume: bool = False, progress: Any = None,
                         log: Any = print, trust_checkpoint: bool = False) -> dict[str, Any]:
    """One replica of a run torchrun started (``torchrun --nproc-per-node N -m certkit train
    …``): join its process group and train; torchrun stops the others if this one fails."""
    from certkit.train.loop import train

    rank, world, local_rank = torchrun_rank() or (0, 1, 0)
    replica = start_replica(cfg.device, rank, world, local_rank)
    try:
        result = train(cfg, run_dir, resume=resume, progress=progress if replica.lead else None,
                       log=log if replica.lead else _silent, trust_checkpoint=trust_checkpoint, replica=replica)
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave_group()
    return result


def _silent(*_: Any, **__: Any) -> None:
    pass


def _leave_group() -> None:
    """Leave the process group once every replica is done: a replica that tore its gloo group
    down while the lead was still writing checkpoints once aborted at exit ("terminate called
    without an active exception", one CI run of the torchrun test); the barrier makes them leave
    together."""
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------ launching


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _die_with_parent(parent: int) -> None:
    """On Linux: SIGTERM this process when the launcher ``parent`` dies (kill -9 included), so
    that no orphaned replica keeps running or waits on a collective."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _run_replica(parent: int, rank: int, world: int, port: int, conn: Any, threads: int, device: str, group: bool,
                 target: Callable[..., Any], args: tuple) -> None:
    """A launched process: join the group (``group``; one process alone runs without), run
    ``target(replica, *args)``, send ("ok", result) or (kind, one-line message) to the launcher."""
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    replica = None
    try:
        if group:
            store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                                  timeout=datetime.timedelta(seconds=120))
            replica = start_replica(device, rank, world, rank, store)
        result = target(replica, *args)
        if replica is not None and dist.is_initialized():
            _leave_group()
        _send(conn, ("ok", result))
        conn.close()
    except BaseException as e:  # noqa: BLE001 - everything goes to the launcher as one line
        if isinstance(e, CertkitError):
            kind, text = "user", str(e)
        elif isinstance(e, KeyboardInterrupt):
            kind, text = "error", "interrupted"
        else:
            kind, text = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        try:
            _send(conn, (kind, text))
            conn.close()
        except OSError:
            pass
        _exit(1)  # no interpreter teardown: a broken process group must not hang it
    _exit(0)  # the result is sent: the seconds of tearing torch down help nobody


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _send(conn: Any, message: tuple[str, Any]) -> None:
    """A message to the launcher, pickled by value (``Connection.send`` would pass tensors as
    shared memory, which dies with this process)."""
    conn.send_bytes(pickle.dumps(message))


def _stop(procs: Sequence[Any]) -> None:
    """SIGTERM the processes still running, SIGKILL those that outlive the grace period."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _STOP_GRACE
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_processes(nproc: int, target: Callable[..., Any], args: tuple = (), device: str = "cpu",
                  threads: int | None = None, group: bool = True) -> list[Any]:
    """``target(replica, *args)`` in ``nproc`` fresh local processes joined in one process group
    (``group=False``: one process, no group, replica None); every process's result, by rank.

    Each process gets ``threads`` torch threads (default: $OMP_NUM_THREADS if set, else the
    cores divided among the processes), so that processes × threads = cores. When one process
    fails or dies the others are stopped and one line says which and why: the first to fail is
    the cause (the others fail after it, when a collective loses its peer): its own error
    (:class:`InvalidInput` for an input error, as one process would raise), else how it died
    (:class:`ReplicaFailed`). The rendezvous store is this process's, on a port the system
    picks: no port is guessed. On Linux the processes die with the thread that started them
    (``PR_SET_PDEATHSIG``): call this from a thread that outlives them, such as the main one."""
    if nproc < 1 or (not group and nproc != 1):
        raise InvalidInput(f"--nproc must be >= 1 (got {nproc})")
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, _cores() // nproc)
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False) if group else None
    port = 0 if store is None else store.port
    procs, conns = [], []
    try:
        for rank in range(nproc):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_replica, name=f"certkit-replica-{rank}",
                            args=(os.getpid(), rank, nproc, port, send, threads, device, group, target, args))
            p.start()
            send.close()  # the child's end: a dead child then reads as EOF, never as a hang
            procs.append(p)
            conns.append(recv)
        return _collect(procs, conns)
    except BaseException:
        _stop(procs)
        raise
    finally:
        for c in conns:
            c.close()
        del store


def _collect(procs: Sequence[Any], conns: Sequence[Any]) -> list[Any]:
    """Every process's result, read as it comes; on the first failure the others are stopped
    and :func:`_raise_failure` names the cause."""
    nproc = len(procs)
    messages: list[tuple[str, Any] | None] = [None] * nproc
    pipes = {conn: rank for rank, conn in enumerate(conns)}
    running = {p.sentinel: rank for rank, p in enumerate(procs)}
    while running:
        failed = []  # the processes this round shows failing; the first round's first is the cause
        for ready in multiprocessing.connection.wait([*pipes, *running]):
            if ready in pipes:  # read as soon as sent: a large result must not block its sender
                rank = pipes.pop(ready)
                messages[rank] = _receive(ready)
                if messages[rank] is not None and messages[rank][0] != "ok":
                    failed.append(rank)
            elif ready in running:
                rank = running.pop(ready)
                procs[rank].join()
                if pipes.pop(conns[rank], None) is not None:  # sent just before exiting: not read yet
                    messages[rank] = _receive(conns[rank])
                if procs[rank].exitcode != 0 or messages[rank] is None or messages[rank][0] != "ok":
                    failed.append(rank)
        if failed:
            # killed (no message) before an input error before any other error: the latter are
            # what the others raise once a collective loses its peer
            cause = min(failed, key=lambda r: (messages[r] is not None, messages[r] is None
                                                or messages[r][0] != "user", r))
            _stop(procs)
            _raise_failure(cause, nproc, procs[cause].exitcode, messages[cause])
    return [msg[1] for msg in messages]  # type: ignore[index]


def _receive(conn: Any) -> tuple[str, Any] | None:
    """A process's message, or None when it sent none (killed): our own child's, on its own
    pipe, so plain unpickling reads what it pickled."""
    try:
        return pickle.loads(conn.recv_bytes()) if conn.poll() else None
    except (EOFError, OSError):
        return None


def _raise_failure(rank: int, world: int, exitcode: int | None, message: tuple[str, Any] | None) -> None:
    who = f"training process {rank} of {world}"
    if message is not None and message[0] == "user":
        raise InvalidInput(message[1])
    if message is not None and message[0] == "error":
        raise ReplicaFailed(f"{who} failed ({message[1]}); the others were stopped")
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with status {exitcode} without finishing"
    raise ReplicaFailed(f"{who} {how}; the others were stopped")


def _train_replica(replica: Replica | None, cfg: Any, run_dir: str, resume: bool, trust_checkpoint: bool,
                   show_progress: bool) -> dict[str, Any]:
    """One launched training process (rank 0 prints the progress bar and the epoch lines)."""
    from certkit.train.loop import train

    progress, log = None, _silent
    if show_progress and (replica is None or replica.lead):
        from certkit.report import TrainProgress, console

        progress, log = TrainProgress(), console.print
    return train(cfg, run_dir, resume=resume, progress=progress, log=log, trust_checkpoint=trust_checkpoint,
                 replica=replica)


def launch(cfg: Any, run_dir: str | Path, nproc: int, resume: bool = False, trust_checkpoint: bool = False,
           show_progress: bool = False) -> dict[str, Any]:
    """``certkit train --nproc N``: train ``cfg`` in ``nproc`` local processes (gloo on the CPU,
    nccl with one GPU each); the last epoch's metrics, as :func:`certkit.train.loop.train`."""
    if nproc < 1:
        raise InvalidInput(f"--nproc must be >= 1 (got {nproc})")
    if cfg.compile:
        raise InvalidInput("--compile is not supported with data-parallel training (--nproc > 1): the sums "
                           "over processes inside the step would split the compiled graph; use --no-compile")
    device = resolve_device(cfg.device)  # a clear error before any process starts
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise InvalidInput(f"--nproc {nproc} needs {nproc} GPUs (one per process); "
                           f"{torch.cuda.device_count()} are visible (or use --device cpu)")
    results = run_processes(nproc, _train_replica, (cfg, str(run_dir), resume, trust_checkpoint, show_progress),
                            device=cfg.device, group=nproc > 1)
    return results[0]


def processes(nproc: int | None) -> tuple[int, bool]:
    """(processes, whether this one prints) for ``train --nproc``: ``nproc`` local ones, or
    torchrun's world (rank 0 prints), or one."""
    under = torchrun_rank()
    if nproc is not None and nproc < 1:
        raise InvalidInput(f"--nproc must be >= 1 (got {nproc})")
    if nproc is not None and nproc > 1 and under is not None:
        raise InvalidInput("--nproc starts its own processes: under torchrun leave it out")
    if under is not None:
        return under[1], under[0] == 0
    return nproc or 1, True


def train_in_processes(cfg: Any, run_dir: str | Path, nproc: int | None, resume: bool = False,
                       trust_checkpoint: bool = False, progress: Any = None, log: Any = print) -> dict[str, Any]:
    """The ``train`` command: :func:`launch` ``nproc`` > 1 local processes, or be one replica of
    torchrun's (:func:`train_under_torchrun`), or train in this process alone."""
    if nproc is not None and nproc > 1:
        return launch(cfg, run_dir, nproc, resume=resume, trust_checkpoint=trust_checkpoint,
                      show_progress=progress is not None)
    if torchrun_rank() is not None:
        return train_under_torchrun(cfg, run_dir, resume=resume, progress=progress, log=log,
                                    trust_checkpoint=trust_checkpoint)
    from certkit.train.loop import train

    return train(cfg, run_dir, resume=resume, progress=progress, log=log, trust_checkpoint=trust_checkpoint)


# ------------------------------------------------------------------------ benchmark


def _bench_replica(replica: Replica | None, overrides: dict[str, Any], steps: int, warmup: int) -> float | None:
    """Training steps/s of one process (rank 0's clock, between barriers) on random images."""
    from certkit.train.loop import Splits, Trainer, config_from
    from certkit.train.models import DATASETS

    cfg = config_from(None, **overrides)
    info = DATASETS[cfg.dataset]
    gen = torch.Generator().manual_seed(0)
    n = cfg.batch_size * 4
    x = torch.randint(0, 256, (n, *info.shape), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, info.num_classes, (n,), generator=gen)
    trainer = Trainer(cfg, Splits((x, y), (x[:8], y[:8]), (x[:8], y[:8])), replica)

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if replica is not None:
            dist.barrier(group=replica.group)

    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        idx = torch.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size) % n
        xb, yb = trainer.batch(idx)
        trainer.step(xb, yb, cfg.eps, 1)  # epoch 1: inside the warmup, regularisers on
    sync()
    return steps / (time.perf_counter() - t0) if replica is None or replica.lead else None


def steps_per_second(procs: Sequence[int] = (1, 2), model: str = "cnn-small", dataset: str = "mnist",
                     batch_size: int = 256, method: str = "fast", steps: int = 20, warmup: int = 3,
                     device: str = "cpu", cores: int | None = None) -> dict[int, float]:
    """Training steps per second with 1, 2, … processes at the same global batch, measured in
    one call: each count in fresh processes with ``cores // processes`` torch threads each
    (processes × threads = cores; ``cores`` defaults to the cores this process may use), one
    process without a process group (the single-process trainer). The step is the warmup's
    (IBP bounds, robust loss, both regularisers with gradients; ``method="fast"``), after
    ``warmup`` untimed steps; images are random, so no dataset files are needed. For
    benchmarks/scale_out.py: ``{1: steps/s, 2: steps/s}``."""
    cores = cores or _cores()
    overrides = dict(dataset=dataset, model=model, method=method, batch_size=batch_size, eps=0.2, epochs=1,
                     schedule_start=1, schedule_length=1, device=device, compile=False)
    out = {}
    for n in procs:
        rates = run_processes(n, _bench_replica, (overrides, steps, warmup), device=device,
                              threads=max(1, cores // n), group=n > 1)
        out[n] = float(rates[0])
    return out
