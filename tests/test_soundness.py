"""Property-based soundness of the bound engine.

Random small networks (MLPs, CNNs, residual blocks, normalisation layers, concatenation,
permutes, reshapes, batch norm with random statistics) and random boxes: every point
sampled in the box (and every corner of small boxes), pushed through the *plain torch
module*, must lie inside the bounds of every method, with and without a margin
specification, and every intermediate value must lie inside the interval that
``BoundedModel.intervals`` gives its node.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certkit.bounds import METHODS, BoundedModel, margin_matrix
from certkit.train.models import build_model

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
N_SAMPLES = 2000


def tol(v: torch.Tensor) -> torch.Tensor:
    """float32 rounding allowance, relative to the magnitude of the value."""
    return 1e-4 * (1 + v.abs())


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters far from the identity (weights of both signs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.8 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen) * 0.7 + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)


def random_box(shape: tuple[int, ...], batch: int, gen: torch.Generator, eps_max: float = 1.0):
    centre = torch.randn(batch, *shape, generator=gen)
    eps = torch.rand(batch, *([1] * len(shape)), generator=gen) * eps_max + 0.01
    # per-coordinate radii too, so the box is not a cube
    radius = eps * (0.25 + torch.rand(batch, *shape, generator=gen))
    return centre - radius, centre + radius


def sample_box(lo: torch.Tensor, up: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(B, n, *shape): n uniform points per box, plus all corners when a box has <= 8 coordinates."""
    B, shape = lo.shape[0], lo.shape[1:]
    u = torch.rand(B, n, *shape, generator=gen)
    pts = lo.unsqueeze(1) + (up - lo).unsqueeze(1) * u
    d = math.prod(shape)
    if d <= 8:
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d))).reshape(-1, *shape)
        pts = torch.cat([pts, lo.unsqueeze(1) + (up - lo).unsqueeze(1) * corners.unsqueeze(0)], 1)
    # the box centre, and the box's own end points, are in the box too
    pts = torch.cat([pts, ((lo + up) / 2).unsqueeze(1), lo.unsqueeze(1), up.unsqueeze(1)], 1)
    return pts


def node_values(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every intermediate value of the plain module, keyed by its torch.fx node name."""
    gm = fx.symbolic_trace(module)
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def assert_inside(name: str, v: torch.Tensor, lo: torch.Tensor, up: torch.Tensor) -> None:
    """v (B, n, ...) inside [lo, up] (B, ...) up to float32 rounding."""
    excess = torch.maximum(lo.unsqueeze(1) - v, v - up.unsqueeze(1))  # > 0 outside the bounds
    bad = excess > tol(v)
    if bad.any():
        i = int(torch.argmax(torch.where(bad, excess, torch.zeros_like(excess))))
        raise AssertionError(f"{name}: {int(bad.sum())} sampled values outside their bounds, the worst by "
                             f"{excess.flatten()[i].item():.3g} (value {v.flatten()[i].item():.6g})")


def check_bounds(lb, ub, shape, what):
    assert lb.shape == shape and ub.shape == shape, f"{what}: shapes {lb.shape} {ub.shape}, expected {shape}"
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), f"{what}: non-finite bounds"
    # equal up to rounding when the output is constant on the box (e.g. a train-mode batch norm whose
    # clean-batch variance is ~0 scales its input by 1/sqrt(eps) and amplifies float32 rounding)
    assert (lb <= ub + tol(ub)).all(), f"{what}: lb > ub by {(lb - ub).max().item():.3g}"


def check_soundness(model: nn.Module, lo: torch.Tensor, up: torch.Tensor, gen: torch.Generator,
                    x: torch.Tensor | None = None, reference: nn.Module | None = None,
                    n_samples: int = N_SAMPLES, methods=METHODS,
                    interval_methods=("ibp", "crown", "alpha-crown"),
                    stack_specs: bool = False) -> None:
    """All methods' bounds (plain and margin) and all node intervals contain the sampled behaviour.

    ``reference`` evaluates the samples (default: ``model`` itself); ``x`` is the clean batch
    for train-mode batch norm. ``stack_specs`` bounds the outputs and the margins in one call.
    """
    reference = model if reference is None else reference
    B = lo.shape[0]
    pts = sample_box(lo, up, n_samples, gen)
    n = pts.shape[1]
    flat = pts.reshape(B * n, *lo.shape[1:])
    with torch.no_grad():
        out = reference(flat)
    K = out[0].numel()
    out = out.reshape(B, n, K)
    labels = torch.randint(0, K, (B,), generator=gen)
    C_margin = margin_matrix(labels, K) if K > 1 else None
    margins = None if C_margin is None else torch.einsum("bsk,bnk->bns", C_margin, out)

    bm = BoundedModel(model)
    for method in methods:
        if stack_specs and C_margin is not None:
            C = torch.cat([torch.eye(K).expand(B, K, K), C_margin], 1)
            lb, ub = bm.compute_bounds(lo, up, method=method, C=C, x=x)
            check_bounds(lb, ub, (B, 2 * K - 1), method)
            assert_inside(f"{method} outputs", out, lb[:, :K].detach(), ub[:, :K].detach())
            assert_inside(f"{method} margins", margins, lb[:, K:].detach(), ub[:, K:].detach())
            continue
        lb, ub = bm.compute_bounds(lo, up, method=method, x=x)
        check_bounds(lb, ub, (B, K), method)
        assert_inside(f"{method} outputs", out, lb.detach(), ub.detach())
        if C_margin is not None:
            lb, ub = bm.compute_bounds(lo, up, method=method, C=C_margin, x=x)
            check_bounds(lb, ub, (B, K - 1), f"{method} margin")
            assert_inside(f"{method} margins", margins, lb.detach(), ub.detach())
            lb2, _ = bm.compute_bounds(lo, up, method=method, C=C_margin, x=x, bound_upper=False)
            assert torch.allclose(lb2, lb, atol=1e-5, rtol=1e-5)
        if method != "ibp":  # the raw CROWN bound, before intersecting with IBP, is sound too
            lb, ub = bm.compute_bounds(lo, up, method=method, x=x, intersect=False)
            check_bounds(lb, ub, (B, K), f"{method} raw")
            assert_inside(f"{method} raw outputs", out, lb.detach(), ub.detach())
            if C_margin is not None:
                lb, ub = bm.compute_bounds(lo, up, method=method, C=C_margin, x=x, intersect=False)
                check_bounds(lb, ub, (B, K - 1), f"{method} raw margin")
                assert_inside(f"{method} raw margins", margins, lb.detach(), ub.detach())

    if not interval_methods:
        return
    values = node_values(reference, flat)
    for method in interval_methods:
        if x is not None:
            bm(x)  # train-mode batch norms use the statistics of the last clean forward
        if method == "alpha-crown":  # CROWN intermediate bounds with their own optimised slopes
            bounds = bm.intervals(lo, up, "crown", alpha_iterations=3)
        else:
            bounds = bm.intervals(lo, up, method)
        assert set(bounds) <= set(values), f"graph nodes {set(bounds) - set(values)} not in the fx trace"
        assert len(bounds) == len(bm.graph.nodes)
        for name, (lo_n, up_n) in bounds.items():
            assert torch.isfinite(lo_n).all() and torch.isfinite(up_n).all(), f"{method} {name}: non-finite"
            v = values[name].reshape(B, n, *lo_n.shape[1:])
            assert_inside(f"{method} interval of {name}", v, lo_n.detach(), up_n.detach())


def gen_of(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def init_params(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Deterministic weights (independent of the global torch seed), random BN statistics, eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    randomize_bn(model, gen)
    return model.eval()


# ------------------------------------------------------------------------ networks

seeds = st.integers(0, 2**31 - 1)
batches = st.integers(2, 3)


@st.composite
def mlps(draw):
    d_in = draw(st.integers(1, 12))
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 10), min_size=depth, max_size=depth))
    bn = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    bias = draw(st.booleans())
    k = draw(st.integers(1, 5))
    layers: list[nn.Module] = []
    fin = d_in
    for w, use_bn in zip(widths, bn, strict=True):
        layers.append(nn.Linear(fin, w, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(w, affine=draw(st.booleans())))
        layers.append(nn.ReLU())
        fin = w
    layers.append(nn.Linear(fin, k))
    return nn.Sequential(*layers), (d_in,)


def _conv_out(h, k, s, p, d):
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


class Normalize(nn.Module):
    """(x - mean) / std per channel, then a multiplication by a constant (scalar or per channel)."""

    def __init__(self, mean, std, scale, mode: int):
        super().__init__()
        self.register_buffer("mean", mean.view(-1, 1, 1))
        self.register_buffer("std", std.view(-1, 1, 1))
        self.register_buffer("scale", scale)
        self.mode = mode

    def forward(self, x):
        x = (x - self.mean) / self.std
        if self.mode == 0:
            return x * self.scale
        if self.mode == 1:
            return self.scale * x
        if self.mode == 2:
            return 2.0 * x + 0.5
        return 1.0 - x / 3.0


class FunctionalPool(nn.Module):
    """F.avg_pool2d called as a function (keyword arguments), not as a module."""

    def __init__(self, kernel, stride, padding, ceil_mode, count_include_pad):
        super().__init__()
        self.args = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad)

    def forward(self, x):
        return F.avg_pool2d(x, **self.args)


@st.composite
def cnn_models(draw):
    c = draw(st.integers(1, 3))
    h = draw(st.integers(3, 8))
    w = draw(st.integers(3, 8))
    shape = (c, h, w)
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        mean, std = torch.linspace(-0.3, 0.4, c), torch.linspace(0.2, 0.5, c)
        layers.append(Normalize(mean, std, torch.tensor(0.7), draw(st.integers(0, 3))))

    def pair(lo, hi):  # square most of the time, sometimes one value per spatial dimension
        a = draw(st.integers(lo, hi))
        return (a, draw(st.integers(lo, hi))) if draw(st.integers(0, 3)) == 0 else (a, a)

    for _ in range(draw(st.integers(1, 2))):
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        if c % groups:
            groups = 1
        cout = groups * draw(st.integers(1, 3))
        k, s, p, d = pair(1, 3), pair(1, 2), pair(0, 2), pair(1, 2)
        if _conv_out(h, k[0], s[0], p[0], d[0]) < 1 or _conv_out(w, k[1], s[1], p[1], d[1]) < 1:
            k, d = (1, 1), (1, 1)
        layers += [nn.Conv2d(c, cout, k, s, p, d, groups, bias=draw(st.booleans())),
                   nn.BatchNorm2d(cout, affine=draw(st.booleans())), nn.ReLU()]
        c, h, w = cout, _conv_out(h, k[0], s[0], p[0], d[0]), _conv_out(w, k[1], s[1], p[1], d[1])
        if min(h, w) >= 2 and draw(st.booleans()):
            pk = (2, draw(st.integers(1, 2)))
            ps = pair(1, 2)
            pp = (draw(st.integers(0, 1)), 0)
            ceil, cip = draw(st.booleans()), draw(st.booleans())
            pool = FunctionalPool if draw(st.booleans()) else nn.AvgPool2d
            layers.append(pool(pk, ps, pp, ceil, cip))
            h, w = F.avg_pool2d(torch.zeros(1, c, h, w), pk, ps, pp, ceil).shape[-2:]
    k_out = draw(st.integers(2, 4))
    layers += [nn.Flatten(), nn.Linear(c * h * w, k_out)]
    return nn.Sequential(*layers), shape


class ResBlock(nn.Module):
    """relu(body(x) ± shortcut(x)); the shortcut is the identity or a 1x1 conv (+ BN)."""

    def __init__(self, c: int, cout: int, stride: int, subtract: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if c == cout and stride == 1
                         else nn.Sequential(nn.Conv2d(c, cout, 1, stride), nn.BatchNorm2d(cout)))
        self.subtract = subtract
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.body(x)
        s = self.shortcut(x)
        return self.relu(y - s if self.subtract else y + s)


@st.composite
def residual_models(draw):
    c = draw(st.integers(1, 3))
    h = draw(st.integers(3, 6))
    shape = (c, h, h)
    mode = draw(st.integers(0, 3))
    mean = torch.linspace(-0.5, 0.5, c)
    std = torch.linspace(0.3, 0.9, c)
    scale = torch.tensor(-1.7) if draw(st.booleans()) else torch.linspace(0.5, -1.5, c).view(-1, 1, 1)
    layers: list[nn.Module] = [Normalize(mean, std, scale, mode)]
    for _ in range(draw(st.integers(1, 2))):
        cout = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        layers.append(ResBlock(c, cout, stride, subtract=draw(st.booleans())))
        c, h = cout, _conv_out(h, 3, stride, 1, 1)
    layers += [nn.Flatten(), nn.Linear(c * h * h, draw(st.integers(2, 4)))]
    return nn.Sequential(*layers), shape


class MLPResidual(nn.Module):
    """Add and Sub of two bounded tensors on vectors: out = L3(relu(L1 x) + L2 x) - relu(L4 x)."""

    def __init__(self, d: int, w: int, k: int):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(w, k), nn.Linear(d, k)
        self.bn = nn.BatchNorm1d(w)

    def forward(self, x):
        y = self.bn(F.relu(self.l1(x)) + self.l2(x))
        return self.l3(F.relu(y)) - F.relu(self.l4(x))


class CatNet(nn.Module):
    """Two branches concatenated along channels, mixed by a conv, and along width (negative dim)."""

    def __init__(self, c: int, a: int, b: int, hw: int, k: int, width_cat: bool):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(c, a, 3, 1, 1), nn.BatchNorm2d(a), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(c, b, 1), nn.BatchNorm2d(b))
        self.mix = nn.Conv2d(a + b, 2, 3, 1, 1)
        self.width_cat = width_cat
        self.fc = nn.Linear((a + b + 2) * hw * hw if width_cat else 2 * hw * hw, k)

    def forward(self, x):
        y = torch.cat([self.b1(x), self.b2(x)], dim=1)
        z = F.relu(self.mix(y))
        if self.width_cat:
            z = torch.cat([F.relu(y), z], 1)
        return self.fc(torch.flatten(z, 1))


class PermuteNet(nn.Module):
    """Channels-last Linear via permute, a transpose of H and W, a ReLU between them."""

    def __init__(self, c: int, hw: int, k: int):
        super().__init__()
        self.lin = nn.Linear(c, 3)
        self.conv = nn.Conv2d(3, 2, (2, 1))
        self.fc = nn.Linear(2 * (hw - 1) * hw, k)

    def forward(self, x):
        y = F.relu(self.lin(x.permute(0, 2, 3, 1)))  # (B, H, W, 3)
        y = y.permute(0, 3, 1, 2).transpose(2, 3)  # (B, 3, W, H)
        y = F.relu(self.conv(y))
        return self.fc(y.flatten(1))


class ReshapeNet(nn.Module):
    """A vector viewed as an image, convolved, unsqueezed/squeezed, concatenated on its last dim, flattened."""

    def __init__(self, side: int, k: int):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(1, 2, 2)
        self.lin = nn.Linear((side - 1) ** 2, 3)
        self.fc = nn.Linear(12, k)

    def forward(self, x):
        y = x.view(x.size(0), 1, self.side, self.side)
        y = F.relu(self.conv(y))  # (B, 2, s-1, s-1)
        y = y.reshape(x.shape[0], 2, -1).unsqueeze(1)  # (B, 1, 2, (s-1)^2)
        y = F.relu(self.lin(y)).squeeze(1)  # (B, 2, 3)
        y = torch.cat([y, 1 - 2 * y], dim=-1)  # (B, 2, 6): concatenation along the last dimension
        return self.fc(torch.flatten(y, 1))


# -------------------------------------------------------------------------- tests


def check_drawn_model(spec, batch: int, seed: int, eps_max: float = 1.0) -> None:
    """Soundness of a drawn (model, input shape) with seeded parameters on a seeded random box."""
    model, shape = spec
    gen = gen_of(seed)
    init_params(model, gen)
    lo, up = random_box(shape, batch, gen, eps_max=eps_max)
    check_soundness(model, lo, up, gen)


@settings(max_examples=100, **SETTINGS)
@given(spec=mlps(), batch=batches, seed=seeds)
def test_mlp_sound(spec, batch, seed):
    check_drawn_model(spec, batch, seed)


@settings(max_examples=80, **SETTINGS)
@given(spec=cnn_models(), batch=batches, seed=seeds)
def test_cnn_sound(spec, batch, seed):
    check_drawn_model(spec, batch, seed)


@settings(max_examples=40, **SETTINGS)
@given(spec=residual_models(), batch=batches, seed=seeds)
def test_residual_sound(spec, batch, seed):
    check_drawn_model(spec, batch, seed, eps_max=0.5)


@settings(max_examples=40, **SETTINGS)
@given(d=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(1, 3), batch=batches, seed=seeds)
def test_mlp_add_sub_sound(d, w, k, batch, seed):
    gen = gen_of(seed)
    model = init_params(MLPResidual(d, w, k), gen)
    lo, up = random_box((d,), batch, gen)
    check_soundness(model, lo, up, gen)


@settings(max_examples=40, **SETTINGS)
@given(c=st.integers(1, 3), a=st.integers(1, 3), b=st.integers(1, 3), hw=st.integers(2, 5), k=st.integers(2, 3),
       width_cat=st.booleans(), batch=batches, seed=seeds)
def test_concat_sound(c, a, b, hw, k, width_cat, batch, seed):
    gen = gen_of(seed)
    model = init_params(CatNet(c, a, b, hw, k, width_cat), gen)
    lo, up = random_box((c, hw, hw), batch, gen)
    check_soundness(model, lo, up, gen)


@settings(max_examples=30, **SETTINGS)
@given(c=st.integers(1, 3), hw=st.integers(2, 5), k=st.integers(2, 3), batch=batches, seed=seeds)
def test_permute_sound(c, hw, k, batch, seed):
    gen = gen_of(seed)
    model = init_params(PermuteNet(c, hw, k), gen)
    lo, up = random_box((c, hw, hw), batch, gen)
    check_soundness(model, lo, up, gen)


@settings(max_examples=30, **SETTINGS)
@given(side=st.integers(2, 5), k=st.integers(1, 3), batch=batches, seed=seeds)
def test_reshape_sound(side, k, batch, seed):
    gen = gen_of(seed)
    model = init_params(ReshapeNet(side, k), gen)
    lo, up = random_box((side * side,), batch, gen)
    check_soundness(model, lo, up, gen)


def _bn_stats_reference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """An eval-mode copy of a train-mode model whose running statistics are the clean batch's.

    In train mode the engine normalises with the mean and biased variance that each batch
    norm sees on the clean batch ``x``; the copy evaluates samples with exactly that affine map.
    """
    ref = copy.deepcopy(model).train()
    seen: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.__setitem__(m, inp[0].detach()))
             for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    ref.eval()
    with torch.no_grad():
        for m, v in seen.items():
            dims = [0] + list(range(2, v.dim()))
            m.running_mean.copy_(v.mean(dims))
            m.running_var.copy_(v.var(dims, unbiased=False))
    return ref


@settings(max_examples=50, **SETTINGS)
@given(spec=st.one_of(mlps(), cnn_models()), batch=batches, seed=seeds)
def test_train_mode_batchnorm_sound(spec, batch, seed):
    model, shape = spec
    gen = gen_of(seed)
    init_params(model, gen)
    model.train()
    x = torch.randn(4, *shape, generator=gen)
    reference = _bn_stats_reference(model, x)
    lo, up = random_box(shape, batch, gen)
    check_soundness(model, lo, up, gen, x=x, reference=reference)


@pytest.mark.parametrize("name,dataset", [("cnn-small", "mnist"), ("cnn-small", "cifar10"), ("mlp", "mnist")])
@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_model_zoo_sound(name, dataset, eps):
    gen = gen_of(1234)
    torch.manual_seed(0)
    model = build_model(name, dataset)
    randomize_bn(model, gen)
    model.eval()
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    x = torch.rand(2, *shape, generator=gen)
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    # full-CROWN intermediate intervals are costly on the CIFAR model: check them on MNIST
    interval_methods = ("ibp", "crown") if dataset == "mnist" else ("ibp",)
    check_soundness(model, lo, up, gen, n_samples=2000, interval_methods=interval_methods, stack_specs=True)


def test_networks_cover_every_node_kind():
    """The families above exercise every operator kind of the graph."""
    models = [
        (nn.Sequential(Normalize(torch.zeros(2), torch.ones(2), torch.tensor(2.0), 0), ResBlock(2, 2, 1, True),
                       ResBlock(2, 3, 2, False), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3, 2)), (2, 4, 4)),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), (3,)),
        (MLPResidual(3, 4, 2), (3,)),
        (CatNet(2, 2, 2, 3, 2, True), (2, 3, 3)),
        (PermuteNet(2, 3, 2), (2, 3, 3)),
        (ReshapeNet(3, 2), (9,)),
    ]
    kinds = set()
    for model, shape in models:
        bm = BoundedModel(model.eval())
        bm(torch.zeros(1, *shape))
        kinds |= {n.op.kind for n in bm.graph.nodes[1:]}
    assert kinds == {"linear", "conv", "affine", "batchnorm", "reshape", "permute", "concat", "avgpool", "add", "sub",
                     "relu"}
