"""MILP refinement of intermediate bounds: sound on samples, exact on small networks, tighter
than CROWN, and not applied where the network has other nonlinearities."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from certkit.bounds import BoundedModel
from certkit.complete.milp import _Program, affine_layer, layer_intervals, refine, relu_layers
from tests.test_vnncomp import _mlp as _vnncomp_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, n_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    return _vnncomp_mlp(seed, n_in, hidden).double()


def _pre_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.Linear):
            out.append(x)
    return out[:-1]


def _refined(model: nn.Sequential, lo: torch.Tensor, up: torch.Tensor, seconds: float = 5.0):
    bm = BoundedModel(model, tuple(lo.shape[1:])).to(torch.float64)
    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
        layers = relu_layers(bm, crown)
        refined, stats = refine(bm, lo, up, crown, lambda: False,
                                lambda known: bm.intervals(lo, up, "crown", known=known), seconds, workers=2)
    return [crown[L.pre] for L in layers], [refined[L.pre] for L in layers], stats


@pytest.mark.parametrize("seed", range(3))
def test_refined_intervals_hold_on_samples_and_box_corners_and_beat_crown(seed):
    n_in = 5
    model = _mlp(seed, n_in, (20, 20, 20))
    lo, up = -torch.ones(1, n_in, dtype=torch.float64), torch.ones(1, n_in, dtype=torch.float64)
    crown, refined, stats = _refined(model, lo, up, seconds=0.3)  # stopped early: the solver's dual bound
    g = torch.Generator().manual_seed(seed)
    corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * n_in)
    x = torch.cat([corners, 2 * torch.rand(50_000, n_in, generator=g, dtype=torch.float64) - 1])
    with torch.no_grad():
        values = _pre_activations(model, x)
    tighter = 0
    for (cl, cu), (rl, ru), z in zip(crown, refined, values):
        rl, ru, cl, cu = rl.reshape(-1), ru.reshape(-1), cl.reshape(-1), cu.reshape(-1)
        assert bool((z >= rl).all()) and bool((z <= ru).all()), "a sampled point lies outside a refined interval"
        assert bool((rl >= cl).all()) and bool((ru <= cu).all()), "refinement loosened an interval"
        tighter += int(((rl > cl + 1e-3) | (ru < cu - 1e-3)).sum())
    assert stats.bounds > 0 and stats.tightened > 0 and tighter > 0, stats


def test_refined_bounds_of_a_two_input_network_match_an_exhaustive_grid():
    """With enough solver time the program is exact: each refined bound of the second layer is
    within the grid's resolution of the true extremum, where CROWN's are not."""
    model = _mlp(7, 2, (16, 16))
    lo, up = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    crown, refined, _ = _refined(model, lo, up, seconds=10.0)
    axis = torch.linspace(-1, 1, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        z = _pre_activations(model, grid)[1]
    zmin, zmax = z.min(0).values, z.max(0).values
    (rl, ru), (cl, cu) = (t.reshape(-1) for t in refined[1]), (t.reshape(-1) for t in crown[1])
    unstable = (cl < 0) & (cu > 0)
    assert int(unstable.sum()) > 0
    slack = 0.01 * (zmax - zmin) + 1e-3  # grid spacing 0.0025 times the neuron's slope, generously
    assert bool((rl <= zmin + 1e-9).all()) and bool((ru >= zmax - 1e-9).all())
    assert bool((rl[unstable] >= zmin[unstable] - slack[unstable]).all())
    assert bool((ru[unstable] <= zmax[unstable] + slack[unstable]).all())
    assert float((cu - cl)[unstable].sum()) > float((ru - rl)[unstable].sum()) + 1e-3


def test_the_whole_network_program_bounds_property_rows_exactly():
    """The program of every ReLU layer with a property's rows over the output as objective
    (benchmarks/whole_network_milp.py): each proven minimum of c·y lies at or below every
    grid value and within the grid's resolution of the smallest, where CROWN's is looser."""
    model = _mlp(3, 2, (12, 12))
    lo, up = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    bm = BoundedModel(model, (2,)).to(torch.float64)
    C = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.5, 2.0, -1.0]], dtype=torch.float64)
    axis = torch.linspace(-1, 1, 801, dtype=torch.float64)
    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
        layers = relu_layers(bm, crown)
        rows = affine_layer(bm, crown, bm.graph.output, C)
        crown_lb, _ = bm.spec_bounds(crown, C.unsqueeze(0), "crown", bound_upper=False)
        y = model(torch.cartesian_prod(axis, axis)) @ C.T
    program = _Program(layers, len(layers), bm.graph.input.name, lo.reshape(-1).numpy(), up.reshape(-1).numpy(),
                       layer_intervals(crown, layers))
    proven = torch.tensor([program.bound(rows, i, 1.0, 10.0) for i in range(C.shape[0])], dtype=torch.float64)
    ymin, ymax = y.min(0).values, y.max(0).values
    assert bool((proven <= ymin + 1e-6).all()), (proven, ymin)
    assert bool((proven >= ymin - 0.01 * (ymax - ymin) - 1e-3).all()), (proven, ymin)
    assert float((proven - crown_lb[0]).max()) > 1e-3, (proven, crown_lb)


def test_networks_with_other_nonlinearities_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    bm = BoundedModel(model, (3,)).to(torch.float64)
    lo, up = -torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    with torch.no_grad():
        bounds = bm.intervals(lo, up, "crown")
        assert relu_layers(bm, bounds) is None
        same, stats = refine(bm, lo, up, bounds, lambda: False, lambda known: known)
    assert same is bounds and stats.bounds == 0


def test_refinement_stops_at_the_first_layer_after_which_done_says_so():
    """``done`` is asked after every refined layer with the re-propagated intervals; once it
    says yes no later layer is refined (the solver stops as soon as α-CROWN refutes the
    property), and the intervals it saw are the ones returned."""
    n_in = 4
    model = _mlp(4, n_in, (12, 12, 12, 12))
    bm = BoundedModel(model, (n_in,)).to(torch.float64)
    lo, up = -torch.ones(1, n_in, dtype=torch.float64), torch.ones(1, n_in, dtype=torch.float64)
    seen = []

    def done(bounds):
        seen.append(bounds)
        return len(seen) == 2

    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
        refined, stats = refine(bm, lo, up, crown, lambda: False,
                                lambda known: bm.intervals(lo, up, "crown", known=known), 1.0, workers=1, done=done)
        _, full = refine(bm, lo, up, crown, lambda: False,
                         lambda known: bm.intervals(lo, up, "crown", known=known), 1.0, workers=1)
    assert stats.done and stats.layers == 2 and len(seen) == 2 and refined is seen[-1]
    assert full.layers == 3 and not full.done


def test_milp_takes_the_highest_priority_neurons_first():
    """With time for two bounds only, the neuron ``priority`` scores highest is the one
    refined, whichever is most balanced."""
    n_in = 3
    model = _mlp(5, n_in, (16, 16))
    bm = BoundedModel(model, (n_in,)).to(torch.float64)
    lo, up = -torch.ones(1, n_in, dtype=torch.float64), torch.ones(1, n_in, dtype=torch.float64)
    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
        layers = relu_layers(bm, crown)
        cl, cu = (t.reshape(-1) for t in crown[layers[1].pre])
    unstable = ((cl < 0) & (cu > 0)).nonzero().squeeze(1)
    assert unstable.numel() >= 2
    balanced = unstable[torch.minimum(-cl[unstable], cu[unstable]).argmax()]
    target = int(unstable[unstable != balanced][0])
    for chosen, priority in ((int(balanced), None), (target, {layers[1].pre: (torch.arange(cl.numel()) == target)
                                                             .double().numpy()})):
        calls = []

        def expired(calls=calls):
            calls.append(1)
            return len(calls) > 3  # asked once before the layer, then before each bound: two bounds

        with torch.no_grad():
            refined, stats = refine(bm, lo, up, crown, expired, lambda known: known, 5.0, workers=1,
                                    priority=None if priority is None else (lambda b, p=priority: p))
        rl, ru = (t.reshape(-1) for t in refined[layers[1].pre])
        moved = ((rl > cl + 1e-9) | (ru < cu - 1e-9)).nonzero().squeeze(1).tolist()
        assert stats.bounds == 2 and moved == [chosen], (chosen, moved, stats)
