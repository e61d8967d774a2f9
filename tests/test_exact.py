"""Exact values of the bound engine: affine networks, hand-computed IBP/CROWN bounds,
ordering of the methods, the margin matrix, and gradients of the training bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from certkit.bounds import METHODS, BoundedModel, compute_bounds, margin_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def set_linear(layer: nn.Linear, weight, bias) -> nn.Linear:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Deterministic weights and batch-norm statistics far from the identity; eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 1.5 / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.8 + 0.2)
                m.weight.copy_(torch.randn(n, generator=gen) * 0.7 + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


def random_box(shape, batch, gen, eps=0.5):
    centre = torch.randn(batch, *shape, generator=gen)
    radius = eps * (0.1 + torch.rand(batch, *shape, generator=gen))
    return centre - radius, centre + radius


# ----------------------------------------------------------------- affine networks


class Normalize(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("mean", torch.linspace(0.1, 0.6, c).view(-1, 1, 1))
        self.register_buffer("std", torch.linspace(0.2, 0.4, c).view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std * -1.5


class AffineGraph(nn.Module):
    """Every affine node kind on a DAG: cat, permute, channels-last Linear, Add, Sub, reshape."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize(2)
        self.a = nn.Conv2d(2, 2, 3, 1, 1)
        self.b = nn.Conv2d(2, 4, 1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.lin = nn.Linear(6, 3)
        self.skip = nn.Conv2d(2, 3, 3, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):  # x: (B, 2, 4, 4)
        x = self.norm(x)
        y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
        y = self.lin(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 3, 4, 4)
        y = y + self.skip(x) - 0.5 * self.skip(x).transpose(2, 3)
        y = self.pool(y).unsqueeze(1).squeeze(1)  # (B, 3, 3, 3)
        return self.fc(y.reshape(y.size(0), -1))


AFFINE_NETS = {
    "linear-linear": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)), (5,)),
    "norm-linear-bn-linear": (lambda: nn.Sequential(Normalize(1), nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8),
                                                    nn.Linear(8, 8), nn.Linear(8, 4)), (1, 3, 4)),
    "norm-conv-flatten-linear": (lambda: nn.Sequential(Normalize(3), nn.Conv2d(3, 4, 3, 2, 1), nn.Flatten(),
                                                       nn.Linear(4 * 3 * 3, 5)), (3, 5, 5)),
    "conv-bn-pool-conv-linear": (lambda: nn.Sequential(
        Normalize(2), nn.Conv2d(2, 4, 3, 1, 2, dilation=2, groups=2), nn.BatchNorm2d(4),
        nn.AvgPool2d(2, 1, 1, count_include_pad=False), nn.Conv2d(4, 3, 2, 2), nn.Flatten(), nn.Linear(27, 3)),
        (2, 5, 5)),
    "affine-graph": (AffineGraph, (2, 4, 4)),
}


def exact_range(model: nn.Module, lo: torch.Tensor, up: torch.Tensor, C: torch.Tensor | None = None):
    """Exact range of an affine network over a box, in float64: f(c) ± |M| r with M its Jacobian."""
    f = copy.deepcopy(model).double().eval()
    lo, up = lo.double(), up.double()
    c, r = (lo + up) / 2, (up - lo) / 2
    lows, highs = [], []
    for b in range(lo.shape[0]):
        M = torch.func.jacrev(lambda z: f(z.unsqueeze(0)).reshape(-1))(c[b]).reshape(-1, c[b].numel())
        fc = f(c[b].unsqueeze(0)).reshape(-1)
        if C is not None:
            M, fc = C[b].double() @ M, C[b].double() @ fc
        rad = M.abs() @ r[b].reshape(-1)
        lows.append(fc - rad)
        highs.append(fc + rad)
    return torch.stack(lows), torch.stack(highs)


@pytest.mark.parametrize("name", list(AFFINE_NETS))
def test_crown_is_exact_on_affine_networks(name):
    make, shape = AFFINE_NETS[name]
    gen = torch.Generator().manual_seed(7)
    model = randomize(make(), gen)
    lo, up = random_box(shape, 3, gen)
    bm = BoundedModel(model)
    with torch.no_grad():
        out = model((lo + up) / 2)
    K = out.shape[1]
    C = margin_matrix(torch.tensor([0, K - 1, 1]), K)
    for spec in (None, C):
        exact_lb, exact_ub = exact_range(model, lo, up, spec)
        atol = 1e-5 * (1 + torch.maximum(exact_lb.abs(), exact_ub.abs()))
        for method in ("crown", "crown-ibp"):
            for intersect in (True, False):
                lb, ub = bm.compute_bounds(lo, up, method=method, C=spec, intersect=intersect)
                assert ((lb.double() - exact_lb).abs() <= atol).all(), (method, intersect, lb, exact_lb)
                assert ((ub.double() - exact_ub).abs() <= atol).all(), (method, intersect, ub, exact_ub)
        # IBP is sound but (with two or more mixing layers) looser
        lb, ub = bm.compute_bounds(lo, up, method="ibp", C=spec)
        assert (lb.double() <= exact_lb + atol).all() and (ub.double() >= exact_ub - atol).all()


def test_ibp_is_exact_with_one_mixing_layer():
    gen = torch.Generator().manual_seed(3)
    model = randomize(nn.Sequential(Normalize(3), nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.Flatten()), gen)
    lo, up = random_box((3, 5, 5), 2, gen)
    exact_lb, exact_ub = exact_range(model, lo, up)
    lb, ub = compute_bounds(model, lo, up, method="ibp")
    atol = 1e-5 * (1 + exact_ub.abs())
    assert ((lb.double() - exact_lb).abs() <= atol).all() and ((ub.double() - exact_ub).abs() <= atol).all()


def test_ibp_strictly_looser_on_two_linear_layers():
    # x in [-1, 1]^2, h = (x1 + x2, x1 - x2), y = h1 + h2 = 2 x1: exact [-2, 2];
    # IBP: h1, h2 in [-2, 2] so y in [-4, 4]; CROWN composes the layers: [-2, 2].
    model = nn.Sequential(set_linear(nn.Linear(2, 2), [[1, 1], [1, -1]], [0, 0]),
                          set_linear(nn.Linear(2, 1), [[1, 1]], [0]))
    lo, up = -torch.ones(1, 2), torch.ones(1, 2)
    lb, ub = compute_bounds(model, lo, up, "ibp")
    assert (lb.item(), ub.item()) == (-4.0, 4.0)
    lb, ub = compute_bounds(model, lo, up, "crown")
    assert (lb.item(), ub.item()) == (-2.0, 2.0)


# ---------------------------------------------------------------- hand-sized networks


def relu_net(*layers) -> nn.Sequential:
    """Linear layers given as (weight, bias) with ReLU between them."""
    mods: list[nn.Module] = []
    for i, (w, b) in enumerate(layers):
        mods.append(set_linear(nn.Linear(len(w[0]), len(w)), w, b))
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def bounds(bm, lo, up, method, **kw):
    lb, ub = bm.compute_bounds(torch.tensor([lo]), torch.tensor([up]), method=method, **kw)
    return lb.squeeze().item(), ub.squeeze().item()


def test_hand_crown_tighter_than_ibp():
    # y = 2 relu(x1 + x2) - relu(2 x1 + 2 x2)  (= 0 everywhere),  box x1, x2 in [-0.5, 1].
    bm = BoundedModel(relu_net(([[1, 1], [2, 2]], [0, 0]), ([[2, -1]], [0])))
    box = ([-0.5, -0.5], [1.0, 1.0])
    # IBP: h1 = x1 + x2 in [-1, 2], h2 = 2 x1 + 2 x2 in [-2, 4]; z1 in [0, 2], z2 in [0, 4];
    #      y = 2 z1 - z2 in [2*0 - 4, 2*2 - 0] = [-4, 4].
    assert bounds(bm, *box, "ibp") == (-4.0, 4.0)
    # CROWN, lower bound of y = 2 z1 - z2 (the first layer is exact, h1, h2 are unstable):
    #   z1 has coefficient +2 -> lower line; u = 2 >= -l = 1 -> slope 1: z1 >= h1.
    #   z2 has coefficient -1 -> upper line u/(u-l) (h - l) = 4/6 (h2 + 2) = 2/3 h2 + 4/3.
    #   y >= 2 h1 - 2/3 h2 - 4/3 = 2 s - 4/3 s - 4/3 = 2/3 s - 4/3 with s = x1 + x2 in [-1, 2]
    #   minimum at s = -1: -2/3 - 4/3 = -2.
    # Upper bound: -y = -2 z1 + z2:
    #   z1 coefficient -2 -> upper line 2/3 (h1 + 1): -4/3 h1 - 4/3; z2 coefficient +1 -> lower line,
    #   u = 4 >= -l = 2 -> slope 1: z2 >= h2.  -y >= -4/3 s - 4/3 + 2 s = 2/3 s - 4/3 >= -2, so y <= 2.
    for method in ("crown", "crown-ibp"):
        for intersect in (True, False):
            lb, ub = bounds(bm, *box, method, intersect=intersect)
            assert lb == pytest.approx(-2.0, abs=1e-6) and ub == pytest.approx(2.0, abs=1e-6)
    # with a specification C = [[-1]] the bounds of -y are [-2, 2] for CROWN and [-4, 4] for IBP
    C = -torch.ones(1, 1, 1)
    assert bounds(bm, *box, "ibp", C=C) == (-4.0, 4.0)
    lb, ub = bounds(bm, *box, "crown", C=C)
    assert lb == pytest.approx(-2.0, abs=1e-6) and ub == pytest.approx(2.0, abs=1e-6)


def test_hand_crown_ibp_and_crown_refinement():
    # x in [-1, 1];  z = relu([x, -x]);  g = z1 + z2 - 1 (= |x| - 1, true range [-1, 0]);
    # r = relu(g) (= 0);  o = 1 - 2 r (= 1 everywhere).
    bm = BoundedModel(relu_net(([[1], [-1]], [0, 0]), ([[1, 1]], [-1]), ([[-2]], [1])))
    box = ([-1.0], [1.0])
    # IBP: h in [-1, 1]^2, z in [0, 1]^2, g in [-1, 1], r in [0, 1], o = 1 - 2 r in [-1, 1].
    assert bounds(bm, *box, "ibp") == (-1.0, 1.0)
    # CROWN-IBP (intermediate intervals from IBP: h in [-1, 1], g in [-1, 1]):
    #   lower bound of o = 1 - 2 r: r has coefficient -2 -> upper line 1/2 (g + 1):
    #     o >= 1 - g - 1 = -g = 1 - z1 - z2; z1, z2 coefficient -1 -> upper lines 1/2 (h + 1):
    #     o >= 1 - (x + 1)/2 - (-x + 1)/2 = 0.                              lb = 0   (IBP: -1)
    #   upper bound: -o = 2 r - 1, r coefficient +2 -> lower line (u = 1 >= -l = 1: slope 1), r >= g:
    #     -o >= 2 g - 1 = 2 z1 + 2 z2 - 3 >= 2 x - 2 x - 3 = -3 (z >= h, slope 1): raw ub = 3,
    #     intersected with IBP: 1.
    assert bounds(bm, *box, "crown-ibp", intersect=False) == (0.0, 3.0)
    assert bounds(bm, *box, "crown-ibp") == (0.0, 1.0)
    # CROWN refines g before relaxing r:  g >= x - x - 1 = -1 (lower lines, slope 1),
    #   g <= (x + 1)/2 + (-x + 1)/2 - 1 = 0 (upper lines), so g in [-1, 0]: r is stably 0 and
    #   o in [1, 1], the exact value, both raw and intersected.
    assert bounds(bm, *box, "crown", intersect=False) == (1.0, 1.0)
    assert bounds(bm, *box, "crown") == (1.0, 1.0)
    g = [n.name for n in bm.graph.nodes if n.op is not None and n.op.kind == "linear"][1]
    lo, up = torch.tensor([box[0]]), torch.tensor([box[1]])
    assert [t.item() for t in bm.intervals(lo, up, "ibp")[g]] == [-1.0, 1.0]
    assert [t.item() for t in bm.intervals(lo, up, "crown")[g]] == [-1.0, 0.0]


def test_hand_relu_alpha_zero_and_alpha():
    # x in [-3, 1];  h = (x, x);  o = 2 relu(x) - relu(x)  (= relu(x), true range [0, 1]).
    bm = BoundedModel(relu_net(([[1], [1]], [0, 0]), ([[2, -1]], [0])))
    box = ([-3.0], [1.0])
    # IBP: z in [0, 1]^2, o in [0 - 1, 2 - 0] = [-1, 2].
    assert bounds(bm, *box, "ibp") == (-1.0, 2.0)
    # CROWN: u = 1 < -l = 3 -> lower slope 0; upper line 1/4 (h + 3).
    #   lb: z1 (coef 2) >= 0, z2 (coef -1) <= (x + 3)/4: o >= -(x + 3)/4 >= -1 (x = 1).
    #   ub: -o = -2 z1 + z2 >= -(x + 3)/2 + 0 >= -2 (x = 1): o <= 2.
    assert bounds(bm, *box, "crown", intersect=False) == (-1.0, 2.0)
    # alpha = 1 instead (lower line z >= h):
    #   lb: o >= 2 x - (x + 3)/4 = 7/4 x - 3/4 >= -6 (x = -3);
    #   ub: -o >= -(x + 3)/2 + x = x/2 - 3/2 >= -3 (x = -3): o <= 3.
    relu = next(n.name for n in bm.graph.nodes if n.op is not None and n.op.kind == "relu")
    ones = {relu: torch.ones(1, 2, 2)}  # (batch, specs: lower and upper rows, neurons)
    assert bounds(bm, *box, "crown", intersect=False, alphas=ones) == (-6.0, 3.0)
    assert bounds(bm, *box, "crown", alphas=ones) == (-1.0, 2.0)


# ------------------------------------------------------------------------ ordering


class Res(nn.Module):
    def __init__(self, d: int, w: int, k: int):
        super().__init__()
        self.l1, self.l2, self.bn = nn.Linear(d, w), nn.Linear(w, w), nn.BatchNorm1d(w)
        self.skip, self.out = nn.Linear(d, w), nn.Linear(w, k)

    def forward(self, x):
        y = F.relu(self.bn(self.l1(x)))
        y = F.relu(self.l2(y) + self.skip(x)) - F.relu(self.skip(x))
        return self.out(y)


def ordering_nets():
    yield "mlp", nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                               nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), (6,)
    yield "cnn", nn.Sequential(Normalize(2), nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, 2, 1, groups=2), nn.ReLU(), nn.AvgPool2d(2),
                               nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)), (2, 8, 8)
    yield "residual", Res(5, 8, 3), (5,)


@pytest.mark.parametrize("network", ["mlp", "cnn", "residual"])
def test_crown_bounds_a_batch_as_each_sample_alone(network):
    # every sample of a batch gets the intervals it gets alone, whatever else is in the batch: boxes
    # of three widths, so the samples' unstable neurons differ in number and place (rows padded per
    # sample, or per (sample, neuron) pair); in float64, where the batchings' rounding cannot hide
    # a difference. Lower bounds of neurons shown <= 0 may or may not be tightened (moot for a ReLU)
    _, net, shape = next(n for n in ordering_nets() if n[0] == network)
    gen = torch.Generator().manual_seed(3)
    model = randomize(net, gen).double()
    lo, up = (torch.cat(t) for t in zip(*(random_box(shape, 2, gen, eps=e) for e in (0.05, 0.3, 1.0))))
    lo, up = lo.double(), up.double()
    bm = BoundedModel(model)
    batch = bm.intervals(lo, up, "crown")
    alone = [bm.intervals(lo[i:i + 1], up[i:i + 1], "crown") for i in range(lo.shape[0])]
    tightened = 0
    for name in bm.pre_activation:
        lo_b, up_b = batch[name]
        lo_a, up_a = (torch.cat([a[name][j] for a in alone]) for j in (0, 1))
        torch.testing.assert_close(up_b, up_a, rtol=1e-9, atol=1e-9)
        live = up_a > 0
        torch.testing.assert_close(lo_b[live], lo_a[live], rtol=1e-9, atol=1e-9)
        tightened += int((up_a < bm.intervals(lo, up, "ibp")[name][1] - 1e-9).sum())
    assert tightened > 0  # not vacuous: CROWN changed some intervals


@pytest.mark.parametrize("seed", range(8))
def test_crown_never_looser_than_ibp(seed):
    """The ordering holds in exact arithmetic, so it is checked in float64: in float32 the two
    methods' different summation orders differ by ~10 ulps where they tie (cnn, seed 5: 1.9e-5
    on 16.86 on one CPU), more than any tolerance that still means 'never looser'."""
    for _, net, shape in ordering_nets():
        gen = torch.Generator().manual_seed(seed)
        model = randomize(net, gen).double()
        lo, up = (t.double() for t in random_box(shape, 3, gen, eps=[0.05, 0.3, 1.0][seed % 3]))
        bm = BoundedModel(model)
        K = model(lo).shape[1]
        C = margin_matrix(torch.randint(0, K, (3,), generator=gen), K)
        for spec in (None, C):
            lb_ibp, ub_ibp = bm.compute_bounds(lo, up, method="ibp", C=spec)
            for method in ("crown-ibp", "crown"):
                lb, ub = bm.compute_bounds(lo, up, method=method, C=spec)
                assert (lb >= lb_ibp - 1e-6 * (1 + lb_ibp.abs())).all(), (method, lb, lb_ibp)
                assert (ub <= ub_ibp + 1e-6 * (1 + ub_ibp.abs())).all(), (method, ub, ub_ibp)
        ibp = bm.intervals(lo, up, "ibp")
        crown = bm.intervals(lo, up, "crown")
        assert set(ibp) == set(crown) == {n.name for n in bm.graph.nodes}
        for name, (lo_i, up_i) in ibp.items():
            lo_c, up_c = crown[name]
            assert (lo_c >= lo_i - 1e-6 * (1 + lo_i.abs())).all(), name
            assert (up_c <= up_i + 1e-6 * (1 + up_i.abs())).all(), name
            assert (lo_c <= up_c + 1e-5 * (1 + up_c.abs())).all(), name


def test_crown_refinement_tightens_some_node():
    # sanity check that the ordering test is not vacuous: CROWN tightens deep intervals
    gen = torch.Generator().manual_seed(0)
    _, net, shape = next(ordering_nets())
    model = randomize(net, gen)
    lo, up = random_box(shape, 2, gen, eps=0.3)
    bm = BoundedModel(model)
    bm(lo)  # builds the graph (intervals() needs it built)
    ibp, crown = bm.intervals(lo, up, "ibp"), bm.intervals(lo, up, "crown")
    out = bm.graph.output
    assert ((crown[out][1] - crown[out][0]) < (ibp[out][1] - ibp[out][0]) - 1e-3).any()


# ------------------------------------------------------------------- margin matrix


def test_margin_matrix_explicit():
    C = margin_matrix(torch.tensor([2, 0]), 3)
    assert C.shape == (2, 2, 3)
    expected = torch.tensor([
        [[-1.0, 0.0, 1.0],   # y = 2: e2 - e0
         [0.0, -1.0, 1.0]],  #        e2 - e1
        [[1.0, -1.0, 0.0],   # y = 0: e0 - e1
         [1.0, 0.0, -1.0]],  #        e0 - e2
    ])
    assert torch.equal(C, expected)
    logits = torch.tensor([[1.0, 2.0, 5.0], [3.0, -1.0, 0.5]])
    margins = torch.einsum("bsk,bk->bs", C, logits)
    assert torch.equal(margins, torch.tensor([[4.0, 3.0], [4.0, 2.5]]))


def test_margin_matrix_shapes():
    C = margin_matrix([1], 2)
    assert torch.equal(C, torch.tensor([[[-1.0, 1.0]]]))
    C = margin_matrix(torch.arange(10), 10)
    assert C.shape == (10, 9, 10)
    assert torch.equal(C.sum(-1), torch.zeros(10, 9))  # each row is e_y - e_j
    for y in range(10):
        assert torch.equal(C[y, :, y], torch.ones(9))
        others = [j for j in range(10) if j != y]
        assert torch.equal(C[y][:, others], -torch.eye(9))


def test_margin_matrix_bounds_are_margin_bounds():
    # bounding C f over a point box gives exactly the margins f_y - f_j
    gen = torch.Generator().manual_seed(1)
    model = randomize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)), gen)
    x = torch.randn(3, 4, generator=gen)
    labels = torch.tensor([4, 0, 2])
    with torch.no_grad():
        f = model(x)
    expected = torch.stack([f[b, labels[b]] - f[b][torch.arange(5) != labels[b]] for b in range(3)])
    for method in METHODS:
        lb, ub = compute_bounds(model, x, x, method=method, C=margin_matrix(labels, 5))
        assert torch.allclose(lb, expected, atol=1e-5) and torch.allclose(ub, expected, atol=1e-5)


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("train", [False, True])
def test_bounds_are_differentiable(method, train):
    gen = torch.Generator().manual_seed(5)
    model = randomize(nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                                    nn.Linear(12, 4)), gen)
    model.train(train)
    x = torch.randn(4, 6, generator=gen)
    labels = torch.tensor([0, 1, 2, 3])
    lb, ub = compute_bounds(model, x - 0.2, x + 0.2, method=method, C=margin_matrix(labels, 4))
    loss = F.softplus(-lb).sum() + ub.mean()
    loss.backward()
    grad = model[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_bound_gradient_matches_finite_differences(method):
    gen = torch.Generator().manual_seed(11)
    model = randomize(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), gen)
    model = model.double()
    lo, up = random_box((3,), 2, gen, eps=0.4)
    lo, up = lo.double(), up.double()
    bm = BoundedModel(model)

    def objective():
        lb, ub = bm.compute_bounds(lo, up, method=method)
        return (lb * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum() + (ub ** 2).sum()

    objective().backward()
    w = model[0].weight
    grad = w.grad.clone()
    h = 1e-6
    for idx in [(0, 0), (1, 2), (2, 1), (4, 0)]:
        with torch.no_grad():
            w[idx] += h
            plus = objective().item()
            w[idx] -= 2 * h
            minus = objective().item()
            w[idx] += h
        assert grad[idx].item() == pytest.approx((plus - minus) / (2 * h), rel=1e-4, abs=1e-6)
    assert grad.abs().sum() > 0


# ------------------------------------------------------------ CROWN refinement batching


@pytest.mark.parametrize("network,alpha_iterations", [("acasxu", 0), ("acasxu", 3), ("cnn", 0)])
def test_per_pair_and_per_domain_refinement_agree(vnncomp_dir, network, alpha_iterations):
    # both batchings of CROWN's intermediate bounds give the same bound, pair by pair: branch and
    # bound's ACAS Xu sub-boxes (with and without α) and a random conv net (conv, grouped conv, batch
    # norm, average pooling) on boxes of different widths
    gen = torch.Generator().manual_seed(0)
    if network == "acasxu":
        bm = BoundedModel(vnncomp_dir / "acasxu" / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx").to(torch.float64)
        shape = bm.graph.input_shape
        lo = torch.rand(16, *shape, generator=gen, dtype=torch.float64) - 0.5
        up = lo + 0.02 * torch.rand(16, *shape, generator=gen, dtype=torch.float64)
    else:
        _, net, shape = next(n for n in ordering_nets() if n[0] == network)
        bm = BoundedModel(randomize(net, gen).double())
        lo, up = random_box(shape, 16, gen, eps=0.3)
        lo, up = lo.double(), up.double()
        bm(lo)  # builds the graph
    bounds = bm.intervals(lo, up, "ibp")  # IBP for the earlier nodes: valid, and the same for both
    compared = tightened = 0
    for name in sorted(bm.pre_activation, key=[n.name for n in bm.graph.nodes].index):
        ibp_lo, ibp_up = bounds[name]
        loose = (ibp_lo < 0) & (ibp_up > 0)
        pair = bm._crown_refine(name, ibp_lo, ibp_up, bounds, alpha_iterations, per_pair=True)
        batch = bm._crown_refine(name, ibp_lo, ibp_up, bounds, alpha_iterations, per_pair=False)
        # lower bounds are computed only where the new upper bound is still positive (a ReLU's input
        # at most 0 needs none); the per-neuron batching may have them elsewhere too
        wanted = (loose & (pair[1] > 0), loose)
        for p, b, ibp, w in zip(pair, batch, (ibp_lo, ibp_up), wanted):
            torch.testing.assert_close(p[w], b[w], rtol=1e-9, atol=1e-9)
            assert torch.equal(p[~loose], ibp[~loose])  # stable neurons are left as they were
        compared += int(loose.sum())
        tightened += int(((pair[1] - pair[0])[loose] < 0.99 * (ibp_up - ibp_lo)[loose]).sum())
    assert compared > 50 and tightened > 10  # not vacuous: many pairs, and CROWN tightened many of them
