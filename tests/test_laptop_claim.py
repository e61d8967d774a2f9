"""The paper's claim on a laptop: models by width and depth, the protocol script's table, the
ReLU layers' interval widths, and CROWN-IBP with loss fusion (sound, exact at ε = 0, trains)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor

from certkit.bounds import BoundedModel, margin_matrix
from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.export import export_checkpoint, read_metadata
from certkit.train.loop import Splits, TrainConfig, Trainer, config_from, load_checkpoint, train
from certkit.train.loss_fusion import exp_chord_slope, fused_ce_bound
from certkit.train.metrics import MetricsFile
from certkit.train.models import build_model, num_params
from certkit.train.regularizers import robust_loss
from certkit.train.widths import model_widths, relu_input_widths, widths_of
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import short_warmup  # noqa: E402  (benchmarks/short_warmup.py)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster on a shared CPU
TINY = dict(limit=300, val_size=100, eval_limit=100, batch_size=100, milestones=(3,))


# ------------------------------------------------------------------ models by width and depth


def test_cnn7_width_8_and_mlp_depth_6_have_the_stated_shapes():
    net = build_model("cnn7", "mnist", width=8)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 16]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 14 * 14, 128), (128, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 6
    assert num_params(net) == 409_682  # convs 6,472 + BN 384 + linear 401,536 + classifier 1,290
    deep = build_model("mlp", "mnist", depth=6, hidden=256)
    kinds = [type(m).__name__ for m in deep]
    assert kinds == ["Normalize", "Flatten", *["Linear", "BatchNorm1d", "ReLU"] * 6, "Linear"]
    assert [m.out_features for m in deep if isinstance(m, nn.Linear)] == [256] * 6 + [10]
    assert num_params(deep) == 784 * 256 + 5 * 256 * 256 + 6 * (256 + 2 * 256) + 256 * 10 + 10 == 535_562


def test_default_sizes_build_todays_models():
    for name, sizes in (("cnn7", dict(width=64)), ("mlp", dict(depth=2, hidden=256))):
        torch.manual_seed(0)
        default = build_model(name, "mnist").state_dict()
        torch.manual_seed(0)
        explicit = build_model(name, "mnist", **sizes).state_dict()
        assert list(default) == list(explicit) and all(torch.equal(default[k], explicit[k]) for k in default)
    assert num_params(build_model("cnn7", "mnist")) == 13_259_338  # the paper's CNN-7 (512-unit linear)


@pytest.mark.parametrize("sizes, message", [
    (dict(model="cnn7", width=0), "--width must be a whole number >= 1"),
    (dict(model="mlp", depth=0), "--depth must be a whole number >= 1"),
    (dict(model="cnn-small", width=8), "--width does not apply to model 'cnn-small'"),
    (dict(model="cnn7", hidden=128), "--hidden does not apply to model 'cnn7' (it takes --width)"),
    (dict(model="vanilla-net"), "unknown model 'vanilla-net'"),
])
def test_nonsense_sizes_are_refused(sizes, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from("mnist", **sizes)


def test_width_model_trains_exports_and_bounds(tmp_path, data_dir):
    """cnn7 --width 8: one epoch of two steps, the checkpoint and the ONNX file rebuild it."""
    cfg = config_from("mnist", model="cnn7", width=8, epochs=1, eps=0.1, schedule_length=1,
                      data_dir=str(data_dir), **TINY)
    train(cfg, tmp_path / "run", log=lambda *_: None)
    model, saved, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved.width == 8 and num_params(model) == 409_682
    out = tmp_path / "m.onnx"
    export_checkpoint(tmp_path / "run" / "last.pt", out, data_dir=str(data_dir), check_samples=8)
    meta = read_metadata(out)
    assert meta["model"] == "cnn7" and json.loads(meta["model_args"]) == {"width": 8}
    bm = BoundedModel(out)
    x = torch.rand(2, 1, 28, 28)
    lb, ub = bm.compute_bounds((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), "crown-ibp")
    with torch.no_grad():
        y = model(x)
    assert len(bm.graph.relus) == 6 and (lb <= y + 1e-4).all() and (y <= ub + 1e-4).all()


def test_cli_trains_mlp_by_depth_and_refuses_nonsense(tmp_path, data_dir):
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--dataset", "mnist", "--model", "mlp", "--depth", "6", "--hidden", "32",
                                  "--epochs", "1", "--limit", "300", "--val-size", "100", "--eval-limit", "100",
                                  "--batch-size", "100", "--eps", "0.1", "--schedule", "1,1",
                                  "--data-dir", str(data_dir), "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "mlp-d6-h32" in r.output
    saved = json.loads((run / "config.json").read_text())
    assert (saved["depth"], saved["hidden"], saved["width"]) == (6, 32, None)
    model, _, _ = load_checkpoint(run / "last.pt")
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 6
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(run / "last.pt"), str(out), "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads(read_metadata(out)["model_args"]) == {"depth": 6, "hidden": 32}
    assert len(BoundedModel(out).graph.relus) == 6
    for args, message in ((["--model", "cnn7", "--width", "0"], "--width must be a whole number >= 1"),
                          (["--model", "cnn-small", "--depth", "3"], "--depth does not apply to model 'cnn-small'"),
                          (["--method", "vanilla", "--loss-fusion"], "loss fusion applies to --method crown-ibp")):
        r = CliRunner().invoke(main, ["train", "--dataset", "mnist", *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


# ------------------------------------------------------------------ the protocol script's table


def test_protocol_table_on_tiny_runs(tmp_path, data_dir):
    """Two seeds of both methods on a tiny budget through the script's functions: the table's
    numbers are the runs' own, the paired differences are fast − vanilla, and the widths of both
    moments (before training, the ramp's last epoch) were logged."""
    seeds = [0, 1]
    results = {}
    for seed in seeds:
        for method in ("vanilla", "fast"):
            cfg = short_warmup.run_config("cnn7-cpu", seed, method, model="mlp", depth=2, hidden=16,
                                          epochs=3, schedule_start=1, schedule_length=2, data_dir=str(data_dir),
                                          **TINY)
            run = tmp_path / f"{method}-s{seed}"
            short_warmup.train_run(cfg, run)
            results[method, seed] = short_warmup.summarize_run(run)
    r = results["fast", 1]
    m = MetricsFile(tmp_path / "fast-s1" / "metrics.h5").read()
    assert r["tightness"] == m["tightness"][1] and r["relu"] == m["relu"][1]  # the ramp's last epoch: 2
    assert r["wall_min"] >= r["train_min"] > 0 and len(r["widths_init"]) == len(r["widths_ramp"]) == 2
    assert set(widths_of(tmp_path / "fast-s1")) == {0, 2}
    assert set(MetricsFile(tmp_path / "fast-s1" / "metrics.h5").notes()["wall_time"]) == {1, 2, 3}
    text = short_warmup.report(results, seeds, cfg)
    paired = text.split("paired difference")[1].splitlines()
    for seed, line in zip(seeds, paired[2:4]):
        cells = [results["fast", seed][k] - results["vanilla", seed][k] for k, _ in short_warmup.ERRORS]
        assert line.split() == [str(seed), *(f"{d:+.2f}" for d in cells)]
    assert "MNIST, mlp-h16, eps 0.4 (train 0.4), 3 epochs, ramp start 1 length 2" in text
    assert "fast     epoch 2" in text and "vanilla  init" in text
    for method in ("vanilla", "fast"):
        mean = short_warmup.mean_std([results[method, s]["clean"] for s in seeds])
        assert f"{method:8s}  mean" in text and mean in text
    fig = short_warmup.draw_widths(results, seeds, ["vanilla", "fast"], 0.4)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["vanilla, init", "vanilla, epoch 2", "fast, init", "fast, epoch 2"]
    mean = [(a + b) / 2 for a, b in zip(results["fast", 0]["widths_ramp"], results["fast", 1]["widths_ramp"])]
    assert lines[3].get_ydata() == pytest.approx(mean)
    blank = {key: dict(r, widths_init=None, widths_ramp=None) for key, r in results.items()}
    assert short_warmup.draw_widths(blank, seeds, ["vanilla", "fast"], 0.4) is None
    other = short_warmup.run_config("cnn7-cpu", 0, "fast", model="mlp", depth=3, hidden=16, data_dir=str(data_dir),
                                    **TINY)
    with pytest.raises(SystemExit, match="another configuration"):
        short_warmup.train_run(other, tmp_path / "fast-s0")


def test_fusion_comparison_trains_crown_ibp_with_and_without_fusion():
    """``--compare fusion``: both arms are CROWN-IBP on the protocol's budget, only loss fusion differs."""
    (first, a), (second, b) = short_warmup.COMPARISONS["fusion"]
    cfgs = [short_warmup.run_config("cnn7-cpu", 0, **arm) for arm in (a, b)]
    assert (first, second) == ("unfused", "fused")
    assert [c.method for c in cfgs] == ["crown-ibp"] * 2 and [c.use_loss_fusion for c in cfgs] == [False, True]
    assert dataclasses.replace(cfgs[0], loss_fusion=True) == cfgs[1]
    assert not cfgs[0].use_ibp_init and short_warmup.run_config("cnn7-cpu", 0, **a, ibp_init=True).use_ibp_init


def test_metrics_notes_merge_and_follow_truncation(tmp_path):
    mf = MetricsFile(tmp_path / "metrics.h5")
    for epoch in (1, 2, 3):
        notes = {"wall_time": {epoch: 10.0 * epoch}, "relu_widths": {0: [1.0]} if epoch == 1 else {}}
        mf.append({"epoch": epoch, "loss": 1.0 / epoch}, notes)
    assert mf.notes() == {"wall_time": {1: 10.0, 2: 20.0, 3: 30.0}, "relu_widths": {0: [1.0]}}
    mf.truncate(2)  # a resume from epoch 2's checkpoint
    assert mf.notes() == {"wall_time": {1: 10.0, 2: 20.0}, "relu_widths": {0: [1.0]}}
    assert list(mf.read()) == ["epoch", "loss"]  # notes are no datasets


def test_mean_std_over_seeds():
    assert short_warmup.mean_std([1.0, 3.0]) == "2.00 ± 1.41" and short_warmup.mean_std([2.5]) == "2.50"


def test_paired_interval_and_verdict():
    """Student's t interval of the mean paired difference: t(0.975, 1) · s / √2 around the mean."""
    assert short_warmup.paired_interval([1.0, 3.0]) == pytest.approx((2 - 12.706, 2 + 12.706))
    lo, up = short_warmup.paired_interval([-1.0, -1.2, -0.8, -1.1])
    assert lo < -1.025 < up < 0
    assert short_warmup.verdict([-1.0, -1.2, -0.8, -1.1], "vanilla", "fast").startswith("fast better")
    assert short_warmup.verdict([1.0, 1.2, 0.8], "vanilla", "fast").startswith("vanilla better")
    assert short_warmup.verdict([-1.14, -0.41, 1.86], "vanilla", "fast").startswith("no difference shown")
    assert short_warmup.verdict([0.5], "vanilla", "fast") == "one seed: no interval"


# ------------------------------------------------------------------ interval widths per ReLU layer


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn7", "mnist", width=2)


def test_relu_widths_vanish_at_eps_0_and_grow_with_eps():
    model = _small_cnn().train()
    x = torch.rand(16, 1, 28, 28)
    at = {eps: relu_input_widths(BoundedModel(model, (1, 28, 28)), x, eps) for eps in (0.0, 0.01, 0.05, 0.2)}
    assert at[0.0].widths == [0.0] * 6 and at[0.0].input_width == 0
    for a, b in ((0.01, 0.05), (0.05, 0.2)):
        assert all(wa < wb for wa, wb in zip(at[a].widths, at[b].widths))
        assert at[a].input_width < at[b].input_width
    p = at[0.05]
    assert p.relative == pytest.approx([w / p.input_width for w in p.widths])


def test_model_widths_leave_the_run_untouched():
    model = _small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 28, 28)
    rng = torch.get_rng_state()
    profile = model_widths(model, (1, 28, 28), x, 0.1)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics too
    assert len(profile.relative) == 6 and all(r > 0 for r in profile.relative)


# ------------------------------------------------------------------ CROWN-IBP with loss fusion


def test_exp_chord_slope():
    lo, up = torch.tensor([-3.0, -1.0, -2.0, -200.0]), torch.tensor([-1.0, -1.0, -2.0 + 1e-6, 0.0])
    expected = torch.tensor([(math.exp(-1) - math.exp(-3)) / 2, math.exp(-1), math.exp(-2), 1 / 200])
    assert torch.allclose(exp_chord_slope(lo, up), expected, rtol=1e-5)
    lo.requires_grad_(True)
    exp_chord_slope(lo, up).sum().backward()
    assert torch.isfinite(lo.grad).all()


def _fused(bm: BoundedModel, x: Tensor, y: Tensor, eps: float, f: float, k: int) -> Tensor:
    bounds = bm.intervals((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), "ibp")
    C = margin_matrix(y, k)
    lb, ub = bm.spec_bounds(bounds, C, "ibp", bound_upper=True)
    return fused_ce_bound(bm, bounds, C, lb, ub, f if f == 0 else torch.tensor(f))


def test_fused_loss_is_the_cross_entropy_at_eps_0():
    model = build_model("cnn-small", "mnist").train()  # train-mode BN, as in a training step
    bm = BoundedModel(model, (1, 28, 28))
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    ce = F.cross_entropy(bm(x), y, reduction="none")
    for f in (0.0, 0.5, 1.0):
        torch.testing.assert_close(_fused(bm, x, y, 0.0, f, 10), ce, rtol=1e-5, atol=1e-5)


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_loss_bounds_the_cross_entropy_inside_the_box(seed):
    """Per sample, the fused bound (every CROWN weight) is at or above the cross-entropy at 4,000
    random points and the 8 corners of its box, and at small ε it is close to the worst found."""
    net, k = _tiny_net(seed), 4
    bm = BoundedModel(net, (3,))
    g = torch.Generator().manual_seed(seed)
    x, y = 0.25 + 0.5 * torch.rand(6, 3, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    corners = torch.tensor([[(i >> b) & 1 for b in range(3)] for i in range(8)], dtype=torch.float32) * 2 - 1
    for eps in (0.02, 0.2):
        offsets = torch.cat([corners, torch.rand(4000, 3, generator=g) * 2 - 1]) * eps
        with torch.no_grad():
            points = x[:, None, :] + offsets[None]  # (6, P, 3)
            logits = net(points.reshape(-1, 3)).reshape(6, len(offsets), k)
            worst = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(6, len(offsets)),
                                    reduction="none").max(1).values
        bounds = {}
        for f in (0.0, 0.5, 1.0):
            bounds[f] = bound = _fused(bm, x, y, eps, f, k).detach()
            assert (bound >= worst - 1e-5).all(), (eps, f, bound - worst)
            if eps == 0.02:
                assert (bound - worst).max() < 0.1, (f, bound - worst)
        # the two cross-entropy bounds mix as the margins do, after the log: f·CROWN-IBP + (1 − f)·IBP
        torch.testing.assert_close(bounds[0.5], (bounds[0.0] + bounds[1.0]) / 2)


def test_fused_loss_without_crown_is_the_ibp_robust_loss():
    model = build_model("mlp", "mnist", hidden=32).train()
    bm = BoundedModel(model, (1, 28, 28))
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    bm(x)
    bounds = bm.intervals((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1), "ibp")
    lb, _ = bm.spec_bounds(bounds, margin_matrix(y, 10), "ibp", bound_upper=False)
    torch.testing.assert_close(_fused(bm, x, y, 0.05, 0.0, 10).mean(), robust_loss(lb))


def test_fused_loss_has_gradients_and_a_fused_step_trains():
    n = 64
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    fused = config_from("mnist", model="cnn-small", method="crown-ibp", ibp_init=True, eps=0.3, batch_size=n)
    assert fused.loss_fusion is True
    tr = Trainer(fused, Splits((x, y), (x, y), (x, y)))
    xb, yb = tr.batch(torch.arange(n))
    tr.model.train()
    tr.bm(xb)
    loss = _fused(tr.bm, xb, yb, 0.1, 0.5, 10).mean()
    loss.backward()
    grads = [p.grad for p in tr.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = [p.detach().clone() for p in tr.model.parameters()]
    stats = tr.step(xb, yb, 0.15, epoch=1)  # mid-ramp: the fused CROWN-IBP mix
    assert torch.isfinite(stats["loss"]) and stats["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_loss_fusion_default_follows_the_initialisation_and_is_recorded():
    assert config_from("mnist", method="crown-ibp", ibp_init=True).loss_fusion is True
    assert config_from("mnist", method="crown-ibp").loss_fusion is False  # default init: fused trained worse
    assert config_from("mnist", method="crown-ibp", loss_fusion=True).loss_fusion is True
    assert config_from("mnist", method="crown-ibp", ibp_init=True, loss_fusion=False).loss_fusion is False
    assert config_from("mnist", method="fast").loss_fusion is False
    with pytest.raises(InvalidInput, match="loss fusion applies to --method crown-ibp only"):
        config_from("mnist", method="vanilla", loss_fusion=True)
    old = {k: v for k, v in vars(config_from("mnist", method="crown-ibp")).items() if k != "loss_fusion"}
    assert TrainConfig.from_dict(old).loss_fusion is False  # runs saved before fusion trained unfused
