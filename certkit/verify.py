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

Several radii (``--eps 0.1,0.2,0.3``) make a sweep (:func:`run_sweep`): one results file with
a group per ε, where an answer that holds at other radii is carried over instead of computed
again (a counterexample lies in every larger box, a proof covers every smaller one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
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
from certkit.results import STATUS, ResultsFile, SweepFile, read_results
from certkit.settings import setting
from certkit.status import HDF5_CODES, Status
from certkit.vnnlib import robustness_case

CASCADE = ("ibp", "crown-ibp", "crown", "alpha-crown")
# the results file's integer codes (the status array is int8, one entry per sample); ERROR only for
# the samples of a shard whose worker kept dying (certkit.scale_out)
VERIFIED, FALSIFIED, UNKNOWN, MISCLASSIFIED, ERROR = (HDF5_CODES.index(s) for s in (
    Status.VERIFIED, Status.FALSIFIED, Status.UNKNOWN, Status.MISCLASSIFIED, Status.ERROR))


def _eps(value: Any) -> float | tuple[float, ...]:
    """One radius as a float; several (a sweep) as their ascending tuple."""
    from certkit.boxes import parse_eps_list

    radii = parse_eps_list(value)
    return radii[0] if len(radii) == 1 else radii


def _memory(value: Any) -> int:
    from certkit.memory import parse_size

    return parse_size(value if isinstance(value, (int, str)) and not isinstance(value, bool) else str(value))


@dataclass
class VerifyConfig:
    """The settings of ``certkit verify`` (the ``verify:`` section of a configuration file; its
    flags, when given, win over the file). Which samples, where the results go and the dataset
    are options of the command, not settings."""

    eps: float | tuple[float, ...] = setting(
        help="ℓ∞ radius in pixel units of [0,1]: 8/255, 0.031, 2e-3; several make a sweep in one results file: "
             "0.1,0.2,0.3 or START:STOP:STEP such as 1/255:8/255:1/255 (--eps)", parse=_eps)
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

    def radii(self) -> tuple[float, ...]:
        """The radii to verify, ascending: one, or a sweep's."""
        return self.eps if isinstance(self.eps, tuple) else (self.eps,)


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
        _count(counts, read_results(out)[1]["status"])
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
    ``cfg.eps`` is one radius; several are a sweep, for :func:`run_sweep`.

    ``workers`` (or ``address``) shards the batches over that many worker processes of a Ray
    cluster (:mod:`certkit.scale_out`): a local one started here, or the one at ``address``
    (``auto``, ``ray://HOST:10001``). The rows are the same as in one process; the file also
    records ``workers`` and ``cluster_address``.
    """
    if isinstance(cfg.eps, tuple):
        raise InvalidInput(f"run_verify takes one ε, not {len(cfg.eps)}: verify a sweep with run_sweep")
    onnx_path = Path(onnx_path)
    bm, bounded = _bounded_model(onnx_path, model, x, y)
    K = int(np.prod(bm.graph.output_shape))
    with _executor(cfg, workers, address) as (device, run_attrs, sharded):
        attrs = {**_provenance(onnx_path, cfg, device, dataset, start, len(x), bounded, run_attrs),
                 "eps": float(cfg.eps), "options": json.dumps(asdict(cfg))}
        rows_of = _row_source(onnx_path, bm, cfg, device, sharded, K)
        writer, done, counts = _open_results(out, attrs, cfg.stages(), K - 1, int(np.prod(x.shape[1:])), resume)
        _stream(rows_of(cfg, (x, y, indices), done), done, len(x), counts, progress, writer)
    if writer is not None:
        writer.mark_complete()
    return counts


def run_sweep(onnx_path: str | Path, x: Tensor, y: Tensor, indices: np.ndarray, cfg: VerifyConfig,
              dataset: str, start: int, out: str | Path | None = None, resume: bool = False,
              progress: Callable[[dict[str, Any]], None] | None = None,
              model: BoundedModel | None = None, workers: int | None = None,
              address: str | None = None) -> dict[float, dict[str, int]]:
    """Verify the samples at every radius of ``cfg.radii()``, into one results file with a group
    per ε (:class:`certkit.results.SweepFile`); returns the counts per status of each ε.

    Order: the smallest ε, the largest, then the others ascending (:func:`sweep_order` says why).
    Each radius uses every finished one (:func:`_carry_over`): a sample falsified at a smaller ε
    is falsified here (its counterexample, confirmed by onnxruntime, lies in this larger box: both
    are [x − ε, x + ε] clipped to the same pixel range), one verified at a larger ε is verified
    here, a misclassified one is misclassified at every ε. Such a row records the ε it was computed
    at in ``reused_from`` (NaN where computed here), its deciding stage there, its
    counterexample, no margins and no time. The other samples are computed together, in batches of
    their own (the attack seeded by each batch's first index, as in any run): bounds do not depend
    on a sample's batch mates (but for rounding), the attack's random starting points do, so a
    computed sample may end falsified where a single-ε run left it unknown, or the reverse; never
    verified against falsified. At the end, a row left unknown at an ε computed before the radius
    that decided it (the largest ε before the middle ones) takes that answer too (:func:`_settle`),
    keeping its margins and time: in the file, a sample falsified at some ε is falsified at every
    larger one, one verified at some ε verified at every smaller one.

    ``progress`` gets what :func:`run_verify` gives, plus ``eps``. ``resume``: groups already
    complete are read, not computed again; a partial one continues after its committed rows.
    ``workers``/``address`` shard each radius in turn as :func:`run_verify` does, on one cluster.
    """
    onnx_path = Path(onnx_path)
    bm, bounded = _bounded_model(onnx_path, model, x, y)
    K = int(np.prod(bm.graph.output_shape))
    radii = cfg.radii()
    with _executor(cfg, workers, address) as (device, run_attrs, sharded):
        attrs = {**_provenance(onnx_path, cfg, device, dataset, start, len(x), bounded, run_attrs),
                 "eps": list(radii), "options": json.dumps(asdict(cfg))}
        groups = {e: {"eps": e, "options": json.dumps(asdict(replace(cfg, eps=e)))} for e in radii}
        file = None if out is None else SweepFile(out, attrs, groups, cfg.stages(), K - 1,
                                                  int(np.prod(x.shape[1:])), resume)
        rows_of = _row_source(onnx_path, bm, cfg, device, sharded, K)
        layout = (len(cfg.stages()), K, int(np.prod(x.shape[1:])))
        finished: list[_Answers] = []
        for e in (radii[i] for i in sweep_order(len(radii))):
            finished.append(_sweep_radius(replace(cfg, eps=e), rows_of, (x, y, indices), layout, file, finished,
                                          progress))
        _settle(finished, file)
    if file is not None:
        file.mark_complete()
    return {a.eps: a.counts for a in sorted(finished, key=lambda a: a.eps)}


def _provenance(onnx_path: Path, cfg: VerifyConfig, device: Any, dataset: str, start: int, n: int, bounded: str,
                run_attrs: dict[str, Any]) -> dict[str, Any]:
    """The results file's attributes about the run, besides ``eps`` and ``options``."""
    return {"certkit_version": __version__, "torch_version": str(torch.__version__), "device": str(device),
            "model_path": str(onnx_path), "model_sha256": file_sha256(onnx_path), "method": cfg.method,
            "dataset": dataset, "start": int(start), "n": int(n), "bounded_output": bounded,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **run_attrs}


Samples = tuple[Tensor, Tensor, np.ndarray]  # (x, y, indices)
RowSource = Callable[[VerifyConfig, Samples, int], Iterator[dict[str, np.ndarray]]]


def _row_source(onnx_path: Path, bm: BoundedModel, cfg: VerifyConfig, device: Any, sharded: Any,
                num_outputs: int) -> RowSource:
    """``rows_of(cfg, (x, y, indices), first)``: the rows of those samples from ``first`` on at
    radius ``cfg.eps``, one dict per batch or run of batches; computed in this process, or sharded
    over the cluster's workers (``sharded``). Warns once when the weights hold NaN/Inf."""
    if sharded is None:
        verifier = Verifier.load(onnx_path, bm, cfg, device)
        nonfinite = verifier.nonfinite
    else:
        from certkit.onnx_io import nonfinite_weights_reason

        nonfinite = nonfinite_weights_reason(onnx_path)  # the workers find the same
    if nonfinite:
        logging.getLogger("certkit.verify").warning("every sample ends unknown: %s", nonfinite)

    def rows_of(c: VerifyConfig, data: Samples, first: int) -> Iterator[dict[str, np.ndarray]]:
        if sharded is None:
            return verifier.batches(*data, c, first)
        return sharded.verify(onnx_path, *data, c, first, num_outputs)

    return rows_of


def _count(counts: dict[str, int], status: np.ndarray) -> None:
    for i, name in enumerate(STATUS):
        counts[name] += int((status == i).sum())


def _stream(chunks: Iterator[dict[str, np.ndarray]], done: int, total: int, counts: dict[str, int],
            progress: Callable[[dict[str, Any]], None] | None, writer: Any = None,
            record: Callable[[dict[str, np.ndarray], int], None] | None = None,
            extra: dict[str, Any] | None = None) -> None:
    """Count the rows of ``chunks`` (samples ``done``, ...), append them to ``writer`` and pass them
    to ``record`` (either may be None), then report ``progress`` (with ``extra``)."""
    with contextlib.closing(chunks):  # a failed write stops the workers before the cluster goes
        for rows in chunks:
            _count(counts, rows["status"])
            if writer is not None:
                writer.append(rows)
            if record is not None:
                record(rows, done)
            done += len(rows["index"])
            if progress is not None:
                progress({**(extra or {}), "done": done, "total": total, **counts})


def sweep_order(n: int) -> list[int]:
    """The order in which a sweep computes its ``n`` radii (indices, ascending ε): the smallest, the
    largest, then the others ascending: 0, 2, 1 for three; 0, 4, 1, 2, 3 for five.

    Carrying a counterexample up saves a sample's whole cascade and its attack at the larger ε
    (falsified and unknown samples are the costly ones), carrying a proof down mostly saves the
    cheap stage that would verify it again; so every radius but the largest has every smaller one
    finished, and the largest comes second so that the middle ones also take its proofs."""
    return [0] if n == 1 else [0, n - 1, *range(1, n - 1)]


@dataclass
class _Answers:
    """What one radius of a sweep decided, for the radii after it: per sample the status code, the
    deciding stage, the ε the answer was computed at (this one, or the one it was carried from),
    the counterexamples of the falsified samples (by position), and the counts per status."""

    eps: float
    status: np.ndarray
    stage: np.ndarray
    prediction: np.ndarray
    origin: np.ndarray
    cex: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS, 0))

    @classmethod
    def empty(cls, eps: float, n: int) -> _Answers:
        return cls(eps, np.full(n, UNKNOWN, np.int8), np.full(n, -1, np.int8), np.full(n, -1, np.int64),
                   np.full(n, np.nan))

    def add(self, rows: dict[str, np.ndarray], first: int) -> None:
        """Record the rows of samples ``first``, ``first + 1``, ... (a batch, or a file's committed rows)."""
        at = slice(first, first + len(rows["status"]))
        self.status[at], self.stage[at], self.prediction[at] = rows["status"], rows["stage"], rows["prediction"]
        self.origin[at] = np.where(np.isnan(rows["reused_from"]), self.eps, rows["reused_from"])
        for i in np.flatnonzero(rows["status"] == FALSIFIED):
            self.cex[first + i] = np.array(rows["counterexample"][i])


def _carry_over(eps: float, finished: list[_Answers], n: int) -> _Answers:
    """The answers radius ``eps`` takes from the finished ones (status UNKNOWN: none, compute it):
    misclassified from any, falsified from a smaller ε, verified from a larger one, each from the
    nearest radius that has it. A confirmed counterexample wins over a proof from a larger ε (the
    two contradict each other, which only a bug makes possible: a warning says so)."""
    carried = _Answers.empty(eps, n)
    nearest = sorted(finished, key=lambda a: abs(a.eps - eps))
    for code, usable in ((MISCLASSIFIED, lambda e: True), (FALSIFIED, lambda e: e < eps),
                         (VERIFIED, lambda e: e > eps)):
        for a in filter(lambda a: usable(a.eps), nearest):
            if code == VERIFIED:
                _warn_contradiction(eps, a, np.flatnonzero((a.status == VERIFIED) & (carried.status == FALSIFIED)))
            take = np.flatnonzero((a.status == code) & (carried.status == UNKNOWN))
            carried.status[take], carried.stage[take], carried.origin[take] = code, a.stage[take], a.origin[take]
            carried.prediction[take] = a.prediction[take]
            carried.cex.update((i, a.cex[i]) for i in take if code == FALSIFIED)
    return carried


def _settle(finished: list[_Answers], file: SweepFile | None) -> None:
    """Give the rows that a radius left unknown the answer another radius found later (as
    :func:`_carry_over` would have, had that one been first), in ``finished`` and, in one atomic
    change, in ``file``. A settled row keeps the margins and time computed at its ε."""
    changes = {}
    for a in finished:
        carried = _carry_over(a.eps, [b for b in finished if b is not a], len(a.status))
        late = np.flatnonzero((a.status == UNKNOWN) & (carried.status != UNKNOWN))
        if len(late) == 0:
            continue
        a.status[late], a.stage[late], a.origin[late] = carried.status[late], carried.stage[late], carried.origin[late]
        a.cex.update((i, carried.cex[i]) for i in late if carried.status[i] == FALSIFIED)
        a.counts[STATUS[UNKNOWN]] -= len(late)
        _count(a.counts, carried.status[late])
        falsified = late[a.status[late] == FALSIFIED]
        changes[a.eps] = {"status": (late, a.status[late]), "stage": (late, a.stage[late]),
                          "reason": (late, np.full(len(late), "", dtype=object)),
                          "reused_from": (late, a.origin[late].astype(np.float32)),
                          "counterexample": (falsified, np.array([a.cex[i] for i in falsified]))}
    if file is not None and changes:
        file.update_rows(changes)


def _warn_contradiction(eps: float, verified_at: _Answers, samples: np.ndarray) -> None:
    if len(samples):
        logging.getLogger("certkit.verify").warning(
            "%d sample(s) (positions %s) were verified at ε=%g but falsified at a radius <= ε=%g: one of the two "
            "answers is wrong; the counterexample, confirmed by onnxruntime, is kept", len(samples),
            samples[:10].tolist(), verified_at.eps, eps)


def _merged(computed: Iterator[dict[str, np.ndarray]], first: int, todo: np.ndarray, carried: _Answers,
            data: Samples, layout: tuple[int, int, int]) -> Iterator[dict[str, np.ndarray]]:
    """The rows of samples ``first``, ... (positions in ``data``), in order: each run of ``computed``
    rows (of the samples ``todo``, in order) with the carried ones up to the next computed sample
    (the last run: up to the end), so that a run ends where a batch of the computed ones ends."""
    n, done = len(data[2]), 0
    with contextlib.closing(computed):
        for rows in computed:
            done += len(rows["index"])
            stop = int(todo[done]) if done < len(todo) else n
            yield _carried_rows(first, stop, carried, data, layout, rows)
            first = stop
    if first < n:  # nothing computed from here on: every answer is carried
        yield _carried_rows(first, n, carried, data, layout)


def _carried_rows(first: int, stop: int, carried: _Answers, data: Samples, layout: tuple[int, int, int],
                  computed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The rows of samples [first, stop): the carried answers (no margins, no time, ``reused_from``
    the ε they were computed at), with the ``computed`` rows (``reused_from`` NaN) in their places."""
    at = np.arange(first, stop)
    stages, outputs, input_size = layout
    rows = _Rows.empty(len(at), stages, outputs, input_size)
    rows.status[:], rows.stage_of[:] = carried.status[at], carried.stage[at]
    for j in np.flatnonzero(rows.status == FALSIFIED):
        rows.cex[j] = carried.cex[first + j]
    out = {"index": data[2][at], "label": data[1][at].numpy(), "prediction": carried.prediction[at],
           "status": rows.status, "stage": rows.stage_of, "margins": rows.margins, "times": rows.times,
           "counterexample": rows.cex, "reason": rows.reasons, "reused_from": carried.origin[at].astype(np.float32)}
    if computed is not None:
        mine = np.flatnonzero(carried.status[at] == UNKNOWN)
        for k, v in computed.items():
            out[k][mine] = v
        out["reused_from"][mine] = np.nan
    return out


def _sweep_radius(cfg: VerifyConfig, rows_of: RowSource, data: Samples, layout: tuple[int, int, int],
                  file: SweepFile | None, finished: list[_Answers],
                  progress: Callable[[dict[str, Any]], None] | None) -> _Answers:
    """One radius of a sweep: the rows a resumed file holds already, then the rest: the samples
    with no carried answer computed together, in batches of their own, merged in order with the
    carried ones; what it decided, for the radii after it."""
    n = len(data[2])
    carried = _carry_over(cfg.eps, finished, n)
    answers = _Answers.empty(cfg.eps, n)
    table = None if file is None else file.groups[cfg.eps]
    done = 0 if table is None else table.done
    if done:
        rows = read_results(table.path, eps=cfg.eps)[1]
        answers.add(rows, 0)
        _count(answers.counts, rows["status"])
    if done < n:
        todo = np.flatnonzero(carried.status == UNKNOWN)
        todo = todo[todo >= done]
        pick = torch.as_tensor(todo, dtype=torch.long)
        computed = rows_of(cfg, (data[0][pick], data[1][pick], data[2][todo]), 0)
        _stream(_merged(computed, done, todo, carried, data, layout), done, n, answers.counts, progress, table,
                answers.add, {"eps": cfg.eps})
    elif progress is not None:
        progress({"eps": cfg.eps, "done": done, "total": n, **answers.counts})
    if table is not None and cfg.eps not in file.finished:
        table.mark_complete()
    return answers


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
    """One VNN-LIB property per sample and radius (each of a sweep's, ascending) plus one
    instances.csv (paths relative to ``out_dir``). A property's name holds its sample index and ε."""
    import os

    from certkit.vnnlib import robustness_property, write_instances, write_property

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    onnx_rel = os.path.relpath(Path(onnx_path).resolve(), out_dir.resolve())
    radii = cfg.radii()
    for eps in radii:
        for xi, yi, i in zip(x, y, indices):
            lo = (xi - eps).clamp(*cfg.pixel_range).numpy()
            up = (xi + eps).clamp(*cfg.pixel_range).numpy()
            name = f"{Path(onnx_path).stem}_idx{int(i)}_eps{_eps_tag(eps, radii)}.vnnlib"
            comment = (f"certkit {__version__}: robustness of {Path(onnx_path).name} on sample {int(i)} "
                       f"(label {int(yi)}), Linf eps {eps!r}, box clipped to {list(cfg.pixel_range)}")
            write_property(out_dir / name, robustness_property(lo, up, int(yi), num_outputs, comment))
            rows.append((onnx_rel, name, timeout))
    write_instances(out_dir / "instances.csv", rows)
    return out_dir / "instances.csv"


def _eps_tag(eps: float, radii: tuple[float, ...]) -> str:
    """ε in a file name: 6 significant digits, or every digit where another radius of the sweep
    shares those 6 (their properties would overwrite each other)."""
    short = f"{eps:.6g}"
    return short if sum(f"{e:.6g}" == short for e in radii) == 1 else repr(eps)
