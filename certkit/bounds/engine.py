"""Bound propagation over one graph: IBP, CROWN-IBP and full CROWN.

``BoundedModel`` builds the graph once and bounds many boxes. Every method runs the
same two passes over the graph:

1. a forward sweep in topological order computing an interval for every node with
   the operators' IBP rules; with ``method="crown"`` the interval of every node that
   feeds a nonlinearity is tightened by a backward CROWN pass (only for neurons IBP
   leaves unstable, intersected with IBP);
2. a backward pass from the output with the specification matrix C: for ``ibp`` it
   stops at the last nonlinearity (this is C folded into the last linear layers), for
   ``crown-ibp`` and ``crown`` it runs to the input, and the result is intersected
   with the IBP one.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from certkit.bounds import windows
from certkit.bounds.graph import Graph, build_graph, reference_tensor
from certkit.bounds.ops import Activation, batchnorm_of
from certkit.errors import InvalidInput
from certkit.memory import default_budget, rows_that_fit

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
Interval = tuple[Tensor, Tensor]

# Largest A tensor (elements) one backward pass may hold for intermediate bounds.
_BACKWARD_BUDGET = 1 << 26
# Loose (domain, neuron) pairs from which a ReLU's input gets its upper bounds in a pass of their
# own first (below, the second pass's fixed cost outweighs the rows it saves: OVAL21 nets at batch 1).
_UPPER_FIRST_FROM = 64
# Rows per loose (domain, neuron) pair from which the pairs are bounded one per batch element instead
# of in rows per domain padded to the loosest domain (:meth:`BoundedModel._crown_refine`).
_PADDING_TO_PAIRS = 1.25


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 precision on CUDA while bounding: TF32 matmuls would break soundness."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _accumulate(pending: dict, name: str, A: Tensor | windows.Windows) -> None:
    """Add coefficients reaching node ``name`` to ``pending`` (windows merge with windows of the
    same grid; otherwise both become dense)."""
    have = pending.get(name)
    if have is None:
        pending[name] = A
        return
    if isinstance(have, windows.Windows) and isinstance(A, windows.Windows):
        merged = windows.merge(have, A)
        if merged is not None and merged.fits():
            pending[name] = merged
            return
    dense = [x.dense() if isinstance(x, windows.Windows) else x for x in (have, A)]
    pending[name] = dense[0] + dense[1]


def concretize(A: Tensor, box: Interval) -> Tensor:
    """Lower bound of A·x over the box: A⁺l + A⁻u = A·c − |A|·r, for A of shape (B, S, *shape)."""
    B, S = A.shape[:2]
    c, r = (t.reshape(t.shape[0], -1, 1).expand(B, -1, -1) for t in windows.box_center_radius(box))
    A = A.reshape(B, S, -1)
    return (torch.bmm(A, c) - torch.bmm(A.abs(), r)).squeeze(-1)


class BoundedModel:
    """A network made ready for bounding: an ``nn.Module`` or the path of an ONNX file, or a
    stored graph (:meth:`from_graph`: no module, fixed weights)."""

    def __init__(self, model: nn.Module | str | Path, input_shape: tuple[int, ...] | None = None):
        self.onnx_path = None
        self.strip_softmax = False
        self.max_memory: int | None = None  # bytes for the largest coefficient tensor (None: memory.default_budget)
        self.windowed = True  # CROWN refinements on receptive-field windows (certkit.bounds.windows)
        if isinstance(model, (str, Path)):
            from certkit.onnx_io import load_onnx

            loaded = load_onnx(model)
            self.onnx_path = Path(model)
            model, input_shape = loaded.module, loaded.input_shape
        self.module: nn.Module | None = model
        self._graph: Graph | None = None
        if input_shape is not None:
            self._build(tuple(input_shape))

    @classmethod
    def from_graph(cls, graph: Graph, dtype: torch.dtype, onnx_path: str | Path | None = None) -> BoundedModel:
        """Bound a graph without its module (one read back from :mod:`certkit.graph_cache`),
        inputs cast to ``dtype``: its weights are fixed, ``to`` moves or casts the graph's own
        tensors, and it bounds inputs of the graph's input shape only."""
        bm = cls(nn.Identity())
        bm.module, bm._frozen_dtype = None, dtype
        bm.onnx_path = None if onnx_path is None else Path(onnx_path)
        bm._set_graph(graph)
        return bm

    # ------------------------------------------------------------------ set-up

    def _build(self, input_shape: tuple[int, ...]) -> None:
        if self.module is None:  # a stored graph has one input shape; _prepare names a mismatch
            return
        self._set_graph(build_graph(self.module, input_shape))

    def _set_graph(self, graph: Graph) -> None:
        self._graph = graph
        if self.strip_softmax:
            self._graph = self._graph.before_output_softmax() or self._graph
        self._built_on = self._constants_device()  # where its constants live
        self._ancestors: dict[str, list] = {}
        self._exact = self._graph.ibp_exact()
        self.pre_activation = {i for n in self._graph.nodes[1:] if not n.op.affine for i in n.inputs}
        # nodes feeding only ReLUs: a neuron whose sign IBP already fixes gains nothing from CROWN there;
        # other nonlinearities (Sigmoid, MaxPool, ...) gain from tightening every neuron
        feeds_other = {i for n in self._graph.nodes[1:] if not n.op.affine and n.op.kind != "relu" for i in n.inputs}
        self._relu_only = self.pre_activation - feeds_other

    def _constants_device(self) -> torch.device:
        if self.module is None:
            from certkit.bounds.frozen import graph_device

            return graph_device(self.graph)
        param = reference_tensor(self.module)
        return param.device if param is not None else torch.device("cpu")

    def logits_model(self) -> BoundedModel | None:
        """The same network up to the logits before an output Softmax/LogSoftmax over the
        classes (:meth:`Graph.before_output_softmax`), or None when it has none. Shares the
        module (or the stored graph) with this one."""
        if self.graph.before_output_softmax() is None:
            return None
        view = BoundedModel(nn.Identity())
        view.module, view.onnx_path, view.strip_softmax = self.module, self.onnx_path, True
        view.max_memory, view.windowed = self.max_memory, self.windowed
        if self.module is None:
            view._frozen_dtype = self._frozen_dtype
            view._set_graph(self.graph)
        else:
            view._build(self.graph.input_shape)
        return view

    def to(self, *args, **kwargs) -> BoundedModel:
        """Move or cast the network (``torch.nn.Module.to`` arguments); the graph is rebuilt
        because it holds constants captured at build time."""
        if self.module is None:
            from certkit.bounds.frozen import graph_to

            graph, self._frozen_dtype = graph_to(self.graph, self._frozen_dtype, *args, **kwargs)
            self._set_graph(graph)
            return self
        self.module.to(*args, **kwargs)
        if self._graph is not None:
            self._build(self._graph.input_shape)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to: the network's parameters' (float32 without any)."""
        if self.module is None:
            return self._frozen_dtype
        param = reference_tensor(self.module)
        return param.dtype if param is not None else torch.float32

    @property
    def has_train_bn(self) -> bool:
        """Whether some batch norm is in train mode (and so needs clean-batch statistics)."""
        return any((bn := batchnorm_of(n.op)) is not None and bn.module.training for n in self.graph.nodes[1:])

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            raise RuntimeError("the graph is built on the first call (input shape unknown until then)")
        return self._graph

    def _prepare(self, x: Tensor) -> Tensor:
        """Build the graph on first use, move the model to x's device, cast x to its dtype.

        The graph is rebuilt whenever it was built on another device than x's (also when the
        caller moved ``module`` itself): constants captured at build time must move too."""
        if self.module is None:
            if self._built_on != x.device:
                self.to(x.device)
        else:
            param = reference_tensor(self.module)
            if param is not None and param.device != x.device:
                self.module.to(x.device)
            if self._graph is None or self._built_on != x.device:
                self._build(tuple(x.shape[1:]))
        if tuple(x.shape[1:]) != self.graph.input_shape:
            raise InvalidInput(
                f"input of shape {tuple(x.shape)} does not fit the model, which expects (batch, "
                f"{', '.join(map(str, self.graph.input_shape))})")
        return x.to(self.dtype)

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        """The concrete output, computed through the graph (records batch-norm statistics)."""
        x = self._prepare(x)
        values = {self.graph.input.name: x}
        for n in self.graph.nodes[1:]:
            values[n.name] = n.op.forward(*(values[i] for i in n.inputs))
        return values[self.graph.output]

    __call__ = forward

    # ------------------------------------------------------------------ bounds

    def intervals(self, lower: Tensor, upper: Tensor, method: str = "ibp",
                  known: dict[str, Interval] | None = None, alpha_iterations: int = 0,
                  expired: Callable[[], bool] | None = None) -> dict[str, Interval]:
        """Interval bounds of every node: IBP, refined by CROWN when ``method == 'crown'``.

        ``known`` maps node names to intervals already known to hold on this box (from a
        parent domain in branch and bound, with split neurons clamped): each node's interval
        is intersected with them before later nodes use it, so splits propagate forward.
        With ``alpha_iterations`` > 0 every CROWN refinement optimises its own activation α
        (α-CROWN for intermediate bounds: tighter, about that many times slower, and without
        gradients) until ``expired()`` says time is up; later nodes get plain CROWN.
        Train-mode batch norms use the statistics of the last ``forward``."""
        if self._graph is None:
            self._build(tuple(lower.shape[1:]))
        if method not in ("ibp", "crown"):
            raise InvalidInput(f"unknown interval method {method!r}; choose ibp or crown")
        bounds: dict[str, Interval] = {self.graph.input.name: (lower, upper)}
        for n in self.graph.nodes[1:]:
            lo, up = n.op.interval(*(bounds[i] for i in n.inputs))
            if known is not None and n.name in known:
                lo, up = torch.maximum(lo, known[n.name][0]), torch.minimum(up, known[n.name][1])
            if method == "crown" and n.name in self.pre_activation and not self._exact[n.name]:
                if expired is not None and expired():
                    alpha_iterations = 0
                lo, up = self._crown_refine(n.name, lo, up, bounds, alpha_iterations)
            bounds[n.name] = (lo, up)
        return bounds

    def _crown_refine(self, name: str, lo: Tensor, up: Tensor, bounds: dict[str, Interval],
                      alpha_iterations: int = 0, per_pair: bool | None = None) -> Interval:
        """Tighten with a CROWN pass (α-CROWN with ``alpha_iterations``) the neurons of node
        ``name`` that IBP leaves unstable (every neuron with l < u when the node feeds a
        nonlinearity other than ReLU).

        A node that feeds only ReLUs gets its upper bounds first and lower bounds only where the
        new upper bound is still positive: a ReLU whose input is ≤ 0 outputs 0 whatever the lower
        bound, so every later bound is the same with fewer rows (the CIFAR ResNets: a quarter to a
        half fewer, CROWN about 1.8× faster on ResNet-4B). Only with at least ``_UPPER_FIRST_FROM``
        loose pairs, batched per domain: per (domain, neuron) pair, each pass pays the gathering
        of its pairs' intervals again, which cost more than the rows saved on the small CIFAR
        nets of benchmarks/crown_vs_auto_lirpa.py.

        Two batchings give the same bounds, each domain's as it gets alone: each domain's own loose
        neurons in rows of their own, padded to the largest count in the batch
        (:meth:`_refine_domains`), or each loose (domain, neuron) pair as a batch element of its own
        (:meth:`_refine_pairs`), which pays for its fewer rows with gathering each pair's intervals
        wherever its coefficients are dense. ``per_pair`` forces one (None: per pair when the
        padding would add more than a quarter to the rows: branch and bound's subdomains of
        unequal looseness; the batches of images of benchmarks/crown_vs_auto_lirpa.py mostly not)."""
        B = lo.shape[0]
        lf, uf = lo.reshape(B, -1).clone(), up.reshape(B, -1).clone()
        relu_only = name in self._relu_only
        loose = ((lf < 0) & (uf > 0)) if relu_only else (lf < uf)
        passes = [(1.0, -1.0)]
        while passes:
            signs = passes.pop(0)
            if signs == (1.0,):
                loose = loose & (uf > 0)
            if B == 1:
                P = k = int(loose.sum())
            else:
                counts = loose.sum(1)
                P, k = int(counts.sum()), int(counts.max())
            if P == 0:
                break
            pass_per_pair = _PADDING_TO_PAIRS * P < B * k if per_pair is None else per_pair
            if signs == (1.0, -1.0) and relu_only and not pass_per_pair and P >= _UPPER_FIRST_FROM:
                signs, passes = (-1.0,), [(1.0,)]
            args = (name, signs, lo.shape[1:], lf, uf, bounds, alpha_iterations)
            if pass_per_pair:
                self._refine_pairs(loose.nonzero(), *args)
            else:
                self._refine_domains(loose, k, P < B * k, *args)
        return lf.reshape(lo.shape), uf.reshape(up.shape)

    def _row_cost(self, name: str, alpha_iterations: int) -> int:
        """Elements one row of A needs in a backward pass from ``name`` (the widest node's size,
        twice; α, its gradients and Adam's two moments live beside the coefficients)."""
        widest = max(math.prod(self.graph.by_name[a.name].shape) for a in self._ancestors_of(name))
        return 2 * widest * (5 if alpha_iterations > 0 else 1)

    def memory_budget(self, device: torch.device) -> int:
        """Bytes the largest coefficient tensor of one pass may take on ``device``: ``max_memory``,
        or a safe share of the memory free there now (:func:`certkit.memory.default_budget`)."""
        return self.max_memory if self.max_memory is not None else default_budget(device)

    def min_memory(self, alpha_iterations: int = 0, dtype: torch.dtype | None = None) -> int:
        """The smallest budget (bytes) in which every pass of CROWN (α-CROWN with ``alpha_iterations``)
        fits one chunk: the largest single row of coefficients, with the intervals a (domain, neuron)
        pair gathers, over every node CROWN refines and the final pass. Below it a stage is skipped."""
        size = (dtype or self.dtype).itemsize
        rows = [self._row_cost(self.graph.output, alpha_iterations)]
        for name in self.pre_activation:
            gathered = 2 * sum(math.prod(a.shape) for a in self._ancestors_of(name) if a.name != name)
            rows.append(self._row_cost(name, alpha_iterations) + gathered)
        return max(rows) * size

    def _chunk_rows(self, cost: int, like: Tensor, what: str, cap: bool = True) -> int:
        """Rows of ``cost`` elements (of ``like``'s dtype) one pass may hold within the memory budget
        (and, with ``cap``, within ``_BACKWARD_BUDGET`` elements, where speed stops growing); raises
        :class:`~certkit.memory.MemoryBudgetExceeded` naming ``what`` when not even one row fits."""
        fit = rows_that_fit(cost * like.element_size(), self.memory_budget(like.device), what)
        return min(fit, max(1, _BACKWARD_BUDGET // cost)) if cap else fit

    def _refine_domains(self, loose: Tensor, k: int, padded: bool, name: str, signs: tuple[float, ...], shape,
                        lf: Tensor, uf: Tensor, bounds: dict[str, Interval], alpha_iterations: int) -> None:
        """CROWN bounds of each domain's ``loose`` (B, n) neurons, at most ``k`` per domain (``padded``:
        fewer in some), tightening lf, uf (B, n) in place: the lower bounds for sign 1, the upper
        bounds for sign -1.

        Domain b's rows are its loose neurons, then (up to k) others of its neurons whose bounds are
        dropped: rows of one width for the whole batch, each reading its own domain's intervals
        (nothing gathered). Chunks of rows (and, when one row in every domain is over the memory
        budget, of domains) fit the budget; each row's bound is the same in any chunk."""
        B = lf.shape[0]
        if B == 1:
            order = loose.nonzero()[:, 1].unsqueeze(0)  # (1, k), ascending as the stable sort's
        else:
            order = torch.argsort((~loose).to(torch.uint8), dim=1, stable=True)[:, :k]  # loose ones first
        valid = torch.arange(k, device=lf.device) < loose.sum(1, keepdim=True) if padded else None
        rows = self._chunk_rows(self._row_cost(name, alpha_iterations), lf, f"the CROWN refinement of node {name!r}")
        group = min(B, rows)  # domains per chunk
        m = len(signs)
        for d0 in range(0, B, group):
            dom = slice(d0, min(B, d0 + group))
            g = dom.stop - d0
            sub, lf_d, uf_d = (bounds, lf, uf) if g == B else (self._domains(bounds, name, dom), lf[dom], uf[dom])
            per_domain = max(1, rows // g)
            for c0 in range(0, k, per_domain):
                part = order[dom, c0:c0 + per_domain]
                ok = None if valid is None else valid[dom, c0:c0 + per_domain]
                kk = part.shape[1]
                index = torch.cat([part] * m, 1)  # every neuron with the first sign, then the next
                A = self._unit_rows(index, [s for s in signs for _ in range(kk)], shape, lf, alpha_iterations)
                lb = self._backward(name, A, sub, stop_at_nonlinear=False)
                lb = self._optimise_alphas(name, A, sub, lb, alpha_iterations)
                for j, s in enumerate(signs):
                    bound = lf_d if s > 0 else uf_d
                    held = bound.gather(1, part)
                    new = _tightened(held, lb[:, j * kk:(j + 1) * kk], s)
                    bound.scatter_(1, part, new if ok is None else torch.where(ok, new, held))

    def _unit_rows(self, index: Tensor, signs: list[float], shape, like: Tensor, alpha_iterations: int,
                   domain: Tensor | None = None) -> Tensor | windows.Windows:
        """Rows ``signs[s]``·e_``index[b, s]`` of a node of per-sample ``shape``: receptive-field
        windows (:mod:`certkit.bounds.windows`; ``domain``: the sample of the batch each row's
        intervals come from) where they can be, else dense (B, S, *shape) (windows off, α-CROWN's
        optimisation, or a node that is not an image)."""
        sign = _sign_row(tuple(signs), like.dtype, like.device)
        if self.windowed and alpha_iterations == 0:
            win = windows.unit_rows(index, sign, shape, domain)
            if win is not None:
                return win
        A = torch.zeros(*index.shape, math.prod(shape), dtype=like.dtype, device=like.device)
        A.scatter_(2, index.unsqueeze(2), sign.expand(index.shape).unsqueeze(2))
        return A.reshape(*index.shape, *shape)

    def _domains(self, bounds: dict[str, Interval], name: str, dom: slice | Tensor) -> _DomainBounds:
        """The intervals of ``name``'s ancestors in the domains ``dom`` only (a slice of the batch,
        or each row's domain), each gathered when first read."""
        return _DomainBounds(bounds, dom, [a.name for a in self._ancestors_of(name) if a.name in bounds])

    def _refine_pairs(self, pairs: Tensor, name: str, signs: tuple[float, ...], shape, lf: Tensor, uf: Tensor,
                      bounds: dict[str, Interval], alpha_iterations: int) -> None:
        """CROWN bounds of the given (domain, neuron) pairs, each a batch element of its own with its
        domain's intervals gathered, tightening lf, uf (B, n) in place (lower for sign 1, upper for -1)."""
        m = len(signs)
        names = [a.name for a in self._ancestors_of(name) if a.name in bounds]
        gathered = 2 * sum(bounds[a][0][0].numel() for a in names)
        per_chunk = self._chunk_rows(self._row_cost(name, alpha_iterations) + gathered, lf,
                                     f"the CROWN refinement of node {name!r}")
        for part in pairs.split(per_chunk):
            dom, neuron = part[:, 0], part[:, 1]
            A = self._unit_rows(neuron[:, None].expand(-1, m), list(signs), shape, lf, alpha_iterations, dom)
            sub = self._domains(bounds, name, dom)
            lb = self._backward(name, A, sub, stop_at_nonlinear=False)
            lb = self._optimise_alphas(name, A, sub, lb, alpha_iterations)
            for j, s in enumerate(signs):
                bound = lf if s > 0 else uf
                bound[dom, neuron] = _tightened(bound[dom, neuron], lb[:, j], s)

    def _ancestors_of(self, name: str):
        if name not in self._ancestors:
            self._ancestors[name] = self.graph.ancestors(name)
        return self._ancestors[name]

    def _backward(self, start: str, A: Tensor | windows.Windows, bounds: dict[str, Interval], stop_at_nonlinear: bool,
                  alphas: dict[str, Tensor] | None = None, record: dict[str, Tensor] | None = None,
                  extra: dict[str, Tensor] | None = None) -> Tensor:
        """Lower bound (B, S) of A·node[start] by backward linear propagation.

        With ``stop_at_nonlinear`` the linear function is concretised at the outputs of
        the last nonlinear nodes with their intervals (IBP with C folded in); otherwise it
        is relaxed through them down to the input box (CROWN). ``record`` receives the
        coefficient tensor reaching every node (branching scores and the input's minimiser
        in branch and bound). ``extra`` adds coefficients at given nodes, i.e. bounds
        A·node[start] + Σ extra[n]·node[n] (β-CROWN's Lagrangian terms for split neurons).
        ``A`` may be receptive-field windows (:mod:`certkit.bounds.windows`; then without those
        three): they stay windows while they can, the same bounds for a fraction of the work.
        """
        pending: dict[str, Tensor | windows.Windows] = {start: A}
        if isinstance(A, windows.Windows):
            A = A.A  # (B, S, ...): the rows' count and dtype
        lb = None
        for node in self._ancestors_of(start):
            A_n = pending.pop(node.name, None)
            if extra is not None and node.name in extra:
                A_n = extra[node.name] if A_n is None else A_n + extra[node.name]
            if A_n is None:
                continue
            if isinstance(A_n, windows.Windows):
                done = self._windowed_step(node, A_n, bounds, pending)
                if done is not None:
                    lb = _add(lb, done)
                    continue
                A_n = A_n.dense()
            if record is not None:
                record[node.name] = A_n
            if node.op is None or (stop_at_nonlinear and not node.op.affine):
                lb = _add(lb, concretize(A_n, bounds[node.name]))
                continue
            kw = {}
            if alphas is not None and node.name in alphas:
                kw["alpha"] = alphas[node.name]
            A_ins, bias = node.op.backward(A_n, [bounds[i] for i in node.inputs], **kw)
            if bias is not None:
                lb = _add(lb, bias)
            for i, A_i in zip(node.inputs, A_ins):
                _accumulate(pending, i, A_i)
        return _per_row(lb, A)

    def _windowed_step(self, node, win: windows.Windows, bounds: dict[str, Interval],
                       pending: dict[str, Tensor | windows.Windows]) -> Tensor | int | None:
        """One step of the backward pass on windows (:mod:`certkit.bounds.windows`): the bias it
        adds (0 for none), with the inputs' windows added to ``pending``; None when this node needs
        dense coefficients."""
        if win.domain is not None:  # the rows index the batch's intervals themselves
            bounds = bounds.whole
        if node.op is None:
            return windows.concretize(win, bounds[node.name])
        step = windows.backward(node.op, win, [bounds[i] for i in node.inputs],
                                [self.graph.by_name[i].shape for i in node.inputs])
        if step is None:
            return None
        A_ins, bias = step
        for i, A_i in zip(node.inputs, A_ins):
            _accumulate(pending, i, A_i if A_i.fits() else A_i.dense())
        return 0 if bias is None else bias

    def compute_bounds(self, lower: Tensor, upper: Tensor, method: str = "crown", C: Tensor | None = None,
                       bound_upper: bool = True, x: Tensor | None = None, intersect: bool = True,
                       alphas: dict[str, Tensor] | None = None,
                       reuse_stats: bool = False) -> tuple[Tensor, Tensor | None]:
        """Bounds (lb, ub) of the outputs (B, K), or of C·output (B, S) when C (B, S, K) is given.

        ``x`` is the clean batch whose statistics train-mode batch norms use (default: the
        box centre; like any train-mode forward pass this updates their running statistics);
        with ``reuse_stats`` they use the statistics recorded by the last ``forward`` instead
        (the training loop's clean pass of the same step).
        ``intersect`` takes the better of the CROWN and IBP final bounds.
        ``alphas`` maps activation node names to their relaxations' α, shaped (B, S, *shape)
        for ReLU (lower slopes) and (B, S, *shape, 2) for S-shaped ones (tangent points), for
        the final pass (α-CROWN). ``ub`` is None when ``bound_upper`` is False.
        """
        if method not in METHODS:
            raise InvalidInput(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        lower, upper = self._prepare(lower), self._prepare(upper)
        if lower.shape != upper.shape:
            raise InvalidInput(f"lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
        if bool((lower > upper).any()):
            raise InvalidInput("lower bound above upper bound in the input box")
        with no_tf32():
            if self.has_train_bn and not reuse_stats:
                self.forward((lower + upper) / 2 if x is None else x)
            return self._compute(lower, upper, method, C, bound_upper, intersect, alphas)

    def _compute(self, lower, upper, method, C, bound_upper, intersect, alphas):
        if method == "alpha-crown":
            with torch.no_grad():
                bounds = self.intervals(lower, upper, "crown")
            return self.alpha_crown(bounds, C, bound_upper)
        bounds = self.intervals(lower, upper, "crown" if method == "crown" else "ibp")  # crown-ibp: IBP's
        return self.spec_bounds(bounds, C, method, bound_upper, intersect, alphas)

    def alpha_crown(self, bounds: dict[str, Interval], C: Tensor | None, bound_upper: bool = True,
                    iterations: int = 20, lr: float = 0.1) -> tuple[Tensor, Tensor | None]:
        """α-CROWN: optimise the activations' relaxations (α) in the final backward pass
        (:meth:`_optimise_alphas`); the result is never worse than CROWN intersected with IBP.
        The intermediate bounds are those given (see ``intervals(..., alpha_iterations=)``)."""
        with torch.no_grad():
            best_lb, best_ub = self.spec_bounds(bounds, C, "crown", bound_upper)
        if iterations <= 0:
            return best_lb, best_ub
        lower = bounds[self.graph.input.name][0]
        B, out_shape = lower.shape[0], self.graph.output_shape
        if C is None:
            K = math.prod(out_shape)
            C = torch.eye(K, dtype=lower.dtype, device=lower.device).expand(B, K, K)
        C = C.to(lower)
        A = (torch.cat([C, -C], 1) if bound_upper else C).reshape(B, -1, *out_shape)
        best = torch.cat([best_lb, -best_ub], 1) if bound_upper else best_lb
        best = self._in_chunks(
            A, bounds, self._row_cost(self.graph.output, iterations), "the alpha-CROWN pass",
            lambda A_c, sub, d, s: self._optimise_alphas(self.graph.output, A_c, sub, best[d, s], iterations, lr))
        k = best_lb.shape[1]
        return best[:, :k], (-best[:, k:] if bound_upper else None)

    def _optimise_alphas(self, start: str, A: Tensor, bounds: dict[str, Interval], best: Tensor,
                         iterations: int, lr: float = 0.1) -> Tensor:
        """Lower bounds (B, S) of A·node[start], each the best of ``best`` and of CROWN passes whose
        activation relaxations α (ReLU lower slopes, sigmoid and tanh tangent points; one per
        neuron and row of A) follow projected Adam, clamped to [0, 1], maximising their sum
        (α-CROWN). Every α in [0, 1] gives a sound bound, so every iterate is valid. α starts at
        CROWN's choice."""
        if iterations <= 0:  # the common case, on the hot path of every CROWN refinement
            return best
        acts = [n for n in self._ancestors_of(start) if isinstance(n.op, Activation) and n.op.tunable]
        if not acts:
            return best
        bounds = {k: (lo.detach(), up.detach()) for k, (lo, up) in bounds.items()}
        B, S = A.shape[:2]
        slopes = {}
        for n in acts:
            init = n.op.default_alpha(*(t for i in n.inputs for t in bounds[i]))  # every input's (lo, up)
            slopes[n.name] = init.unsqueeze(1).expand(B, S, *init.shape[1:]).clone().requires_grad_(True)
        opt = torch.optim.Adam(slopes.values(), lr=lr)
        best = best.detach().clone()
        with torch.enable_grad():
            for _ in range(iterations):
                cur = self._backward(start, A, bounds, stop_at_nonlinear=False, alphas=slopes)
                best = torch.maximum(best, torch.nan_to_num(cur.detach(), nan=-math.inf))
                # gradients for the slopes only: never into the model (or train-mode BN statistics)
                grads = torch.autograd.grad(-cur.sum(), list(slopes.values()))
                for a, g in zip(slopes.values(), grads):
                    a.grad = g
                opt.step()
                with torch.no_grad():
                    for a in slopes.values():
                        a.clamp_(0, 1)
        return best

    def spec_bounds(self, bounds: dict[str, Interval], C: Tensor | None, method: str, bound_upper: bool = True,
                    intersect: bool = True, alphas: dict[str, Tensor] | None = None,
                    record: dict[str, Tensor] | None = None, extra: dict[str, Tensor] | None = None
                    ) -> tuple[Tensor, Tensor | None]:
        """The final pass: bounds of C·output given the node intervals from :meth:`intervals`.

        ``ibp`` concretises at the last nonlinearity (C folded into the last linear layers);
        ``crown-ibp`` / ``crown`` relax down to the input, intersected with the IBP result
        unless ``intersect`` is False (the raw CROWN bound, as CROWN-IBP training mixes it).
        ``record`` and ``extra`` go to the CROWN pass (see :meth:`_backward`).
        """
        lower = bounds[self.graph.input.name][0]
        B = lower.shape[0]
        out_shape = self.graph.output_shape
        K = math.prod(out_shape)
        if C is None:
            if method == "ibp":
                lo, up = bounds[self.graph.output]
                return lo.reshape(B, K), (up.reshape(B, K) if bound_upper else None)
            C = torch.eye(K, dtype=lower.dtype, device=lower.device).expand(B, K, K)
        C = C.to(lower)
        if C.dim() != 3 or C.shape[0] != B or C.shape[2] != K:
            raise InvalidInput(f"C must have shape (batch={B}, specs, outputs={K}); got {tuple(C.shape)}")
        S = C.shape[1]
        A = (torch.cat([C, -C], 1) if bound_upper else C).reshape(B, -1, *out_shape)
        lb = None
        cost = self._row_cost(self.graph.output, 0)
        if method == "ibp" or intersect:
            lb = self._in_chunks(A, bounds, cost, "the final IBP pass",
                                 lambda A_c, sub, d, s: self._backward(self.graph.output, A_c, sub, True))
        if method != "ibp":
            records: list[tuple[int, dict[str, Tensor]]] = []

            def crown_pass(A_c: Tensor, sub: dict[str, Interval], d: slice, s: slice) -> Tensor:
                rec = None if record is None else {}
                out = self._backward(self.graph.output, A_c, sub, stop_at_nonlinear=False,
                                     alphas=_cut_rows(alphas, A.shape[:2], d, s), record=rec,
                                     extra=_cut_rows(extra, A.shape[:2], d, s))
                if rec is not None:
                    records.append((d.start or 0, rec))
                return out

            crown = self._in_chunks(A, bounds, cost, f"the final {method} pass", crown_pass)
            if record is not None:
                record.update(_merge_records(records))
            lb = crown if lb is None else torch.maximum(lb, crown)
        return lb[:, :S], (-lb[:, S:] if bound_upper else None)

    def _in_chunks(self, A: Tensor, bounds: dict[str, Interval], cost: int, what: str,
                   fn: Callable[[Tensor, dict[str, Interval], slice, slice], Tensor]) -> Tensor:
        """``fn(A[d, s], bounds of the domains d, d, s)`` → (domains, rows) over chunks of domains d and
        rows s of A (B, S, ...) whose coefficient tensors (``cost`` elements per row) fit the memory
        budget, concatenated back to (B, S). Rows are bounded independently, so chunks change nothing
        but memory; one call with everything when it fits."""
        B, S = A.shape[:2]
        fit = self._chunk_rows(cost, A, what, cap=False)
        if B * S <= fit:
            return fn(A, bounds, slice(0, B), slice(0, S))
        group = min(B, max(1, fit // S))  # whole domains per chunk where a domain fits, else one
        step = min(S, max(1, fit // group))
        out = []
        for d0 in range(0, B, group):
            d = slice(d0, min(B, d0 + group))
            sub = {k: (lo[d], up[d]) if lo.shape[0] == B else (lo, up) for k, (lo, up) in bounds.items()}
            out.append(torch.cat([fn(A[d, s0:s0 + step], sub, d, slice(s0, min(S, s0 + step)))
                                  for s0 in range(0, S, step)], 1))
        return torch.cat(out, 0)


class _DomainBounds(Mapping[str, Interval]):
    """The intervals ``names`` of ``whole`` (a batch's) in the domains ``dom`` (a slice of the
    batch, or for (domain, neuron) pairs sample ``dom[p]`` for pair p), each gathered on first
    use. Windows of pairs read ``whole`` by domain (:class:`~certkit.bounds.windows.Windows`'
    ``domain``) and gather nothing; dense steps gather only the nodes they reach."""

    def __init__(self, whole: dict[str, Interval], dom: slice | Tensor, names: list[str]):
        self.whole, self.dom, self._names, self._gathered = whole, dom, names, {}

    def __getitem__(self, name: str) -> Interval:
        if name not in self._gathered:
            if name not in self._names:
                raise KeyError(name)
            lo, up = self.whole[name]
            self._gathered[name] = (lo[self.dom], up[self.dom])
        return self._gathered[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@functools.lru_cache(maxsize=64)
def _sign_row(signs: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The rows' signs as a tensor (read only), kept: a refinement asks for the same ones per node."""
    return torch.tensor(signs, dtype=dtype, device=device)


def _add(total: Tensor | None, term: Tensor | int) -> Tensor | None:
    """A running sum of bias terms (None: nothing yet; 0: a step without one)."""
    if isinstance(term, int):
        return total
    return term if total is None else total + term


def _per_row(total: Tensor | None, A: Tensor) -> Tensor:
    """A pass's summed bias terms as one value per row of A (B, S, ...): zero where it met none,
    broadcast where its terms were."""
    if total is not None and total.shape == A.shape[:2]:
        return total
    zero = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)
    return zero if total is None else zero + total


def _tightened(bound: Tensor, lb: Tensor, sign: float) -> Tensor:
    """``bound`` tightened by a CROWN lower bound ``lb`` of sign·neuron: a lower bound (sign 1)
    rises to lb, an upper bound (sign -1) falls to -lb."""
    return torch.maximum(bound, lb) if sign > 0 else torch.minimum(bound, -lb)


def _cut_rows(tensors: dict[str, Tensor] | None, shape: tuple[int, int], d: slice, s: slice
              ) -> dict[str, Tensor] | None:
    """Per-row tensors (B, S, ...) cut to domains d and rows s (dimensions of size 1 broadcast)."""
    if tensors is None:
        return None
    B, S = shape
    out = {}
    for k, t in tensors.items():
        t = t[d] if t.shape[0] == B else t
        out[k] = t[:, s] if t.dim() > 1 and t.shape[1] == S else t
    return out


def _merge_records(records: list[tuple[int, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """The coefficient records of chunks (domain offset, record) in chunk order, glued back: rows
    within a group of domains, then the groups."""
    if len(records) == 1:
        return records[0][1]
    groups: dict[int, list[dict[str, Tensor]]] = {}
    for start, rec in records:
        groups.setdefault(start, []).append(rec)
    glued = [{k: torch.cat([r[k] for r in recs], 1) for k in recs[0]} for recs in groups.values()]
    return {k: torch.cat([g[k] for g in glued], 0) for k in glued[0]}


def compute_bounds(model: nn.Module | str | Path | BoundedModel, lower: Tensor, upper: Tensor,
                   method: str = "crown", C: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sound bounds on a network's outputs over the box [lower, upper].

    ``model`` is an ``nn.Module``, a path to an ``.onnx`` file or a :class:`BoundedModel`;
    ``lower``/``upper`` have a batch dimension. Returns ``(lb, ub)`` of shape (B, K), or
    (B, S) for a specification matrix C of shape (B, S, K). Differentiable for ``ibp``
    and ``crown-ibp``.
    """
    bm = model if isinstance(model, BoundedModel) else BoundedModel(model)
    return bm.compute_bounds(lower, upper, method=method, C=C)
