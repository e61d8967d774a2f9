"""The training loop shared by ``fast``, ``vanilla`` and ``crown-ibp`` (ALGORITHMS.md §4–8).

One epoch: per batch, ε from the smoothed schedule, a clean forward pass (train-mode batch
norm records the clean batch statistics), IBP bounds of every node with those statistics,
the robust loss on the margin lower bounds (mixed with CROWN for ``crown-ibp``, by default
through loss fusion: :mod:`certkit.train.loss_fusion`), and during the warmup of ``fast`` the
two regularisers. Then an evaluation at ε_max on the test split and on a validation split
carved from the training set (which picks the ``best`` checkpoint). Everything needed to
continue bit-for-bit is in ``last.pt``. Before training and after the ε ramp's last epoch the
ReLU layers' interval widths go to metrics.h5's notes (:mod:`certkit.train.widths`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from certkit import __version__
from certkit.bounds import BoundedModel, margin_matrix
from certkit.checkpoints import load_checkpoint_state, save_checkpoint
from certkit.device import resolve_device
from certkit.errors import InvalidInput
from certkit.files import remove_stale_temporaries, write_atomically
from certkit.train.data import augment, load_dataset, to_float
from certkit.train.init import ibp_init
from certkit.train.loss_fusion import fused_ce_bound
from certkit.train.metrics import MetricsFile
from certkit.train.models import DATASETS, build_model, model_args
from certkit.train.regularizers import robust_loss, sharded_warmup_regularizers, warmup_regularizers
from certkit.train.schedule import SmoothedEps
from certkit.train.widths import WidthProfile, model_widths, normalised_input

if TYPE_CHECKING:
    from certkit.train.distributed import Replica

METHODS = ("fast", "vanilla", "crown-ibp")
REGULARIZERS = ("tightness", "relu")
AUGMENT_PAD = {"mnist": 0, "cifar10": 2, "tinyimagenet": 4}


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run (saved as RUN_DIR/config.json)."""

    dataset: str = "mnist"
    model: str = "cnn7"
    width: int | None = None  # cnn7's channel multiplier (None: 64, the paper's)
    depth: int | None = None  # mlp's hidden layers (None: 2)
    hidden: int | None = None  # mlp's units per hidden layer (None: 256)
    bn: bool = True
    method: str = "fast"
    loss_fusion: bool | None = None  # crown-ibp: bound the cross-entropy (None: see use_loss_fusion)
    eps: float = 0.4  # ε_max for training
    eps_eval: float | None = None  # ε for evaluation and checkpoint selection (default: eps)
    epochs: int = 70
    batch_size: int = 256
    lr: float = 5e-4
    milestones: tuple[int, ...] = (50, 60)
    lr_decay: float = 0.2
    schedule_start: int = 1
    schedule_length: int = 20
    lam: float = 0.5
    tau: float = 0.5
    grad_clip: float = 10.0
    seed: int = 0
    limit: int | None = None  # train on the first N training images only
    val_size: int | None = None  # default: min(5000, 10% of the training images)
    eval_limit: int | None = None  # evaluate on the first N test images only
    data_dir: str | None = None
    device: str = "auto"
    ibp_init: bool | None = None  # None: as the method says (fast only); set for ablations
    regularizers: tuple[str, ...] | None = None  # None: ("tightness", "relu") for fast, () otherwise
    compile: bool | None = None  # torch.compile the step's loss (see ``compiled``); None: on a GPU only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config saved as JSON (config.json or inside a checkpoint)."""
        data = dict(data)
        data.pop("extra", None)  # an unused field of configs saved before November 2026
        data.setdefault("loss_fusion", False)  # configs saved before loss fusion trained without it
        data["milestones"] = tuple(data["milestones"])
        if data.get("regularizers") is not None:
            data["regularizers"] = tuple(data["regularizers"])
        return cls(**data)

    @property
    def use_ibp_init(self) -> bool:
        return self.method == "fast" if self.ibp_init is None else self.ibp_init

    @property
    def active_regularizers(self) -> tuple[str, ...]:
        if self.regularizers is None:
            return REGULARIZERS if self.method == "fast" else ()
        return self.regularizers

    @property
    def eps_test(self) -> float:
        return self.eps if self.eps_eval is None else self.eps_eval

    @property
    def use_loss_fusion(self) -> bool:
        """Given or, by default, on for CROWN-IBP from the IBP initialisation only: there the fused
        loss trained to the unfused one's verified error within the seeds' spread at a third of the
        ramp's cost; from the default initialisation it trained clearly worse (docs/training.md)."""
        if self.loss_fusion is not None:
            return self.loss_fusion
        return self.method == "crown-ibp" and self.use_ibp_init

    @property
    def arch(self) -> dict[str, int | None]:
        """The model's size options as given (None: the model's default), for ``build_model``."""
        return {"width": self.width, "depth": self.depth, "hidden": self.hidden}

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dataset not in DATASETS:
            raise InvalidInput(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("epochs", "batch_size", "schedule_start"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1")
        unknown = set(self.regularizers or ()) - set(REGULARIZERS)
        if unknown:
            raise InvalidInput(f"unknown regulariser {sorted(unknown)[0]!r}; choose from {', '.join(REGULARIZERS)}")
        if self.schedule_length < 0 or self.eps < 0 or self.lr <= 0:
            raise InvalidInput("schedule length and eps must be >= 0, lr > 0")
        try:
            model_args(self.model, **self.arch)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        if self.loss_fusion and self.method != "crown-ibp":
            raise InvalidInput(f"loss fusion applies to --method crown-ibp only, not {self.method!r}")


PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(dataset="mnist", eps=0.4, batch_size=256, schedule_start=1, schedule_length=20,
                  milestones=(50, 60), epochs=70, lam=0.5),
    "cifar10": dict(dataset="cifar10", eps=8 / 255, batch_size=128, schedule_start=2, schedule_length=80,
                    milestones=(120, 140), epochs=160, lam=0.5),
    "cifar10-short": dict(dataset="cifar10", eps=8 / 255, batch_size=128, schedule_start=2, schedule_length=20,
                          milestones=(50, 60), epochs=70, lam=0.5),
    "tinyimagenet": dict(dataset="tinyimagenet", eps=1 / 255, batch_size=128, schedule_start=2, schedule_length=20,
                         milestones=(61, 71), epochs=80, lam=0.2),
}


def config_from(preset: str | None, **overrides: Any) -> TrainConfig:
    """A preset's hyper-parameters with command-line overrides (None means 'not given')."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base.update(PRESETS[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**base)
    cfg.validate()
    return dataclasses.replace(cfg, loss_fusion=cfg.use_loss_fusion)  # recorded as trained


# ---------------------------------------------------------------------------- data


@dataclass
class Splits:
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def load_splits(cfg: TrainConfig) -> Splits:
    """Training images (minus a held-out validation tail), validation, and test (uint8)."""
    x, y = load_dataset(cfg.dataset, cfg.data_dir, "train")
    if cfg.limit is not None:
        x, y = x[:cfg.limit], y[:cfg.limit]
    n_val = cfg.val_size if cfg.val_size is not None else min(5000, len(x) // 10)
    if not 0 < n_val < len(x):
        raise InvalidInput(f"validation size {n_val} does not fit {len(x)} training images")
    xt, yt = load_dataset(cfg.dataset, cfg.data_dir, "test")
    if cfg.eval_limit is not None:
        xt, yt = xt[:cfg.eval_limit], yt[:cfg.eval_limit]
    return Splits((x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:]), (xt, yt))


# ------------------------------------------------------------------------ training


def compiled(fn: Callable, device: torch.device) -> Callable:
    """``fn`` through torch.compile: fused elementwise work, and on a GPU CUDA graphs
    (mode ``reduce-overhead``), which replay a step's hundreds of kernel launches at once.

    On an H100 this makes a CNN-7 IBP step about 3x faster (README, Benchmarks) for a minute
    or two of compilation per variant of the step (ε = 0, warmup, after it, CROWN-IBP's
    mixing, the last smaller batch). Outputs of a CUDA-graphed call live in buffers the next
    call reuses: callers clone what they keep. The variants of every compiled function in a
    process count towards one recompilation limit, past which dynamo would silently fall back
    to eager: the limit grows so that several trainers (benchmarks, tests) fit.
    """
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else "default")


class Trainer:
    """Holds the model, its bound graph, the optimiser, schedules and RNG of one run.

    With a ``replica`` (data-parallel training, :mod:`certkit.train.distributed`) it is one
    of several processes that together take the single-process steps: it draws the same global
    batches and keeps its rows of them, its batch norms and batch reductions are global, and the
    step's loss runs inside DistributedDataParallel, which averages the gradients."""

    def __init__(self, cfg: TrainConfig, splits: Splits, replica: Replica | None = None):
        self.cfg = cfg
        self.splits = splits
        self.replica = replica
        self.device = resolve_device(cfg.device) if replica is None else replica.device
        if self.device.type == "cuda":
            # cuDNN's fastest convolution backward sums with atomics in a varying order: deterministic
            # algorithms keep a resumed run bit-for-bit equal to an uninterrupted one
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.info = DATASETS[cfg.dataset]
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, cfg.dataset, cfg.bn, **cfg.arch).to(self.device)
        self.bm = BoundedModel(self.model, self.info.shape)
        graph = self.bm.graph
        if cfg.use_ibp_init:
            ibp_init(self.model, graph)
        if replica is not None:
            from certkit.train.distributed import sync_batch_norms

            n, last = len(splits.train[0]), (len(splits.train[0]) - 1) % cfg.batch_size + 1
            if min(cfg.batch_size, n, last) < replica.world:  # a replica without rows cannot bound them
                raise InvalidInput(f"{replica.world} processes need at least {replica.world} images in every "
                                   f"batch, but the last of an epoch has {min(cfg.batch_size, n, last)} ({n} "
                                   f"training images, batch size {cfg.batch_size}): change --batch-size or "
                                   "--limit, or use fewer processes")
            if cfg.compile:
                raise InvalidInput("--compile is not supported with data-parallel training: the sums over "
                                   "processes inside the step would split the compiled graph; use --no-compile")
            sync_batch_norms(graph, replica)
        self.relu_inputs = [n.inputs[0] for n in graph.relus]
        self.input_node = normalised_input(graph)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.lr_sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, list(cfg.milestones), cfg.lr_decay)
        self.batches = math.ceil(len(splits.train[0]) / cfg.batch_size)
        self.eps_sched = SmoothedEps(cfg.eps, cfg.schedule_start, cfg.schedule_length, self.batches)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self._eps = torch.zeros((), device=self.device)
        self.compiled = cfg.compile if cfg.compile is not None else self.device.type == "cuda" and replica is None
        self._losses = compiled(self._eager_losses, self.device) if self.compiled else self._eager_losses
        if replica is not None:
            self._losses = replica.data_parallel(self.model, self._eager_losses)
        self._rows = 0  # images in the current global batch (a replica holds some of them)
        self.epoch = 0  # epochs completed
        self.best_val = math.inf

    # -- state -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict(), "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(), "epoch": self.epoch, "best_val": self.best_val,
                "config": dataclasses.asdict(self.cfg), "certkit_version": __version__}

    def load_state(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.lr_sched.load_state_dict(st["lr_scheduler"])
        self.gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        self.epoch, self.best_val = st["epoch"], st["best_val"]

    # -- one step --------------------------------------------------------------

    def step(self, x: Tensor, y: Tensor, eps: float, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        warm = bool(cfg.active_regularizers) and self.eps_sched.in_warmup(epoch)
        mix = cfg.method == "crown-ibp" and 0 < eps < cfg.eps
        # ε reaches the (possibly compiled) loss as a device tensor filled in place: a Python float
        # would make torch.compile specialise on every value, a fresh tensor would wait for the device
        self._eps.fill_(eps if eps > 0 else 1e-6)  # the ε = 0 phase computes the regularisers at ε = 1e-6
        loss, stats = self._losses(x, y, self._eps, eps > 0, mix, warm)
        if self.compiled:
            stats = {k: v.clone() for k, v in stats.items()}  # CUDA graphs reuse their output buffers
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        return stats

    def _eager_losses(self, x: Tensor, y: Tensor, eps: Tensor, robust: bool, mix: bool,
                      warm: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss and its statistics (device tensors: reading them would make a GPU wait).

        ``robust``: ε > 0 (else the loss is cross-entropy); ``mix``: CROWN-IBP's ramp mixing;
        ``warm``: the regularisers join the loss. Only ``eps`` varies from step to step."""
        cfg = self.cfg
        logits = self.bm(x)
        stats: dict[str, Tensor] = {"clean_err": self._batch_mean((logits.argmax(1) != y).float()).detach()}
        bounds = self.bm.intervals((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), "ibp")
        if robust:
            C = margin_matrix(y, self.info.num_classes)
            fused = mix and cfg.use_loss_fusion
            lb, ub = self.bm.spec_bounds(bounds, C, "ibp", bound_upper=fused)
            stats["ibp_err"] = self._batch_mean(((lb <= 0).any(1) | (logits.argmax(1) != y)).float()).detach()
            loss = self._robust_loss(bounds, C, lb, ub, 1 - eps / cfg.eps, mix)
        else:
            loss = F.cross_entropy(logits, y) if self.replica is None else self._share(
                F.cross_entropy(logits, y, reduction="sum"))
            stats["ibp_err"] = torch.full_like(stats["clean_err"], math.nan)
        with torch.set_grad_enabled(warm):
            boxes = bounds[self.input_node], [bounds[n] for n in self.relu_inputs]
            reg = (warmup_regularizers(*boxes, cfg.tau) if self.replica is None
                   else sharded_warmup_regularizers(*boxes, cfg.tau, self.replica.total))
        if warm:
            terms = {"tightness": reg.tightness, "relu": reg.relu}
            decay = 1 - eps / cfg.eps if cfg.eps > 0 and robust else 1
            loss = loss + cfg.lam * decay * sum(terms[r] for r in cfg.active_regularizers)
        stats.update(loss=loss.detach(), tightness=reg.tightness.detach(), relu=reg.relu.detach(),
                     fractions=reg.fractions)
        return loss, stats

    def _robust_loss(self, bounds: dict[str, tuple[Tensor, Tensor]], C: Tensor, lb: Tensor, ub: Tensor | None,
                     f: Tensor, mix: bool) -> Tensor:
        """The robust loss from the margins' IBP bounds ``lb`` (and ``ub``, given for loss fusion),
        during CROWN-IBP's ramp (``mix``) mixed with CROWN-IBP at weight ``f``: fused, an upper
        bound of the cross-entropy from one backward row per sample (:mod:`certkit.train.loss_fusion`),
        or unfused, on a mix of the K−1 margins' lower bounds. Without ``mix`` (IBP alone) the
        two coincide: the fused bound is then the robust loss of ``lb``."""
        if mix and self.cfg.use_loss_fusion:
            return self._batch_mean(fused_ce_bound(self.bm, bounds, C, lb, ub, f))
        if mix:
            lb_crown, _ = self.bm.spec_bounds(bounds, C, "crown-ibp", bound_upper=False, intersect=False)
            lb = f * lb_crown + (1 - f) * lb
        return robust_loss(lb) if self.replica is None else self._share(robust_loss(lb, "sum"))

    @property
    def ramp_end(self) -> int:
        """The ε ramp's last epoch (ε reaches ε_max at its end; 0: no ramp)."""
        return self.cfg.schedule_start + self.cfg.schedule_length - 1

    def width_profile(self, images: int = 256) -> WidthProfile:
        """:func:`~certkit.train.widths.model_widths` at the training ε on the first ``images``
        training images (the same ones every time, drawn from nothing: the run is unchanged)."""
        x = to_float(self.splits.train[0][:images]).to(self.device)
        return model_widths(self.model, self.info.shape, x, self.cfg.eps)

    def _share(self, total: Tensor) -> Tensor:
        """A replica's loss from the sum over its rows: N × its share of the global batch mean,
        so that DDP's average over the N replicas is the single-process mean."""
        return total * (self.replica.world / self._rows)

    def _batch_mean(self, values: Tensor) -> Tensor:
        """The mean of per-row values over the batch (a replica: its share, as :meth:`_share`)."""
        return values.mean() if self.replica is None else self._share(values.sum())

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels of the global batch ``idx`` (a replica: its rows of it, after the
        augmentation of the whole batch, which draws from the run's generator as one process does)."""
        x, y = self.splits.train
        self._rows = len(idx)
        pad = AUGMENT_PAD[self.cfg.dataset]
        if self.replica is not None and not pad:
            idx = self.replica.shard(idx)
        xb, yb = to_float(x[idx]), y[idx]
        if pad:
            xb = augment(xb, pad, self.gen)
            if self.replica is not None:
                xb, yb = self.replica.shard(xb), self.replica.shard(yb)
        return xb.to(self.device), yb.to(self.device)

    # -- evaluation ------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: tuple[Tensor, Tensor], batch_size: int = 500) -> dict[str, float]:
        """Clean error and IBP-verified error (%) at the evaluation ε, in eval mode (a replica
        evaluates its rows of the split, and the counts are added)."""
        self.model.eval()
        x_all, y_all = split
        n = len(x_all)
        if self.replica is not None:
            x_all, y_all = self.replica.shard(x_all), self.replica.shard(y_all)
        wrong = unverified = 0
        eps = self.cfg.eps_test
        for i in range(0, len(x_all), batch_size):
            x = to_float(x_all[i:i + batch_size]).to(self.device)
            y = y_all[i:i + batch_size].to(self.device)
            pred = self.bm(x).argmax(1)
            lb, _ = self.bm.compute_bounds((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), "ibp",
                                           C=margin_matrix(y, self.info.num_classes), bound_upper=False)
            ok = (pred == y) & (lb > 0).all(1) & torch.isfinite(lb).all(1)
            wrong += int((pred != y).sum())
            unverified += int((~ok).sum())
        if self.replica is not None:
            wrong, unverified = (sum(col) for col in zip(*self.replica.gather([wrong, unverified])))
        return {"clean_err": 100 * wrong / n, "verified_err": 100 * unverified / n}


# training steps between reads of their statistics (each read waits for the device)
STATS_EVERY = 16
_SCALARS = ("clean_err", "ibp_err", "loss", "tightness", "relu")


def _read_stats(pending: list[dict[str, Any]], replica: Replica | None = None) -> list[dict[str, Any]]:
    """The steps' device statistics as Python numbers, read in one transfer (data parallel:
    averaged over the replicas, each of which holds its share of the global batch's)."""
    scalars = torch.stack([torch.stack([r[k].float() for k in _SCALARS]) for r in pending])
    fractions = torch.stack([r["fractions"].float() for r in pending])
    if replica is not None:
        both = replica.mean(torch.cat([scalars.flatten(), fractions.flatten()]))
        scalars, fractions = both[:scalars.numel()].view_as(scalars), both[scalars.numel():].view_as(fractions)
    scalars, fractions = scalars.tolist(), fractions.tolist()
    out = []
    for r, vals, frac in zip(pending, scalars, fractions):
        row = dict(zip(_SCALARS, vals), eps=r["eps"])
        row["active"], row["inactive"], row["unstable"] = ([layer[i] for layer in frac] for i in range(3))
        out.append(row)
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if not (isinstance(r[key], float) and math.isnan(r[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def _layer_means(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [sum(col) / len(col) for col in zip(*(r[key] for r in rows))]


def _train_epoch(trainer: Trainer, cfg: TrainConfig, epoch: int, n: int, progress: Any) -> list[dict[str, Any]]:
    """One epoch of training steps over a fresh permutation of the ``n`` training samples; the
    per-step statistics (read back from the device every ``STATS_EVERY`` steps, not every step)."""
    perm = torch.randperm(n, generator=trainer.gen)
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    if progress is not None:
        progress.start_epoch(epoch, trainer.batches)
    for b in range(trainer.batches):
        step = (epoch - 1) * trainer.batches + b
        eps = trainer.eps_sched(step)
        x, y = trainer.batch(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        stats = trainer.step(x, y, eps, epoch)
        stats["eps"] = eps
        pending.append(stats)
        if len(pending) == STATS_EVERY or b == trainer.batches - 1:
            done = _read_stats(pending, trainer.replica)
            pending = []
            rows.extend(done)
            if progress is not None:
                for row in done:
                    progress.advance(row)
    if progress is not None:
        progress.end_epoch()
    return rows


def _epoch_metrics(trainer: Trainer, epoch: int, rows: list[dict[str, Any]], test: dict[str, float],
                   val: dict[str, float], train_time: float) -> dict[str, Any]:
    """The row of metrics.h5 for one epoch."""
    return {
        "epoch": epoch, "eps": rows[-1]["eps"], "lr": trainer.opt.param_groups[0]["lr"],
        "loss": _mean(rows, "loss"), "train_clean_err": 100 * _mean(rows, "clean_err"),
        "train_ibp_err": 100 * _mean(rows, "ibp_err"), "test_clean_err": test["clean_err"],
        "test_verified_err": test["verified_err"], "val_clean_err": val["clean_err"],
        "val_verified_err": val["verified_err"], "tightness": _mean(rows, "tightness"),
        "relu": _mean(rows, "relu"), "train_time": train_time,
        "active": _layer_means(rows, "active"), "inactive": _layer_means(rows, "inactive"),
        "unstable": _layer_means(rows, "unstable"),
    }


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: Any = None,
          log: Any = print, trust_checkpoint: bool = False, replica: Replica | None = None) -> dict[str, Any]:
    """Train (or continue) a run in ``run_dir``; returns the last epoch's metrics.

    ``resume`` continues from ``last.pt`` (written atomically after every epoch, after the
    epoch's metrics), so a run killed at any moment continues bit-for-bit; without ``last.pt``
    (killed before the first epoch ended) it starts afresh, which gives the same run.

    ``progress`` is an optional object with ``start_epoch(epoch, total)``, ``advance(stats)``
    and ``end_epoch()`` (the CLI passes a rich progress bar); ``log`` prints one line per epoch.
    ``trust_checkpoint`` lets ``resume`` read a ``last.pt`` that needs the unsafe unpickler
    (see :mod:`certkit.checkpoints`).

    ``replica``: this process is one of a data-parallel run (:mod:`certkit.train.distributed`).
    Rank 0 alone writes the run directory and calls ``progress`` and ``log``; with ``resume``
    every rank reads ``last.pt``, which must be the same file for all (one run directory,
    shared between nodes).
    """
    run_dir = Path(run_dir)
    lead = replica is None or replica.lead
    splits = load_splits(cfg)  # fails on missing data before anything is written
    trainer = Trainer(cfg, splits, replica)
    if replica is not None:
        from certkit.train.distributed import check_same_job, job_fingerprint

        check_same_job(replica, job_fingerprint(cfg, [len(splits.train[0]), len(splits.val[0]),
                                                      len(splits.test[0])], splits.train[1]))
    _open_run(trainer, cfg, run_dir, resume, trust_checkpoint)
    metrics = MetricsFile(run_dir / "metrics.h5") if lead else None
    if metrics is not None:
        metrics.truncate(trainer.epoch)
    x_train = splits.train[0]
    last: dict[str, Any] = {}
    widths = {0: dataclasses.asdict(trainer.width_profile())} if lead and trainer.epoch == 0 else {}
    for epoch in range(trainer.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        rows = _train_epoch(trainer, cfg, epoch, len(x_train), progress if lead else None)
        trainer.lr_sched.step()
        train_time = time.perf_counter() - t0
        test = trainer.evaluate(splits.test)
        val = trainer.evaluate(splits.val)
        trainer.epoch = epoch
        last = _epoch_metrics(trainer, epoch, rows, test, val, train_time)
        wall = time.perf_counter() - t0  # training and evaluation
        best = val["verified_err"] < trainer.best_val
        if best:
            trainer.best_val = val["verified_err"]
        if not lead:
            continue
        if epoch == trainer.ramp_end:
            widths[epoch] = dataclasses.asdict(trainer.width_profile())
        metrics.append(last, {"wall_time": {epoch: wall}, "relu_widths": widths})
        widths = {}
        state = trainer.state()
        if best:
            _save(state, run_dir / "best.pt")
        _save(state, run_dir / "last.pt")
        log(f"epoch {epoch}/{cfg.epochs}  ε {last['eps']:.4g}  loss {last['loss']:.4f}  "
            f"test clean {test['clean_err']:.2f}%  verified {test['verified_err']:.2f}% (ε={cfg.eps_test:.4g})  "
            f"val verified {val['verified_err']:.2f}%  {train_time:.1f}s")
    return last


def _open_run(trainer: Trainer, cfg: TrainConfig, run_dir: Path, resume: bool, trust_checkpoint: bool) -> None:
    """Create the run directory (config.json, no stale temporaries) or load ``last.pt`` into
    ``trainer`` (every rank of a data-parallel run, which must all read the same file)."""
    replica = trainer.replica
    lead = replica is None or replica.lead
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "last.pt", "best.pt"):  # what a killed run left half-written
            remove_stale_temporaries(run_dir / name)
    resuming = resume and (run_dir / "last.pt").is_file()  # else killed before its first checkpoint: start afresh
    if replica is not None:
        resuming = _agree_on_resume(replica, resuming, run_dir) if resume else False
    if resuming:
        # on the CPU: RNG states must stay CPU tensors; the model and optimiser copy theirs to the device
        trainer.load_state(load_checkpoint_state(run_dir / "last.pt", "cpu", trust=trust_checkpoint))
        if replica is not None:
            epochs = [e for (e,) in replica.gather([trainer.epoch])]
            if len(set(epochs)) > 1:
                raise InvalidInput(f"{run_dir / 'last.pt'}: the training processes read different checkpoints "
                                   f"(epochs {epochs} by rank); resume from one run directory shared by all")
    elif lead:
        write_atomically(run_dir / "config.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(cfg), indent=2)))


def _agree_on_resume(replica: Replica, found: bool, run_dir: Path) -> bool:
    """Whether a data-parallel run resumes: rank 0's ``last.pt`` decides, and every rank must
    see it (one run directory for all: on several nodes, a shared file system)."""
    seen = [f for (f,) in replica.gather([int(found)])]
    if seen[0]:
        missing = [rank for rank, f in enumerate(seen) if not f]
        if missing:
            raise InvalidInput(f"{run_dir / 'last.pt'}: training process {missing[0]} cannot read it; --resume "
                               "needs the run directory on a file system every node shares")
    return bool(seen[0])


def _save(state: dict[str, Any], path: Path) -> None:
    save_checkpoint(state, path)


def load_checkpoint(path: str | Path, device: str = "cpu",
                    trust: bool = False) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    """The model (eval mode), its config and the raw checkpoint, read without running code from
    the file unless ``trust`` (``--trust-checkpoint``)."""
    path = Path(path)
    st = load_checkpoint_state(path, device, trust=trust)
    try:
        cfg = TrainConfig.from_dict(st["config"])
        model = build_model(cfg.model, cfg.dataset, cfg.bn, **cfg.arch)
        model.load_state_dict(st["model"])
    except Exception as e:
        raise InvalidInput(f"{path}: not a certkit checkpoint ({type(e).__name__}: {e})") from None
    return model.eval(), cfg, st
