"""The CUDA paths: bounds, verification, training and the VNN-COMP solver on a GPU agree with
the CPU and stay sound.

These tests run only where a CUDA device is present (CI has none; a GPU session runs them
with ``pytest tests/test_cuda.py``). TF32 is switched *on* globally before bounding, so a
bound that silently used TF32 matmuls or convolutions would drift from the CPU's float32
result by far more than the tolerance and could be violated by sampled points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certkit.bounds import METHODS, BoundedModel, margin_matrix
from certkit.cli import main
from certkit.results import read_results
from certkit.status import Status
from certkit.train.loop import config_from, train
from certkit.train.metrics import MetricsFile
from tests.conftest import REPO
from tests.test_train_units import assert_compiled_step_matches_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

MODELS = {"mnist": REPO / "models" / "mnist_cnn_small_eps0.3.onnx",
          "cifar10": REPO / "models" / "cifar10_cnn_small_eps2_255.onnx"}
EPS = {"mnist": 0.3, "cifar10": 2 / 255}


@pytest.fixture
def tf32_on():
    """TF32 allowed globally, as many training scripts leave it; restored afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _box(name: str, n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (1, 28, 28) if name == "mnist" else (3, 32, 32)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return (x - EPS[name]).clamp(0, 1), (x + EPS[name]).clamp(0, 1), y


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_bounds_match_cpu_and_hold(name, method, tf32_on):
    lo, up, y = _box(name)
    C = margin_matrix(y, 10)
    cpu = BoundedModel(MODELS[name]).compute_bounds(lo, up, method, C=C)
    gpu_model = BoundedModel(MODELS[name])
    gpu = gpu_model.compute_bounds(lo.cuda(), up.cuda(), method, C=C.cuda())
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored afterwards
    for c, g in zip(cpu, gpu):
        g = g.cpu()
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-4)
    # soundness on the GPU itself: points sampled in each box (full float32 forward pass)
    gen = torch.Generator().manual_seed(2)
    pts = lo.unsqueeze(1) + (up - lo).unsqueeze(1) * torch.rand(lo.shape[0], 256, *lo.shape[1:], generator=gen)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        out = gpu_model.module(pts.flatten(0, 1).cuda()).cpu().reshape(lo.shape[0], 256, 10)
    margins = torch.einsum("bsk,bnk->bns", C, out)
    lb, ub = (t.cpu() for t in gpu)
    assert (margins >= lb.unsqueeze(1) - 1e-4 * (1 + lb.abs().unsqueeze(1))).all()
    assert (margins <= ub.unsqueeze(1) + 1e-4 * (1 + ub.abs().unsqueeze(1))).all()


def test_verify_on_gpu_gives_the_cpu_statuses(tmp_path, data_dir):
    common = ["verify", str(MODELS["mnist"]), "--eps", "0.3", "--dataset", "mnist", "--data-dir", str(data_dir),
              "-n", "48", "--batch-size", "16"]
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.h5"
        r = CliRunner().invoke(main, [*common, "--device", device, "--out", str(out)])
        assert r.exit_code == 0, r.output
        attrs, data = read_results(out)
        assert attrs["device"].startswith(device)
        runs[device] = data
    assert (runs["cpu"]["status"] == runs["cuda"]["status"]).all()
    assert (runs["cpu"]["stage"] == runs["cuda"]["stage"]).all()
    gpu, cpu = runs["cuda"]["margins"], runs["cpu"]["margins"]
    np.testing.assert_allclose(gpu[:, 0], cpu[:, 0], rtol=1e-4, atol=1e-4)  # IBP: the same arithmetic
    # CROWN's adaptive slope of a ReLU with u ≈ -l may flip on a rounding difference: another sound bound
    assert np.nanmax(np.abs(gpu[:, 1:] - cpu[:, 1:])) < 1e-2
    assert np.nanmean(np.abs(gpu[:, 1:] - cpu[:, 1:])) < 1e-3


TINY = dict(model="cnn-small", limit=1200, val_size=200, eval_limit=500, batch_size=100, schedule_start=1,
            schedule_length=2, eps=0.2, milestones=(3,))


@pytest.mark.parametrize("compile", [False, True])
def test_training_on_gpu_resumes_bit_for_bit_and_exports(tmp_path, data_dir, compile):
    straight, split = tmp_path / "a", tmp_path / "b"
    cfg3 = config_from("mnist", method="fast", epochs=3, device="cuda", data_dir=str(data_dir), compile=compile, **TINY)
    cfg1 = config_from("mnist", method="fast", epochs=1, device="cuda", data_dir=str(data_dir), compile=compile, **TINY)
    train(cfg3, straight, log=lambda *_: None)
    train(cfg1, split, log=lambda *_: None)
    train(cfg3, split, resume=True, log=lambda *_: None)
    a = torch.load(straight / "last.pt", weights_only=False, map_location="cpu")
    b = torch.load(split / "last.pt", weights_only=False, map_location="cpu")
    assert next(iter(torch.load(straight / "last.pt", weights_only=False)["model"].values())).is_cuda
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (k, float((a["model"][k] - b["model"][k]).abs().max()))
    ma, mb = MetricsFile(straight / "metrics.h5").read(), MetricsFile(split / "metrics.h5").read()
    assert (ma["test_verified_err"] == mb["test_verified_err"]).all()
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())
    assert ma["test_clean_err"][-1] < 90  # learnt something (3 tiny epochs verify nothing at ε 0.2 yet)
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(straight / "best.pt"), str(out), "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("method", ["fast", "crown-ibp"])
def test_compiled_training_step_matches_eager(method):
    """The compiled step with CUDA graphs computes what the eager step computes."""
    assert_compiled_step_matches_eager("cuda", "cnn-small", method, 100, (0.0, 0.05, 0.1, 0.1, 0.2))


@pytest.mark.parametrize("n_in", [2, 24])  # input splitting (at most 20 inputs), ReLU splitting
def test_vnncomp_solver_on_gpu_gives_the_cpu_answers(tmp_path, n_in, tf32_on):
    """Random networks and properties with sat and unsat answers: the solver on the GPU answers
    what it answers on the CPU, its counterexamples hold in onnxruntime, and TF32 is back on
    afterwards (the solver switches it off only while it runs)."""
    from certkit.complete.solver import Solver
    from certkit.confirm import Oracle, in_unsafe_set
    from tests.test_vnncomp import _export, _mlp, _random_property

    rng = np.random.default_rng(n_in)
    answers = []
    for seed in range(4):
        model = _mlp(seed, n_in, (16, 16))
        onnx = tmp_path / f"net{seed}.onnx"
        _export(model, n_in, onnx)
        with torch.no_grad():
            y = model(torch.as_tensor(rng.uniform(-1, 1, (2000, n_in)), dtype=torch.float32)).numpy()
        prop = _random_property(rng, n_in, 3, y)
        cpu = Solver(onnx).solve(prop, timeout=60)
        gpu = Solver(onnx, device="cuda").solve(prop, timeout=60)
        assert gpu.status == cpu.status, (gpu.log, cpu.log)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        if gpu.status is Status.FALSIFIED:
            out = Oracle(onnx, (n_in,)).outputs(gpu.x[None])[0]
            assert in_unsafe_set(prop.cases[0], out)
        answers.append(gpu.status.vnncomp)
    assert set(answers) <= {"sat", "unsat"}, answers


@pytest.mark.parametrize("family,index,truth", [("acasxu", 0, "unsat"), ("oval21_2022", 0, "unsat"),
                                                ("mnist_fc_2022", 25, "unsat"), ("collins_rul_cnn_2022", 20, "sat")])
def test_real_vnncomp_instances_on_gpu_get_the_ground_truth_answer(family, index, truth, vnncomp_dir):
    """Input splitting (ACAS Xu), ReLU splitting (oval21, mnist_fc) and PGD (collins) on the GPU."""
    import csv

    from certkit.complete.solver import Solver
    from certkit.vnnlib import read_vnnlib

    fam = vnncomp_dir / family
    onnx, vnn, _ = list(csv.reader(open(fam / "instances.csv")))[index]
    res = Solver(fam / onnx, device="cuda").solve(read_vnnlib(fam / vnn), timeout=120)
    assert res.status.vnncomp == truth, res.log
