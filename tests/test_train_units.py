"""Unit tests of the training method's pieces, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from certkit.bounds import BoundedModel
from certkit.train.data import augment
from certkit.train.init import ibp_init, ibp_sigma
from certkit.train.metrics import MetricsFile
from certkit.train.models import build_model, num_params
from certkit.train.regularizers import robust_loss, warmup_regularizers
from certkit.train.schedule import SmoothedEps

EPS = 8 / 255


def test_schedule_cifar_recipe_by_hand():
    # CIFAR-10: 50000 / 128 -> L = 391 batches, start=2, length=80.
    # init = 391, final = 81·391 = 31671, midstep = 391 + floor(31280 / 4) = 8211,
    # a = ε / (7820³ · (23460·4 + 7820)) = ε / (7820³ · 101660), ε_mid = a·7820⁴ = ε·7820/101660 = ε/13.
    s = SmoothedEps(EPS, start=2, length=80, batches_per_epoch=391)
    assert s(0) == 0 and s(390) == 0 and s(391) == 0
    assert s(392) == pytest.approx(EPS / (7820**3 * 101660), rel=1e-9)
    assert s(391 + 3910) == pytest.approx(EPS * 3910**4 / (7820**3 * 101660), rel=1e-9)  # = ε/208
    assert s(391 + 3910) == pytest.approx(EPS / 208, rel=1e-9)
    assert s(8211) == pytest.approx(EPS / 13, rel=1e-9)
    assert s(8211 + 11730) == pytest.approx(EPS * 7 / 13, rel=1e-9)  # halfway along the linear part
    assert s(31671) == pytest.approx(EPS) and s(31672) == EPS and s(10**6) == EPS
    assert s.in_warmup(81) and not s.in_warmup(82)


def test_schedule_mnist_recipe_starts_at_once():
    s = SmoothedEps(0.4, start=1, length=20, batches_per_epoch=235)
    assert s(0) == 0 and s(1) > 0 and s(20 * 235) == pytest.approx(0.4)
    values = [s(i) for i in range(0, 21 * 235, 97)]
    assert values == sorted(values)


def test_schedule_of_a_few_steps_is_linear():
    """Two batches per epoch and a one-epoch ramp: no room for the polynomial start (it divided by 0)."""
    s = SmoothedEps(0.3, start=1, length=1, batches_per_epoch=2)
    assert [s(i) for i in range(4)] == [0.0, pytest.approx(0.15), pytest.approx(0.3), 0.3]
    for steps in range(1, 9):  # every short ramp rises monotonically to eps_max
        s = SmoothedEps(0.3, start=2, length=1, batches_per_epoch=steps)
        values = [s(i) for i in range(4 * steps)]
        assert values == sorted(values) and values[-1] == 0.3


def test_ibp_sigma_values():
    assert ibp_sigma(27) == pytest.approx(math.sqrt(2 * math.pi) / 27)
    assert ibp_sigma(576) == pytest.approx(0.0043519, rel=1e-4)  # 2.50663 / 576
    # the difference gain n·E|W|/2 with E|W| = σ√(2/π) is exactly 1
    for n in (27, 576, 1152, 32768):
        assert n * ibp_sigma(n) * math.sqrt(2 / math.pi) / 2 == pytest.approx(1.0)


def test_ibp_init_on_cnn7_keeps_classifier_and_biases():
    torch.manual_seed(0)
    model = build_model("cnn7", "cifar10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bm = BoundedModel(model, (3, 32, 32))
    names = ibp_init(model, bm.graph)
    assert len(names) == 6  # 5 convs + the hidden linear; the classifier is untouched
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for layer in convs[:-1]:
        fan_in = layer.weight[0].numel()
        gain = fan_in * layer.weight.detach().abs().mean().item() / 2
        assert gain == pytest.approx(1.0, abs=0.05), (layer, gain)
    sd = model.state_dict()
    last_w = [k for k in sd if k.endswith("weight") and sd[k].dim() == 2][-1]
    assert torch.equal(sd[last_w], before[last_w])
    for k in sd:
        if k.endswith("bias") and "running" not in k and sd[k].dim() == 1 and k in before:
            is_bn = k.replace("bias", "running_mean") in sd
            if not is_bn:
                assert torch.equal(sd[k], before[k]), k


def test_ibp_init_halves_layers_after_residual_add():
    torch.manual_seed(0)
    model = build_model("wide-resnet", "cifar10")
    bm = BoundedModel(model, (3, 32, 32))
    ibp_init(model, bm.graph)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "ResidualBlock"]
    # block 2's first conv and shortcut read ReLU(Add(...)) of block 1: gain 1/2; block 1 reads the stem: gain 1
    def gain(conv):
        return conv.weight[0].numel() * conv.weight.detach().abs().mean().item() / 2

    assert gain(blocks[0].body[0]) == pytest.approx(1.0, abs=0.05)
    assert gain(blocks[1].body[0]) == pytest.approx(0.5, abs=0.03)
    assert gain(blocks[1].shortcut[0]) == pytest.approx(0.5, abs=0.03)
    assert gain(blocks[1].body[3]) == pytest.approx(1.0, abs=0.05)  # second conv reads a plain ReLU
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert gain(head[0]) == pytest.approx(0.5, abs=0.03)  # Flatten(ReLU(Add)) feeds the hidden linear


def test_regularizers_by_hand():
    box = (torch.zeros(1, 2), torch.full((1, 2), 0.2))  # Δ̂0 = 0.1
    l1 = (torch.tensor([[1.0, -3, -1, 2]]), torch.tensor([[3.0, -1, 1, 4]]))
    # c = [2, -2, 0, 3], d = 1 -> tightness term relu(0.5 - 0.1)/0.5 = 0.8
    # α = (2+3)/2 = 2.5 -> 0.4 -> relu(0.1); mean c = 0.75, β = (1.5625+5.0625)/7.5625 = 0.876 -> relu(-) = 0
    # layer term (0.1 + 0)/0.5 = 0.2
    l2 = (torch.tensor([[-2.0, -1]]), torch.tensor([[-1.0, 0.5]]))
    # d = [0.5, 0.75] mean 0.625 -> relu(0.5 - 0.16)/0.5 = 0.68; no active: α' = β' = 0 -> (0.5 + 0.5)/0.5 = 2
    l3 = (torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    # d = 1 -> 0.8; no active and no inactive: α = 0/0 = NaN -> layer skipped in L_relu
    r = warmup_regularizers(box, [l1, l2, l3], tau=0.5)
    assert float(r.tightness) == pytest.approx((0.8 + 0.68 + 0.8) / 3)
    assert float(r.relu) == pytest.approx((0.2 + 2.0) / 3)
    assert r.fractions.T.tolist() == [[0.5, 0.0, 0.0], [0.25, 0.5, 0.0], [0.25, 0.5, 1.0]]  # active, inactive, unstable


def test_regularizers_are_differentiable():
    lo = torch.tensor([[1.0, -3, -1, 2]], requires_grad=True)
    up = torch.tensor([[3.0, -1, 1, 4]], requires_grad=True)
    r = warmup_regularizers((torch.zeros(1, 2), torch.full((1, 2), 0.2)), [(lo, up)])
    (r.tightness + r.relu).backward()
    assert torch.isfinite(lo.grad).all() and lo.grad.abs().sum() > 0


def test_regularizer_gradients_stay_finite_when_a_layer_has_no_inactive_neuron():
    # α = Σ_active c / 0 = ∞ -> α' = 0, likewise β: the layer's term is (0.5 + 0.5)/0.5 = 2, a finite value
    # whose gradient through A/0 would be 0·∞ = NaN (it turned every weight into NaN on a GPU run)
    lo = torch.tensor([[1.0, 2.0, -1.0]], requires_grad=True)
    up = torch.tensor([[3.0, 4.0, 1.0]], requires_grad=True)
    r = warmup_regularizers((torch.zeros(1, 2), torch.full((1, 2), 0.2)), [(lo, up)])
    assert float(r.relu.detach()) == pytest.approx(2.0)
    (r.tightness + r.relu).backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(up.grad).all()


def test_robust_loss_by_hand():
    lb = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + 1 + math.exp(1))) / 2
    assert float(robust_loss(lb)) == pytest.approx(expected)


def test_paper_parameter_counts():
    assert round(num_params(build_model("cnn7", "cifar10")) / 1e6, 2) == 17.19
    assert round(num_params(build_model("cnn7", "mnist")) / 1e6, 2) == 13.26
    assert round(num_params(build_model("wide-resnet", "cifar10")) / 1e6, 2) == 21.55
    assert round(num_params(build_model("resnext", "cifar10")) / 1e6, 2) == 17.61


def test_bn_switch():
    with_bn = build_model("cnn-small", "mnist", bn=True)
    without = build_model("cnn-small", "mnist", bn=False)
    count = lambda m: sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())  # noqa: E731
    assert count(with_bn) == 3 and count(without) == 0


def test_augment_flips_and_crops_within_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = augment(x, 2, g)
    assert y.shape == x.shape
    # every output is a shifted crop of the edge-padded (possibly flipped) input: its centre pixels
    # (away from the border by the padding) appear in the original image
    for i in range(8):
        src = {round(v, 6) for v in x[i].flatten().tolist()}
        assert {round(v, 6) for v in y[i, :, 2:6, 2:6].flatten().tolist()} <= src


def test_skipped_nan_layer_leaves_gradients_finite():
    lo = torch.tensor([[-1.0, -2.0]], requires_grad=True)  # no active, no inactive neuron: α = 0/0
    up = torch.tensor([[1.0, 2.0]], requires_grad=True)
    lo2 = torch.tensor([[1.0, -3, -1, 2]], requires_grad=True)
    up2 = torch.tensor([[3.0, -1, 1, 4]], requires_grad=True)
    r = warmup_regularizers((torch.zeros(1, 2), torch.full((1, 2), 0.2)), [(lo, up), (lo2, up2)])
    (r.tightness + r.relu).backward()
    for t in (lo, up, lo2, up2):
        assert torch.isfinite(t.grad).all()


def assert_compiled_step_matches_eager(device: str, model: str, method: str, n: int, epsilons: tuple) -> None:
    """``--compile`` changes how the step runs, not what it computes: from the same start, over
    steps through the ε = 0 phase and the ramp, the compiled loss and statistics follow the eager
    ones, and dynamo really compiled (no silent fallback to eager). Shared with tests/test_cuda.py."""
    from torch._dynamo.utils import counters

    from certkit.train.loop import Splits, Trainer, config_from

    gen = torch.Generator().manual_seed(0)
    fake = (torch.randint(0, 256, (2 * n, 1, 28, 28), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (2 * n,), generator=gen))
    runs = {}
    for compile in (False, True):
        tr = Trainer(config_from("mnist", model=model, method=method, batch_size=n, device=device, compile=compile),
                     Splits(fake, fake, fake))
        assert tr.compiled == compile
        graphs = counters["stats"]["unique_graphs"]
        x, y = tr.batch(torch.arange(n))
        runs[compile] = [tr.step(x, y, eps, epoch=1) for eps in epsilons]
        assert (counters["stats"]["unique_graphs"] > graphs) == compile
    for eager, compiled in zip(runs[False], runs[True]):
        for k in ("loss", "tightness", "relu", "clean_err"):
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(compiled["fractions"], eager["fractions"], rtol=0, atol=0.02)


def test_compiled_step_matches_eager_on_cpu():
    """torch.compile's default mode on a CPU (CUDA graphs on a GPU: tests/test_cuda.py)."""
    assert_compiled_step_matches_eager("cpu", "mlp", "fast", 32, (0.0, 0.1, 0.2))


def test_metrics_summary_reports_the_last_and_the_validation_picked_epoch(tmp_path):
    mf = MetricsFile(tmp_path / "metrics.h5")
    for epoch, (val, clean, verified, t) in enumerate([(30.0, 9.0, 40.0, 60.0), (20.0, 8.0, 30.0, 60.0),
                                                      (20.0, 7.0, 25.0, 120.0), (25.0, 6.0, 28.0, 60.0)], 1):
        mf.append({"epoch": epoch, "val_verified_err": val, "test_clean_err": clean, "test_verified_err": verified,
                   "train_time": t})
    assert mf.summary() == {"clean": 6.0, "verified": 28.0, "picked_clean": 8.0, "picked_verified": 30.0,
                            "picked_epoch": 2, "train_min": 5.0}  # a tie picks the first epoch, as best.pt does
