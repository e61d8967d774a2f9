"""``certkit verify``: sound ℓ∞ robustness verification of an ONNX classifier on a dataset.

Per batch: the clean prediction (wrong → ``misclassified``), then the bound stages in
order (``auto``: IBP, CROWN-IBP, CROWN, α-CROWN; a single method runs only that one),
each on the samples still undecided; a sample is ``verified`` when every margin lower
bound is finite and > 0. Then PGD with random restarts on the rest: a candidate becomes
``falsified`` only after onnxruntime, running the original file, confirms that another
class scores strictly higher at a point inside the box. Everything else is ``unknown``.
A classifier ending in Softmax or LogSoftmax is bounded on the logits before it (the same
argmax, far better conditioned margins); the results file records this in
``bounded_output``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from certkit import __version__
from certkit.attack import pgd_attack
from certkit.bounds import BoundedModel, margin_matrix
from certkit.confirm import Oracle
from certkit.errors import InvalidInput
from certkit.files import check_array_file_size, file_sha256
from certkit.memory import MemoryBudgetExceeded
from certkit.results import STATUS, ResultsFile
from certkit.settings import setting
from certkit.status import HDF5_CODES, Status
from certkit.vnnlib import robustness_case

CASCADE = ("ibp", "crown-ibp", "crown", "alpha-crown")
# the results file's integer codes (the status array is int8, one entry per sample); ERROR only for
# the samples of a shard whose worker kept dying (certkit.scale_out)
VERIFIED, FALSIFIED, UNKNOWN, MISCLASSIFIED, ERROR = (HDF5_CODES.index(s) for s in (
    Status.VERIFIED, Status.FALSIFIED, Status.UNKNOWN, Status.MISCLASSIFIED, Status.ERROR))


def _eps(value: Any) -> float:
    from certkit.boxes import parse_eps

    return parse_eps(value)


def _memory(value: Any) -> int:
    from certkit.memory import parse_size

    return parse_size(value if isinstance(value, (int, str)) and not isinstance(value, bool) else str(value))


@dataclass
class VerifyConfig:
    """The settings of ``certkit verify`` (the ``verify:`` section of a configuration file; its
    flags, when given, win over the file). Which samples, where the results go and the dataset
    are options of the command, not settings."""

    eps: float = setting(help="ℓ∞ radius in pixel units of [0,1]: 8/255, 0.031, 2e-3 (--eps)", parse=_eps)
    method: str = setting("auto", "auto (IBP, CROWN-IBP, CROWN, α-CROWN in turn, stopping per sample at the first "
                                  "proof) or one of them (--method)", choices=("auto", *CASCADE))
    attack: bool = setting(True, "PGD on undecided samples, confirmed by onnxruntime (--attack/--no-attack)")
    batch_size: int = setting(32, "samples bounded together (--batch-size)", min=1)
    device: str = setting("auto", "auto, cpu or cuda (--device)", choices=("auto", "cpu", "cuda"))
    timeout_per_sample: float | None = setting(None, "seconds per sample; stages past the budget are skipped "
                                                     "(null: none; --timeout-per-sample)", min=0)
    pgd_steps: int = setting(50, "PGD: steps per restart", min=0)
    pgd_restarts: int = setting(5, "PGD: starting points per sample (the centre, then random points)", min=1)
    pixel_range: tuple[float, float] = setting((0.0, 1.0), "MIN,MAX the box is clipped to; given here or with "
                                                            "--pixel-range it replaces the model's metadata")
    seed: int = setting(0, "seed of PGD's random starting points", min=0)
    max_memory: int | None = setting(None, "bytes for the largest coefficient tensor, e.g. 2G (null: a share of "
                                           "the free memory; --max-memory)", parse=_memory)

    def stages(self) -> list[str]:
        if self.method == "auto":
            methods = list(CASCADE)
        elif self.method in CASCADE:
            methods = [self.method]
        else:
            raise InvalidInput(f"unknown method {self.method!r}; choose auto or one of {', '.join(CASCADE)}")
        return methods + (["attack"] if self.attack else [])


def _confirm(oracle: Oracle, x: np.ndarray, labels: np.ndarray, lo: np.ndarray, up: np.ndarray,
             num_outputs: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """onnxruntime's verdict per candidate: (x, y) where another class scores strictly higher
    than the label at x (snapped into its float32 box), else None."""
    cases = [robustness_case(lo_i, up_i, int(label), num_outputs) for lo_i, up_i, label in zip(lo, up, labels)]
    return oracle.confirm_each(cases, x)


@dataclass
class _Rows:
    """One batch's rows of the results file, filled in stage by stage."""

    status: np.ndarray  # int8 codes
    stage_of: np.ndarray  # the deciding stage's index, -1 for none
    margins: np.ndarray  # (B, stages, K - 1) lower bounds, NaN where a stage did not run
    times: np.ndarray  # (B, stages) seconds per sample
    cex: np.ndarray  # (B, input size) confirmed counterexamples, NaN elsewhere
    reasons: np.ndarray  # why a sample is unknown ('' when decided)

    @classmethod
    def empty(cls, batch: int, stages: int, outputs: int, input_size: int) -> _Rows:
        return cls(np.full(batch, UNKNOWN, np.int8), np.full(batch, -1, np.int8),
                   np.full((batch, stages, outputs - 1), np.nan, np.float32), np.zeros((batch, stages), np.float32),
                   np.full((batch, input_size), np.nan, np.float32), np.full(batch, "", dtype=object))

    def decide(self, samples: np.ndarray, code: int, stage: int) -> None:
        self.status[samples] = code
        self.stage_of[samples] = stage


def _blocked(x: Tensor, rows: _Rows, nonfinite_weights: str) -> np.ndarray:
    """The samples no stage may run on (NaN/Inf input; all of them when the weights hold NaN/Inf):
    they end unknown with the reason."""
    blocked = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1).cpu().numpy()
    rows.reasons[blocked] = "the input contains NaN or Inf"
    if nonfinite_weights:
        blocked[:] = True
        rows.reasons[:] = nonfinite_weights
    rows.status[blocked] = UNKNOWN
    return blocked


def _attack_stage(bm: BoundedModel, oracle: Oracle | None, rows: _Rows, s: int, todo: np.ndarray, lo: Tensor,
                  up: Tensor, C: Tensor, y: Tensor, cfg: VerifyConfig, generator: torch.Generator) -> None:
    """PGD on the samples ``todo``; a candidate is ``falsified`` once onnxruntime confirms it."""
    idx = torch.as_tensor(todo, device=lo.device)
    xa, worst = pgd_attack(bm, lo[idx], up[idx], C[idx], cfg.pgd_steps, cfg.pgd_restarts, generator=generator)
    cand = (worst < 0).cpu().numpy()
    if not cand.any():
        return
    sel = torch.as_tensor(np.flatnonzero(cand), device=lo.device)
    found = _confirm(oracle, xa[sel].cpu().numpy(), y.cpu().numpy()[todo[cand]], lo[idx][sel].cpu().numpy(),
                     up[idx][sel].cpu().numpy(), C.shape[-1])
    hit = todo[cand][np.array([f is not None for f in found], dtype=bool)]
    rows.decide(hit, FALSIFIED, s)
    if len(hit):
        rows.cex[hit] = np.stack([xc for xc, _ in filter(None, found)]).reshape(len(hit), -1)


def _bounds_stage(bm: BoundedModel, rows: _Rows, s: int, stage: str, todo: np.ndarray, lo: Tensor, up: Tensor,
                  C: Tensor, cache: dict[str, Any]) -> None:
    """One bound stage on the samples ``todo``: ``verified`` where every margin lower bound is
    finite and > 0. Over the memory budget, or with NaN/Inf bounds, the reason is recorded."""
    try:
        lb = _bound_stage(bm, stage, lo, up, C, todo, cache)
    except MemoryBudgetExceeded as e:
        _note(rows.reasons, todo, f"{stage} skipped: {e}")
        logging.getLogger("certkit.verify").warning("%s skipped on %d sample(s): %s", stage, len(todo), e)
        return
    lb = lb.detach().cpu().numpy()
    rows.margins[todo, s] = lb
    finite = np.isfinite(lb).all(1)
    rows.decide(todo[finite & (lb > 0).all(1)], VERIFIED, s)  # NaN/Inf is never verified
    _note(rows.reasons, todo[~finite], f"{stage}: bounds are NaN or Inf")


def verify_batch(bm: BoundedModel, oracle: Oracle | None, x: Tensor, y: Tensor, cfg: VerifyConfig, stages: list[str],
                 generator: torch.Generator, nonfinite_weights: str = "") -> dict[str, np.ndarray]:
    """Run the cascade on one batch; returns the rows of the results file. ``oracle``
    (onnxruntime on the original file) confirms the attack's candidates; None without one.

    Samples whose input holds NaN/Inf, and every sample when ``nonfinite_weights`` names the
    model's non-finite weights, end ``unknown`` with that ``reason`` and no stage runs on them.
    A stage whose smallest chunk exceeds the memory budget is skipped (the reason is recorded),
    as is a stage whose bounds come out NaN/Inf for a sample: neither ever verifies."""
    B = x.shape[0]
    K = int(np.prod(bm.graph.output_shape))
    rows = _Rows.empty(B, len(stages), K, int(np.prod(x.shape[1:])))
    deadline = None if cfg.timeout_per_sample is None else time.monotonic() + cfg.timeout_per_sample * B
    with torch.no_grad():
        pred = bm(x).reshape(B, -1).argmax(1)
    rows.status[(pred != y).cpu().numpy()] = MISCLASSIFIED
    blocked = _blocked(x, rows, nonfinite_weights)
    lo = (x - cfg.eps).clamp(*cfg.pixel_range)
    up = (x + cfg.eps).clamp(*cfg.pixel_range)
    C = margin_matrix(y, K).to(x.device)
    crown_cache: dict[str, Any] = {}
    for s, stage in enumerate(stages):
        todo = np.flatnonzero((rows.status == UNKNOWN) & ~blocked)
        if len(todo) == 0 or (deadline is not None and time.monotonic() > deadline):
            break
        t0 = time.perf_counter()
        if stage == "attack":
            _attack_stage(bm, oracle, rows, s, todo, lo, up, C, y, cfg, generator)
        else:
            _bounds_stage(bm, rows, s, stage, todo, lo, up, C, crown_cache)
        rows.times[todo, s] = (time.perf_counter() - t0) / len(todo)
    rows.reasons[rows.status != UNKNOWN] = ""  # a reason explains an unknown; decided samples need none
    return {"label": y.cpu().numpy(), "prediction": pred.cpu().numpy(), "status": rows.status,
            "stage": rows.stage_of, "margins": rows.margins, "times": rows.times, "counterexample": rows.cex,
            "reason": rows.reasons}


def error_rows(y: np.ndarray, indices: np.ndarray, stages: list[str], num_outputs: int, input_size: int,
               reason: str) -> dict[str, np.ndarray]:
    """Rows of samples that could not be verified at all (a sharded run's samples whose worker kept
    dying): status ``error``, prediction −1, no stage, the reason."""
    rows = _Rows.empty(len(y), len(stages), num_outputs, input_size)
    rows.status[:] = ERROR
    rows.reasons[:] = reason
    return {"label": np.asarray(y), "prediction": np.full(len(y), -1, np.int64), "status": rows.status,
            "stage": rows.stage_of, "margins": rows.margins, "times": rows.times, "counterexample": rows.cex,
            "reason": rows.reasons, "index": np.asarray(indices)}


def _bound_stage(bm: BoundedModel, stage: str, lo: Tensor, up: Tensor, C: Tensor, todo: np.ndarray,
                 cache: dict[str, Any]) -> Tensor:
    """Margin lower bounds of the samples ``todo`` by one bound stage.

    Full-CROWN intermediate bounds are computed once and kept in ``cache`` for α-CROWN, which
    reuses them row-selected; a memory-budget failure computing them is kept there too, and
    raised again for α-CROWN."""
    idx = torch.as_tensor(todo, device=lo.device)
    if stage not in ("crown", "alpha-crown"):
        with torch.no_grad():
            return bm.compute_bounds(lo[idx], up[idx], method=stage, C=C[idx], bound_upper=False)[0]
    if "error" in cache:
        raise cache["error"]
    if "crown" not in cache:
        try:
            with torch.no_grad():
                cache["crown"] = (todo, bm.intervals(lo[idx], up[idx], "crown"))
        except MemoryBudgetExceeded as e:
            cache["error"] = e
            raise
    done, intervals = cache["crown"]
    rows = torch.as_tensor(np.searchsorted(done, todo), device=lo.device)
    bounds = {k: (lo_[rows], up_[rows]) for k, (lo_, up_) in intervals.items()}
    if stage == "crown":
        with torch.no_grad():
            return bm.spec_bounds(bounds, C[idx], "crown", bound_upper=False)[0]
    return bm.alpha_crown(bounds, C[idx], bound_upper=False)[0]


def _note(reasons: np.ndarray, samples: np.ndarray, text: str) -> None:
    """Add ``text`` to the reasons of ``samples`` (joined with '; ')."""
    for i in samples:
        reasons[i] = f"{reasons[i]}; {text}" if reasons[i] else text


def bounded_model(onnx_path: Path, model: BoundedModel | None = None) -> tuple[BoundedModel, str]:
    """The model whose margins are bounded (the logits before an output softmax: same argmax, far
    better conditioned margins), and what the results file records as ``bounded_output``."""
    bm = BoundedModel(onnx_path) if model is None else model
    logits = bm.logits_model()
    if logits is not None:
        return logits, f"logits before the output softmax (node {bm.graph.output!r})"
    return bm, "outputs"


def _bounded_model(onnx_path: Path, model: BoundedModel | None, x: Tensor, y: Tensor) -> tuple[BoundedModel, str]:
    """:func:`bounded_model`, and a check that the data fits it: samples of its input shape, labels
    among its outputs."""
    bm, bounded = bounded_model(onnx_path, model)
    if tuple(x.shape[1:]) != bm.graph.input_shape:
        raise InvalidInput(f"the data has samples of shape {tuple(x.shape[1:])} but the model expects "
                           f"{bm.graph.input_shape}")
    K = int(np.prod(bm.graph.output_shape))
    if len(y) and (int(y.max()) >= K or int(y.min()) < 0):
        raise InvalidInput(f"labels range over [{int(y.min())}, {int(y.max())}] but the model has {K} outputs")
    return bm, bounded


def _open_results(out: str | Path | None, attrs: dict[str, Any], stages: list[str], num_specs: int,
                  input_size: int, resume: bool) -> tuple[ResultsFile | None, int, dict[str, int]]:
    """The results file (None without ``out``), the samples it already holds, and their counts
    per status."""
    counts = {name: 0 for name in STATUS}
    if out is None:
        return None, 0, counts
    writer = ResultsFile(out, attrs, stages, num_specs, input_size, resume=resume)
    if writer.done:
        from certkit.results import read_results

        _, data = read_results(out)
        for i, name in enumerate(STATUS):
            counts[name] = int((data["status"] == i).sum())
    return writer, writer.done, counts


@dataclass
class Verifier:
    """What verifying a batch needs besides the data: the bounded model on its device, the
    onnxruntime oracle that confirms counterexamples (None without the attack stage) and the
    reason every sample ends unknown when the weights hold NaN/Inf ('' otherwise). The single
    process and every worker of a sharded run (:mod:`certkit.scale_out`) build it the same way."""

    bm: BoundedModel
    oracle: Oracle | None
    nonfinite: str
    device: torch.device

    @classmethod
    def load(cls, onnx_path: Path, bm: BoundedModel, cfg: VerifyConfig, device: torch.device) -> Verifier:
        """``bm``: ``onnx_path``'s bounded model (see :func:`_bounded_model`)."""
        from certkit.onnx_io import nonfinite_weights_reason

        bm.to(device)
        if cfg.max_memory is not None:
            bm.max_memory = cfg.max_memory
        oracle = Oracle(onnx_path, bm.graph.input_shape) if "attack" in cfg.stages() else None
        return cls(bm, oracle, nonfinite_weights_reason(onnx_path), device)

    def batches(self, x: Tensor, y: Tensor, indices: np.ndarray, cfg: VerifyConfig, first: int = 0
                ) -> Iterator[dict[str, np.ndarray]]:
        """The rows of the batches of ``cfg.batch_size`` samples from ``first`` on, one dict per batch.

        The attack's randomness depends only on the seed and the index of the batch's first sample,
        so a resumed run, or a worker given whole batches of the same run, computes the same rows."""
        stages = cfg.stages()
        for b in range(first, len(x), cfg.batch_size):
            xb = x[b:b + cfg.batch_size].to(self.device)
            yb = y[b:b + cfg.batch_size].to(self.device)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(indices[b]))
            rows = verify_batch(self.bm, self.oracle, xb, yb, cfg, stages, generator,
                                nonfinite_weights=self.nonfinite)
            rows["index"] = indices[b:b + cfg.batch_size]
            yield rows


def run_verify(onnx_path: str | Path, x: Tensor, y: Tensor, indices: np.ndarray, cfg: VerifyConfig,
               dataset: str, start: int, out: str | Path | None = None, resume: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None,
               model: BoundedModel | None = None, workers: int | None = None,
               address: str | None = None) -> dict[str, Any]:
    """Verify samples ``x`` (N, *input shape, pixels) with labels ``y``; stream rows to ``out``.

    Returns the counts per status. ``progress`` is called after every batch with the counts
    so far and the number of samples done. ``model`` is ``onnx_path`` already loaded, if the
    caller has it. The results file records ``cfg`` (the effective settings) as ``options``.

    ``workers`` (or ``address``) shards the batches over that many worker processes of a Ray
    cluster (:mod:`certkit.scale_out`): a local one started here, or the one at ``address``
    (``auto``, ``ray://HOST:10001``). The rows are the same as in one process; the file also
    records ``workers`` and ``cluster_address``.
    """
    onnx_path = Path(onnx_path)
    stages = cfg.stages()
    bm, bounded = _bounded_model(onnx_path, model, x, y)
    K = int(np.prod(bm.graph.output_shape))
    with _executor(cfg, workers, address) as (device, run_attrs, sharded):
        attrs = {"certkit_version": __version__, "torch_version": str(torch.__version__), "device": str(device),
                 "model_path": str(onnx_path), "model_sha256": file_sha256(onnx_path), "eps": float(cfg.eps),
                 "method": cfg.method, "dataset": dataset, "start": int(start), "n": int(len(x)),
                 "options": json.dumps(asdict(cfg)), "bounded_output": bounded,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **run_attrs}
        if sharded is None:
            verifier = Verifier.load(onnx_path, bm, cfg, device)
            nonfinite = verifier.nonfinite
        else:
            from certkit.onnx_io import nonfinite_weights_reason

            nonfinite = nonfinite_weights_reason(onnx_path)  # the workers find the same
        if nonfinite:
            logging.getLogger("certkit.verify").warning("every sample ends unknown: %s", nonfinite)
        writer, done, counts = _open_results(out, attrs, stages, K - 1, int(np.prod(x.shape[1:])), resume)
        if sharded is None:
            chunks = verifier.batches(x, y, indices, cfg, done)
        else:
            chunks = sharded.verify(onnx_path, x, y, indices, cfg, done, K)
        with contextlib.closing(chunks):  # a failed write stops the workers before the cluster goes
            for rows in chunks:
                for i, name in enumerate(STATUS):
                    counts[name] += int((rows["status"] == i).sum())
                if writer is not None:
                    writer.append(rows)
                done += len(rows["index"])
                if progress is not None:
                    progress({"done": done, "total": len(x), **counts})
    if writer is not None:
        writer.mark_complete()
    return counts


@contextlib.contextmanager
def _executor(cfg: VerifyConfig, workers: int | None, address: str | None
              ) -> Iterator[tuple[Any, dict[str, Any], Any]]:
    """Where the batches run: (device, attributes the results file records about the run, None)
    in this process, or (the workers' device, their count and cluster address, the Ray cluster)."""
    if workers is None and address is None:
        from certkit.device import resolve_device

        yield resolve_device(cfg.device), {}, None
        return
    from certkit.scale_out import Cluster

    with Cluster(workers, address, cfg.device) as cluster:
        yield cluster.device, {"workers": cluster.workers, "cluster_address": cluster.address}, cluster


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz archive, read without pickle."""
    try:
        found = path.is_file()
    except OSError as e:  # a name too long for the file system, ...
        raise InvalidInput(f"{str(path)[:80]}: {e.strerror}") from None
    if not found:
        raise InvalidInput(f"{path}: no such file")
    check_array_file_size(path)
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise InvalidInput(f"{path}: a single array, not an .npz archive with arrays 'x' and 'y'")
        with f:
            return f["x"], f["y"]
    except KeyError:
        raise InvalidInput(f"{path}: needs arrays 'x' and 'y'") from None
    except InvalidInput:
        raise
    except Exception as e:
        raise InvalidInput(f"{path}: not a readable .npz file ({e})") from None


def read_npz_dataset(path: Path) -> tuple[Tensor, Tensor]:
    """Samples (float; uint8 scaled to [0, 1]) and int64 labels of an ``npz:FILE`` dataset, checked
    so that a hostile file gets a one-line error: x real-valued with a sample axis, y whole numbers
    (no NaN, no fractions silently truncated into another class), one label per sample."""
    x_all, y_all = _npz_arrays(path)
    if x_all.ndim < 1 or not (np.issubdtype(x_all.dtype, np.integer) or np.issubdtype(x_all.dtype, np.floating)
                              or x_all.dtype == np.bool_):
        raise InvalidInput(f"{path}: x must be a real-valued array of samples; got {x_all.dtype} of shape "
                           f"{x_all.shape}")
    y_all = y_all.reshape(-1)
    if not (np.issubdtype(y_all.dtype, np.integer) or np.issubdtype(y_all.dtype, np.floating)):
        raise InvalidInput(f"{path}: y must hold integer class labels; got {y_all.dtype}")
    big = np.iinfo(np.int64).max
    if np.issubdtype(y_all.dtype, np.floating) and not (np.isfinite(y_all) & (y_all == np.round(y_all))).all():
        raise InvalidInput(f"{path}: y must hold integer class labels; it has NaN, infinite or fractional values")
    if len(y_all) and (y_all.min() < 0 or y_all.max() > big):
        raise InvalidInput(f"{path}: class labels must be whole numbers >= 0 and < 2**63; y ranges over "
                           f"[{y_all.min()}, {y_all.max()}]")
    if len(x_all) != len(y_all):
        raise InvalidInput(f"{path}: {len(x_all)} samples in x but {len(y_all)} labels in y")
    from certkit.train.data import to_float

    x = torch.as_tensor(x_all)
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    return x, torch.as_tensor(y_all.astype(np.int64))


def load_verify_data(dataset: str, data_dir: str | None, start: int, n: int | None, input_shape: tuple[int, ...]
                     ) -> tuple[Tensor, Tensor, np.ndarray]:
    """Samples [start, start+n) of a dataset's test split, as float pixels, labels and indices.

    ``dataset`` is mnist, cifar10, tinyimagenet, or ``npz:FILE`` with arrays ``x`` (N × input
    shape; uint8 is scaled to [0, 1]) and ``y`` (N).
    """
    from certkit.train.data import load_dataset, to_float

    if dataset.startswith("npz:"):
        x_all, y_all = read_npz_dataset(Path(dataset[4:]))
    else:
        x_all, y_all = load_dataset(dataset, data_dir, "test")
        x_all = to_float(x_all)
    if not 0 <= start < len(x_all):
        raise InvalidInput(f"--start {start} is outside the {len(x_all)} samples of {dataset}")
    end = len(x_all) if n is None else min(len(x_all), start + n)
    x, y = x_all[start:end], y_all[start:end]
    if tuple(x.shape[1:]) != tuple(input_shape):
        if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
            raise InvalidInput(f"the {dataset} samples have shape {tuple(x.shape[1:])} but the model expects "
                               f"{tuple(input_shape)}")
        x = x.reshape(len(x), *input_shape)  # same values in another layout (row-major), e.g. 784×1
    return x, y, np.arange(start, end)


def emit_vnnlib(onnx_path: str | Path, out_dir: str | Path, x: Tensor, y: Tensor, indices: np.ndarray,
                cfg: VerifyConfig, num_outputs: int, timeout: float = 60.0) -> Path:
    """One VNN-LIB property per sample plus instances.csv (paths relative to ``out_dir``)."""
    import os

    from certkit.vnnlib import robustness_property, write_instances, write_property

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    onnx_rel = os.path.relpath(Path(onnx_path).resolve(), out_dir.resolve())
    for xi, yi, i in zip(x, y, indices):
        lo = (xi - cfg.eps).clamp(*cfg.pixel_range).numpy()
        up = (xi + cfg.eps).clamp(*cfg.pixel_range).numpy()
        name = f"{Path(onnx_path).stem}_idx{int(i)}_eps{cfg.eps:.6g}.vnnlib"
        comment = (f"certkit {__version__}: robustness of {Path(onnx_path).name} on sample {int(i)} "
                   f"(label {int(yi)}), Linf eps {cfg.eps!r}, box clipped to {list(cfg.pixel_range)}")
        write_property(out_dir / name, robustness_property(lo, up, int(yi), num_outputs, comment))
        rows.append((onnx_rel, name, timeout))
    write_instances(out_dir / "instances.csv", rows)
    return out_dir / "instances.csv"
