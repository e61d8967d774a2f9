"""Second-layer bounds by branch and bound over the first layer's ReLU phases: sound on samples
whenever the search stops, exact when it finishes (against an exhaustive grid), and what
``milp.refine`` uses for the second layer when asked to."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certkit.bounds import BoundedModel
from certkit.complete.layer2 import BranchStats, branch_bounds
from certkit.complete.milp import refine, relu_layers
from tests.test_vnncomp import _mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_layers(seed: int, n_in: int, hidden: int, n2: int):
    """Random first and second layers (float64) with biases that leave many ReLUs unstable."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(hidden, n_in, generator=g, dtype=torch.float64)
    b1 = 0.3 * torch.randn(hidden, generator=g, dtype=torch.float64)
    W2 = torch.randn(n2, hidden, generator=g, dtype=torch.float64)
    b2 = 0.3 * torch.randn(n2, generator=g, dtype=torch.float64)
    return W1, b1, W2, b2


def _bounds(W1, b1, W2, b2, lo, up, expired=lambda: False, stats=None):
    """Lower and upper bounds of every second-layer neuron on the box, by branching."""
    cx, rx = (up + lo) / 2, (up - lo) / 2
    l1, u1 = W1 @ cx + b1 - W1.abs() @ rx, W1 @ cx + b1 + W1.abs() @ rx
    C, k = torch.cat([W2, -W2]), torch.cat([b2, -b2])
    value = branch_bounds(W1, b1, l1, u1, lo, up, C, k, expired, stats=stats)
    n = W2.shape[0]
    return value[:n], -value[n:]


def _second_layer(W1, b1, W2, b2, x):
    return torch.relu(x @ W1.T + b1) @ W2.T + b2


def _stops_after(calls: int):
    count = [0]

    def expired() -> bool:
        count[0] += 1
        return count[0] > calls

    return expired


@pytest.mark.parametrize("seed", range(3))
def test_finished_search_matches_an_exhaustive_grid_of_a_two_input_network(seed):
    """Two inputs, 24 first-layer neurons: every search closes, and each bound is the true
    extremum up to the grid's resolution (or past 0, where the neuron is stable), far tighter
    than the root's (LP) bounds."""
    W1, b1, W2, b2 = _two_layers(seed, 2, 24, 16)
    lo, up = -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    stats = BranchStats()
    lower, upper = _bounds(W1, b1, W2, b2, lo, up, stats=stats)
    root_lower, root_upper = _bounds(W1, b1, W2, b2, lo, up, expired=lambda: True)
    axis = torch.linspace(-1, 1, 801, dtype=torch.float64)
    z = _second_layer(W1, b1, W2, b2, torch.cartesian_prod(axis, axis))
    zmin, zmax = z.min(0).values, z.max(0).values
    assert stats.closed == stats.objectives == 32, stats
    assert bool((lower <= zmin + 1e-9).all()) and bool((upper >= zmax - 1e-9).all())
    slack = 0.01 * (zmax - zmin) + 1e-3  # grid spacing 0.0025 times the neuron's slope, generously
    # a search stops once its neuron is stable (a lower bound ≥ 0, an upper one ≤ 0): exact elsewhere
    assert bool(torch.where(zmin < 0, lower >= zmin - slack, lower >= 0).all()), (lower, zmin)
    assert bool(torch.where(zmax > 0, upper <= zmax + slack, upper <= 0).all()), (upper, zmax)
    assert float((root_upper - root_lower - (upper - lower)).sum()) > 0.1  # branching did tighten them


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_in=st.integers(2, 6), hidden=st.integers(4, 30),
       calls=st.integers(1, 12), width=st.floats(0.1, 2.0))
def test_bounds_hold_on_samples_and_corners_wherever_the_search_stops(seed, n_in, hidden, calls, width):
    W1, b1, W2, b2 = _two_layers(seed, n_in, hidden, 8)
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(n_in, generator=g, dtype=torch.float64)
    lo, up = centre - width, centre + width
    lower, upper = _bounds(W1, b1, W2, b2, lo, up, expired=_stops_after(calls))
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * n_in)
    x = lo + (up - lo) * torch.cat([corners, torch.rand(20_000, n_in, generator=g, dtype=torch.float64)])
    z = _second_layer(W1, b1, W2, b2, x)
    assert bool((z >= lower - 1e-9).all()), "a sampled point lies below a lower bound"
    assert bool((z <= upper + 1e-9).all()), "a sampled point lies above an upper bound"


def test_refine_branches_on_the_second_layer_and_the_intervals_still_hold():
    """``refine`` with ``branch_expired``: the second layer comes from the branching (every
    search of this small network closes); all intervals hold on samples and none is looser
    than CROWN's."""
    n_in = 4
    model = _mlp(3, n_in, (24, 24)).double()
    bm = BoundedModel(model, (n_in,)).to(torch.float64)
    lo, up = -torch.ones(1, n_in, dtype=torch.float64), torch.ones(1, n_in, dtype=torch.float64)
    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
        layers = relu_layers(bm, crown)
        refined, stats = refine(bm, lo, up, crown, lambda: False,
                                lambda known: bm.intervals(lo, up, "crown", known=known), 2.0, workers=1,
                                branch_expired=lambda: False)
    assert stats.branch is not None and stats.branch.objectives > 0
    assert stats.branch.closed == stats.branch.objectives, stats.branch
    x = lo + (up - lo) * torch.rand(50_000, n_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values, h = [], x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, torch.nn.Linear):
                values.append(h)
    tighter = 0
    for L, z in zip(layers, values):
        (cl, cu), (rl, ru) = crown[L.pre], refined[L.pre]
        assert bool((z >= rl.reshape(-1)).all()) and bool((z <= ru.reshape(-1)).all()), L.pre
        assert bool((rl >= cl).all()) and bool((ru <= cu).all()), "refinement loosened an interval"
        tighter += int(((rl > cl + 1e-3) | (ru < cu - 1e-3)).sum())
    assert tighter > 0
