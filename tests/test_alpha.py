"""α-CROWN: never looser than CROWN, strictly tighter somewhere, sound by sampling."""

from __future__ import annotations

import torch
import torch.nn as nn

from certkit.bounds import BoundedModel, margin_matrix


def test_alpha_crown_tightens_and_stays_sound():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    bm = BoundedModel(model)
    x = torch.randn(4, 6)
    lo, up = x - 0.5, x + 0.5
    C = margin_matrix(torch.tensor([0, 1, 2, 3]), 5)
    with torch.no_grad():
        lc, uc = bm.compute_bounds(lo, up, "crown", C=C)
    la, ua = bm.compute_bounds(lo, up, "alpha-crown", C=C)
    assert (la >= lc - 1e-6).all() and (ua <= uc + 1e-6).all()
    assert (la > lc + 1e-3).any()  # the optimisation actually moved something
    pts = lo.unsqueeze(1) + (up - lo).unsqueeze(1) * torch.rand(4, 5000, 6)
    with torch.no_grad():
        out = model(pts.reshape(-1, 6)).reshape(4, 5000, 5)
    margins = torch.einsum("bsk,bnk->bns", C, out)
    assert (margins >= la.unsqueeze(1) - 1e-5).all() and (margins <= ua.unsqueeze(1) + 1e-5).all()
    assert not la.requires_grad


def test_alpha_intermediate_bounds_tighten_and_stay_sound():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 5)).eval()
    bm = BoundedModel(model, (6,))
    x = torch.randn(2, 6)
    lo, up = x - 0.4, x + 0.4
    with torch.no_grad():
        crown = bm.intervals(lo, up, "crown")
    alpha = bm.intervals(lo, up, "crown", alpha_iterations=20)
    pts = (lo.unsqueeze(1) + (up - lo).unsqueeze(1) * torch.rand(2, 5000, 6)).reshape(-1, 6)
    pre_values = []  # the inputs of the three ReLUs, (2, 5000, 32) each
    with torch.no_grad():
        h = pts
        for layer in list(model)[:-1]:
            if isinstance(layer, nn.ReLU):
                pre_values.append(h.reshape(2, 5000, -1))
            h = layer(h)
    pre = [n.inputs[0] for n in bm.graph.nodes[1:] if n.op.kind == "relu"]
    gained = 0.0
    for k, (name, v) in enumerate(zip(pre, pre_values, strict=True)):
        (lc, uc), (la, ua) = crown[name], alpha[name]
        assert (la <= v.min(1).values + 1e-5).all() and (ua >= v.max(1).values - 1e-5).all(), name
        # lower bounds are refined only where the upper bound stays positive (a ReLU input ≤ 0 needs none)
        wanted = ua > 0
        if k == 1:
            # from the same earlier intervals, α starts at CROWN's slopes and keeps the best: never looser.
            # Deeper, the earlier intervals differ (α's are tighter), and CROWN's adaptive slopes are not
            # monotone in them: a neuron may come out looser, so only the sum is compared there
            assert (la[wanted] >= lc[wanted] - 1e-5).all() and (ua <= uc + 1e-5).all(), name
        gained += float((la - lc)[wanted].sum() + (uc - ua).sum())
    assert gained > 1e-2  # the deeper layers' intervals shrank


def test_alpha_slopes_receive_gradient_at_default_values():
    # CROWN's default slopes are exactly 0 or 1, where clamp has no gradient: the engine must pass it through.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    bm = BoundedModel(model, (3,))
    lo, up = -torch.ones(1, 3), torch.ones(1, 3)
    bounds = bm.intervals(lo, up, "crown")
    relu = next(n for n in bm.graph.nodes if n.op is not None and n.op.kind == "relu")
    pre_lo, pre_up = bounds[relu.inputs[0]]
    slopes = {relu.name: relu.op.default_alpha(pre_lo, pre_up).unsqueeze(1).expand(1, 2, 8).clone()
              .requires_grad_(True)}
    lb, _ = bm.spec_bounds(bounds, None, "crown", bound_upper=False, intersect=False, alphas=slopes)
    lb.sum().backward()
    assert slopes[relu.name].grad.abs().sum() > 0


def test_alpha_crown_with_train_mode_batchnorm_leaves_model_gradients_alone():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    bm = BoundedModel(model)
    x = torch.randn(8, 4)
    lb, ub = bm.compute_bounds(x - 0.3, x + 0.3, "alpha-crown", x=x)
    assert torch.isfinite(lb).all() and (lb <= ub).all()
    assert all(p.grad is None for p in model.parameters())
