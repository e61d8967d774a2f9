"""VNN-COMP: margins of polytopes, branch and bound against exhaustive grids, run-instance
(hard deadline, result files that onnxruntime reproduces), the benchmark runner, and real
competition instances with known answers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from certkit.complete import Solver, SolverConfig
from certkit.complete.spec import Spec
from certkit.confirm import Oracle, in_unsafe_set, snap_into_box
from certkit.status import Status
from certkit.vnncomp.instance import run_instance
from certkit.vnncomp.result_file import format_result, parse_result
from certkit.vnncomp.runner import discover, run_benchmark, summarize, verdict
from certkit.vnnlib import Case, Property, format_vnnlib, read_vnnlib
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ helpers


def _mlp(seed: int, n_in: int = 2, hidden: tuple[int, ...] = (12, 12), n_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = n_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, n_out)).eval()


def _export(model: nn.Module, n_in: int, path) -> None:
    torch.onnx.export(model, torch.zeros(1, n_in), str(path), dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["output"])


def _grid(n_in: int, per_dim: int, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
    axes = [np.linspace(lo[i], up[i], per_dim) for i in range(n_in)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n_in)


def _random_property(rng: np.random.Generator, n_in: int, n_out: int, y: np.ndarray) -> Property:
    """A box and 1-2 polytopes of 1-3 rows, thresholds placed inside the sampled output range so
    that both sat and unsat cases occur."""
    lo = -np.ones(n_in)
    up = np.ones(n_in)
    polys = []
    for _ in range(rng.integers(1, 3)):
        rows = rng.integers(1, 4)
        A = rng.normal(size=(rows, n_out))
        vals = y @ A.T
        b = np.quantile(vals, rng.uniform(0.0, 0.03), axis=0) - rng.uniform(0, 0.3) * vals.std(0)
        polys.append((A, b))
    return Property(n_in, n_out, [Case(lo, up, polys)])


# ------------------------------------------------------------------ margins


def test_group_margins_never_exceed_the_true_minimum_of_the_largest_row():
    """For any λ on the simplex, min_x Σλ_r L_r(x) ≤ min_x max_r L_r(x): checked on samples."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        N, R, D = 4, int(rng.integers(1, 5)), int(rng.integers(1, 6))
        case = Case(np.zeros(D), np.ones(D), [(rng.normal(size=(R, 3)), rng.normal(size=R))])
        spec = Spec.from_case(case)
        A = torch.as_tensor(rng.normal(size=(N, R, D)))
        c = torch.as_tensor(rng.normal(size=(N, R)))
        lo = torch.as_tensor(rng.uniform(-1, 0, size=(N, D)))
        up = lo + torch.as_tensor(rng.uniform(0, 2, size=(N, D)))
        m = spec.group_margins(A, c, lo, up)[:, 0]
        x = lo.unsqueeze(1) + (up - lo).unsqueeze(1) * torch.rand(N, 4000, D, dtype=torch.float64)
        L = torch.einsum("nrd,nsd->nsr", A, x) + (c - spec.b).unsqueeze(1)
        assert bool((m.unsqueeze(1) <= L.amax(2) + 1e-9).all())


def test_group_margins_combine_rows_that_no_single_row_refutes():
    """y1 ≥ 0 and y2 ≥ 0 with y1 = x, y2 = -x on [-1, 1]: each row alone can be 0, the sum cannot."""
    # unsafe: -y1 ≤ -0.5 and -y2 ≤ -0.5 (both ≥ 0.5): impossible since y1 + y2 = 0
    case = Case(np.array([-1.0]), np.array([1.0]), [(np.array([[-1.0, 0.0], [0.0, -1.0]]), np.array([-0.5, -0.5]))])
    spec = Spec.from_case(case)
    A = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64)  # lower bounds of -y1 = -x and -y2 = x
    c = torch.zeros(1, 2, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    m = spec.group_margins(A, c, -one, one)
    single = (c - spec.b + torch.minimum(A * -1, A * 1).sum(-1)).amax(1)
    assert single.item() <= 0 < m.item()


# ------------------------------------------------------------------ branch and bound vs exhaustive search


@pytest.mark.parametrize("mode", ["input-split", "input-split-3", "input-split-fresh", "relu-split"])
def test_branch_and_bound_agrees_with_an_exhaustive_grid(mode, tmp_path):
    """Random 2-input ReLU networks and random polytope properties: an unsat answer must have no
    violating grid point (400 × 400), a sat answer must be confirmed by onnxruntime, and many
    instances must be decided (ReLU splitting proves domains with every ReLU fixed through
    their β multipliers, but its counterexample candidates are box corners and PGD, so it may
    miss a small violating region inside the box)."""
    splits_inputs = mode.startswith("input-split")
    rng = np.random.default_rng(1 if splits_inputs else 2)
    cfg = SolverConfig(input_split_max=20 if splits_inputs else 0, attack_restarts=2, attack_steps=5,
                       split_candidates=3 if mode == "input-split-3" else 1,
                       reuse_parent_bounds=mode != "input-split-fresh")
    answers = []
    for seed in range(6):
        path = tmp_path / f"net{seed}.onnx"
        model = _mlp(seed)
        _export(model, 2, path)
        grid = _grid(2, 400, -np.ones(2), np.ones(2))
        with torch.no_grad():
            y_grid = model(torch.as_tensor(grid, dtype=torch.float32)).double().numpy()
        solver = Solver(path, cfg)
        for _ in range(3):
            prop = _random_property(rng, 2, 3, y_grid)
            truth_sat = any(np.all(y_grid @ A.T - b < 0, axis=1).any() for A, b in prop.cases[0].polytopes)
            res = solver.solve(prop, timeout=20)
            answers.append(res.status.vnncomp)
            if res.status is Status.VERIFIED:
                assert not truth_sat, f"unsat claimed but a grid point violates the property (seed {seed})"
            if res.status is Status.FALSIFIED:
                assert np.all((res.x >= prop.cases[0].lower) & (res.x <= prop.cases[0].upper))
                y = Oracle(path, (2,)).outputs(res.x[None])[0]
                assert in_unsafe_set(prop.cases[0], y)
    assert answers.count("sat") >= 2 and answers.count("unsat") >= 2, answers
    decided = sum(a in ("sat", "unsat") for a in answers)
    assert decided >= len(answers) - (1 if splits_inputs else 2), answers


def test_pair_margins_match_the_per_domain_margins_of_the_same_polytopes():
    """Bounding (domain, polytope) pairs one by one gives each pair the margin the per-domain
    pass gives that polytope on that domain, including a two-row polytope (λ-combined) next
    to one-row ones (padded by repeating their row)."""
    from certkit.bounds import BoundedModel
    from certkit.complete.margins import Pairs, margins, pair_margins

    model = _mlp(5, n_in=3, hidden=(12, 12), n_out=3)
    bm = BoundedModel(model).to(torch.float64)
    polytopes = [(np.array([[1.0, -1.0, 0.0]]), np.array([0.5])),
                 (np.array([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]), np.array([0.2, 0.1])),
                 (np.array([[-1.0, 0.0, 1.0]]), np.array([-0.3]))]
    spec = Spec.from_case(Case(-np.ones(3), np.ones(3), polytopes))
    lo = -torch.rand(4, 3, dtype=torch.float64)
    up = torch.rand(4, 3, dtype=torch.float64)
    bounds = bm.intervals(lo, up, "crown")
    m_dom, A_dom, _ = margins(bm, spec, bounds, lo, up)
    alive = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    pairs = Pairs.of(spec, alive)
    assert pairs.rows.shape == (int(alive.sum()), 2)
    gathered = {k: (a[pairs.dom], b[pairs.dom]) for k, (a, b) in bounds.items()}
    m, A, _ = pair_margins(bm, pairs, gathered, lo[pairs.dom], up[pairs.dom])
    torch.testing.assert_close(m, m_dom[pairs.dom, pairs.group])
    torch.testing.assert_close(A[:, 0], A_dom[pairs.dom, pairs.rows[:, 0]])


def test_float32_alpha_beta_steps_return_only_float64_margins():
    """α-β-CROWN's steps on a float32 copy: the margins handed back are those one float64 pass
    (of the kept α and β) gives, or the starting ones, never a float32 value, and they are
    below the true minimum found by sampling each domain."""
    import copy

    from certkit.bounds import BoundedModel
    from certkit.complete.alpha_beta import optimise, split_terms
    from certkit.complete.margins import Pairs, pair_margins

    model = _mlp(4, n_in=3, hidden=(16, 16), n_out=2)
    bm = BoundedModel(copy.deepcopy(model)).to(torch.float64)
    polytope = (np.array([[1.0, -1.0], [-1.0, 0.5]]), np.array([-2.0, 0.0]))
    spec = Spec.from_case(Case(-np.ones(3), np.ones(3), [polytope]))
    lo, up = -torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    up[1, 0] = 0.0  # two domains: the whole box and its half x0 ≤ 0
    bounds = bm.intervals(lo, up, "crown")
    fast = copy.deepcopy(bm).to(torch.float32)  # as relu_split makes it
    relus = [n for n in bm.graph.nodes[1:] if n.op.kind == "relu"]
    pre = [n.inputs[0] for n in relus]
    sizes = [bounds[p][0][0].numel() for p in pre]
    signs = [torch.zeros(2, k, dtype=torch.float64) for k in sizes]
    signs[0][:, 0] = -1.0  # neuron 0 of the first layer split active: a β term in play
    alphas = [r.op.default_alpha(*bounds[p]).reshape(2, 1, -1).expand(2, spec.num_rows, -1).clone()
              for r, p in zip(relus, pre)]
    betas = [torch.zeros(2, spec.num_rows, k, dtype=torch.float64) for k in sizes]
    shapes = [bounds[p][0].shape[1:] for p in pre]
    pairs = Pairs.of(spec, torch.ones(2, 1, dtype=torch.bool))  # one polytope per domain: pair i = domain i

    def start_margins():
        return pair_margins(bm, pairs, bounds, lo, up, alphas={r.name: a for r, a in zip(relus, alphas)},
                            extra=split_terms(pre, signs, betas, shapes))[0].detach()

    pairs.b += float(start_margins().max()) + 0.3  # shifts every margin by the same amount: all open
    spec.b += float(pairs.b[0, 0] - spec.b[0])
    start = start_margins()
    assert bool((start < 0).all())
    evaluated = []
    real_margins = pair_margins

    def spy(model, *a, **kw):  # every pass of the float64 network, and what it gave
        out = real_margins(model, *a, **kw)
        if model is bm:
            evaluated.append(out[0].detach())
        return out

    import certkit.complete.alpha_beta as bab_module
    bab_module.pair_margins = spy
    try:
        m, fa, fb = optimise(bm, pairs, bounds, lo, up, relus, pre, signs, start, 15, alphas, betas, fast=fast)
    finally:
        bab_module.pair_margins = real_margins
    assert m.dtype == fa[0].dtype == fb[0].dtype == torch.float64
    assert len(evaluated) == 1 and torch.equal(m, torch.maximum(start, evaluated[0]))  # one float64 pass decides
    assert bool((m > start).any())  # the steps did something
    # sound: sample each domain (respecting the split: first-layer neuron 0 active)
    x = lo[:, None] + (up - lo)[:, None] * torch.rand(2, 20000, 3, dtype=torch.float64)
    z = model[0](x.reshape(-1, 3).float()).double().reshape(2, -1, 16)[..., 0]
    y = model(x.reshape(-1, 3).float()).double().reshape(2, -1, 2)
    v = (y @ spec.C.T - spec.b).amax(-1)  # the polytope is one group: its largest row
    v = torch.where(z >= 0, v, torch.full_like(v, torch.inf))
    assert bool((m <= v.amin(1) + 1e-6).all())


def test_alpha_beta_steps_drop_refuted_pairs_without_changing_the_others():
    """Pairs refuted half-way leave the α-β batch; the pairs left open end with the same margins
    and the same final α, β as when they are stepped on their own."""
    import copy

    import certkit.complete.alpha_beta as bab_module
    from certkit.bounds import BoundedModel
    from certkit.complete.alpha_beta import optimise, split_terms
    from certkit.complete.margins import Pairs, pair_margins

    n = 8
    model = _mlp(5, n_in=3, hidden=(16, 16), n_out=2)
    bm = BoundedModel(copy.deepcopy(model)).to(torch.float64)
    spec = Spec.from_case(Case(-np.ones(3), np.ones(3), [(np.array([[1.0, -1.0]]), np.array([0.0]))]))
    gen = torch.Generator().manual_seed(0)
    centre = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 1.2 - 0.6
    lo, up = centre - 0.4, centre + 0.4  # eight different domains, one pair each
    bounds = bm.intervals(lo, up, "crown")
    relus = [node for node in bm.graph.nodes[1:] if node.op.kind == "relu"]
    pre = [node.inputs[0] for node in relus]
    sizes = [bounds[p][0][0].numel() for p in pre]
    signs = [torch.zeros(n, k, dtype=torch.float64) for k in sizes]
    signs[0][:, 3] = 1.0  # a split neuron (inactive) in every domain: β in play
    alphas = [r.op.default_alpha(*bounds[p]).reshape(n, 1, -1).clone() for r, p in zip(relus, pre)]
    betas = [torch.zeros(n, 1, k, dtype=torch.float64) for k in sizes]
    shapes = [bounds[p][0].shape[1:] for p in pre]
    pairs = Pairs.of(spec, torch.ones(n, 1, dtype=torch.bool))

    def run(rows: torch.Tensor, shift: torch.Tensor, spy: list | None = None):
        sub = pairs.take(rows)
        sub.b = sub.b + shift[rows, None]
        sub_bounds = {k: (a[rows], b[rows]) for k, (a, b) in bounds.items()}
        sub_signs = [s[rows] for s in signs]
        start = pair_margins(bm, sub, sub_bounds, lo[rows], up[rows],
                             alphas={r.name: a[rows].reshape(-1, 1, *s) for r, a, s in zip(relus, alphas, shapes)},
                             extra=split_terms(pre, sub_signs, [b[rows] for b in betas], shapes))[0]
        real = bab_module.pair_margins

        def counting(model, p, *a, **kw):
            if spy is not None:
                spy.append(p.dom.shape[0])
            return real(model, p, *a, **kw)

        bab_module.pair_margins = counting
        try:
            return start, optimise(bm, sub, sub_bounds, lo[rows], up[rows], relus, pre, sub_signs, start, 20,
                                    [a[rows] for a in alphas], [b[rows] for b in betas])
        finally:
            bab_module.pair_margins = real

    every = torch.arange(n)
    start, (alone, _, _) = run(every, torch.full((n,), 100.0))  # every pair open all along
    start = start.detach()
    assert bool((alone - start > 1e-3).all())  # the steps improve every pair
    # half of the pairs refuted half-way: their threshold lowered to the middle of their progress
    shift = torch.where(every % 2 == 0, (start + alone) / 2 + 100.0, torch.full((n,), 100.0))
    sizes_seen: list[int] = []
    start2, (m, fa, fb) = run(every, shift, sizes_seen)
    odd = every[1::2]
    assert bool((start2[::2] < 0).all()) and bool((m[::2] > 0).all())  # refuted on the way, not at the start
    assert min(sizes_seen) == n // 2  # they left the batch
    _, (m_odd, fa_odd, fb_odd) = run(odd, shift)
    assert torch.allclose(m[odd], m_odd, atol=1e-9)
    for full, alone_ in zip(fa + fb, fa_odd + fb_odd):
        assert torch.allclose(full[odd], alone_, atol=1e-9)


def test_relu_split_proves_what_plain_crown_cannot(tmp_path):
    """A threshold halfway between α-CROWN's root bound and the best value a strong PGD finds:
    open at the root, proved by ReLU splitting."""
    from certkit.bounds import BoundedModel

    model = _mlp(3, n_in=4, hidden=(16, 16), n_out=2)
    path = tmp_path / "net.onnx"
    _export(model, 4, path)
    C = torch.tensor([[[1.0, -1.0]]])
    lo, up = -torch.ones(1, 4), torch.ones(1, 4)
    root = float(BoundedModel(model).compute_bounds(lo, up, "alpha-crown", C=C, bound_upper=False)[0])
    x = (torch.rand(4096, 4) * 2 - 1).requires_grad_(True)
    for _ in range(200):  # PGD from many starts: an upper estimate of the true minimum
        d = model(x)[:, 0] - model(x)[:, 1]
        g, = torch.autograd.grad(d.sum(), x)
        x = (x - 0.02 * g.sign()).clamp(-1, 1).detach().requires_grad_(True)
    best = float((model(x)[:, 0] - model(x)[:, 1]).min())
    assert root < best
    b = root + 0.5 * (best - root)
    prop = Property(4, 2, [Case(-np.ones(4), np.ones(4), [(np.array([[1.0, -1.0]]), np.array([b]))])])
    # MILP off: were the first slice of ReLU splitting to run out, MILP alone would refute it at the root
    res = Solver(path, SolverConfig(input_split_max=0, milp_time=0)).solve(prop, timeout=60)
    assert res.status is Status.VERIFIED and res.stage == "relu-split", (res.status, res.stage, res.log)


# ------------------------------------------------------------------ result files and run-instance


def test_result_file_round_trip_and_float32_snapping():
    lo, up = np.array([0.1, -0.3]), np.array([0.3, 0.7])
    x = snap_into_box(np.array([[0.3, -0.3]]), lo, up)[0]
    assert x.dtype == np.float32 and np.all((x >= lo) & (x <= up))
    text = format_result(Status.FALSIFIED, x, np.array([1.5, -2.0]))
    status, values = parse_result(text)
    assert status is Status.FALSIFIED and values["X_0"] == float(x[0]) and values["Y_1"] == -2.0
    assert text.startswith("sat\n((X_0 ") and text.rstrip().endswith(")")
    assert format_result(Status.VERIFIED) == "unsat\n"


def test_a_fixed_input_float32_cannot_hold_snaps_to_the_nearest_float32(tmp_path):
    # lo = up = 0.1 holds no float32: the nearest one is the input the network can take; a
    # confirmation that demanded a float32 inside [0.1, 0.1] rejected every candidate
    lo, up = np.array([0.1, -1.0, 0.25]), np.array([0.1, 1.0, 0.25])
    x = snap_into_box(np.array([[0.3, 0.5, 0.0]]), lo, up)[0]
    assert x[0] == np.float32(0.1) and x[1] == np.float32(0.5) and x[2] == np.float32(0.25)
    model = _mlp(4, n_in=3)
    onnx = tmp_path / "net.onnx"
    _export(model, 3, onnx)
    case = Case(lo, up, [(np.array([[1.0, 0.0, 0.0]]), np.array([1e9]))])  # every output is unsafe
    assert Oracle(onnx, (3,)).confirm(case, np.array([[0.1, 0.0, 0.25]])) is not None


def test_the_corner_of_each_row_of_a_two_sided_property_is_tried(tmp_path):
    # unsafe: y0 within 1e-3 of its maximum over the box (or above). Summing the two rows (−y0 and +y0) cancels
    # them, so only the corner that maximises y0 on its own finds the counterexample
    from certkit.complete.input_split import input_split

    model = nn.Sequential(nn.Linear(3, 2)).eval()
    onnx = tmp_path / "lin.onnx"
    _export(model, 3, onnx)
    lo, up = -np.ones(3), np.ones(3)
    w, c = model[0].weight[0].detach().double().numpy(), float(model[0].bias[0])
    top = float(np.abs(w).sum() + c)
    case = Case(lo, up, [(np.array([[-1.0, 0.0], [1.0, 0.0]]), np.array([-(top - 1e-3), top + 1.0]))])
    solver = Solver(onnx)
    lo_t, up_t = solver._box(case)
    out = input_split(solver.bm, Spec.from_case(case), lo_t, up_t, solver._confirm(case, Spec.from_case(case)),
                      expired=lambda: True)
    assert out.status is Status.FALSIFIED, out
    assert in_unsafe_set(case, Oracle(onnx, (3,)).outputs(out.counterexample[0][None])[0])


def _write_prop(path, prop: Property) -> None:
    path.write_text(format_vnnlib(prop))


def test_run_instance_writes_a_sat_answer_that_onnxruntime_reproduces(tmp_path):
    model = _mlp(4)
    onnx = tmp_path / "net.onnx"
    _export(model, 2, onnx)
    with torch.no_grad():
        y = model(torch.zeros(1, 2)).numpy()[0]
    # unsafe: y0 - y1 < (y0 - y1 at the centre) + 0.1: the centre itself is a counterexample
    prop = Property(2, 3, [Case(-np.ones(2), np.ones(2), [(np.array([[1.0, -1.0, 0.0]]),
                                                           np.array([y[0] - y[1] + 0.1]))])])
    vnn = tmp_path / "p.vnnlib"
    _write_prop(vnn, prop)
    results = tmp_path / "out" / "result.txt"
    assert run_instance(onnx, vnn, 60, results, quiet=True) is Status.FALSIFIED
    status, values = parse_result(results.read_text())
    x = np.array([values[f"X_{i}"] for i in range(2)], dtype=np.float32)
    y_written = np.array([values[f"Y_{j}"] for j in range(3)])
    y_ort = Oracle(onnx, (2,)).outputs(x[None])[0]
    assert status is Status.FALSIFIED and np.array_equal(y_ort.astype(np.float32), y_written.astype(np.float32))
    assert in_unsafe_set(read_vnnlib(vnn).cases[0], y_ort)


def test_run_instance_deadline_is_hard(tmp_path, vnncomp_dir):
    """A limit shorter than loading the network: `timeout` is written on time all the same."""
    fam = vnncomp_dir / "acasxu"
    results = tmp_path / "r.txt"
    results.write_text("unsat\n")  # a stale answer from an earlier run must not survive
    start = time.monotonic()
    status = run_instance(fam / "onnx/ACASXU_run2a_1_1_batch_2000.onnx", fam / "vnnlib/prop_2.vnnlib", 1.0,
                          results, quiet=True)
    elapsed = time.monotonic() - start
    assert status is Status.TIMEOUT and results.read_text() == "timeout\n"
    assert elapsed < 1.0 + 0.5, elapsed


def test_run_instance_cli_errors_are_one_line(tmp_path):
    onnx = tmp_path / "net.onnx"
    _export(_mlp(0), 2, onnx)
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 oops))\n")
    results = tmp_path / "r.txt"
    cmd = [sys.executable, "-m", "certkit.cli", "run-instance", str(onnx), str(bad), "--timeout", "30",
           "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and proc.stdout.strip() == "error"
    assert results.read_text() == "error\n" and "line 3" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd[:4] + [str(tmp_path / "missing.vnnlib")] + cmd[5:], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["run-instance", "vnncomp"])
def test_device_cuda_without_one_is_a_clear_error_before_any_output(tmp_path, command):
    onnx, prop, results = tmp_path / "net.onnx", tmp_path / "p.vnnlib", tmp_path / "out" / "r.txt"
    _export(_mlp(0), 2, onnx)
    _write_prop(prop, _random_property(np.random.default_rng(0), 2, 3, np.zeros((4, 3))))
    args = ([str(onnx), str(prop), "--timeout", "30", "--results", str(results)] if command == "run-instance"
            else [str(tmp_path), "--out", str(results)])
    proc = subprocess.run([sys.executable, "-m", "certkit.cli", command, *args, "--device", "cuda"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not results.parent.exists()


def test_harness_scripts_follow_the_calling_convention(tmp_path):
    onnx = tmp_path / "net.onnx"
    model = _mlp(5)
    _export(model, 2, onnx)
    prop = Property(2, 3, [Case(-np.ones(2), np.ones(2), [(np.array([[1.0, 0, 0]]), np.array([-1e6]))])])
    vnn = tmp_path / "p.vnnlib"
    _write_prop(vnn, prop)
    results = tmp_path / "r.txt"
    scripts = REPO / "vnncomp"
    env = {**os.environ, "CERTKIT_WORKER_PIDFILE": str(tmp_path / "worker.pid")}
    assert subprocess.run(["bash", scripts / "prepare_instance.sh", "v1", "test", onnx, vnn], env=env).returncode == 0
    proc = subprocess.run(["bash", scripts / "run_instance.sh", "v1", "test", onnx, vnn, results, "30"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and results.read_text() == "unsat\n"
    assert not (tmp_path / "worker.pid").exists()  # removed once the solver is done
    assert subprocess.run(["bash", scripts / "run_instance.sh", "v2"], capture_output=True).returncode != 0


def test_prepare_stops_the_leftover_solver_and_no_other(tmp_path):
    """prepare_instance.sh kills the solver named in the pidfile (left over by an interrupted run), never
    another certkit solver on the machine (it once killed a benchmark run's solvers by pattern)."""
    onnx, vnn = tmp_path / "net.onnx", tmp_path / "p.vnnlib"
    _export(_mlp(5), 2, onnx)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "certkit.vnncomp.worker"]
    leftover = subprocess.Popen(sleeper, start_new_session=True)
    bystander = subprocess.Popen(sleeper, start_new_session=True)
    try:
        (tmp_path / "worker.pid").write_text(f"{leftover.pid}\n")
        env = {**os.environ, "CERTKIT_WORKER_PIDFILE": str(tmp_path / "worker.pid")}
        r = subprocess.run(["bash", REPO / "vnncomp" / "prepare_instance.sh", "v1", "test", onnx, vnn], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert leftover.wait(timeout=10) == -9
        assert bystander.poll() is None
        assert not (tmp_path / "worker.pid").exists()
    finally:
        for p in (leftover, bystander):
            p.kill()
            p.wait()


# ------------------------------------------------------------------ the benchmark runner


def test_runner_scores_resumes_and_writes_csv_and_h5(tmp_path, vnncomp_dir):
    """Three real rl instances (two unsat, one sat) and one with a deliberately wrong ground truth."""
    fam = vnncomp_dir / "rl_benchmarks_2022"
    rows = list(csv.reader(open(fam / "instances.csv")))
    gt = list(csv.DictReader(open(fam / "ground_truth.csv")))
    pick = [0, 1, 50]
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "instances.csv", "w", newline="") as f:
        for i in pick + [2]:
            csv.writer(f).writerow([str(fam / rows[i][0]), str(fam / rows[i][1]), "20"])
    with open(bench / "ground_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["onnx", "vnnlib", "ground_truth"])
        for i in pick:
            w.writerow([str(fam / rows[i][0]), str(fam / rows[i][1]), gt[i]["ground_truth"]])
        w.writerow([str(fam / rows[2][0]), str(fam / rows[2][1]), "sat"])  # wrong on purpose: 2 is unsat
    insts = discover(bench)
    out = tmp_path / "res" / "results.csv"
    outcomes = run_benchmark(insts, out, out.parent, tmp_path / "res" / "results.h5")
    assert [o.status.vnncomp for o in outcomes] == [gt[i]["ground_truth"] for i in pick] + ["unsat"]
    assert [o.verdict for o in outcomes] == ["correct"] * 3 + ["wrong"]
    s = summarize(insts, outcomes)[0]
    assert (s.correct, s.wrong, s.score) == (3, 1, 3 * 10 - 150)
    for o in outcomes:
        assert parse_result(open(o.result_file).read())[0] == o.status
        log = Path(o.result_file).with_suffix(".log").read_text()  # the worker's stages, kept for diagnosis
        assert log.strip().endswith(o.status.vnncomp) or f"{o.status.vnncomp} (" in log
    # resume: nothing is rerun
    stamp = out.stat().st_mtime_ns
    again = run_benchmark(insts, out, out.parent)
    assert out.stat().st_mtime_ns == stamp and [o.status for o in again] == [o.status for o in outcomes]
    import h5py

    with h5py.File(tmp_path / "res" / "results.h5") as f:
        assert f["families"]["bench"].attrs["wrong"] == 1 and len(f["instances"]["status"]) == 4


def test_verdicts():
    sat, unsat = Status.FALSIFIED, Status.VERIFIED
    assert verdict(sat, sat) == "correct" and verdict(unsat, sat) == "wrong"
    assert verdict(Status.TIMEOUT, sat) == "none" and verdict(sat, Status.UNKNOWN) == "unchecked"


def test_discover_rejects_unknown_families(vnncomp_dir):
    from certkit.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown family nope"):
        discover(vnncomp_dir, families=["nope"])


# ------------------------------------------------------------------ real instances with known answers


REAL = [  # (family, instance index, ground truth): quick ones covering attack, CROWN and both splits
    ("acasxu", 0, "unsat"),
    ("tllverifybench_2022", 3, "unsat"),
    ("tllverifybench_2022", 0, "sat"),
    ("reach_prob_density_2022", 0, "unsat"),
    ("reach_prob_density_2022", 4, "sat"),
    ("rl_benchmarks_2022", 0, "unsat"),
    ("acasxu", 19, "sat"),  # PGD over the whole box stalls at a margin of 0.0014; PGD inside sub-boxes finds it
    ("acasxu", 23, "sat"),  # violated only in ~1% of one input's range: found by splitting the child whose best
    #                         candidate point is closest to the unsafe set first (plain depth first: timeout at 116 s)
    ("acasxu", 14, "unsat"),  # input splitting with the 25% width guard timed out at 116 s (155,041 domains
    #                           in 190 s); with the 2% guard about 1,300 domains
    ("acasxu", 22, "sat"),  # violated in 13 of 160,000 grid points of one face; PGD restarts all stall at 5.4e-4
    ("collins_rul_cnn_2022", 18, "sat"),  # 380 of its 400 inputs are fixed at values float32 cannot hold
    ("collins_rul_cnn_2022", 20, "sat"),  # output flat at every random start: PGD from CROWN's minimiser corners
    ("eran_2021", 36, "unsat"),  # sigmoid 6x200: needs α-CROWN's tangent points on every layer (CROWN: −31)
]


@pytest.mark.parametrize("family,index,truth", REAL)
def test_real_instances_get_the_ground_truth_answer(family, index, truth, vnncomp_dir):
    fam = vnncomp_dir / family
    onnx, vnn, _ = list(csv.reader(open(fam / "instances.csv")))[index]
    gt = list(csv.DictReader(open(fam / "ground_truth.csv")))[index]
    assert gt["ground_truth"] == truth
    res = Solver(fam / onnx).solve(read_vnnlib(fam / vnn), timeout=60)
    assert res.status.vnncomp == truth, res.log
    if (family, index) == ("acasxu", 19):
        assert res.stage == "input-split", res.log
    if (family, index) == ("eran_2021", 36):
        assert res.stage == "alpha-crown", res.log
    if (family, index) == ("collins_rul_cnn_2022", 20):
        assert "minimisers" in res.log[-1], res.log
    if truth == "sat":
        y = Oracle(fam / onnx, Solver(fam / onnx).input_shape).outputs(res.x[None])[0]
        assert in_unsafe_set(read_vnnlib(fam / vnn).cases[0], y)


def _mnist_fc(index: int, vnncomp_dir, timeout: float):
    fam = vnncomp_dir / "mnist_fc_2022"
    onnx, vnn, _ = list(csv.reader(open(fam / "instances.csv")))[index]
    return Solver(fam / onnx).solve(read_vnnlib(fam / vnn), timeout=timeout)


def test_milp_refinement_decides_mnist_fc_59(vnncomp_dir):
    """mnist_fc 256×4 #59 (ε = 0.05, unsat), measured at this 150 s limit (7bd60d6): the first
    slice of ReLU splitting leaves it open (2,365 domains); the refinement window (28 s: the
    second layer by branch and bound over the first layer's phases, every search closed in 17 s,
    then MILP for the third and fourth) tightens 205 bounds and stabilises 35 neurons, and
    α-CROWN from those intervals refutes it at once (50 s in all). Before the branching, MILP
    alone needed splitting again afterwards (82 s at a 120 s limit)."""
    res = _mnist_fc(59, vnncomp_dir, timeout=150)
    assert res.status is Status.VERIFIED, res.log
    assert any("MILP refinement" in line for line in res.log), res.log


def test_relu_splitting_that_finishes_quickly_skips_the_milp_refinement(vnncomp_dir):
    """mnist_fc #25 (unsat) needs about 90 domains from α-CROWN's intervals (7 s; 29 s when the
    MILP refinement ran first): the first slice of ReLU splitting (a tenth of the time left)
    decides it, and the MILP refinement, which takes a quarter of the time left, never runs."""
    res = _mnist_fc(25, vnncomp_dir, timeout=300)
    assert res.status is Status.VERIFIED and res.stage == "relu-split", res.log
    assert not any("MILP" in line for line in res.log), res.log


def test_worker_reports_an_internal_error_with_its_traceback(tmp_path, monkeypatch, capsys, vnncomp_dir):
    """A bug in the solver is answered 'error' (never a verdict), and the log names where it happened."""
    from certkit.complete import solver
    from certkit.vnncomp import worker

    def broken(self, prop, timeout, log=None):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(solver.Solver, "solve", broken)
    fam = vnncomp_dir / "rl_benchmarks_2022"
    onnx, prop = next(csv.reader(open(fam / "instances.csv")))[:2]
    out = tmp_path / "res.txt"
    assert worker.main([str(fam / onnx), str(fam / prop), str(out), str(time.time() + 30), "rl", "1", "cpu"]) == 3
    assert out.read_text().strip() == "error"
    err = capsys.readouterr().err
    assert "internal error" in err and "injected failure" in err and "Traceback" in err


def test_a_worker_killed_by_a_signal_is_an_error_and_the_log_says_so(tmp_path, monkeypatch, capsys):
    """A child that dies without writing (a native crash, the OOM killer) is answered 'error', and the
    log records how it ended."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -9 $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    out, log = tmp_path / "res.txt", tmp_path / "res.log"
    assert run_instance("m.onnx", "p.vnnlib", timeout=20, results=out, log_file=log) is Status.ERROR
    assert out.read_text().strip() == "error"
    assert "killed by signal 9 (SIGKILL)" in log.read_text()
    assert run_instance("m.onnx", "p.vnnlib", timeout=20, results=out) is Status.ERROR  # no log file: stderr
    assert "killed by signal 9 (SIGKILL)" in capsys.readouterr().err


def test_the_run_instance_parent_imports_neither_torch_nor_onnx(vnncomp_dir, tmp_path):
    """The parent only checks its options, starts the solver and waits: torch's import (seconds)
    belongs to the child alone."""
    fam = vnncomp_dir / "acasxu"
    onnx, prop = next(csv.reader(open(fam / "instances.csv")))[:2]
    args = ["run-instance", str(fam / onnx), str(fam / prop), "--timeout", "10", "--results", "r.txt"]
    code = textwrap.dedent(f"""
        import sys
        from unittest import mock
        import certkit.vnncomp.instance as inst
        from certkit.status import Status
        seen = []
        def fake(*a, **k):
            seen.extend(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules)
            return Status.VERIFIED
        with mock.patch.object(inst, 'run_instance', fake):
            from certkit.cli import main
            try:
                main({args!r})
            except SystemExit as e:
                assert not e.code, e.code
        print(seen)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
