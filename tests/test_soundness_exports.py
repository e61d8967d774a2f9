"""Random networks built from the operators of exported models (hypothesis): activations of
every family, LayerNorm, Softmax / LogSoftmax, gated products, attention, element-wise max and
min. Every method's output bounds, and every node's interval (IBP, CROWN, α-CROWN), contain
the values of thousands of points sampled in random boxes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from certkit.bounds import METHODS, BoundedModel
from tests.test_soundness import SETTINGS, assert_inside, gen_of, init_params, node_values, random_box, sample_box

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVATIONS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1), "relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(-0.5, 0.7),
    "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish, "elu": lambda: nn.ELU(0.8), "softplus": nn.Softplus,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "silu": nn.SiLU, "prelu": lambda: nn.PReLU(1, 0.3),
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU,
}


class Gated(nn.Module):
    """h · σ(W h) (squeeze-excitation style), h · h, h / (1 + |g|), max(h, g), min(h, g)."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(d, 6), nn.Linear(d, 6), nn.Linear(6, 3)
        self.kind = kind

    def forward(self, x):
        h, g = self.a(x), self.b(x)
        if self.kind == "gate":
            y = h * torch.sigmoid(g)
        elif self.kind == "square":
            y = h * h
        elif self.kind == "quotient":
            y = h / (1 + torch.abs(g))
        elif self.kind == "max":
            y = torch.maximum(h, g)
        else:
            y = torch.minimum(h, g)
        return self.out(y)


class NormHead(nn.Module):
    """Linear → LayerNorm → activation → Linear → Softmax or LogSoftmax (or nothing)."""

    def __init__(self, d: int, act: str, head: str):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, 8), nn.LayerNorm(8), nn.Linear(8, 4)
        self.act, self.head = ACTIVATIONS[act](), head

    def forward(self, x):
        y = self.fc2(self.act(self.norm(self.fc1(x))))
        if self.head == "softmax":
            return torch.softmax(y, -1)
        return torch.log_softmax(y, -1) if self.head == "log_softmax" else y


class Attention(nn.Module):
    """One head of self-attention over ``n`` tokens of ``d`` features, mean-pooled."""

    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(d, 4), nn.Linear(d, 4), nn.Linear(d, 4), nn.Linear(4, 3)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2.0, -1)
        return self.out((att @ self.v(x)).mean(1))


def check_network(model: nn.Module, shape: tuple[int, ...], seed: int, eps_max: float) -> None:
    gen = gen_of(seed)
    init_params(model, gen)
    lo, up = random_box(shape, 2, gen, eps_max=eps_max)
    pts = sample_box(lo, up, 1500, gen)
    B, n = pts.shape[:2]
    flat = pts.reshape(B * n, *shape)
    with torch.no_grad():
        out = model(flat).reshape(B, n, -1)
    bm = BoundedModel(model)
    for method in METHODS:
        lb, ub = bm.compute_bounds(lo, up, method=method)
        assert not torch.isnan(lb).any() or method == "ibp", f"{method}: NaN bounds"
        assert_inside(f"{method} outputs", out, lb.detach(), ub.detach())
    values = node_values(model, flat)
    for method, alpha in (("ibp", 0), ("crown", 0), ("crown", 3)):
        bounds = bm.intervals(lo, up, method, alpha_iterations=alpha)
        for name, (lo_n, up_n) in bounds.items():
            if name in values:  # nodes a rule added (LayerNorm's parts, ...) have no fx value
                v = values[name].reshape(B, n, *lo_n.shape[1:])
                assert_inside(f"{method}/{alpha} interval of {name}", v, lo_n.detach(), up_n.detach())


@settings(max_examples=len(ACTIVATIONS) * 3, **SETTINGS)
@given(act=st.sampled_from(sorted(ACTIVATIONS)), act2=st.sampled_from(sorted(ACTIVATIONS)), d=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_activation_mlps_sound(act, act2, d, seed):
    model = nn.Sequential(nn.Linear(d, 7), ACTIVATIONS[act](), nn.Linear(7, 5), ACTIVATIONS[act2](), nn.Linear(5, 3))
    check_network(model, (d,), seed, eps_max=1.0)


@settings(max_examples=30, **SETTINGS)
@given(kind=st.sampled_from(["gate", "square", "quotient", "max", "min"]), d=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_products_and_extrema_sound(kind, d, seed):
    check_network(Gated(d, kind), (d,), seed, eps_max=1.0)


@settings(max_examples=25, **SETTINGS)
@given(act=st.sampled_from(["relu", "gelu", "tanh", "leaky_relu"]),
       head=st.sampled_from(["softmax", "log_softmax", "none"]), d=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_and_softmax_heads_sound(act, head, d, seed):
    check_network(NormHead(d, act, head), (d,), seed, eps_max=0.3)


@settings(max_examples=15, **SETTINGS)
@given(tokens=st.integers(2, 4), d=st.integers(2, 4), seed=st.integers(0, 2**31 - 1))
def test_attention_sound(tokens, d, seed):
    check_network(Attention(d), (tokens, d), seed, eps_max=0.2 / math.sqrt(d))
