"""Data-parallel training (certkit/train/distributed.py, docs/training.md "Data-parallel
training"): two processes train the single-process run.

What holds, and is checked here:

* per step, from the same weights, the gradients of 2 processes equal the single-process
  gradients of the same global batch to float rounding (relative 1e-4; ~1e-6 seen), for the
  fast method (batch norm with global statistics, both regularisers, ε = 0 and > 0),
  CROWN-IBP's mixing and CIFAR's augmentation, with uneven shards; so do the statistics
  written to metrics.h5 and the evaluation;
* over a run the weights cannot stay that close: Adam divides each gradient entry by its own
  magnitude, so where a gradient is near zero (a few entries, and the biases of layers that
  feed a batch norm, whose gradient is exactly zero but for rounding) the rounding becomes
  steps of up to ~lr. One process that sums each batch in reverse row order drifts from
  itself the same way, and that is the yardstick: after 12 real MNIST steps the median
  weight differs by ~1e-8, 99.9% by < 5e-5, the 99.9th percentile no more than 10× the
  reversed-rows run's, and the train-mode network (what the bounds are taken on) no more
  than 10× either;
* the ε schedule, warmup and learning rate per epoch are identical, losses and regularisers
  to 1e-4; rank 0 alone writes; a run stopped after epoch 1 and resumed under torchrun
  equals the uninterrupted ``--nproc 2`` run bit for bit;
* a process that dies stops the run with one line, and a launcher that dies takes its
  processes with it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from certkit.cli import main
from certkit.errors import InvalidInput
from certkit.train.distributed import Replica, run_processes
from certkit.train.loop import Splits, Trainer, _read_stats, config_from, train
from certkit.train.metrics import MetricsFile
from certkit.train.models import DATASETS, build_model

REPO = Path(__file__).resolve().parents[1]
# 555 training images in batches of 100: the last batch (55) splits 28 / 27
TINY = dict(model="cnn-small", method="fast", limit=655, val_size=100, eval_limit=200, batch_size=100,
            schedule_start=1, schedule_length=1, eps=0.1, milestones=(2,))
CLI_TINY = ["--dataset", "mnist", "--model", "cnn-small", "--limit", "655", "--val-size", "100", "--eval-limit",
            "200", "--batch-size", "100", "--eps", "0.1", "--schedule", "1,1", "--milestones", "2"]
GRAD_RTOL = 1e-4  # of the largest gradient entry of the parameter


@pytest.fixture(autouse=True)
def one_thread_each(monkeypatch):
    """Each launched process runs one torch thread (the launcher reads $OMP_NUM_THREADS), as
    torchrun's processes do: runs under both launchers then round identically."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _dead_biases(model: torch.nn.Module) -> set[str]:
    """Names of the biases of Conv/Linear layers followed by a batch norm, and the norms'
    running means: the parameters whose gradient is zero up to rounding."""
    names, mods = set(), list(model.named_modules())
    for (name, mod), (bn_name, nxt) in zip(mods, mods[1:]):
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and isinstance(nxt, nn.modules.batchnorm._BatchNorm):
            names |= {f"{name}.bias", f"{bn_name}.running_mean"}
    return names


def _synthetic(dataset: str, n: int = 119) -> Splits:
    info = DATASETS[dataset]
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, *info.shape), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, info.num_classes, (n,), generator=gen)
    return Splits((x, y), (x[:30], y[:30]), (x[:45], y[:45]))


CASES = {  # config, ε of the three steps
    "fast-bn-regularisers": (dict(dataset="mnist", model="cnn-small", method="fast"), [0.0, 0.05, 0.1]),
    "crown-ibp-mixing": (dict(dataset="mnist", model="mlp", method="crown-ibp"), [0.02, 0.05, 0.08]),
    "cifar-augmentation": (dict(dataset="cifar10", model="cnn-small", method="vanilla", eps=2 / 255), [0.004] * 3),
}


def _steps(replica, case: str) -> dict:
    """Three steps of a case on synthetic data (batches of 40, the last of 39: odd shards) at a
    learning rate so small that the weights stay put: every step's gradients are then those of
    the same weights in both runs (else Adam's amplification of rounding in near-zero gradient
    entries, the subject of the next test, would blur the comparison). The gradients, the
    statistics as metrics.h5 gets them, and the evaluation."""
    kw, eps_list = CASES[case]
    cfg = config_from(None, **{"eps": 0.1, "batch_size": 40, "schedule_start": 1, "schedule_length": 1,
                               "epochs": 1, "lr": 1e-30, **kw})
    trainer = Trainer(cfg, _synthetic(cfg.dataset), replica)
    perm = torch.randperm(119, generator=trainer.gen)
    grads, pending = [], []
    for i, eps in enumerate(eps_list):
        x, y = trainer.batch(perm[40 * i:40 * (i + 1)])
        stats = trainer.step(x, y, eps, 1)
        stats["eps"] = eps
        pending.append(stats)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    return {"grads": grads, "stats": _read_stats(pending, replica), "dead": _dead_biases(trainer.model),
            "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "eval": trainer.evaluate(trainer.splits.test)}


def _run_cases(replica) -> dict:
    return {case: _steps(replica, case) for case in CASES}


def test_steps_match_one_process(one_thread):
    """Per step, 2 processes compute the single-process gradients (to float rounding), for the
    fast method (global batch-norm statistics, both regularisers, ε = 0 and > 0), CROWN-IBP's
    mixing and CIFAR's augmentation; and the same statistics and evaluation. The replicas
    stay identical."""
    replicas = run_processes(2, _run_cases, ())
    for case in CASES:
        one, two, other = _steps(None, case), replicas[0][case], replicas[1][case]
        assert all(torch.equal(two["weights"][k], other["weights"][k]) for k in two["weights"]), case
        for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
            largest = max(g.abs().max() for g in g1.values())
            for name, g in g1.items():
                if name in one["dead"]:  # zero up to rounding in both
                    assert max(g.abs().max(), g2[name].abs().max()) < 1e-4 * largest, (case, step, name)
                else:
                    assert (g2[name] - g).abs().max() <= GRAD_RTOL * g.abs().max(), (case, step, name)
        for r1, r2 in zip(one["stats"], two["stats"]):
            for key in ("loss", "clean_err", "ibp_err", "tightness", "relu", "eps"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6, nan_ok=True), (case, key)
            assert r2["unstable"] == pytest.approx(r1["unstable"], abs=1e-6), case
        assert two["eval"] == one["eval"], case


def test_nproc2_trains_the_single_process_run_and_resumes(tmp_path, data_dir, monkeypatch):
    """Real MNIST, cnn-small with batch norm, fast method, 2 epochs (warmup, then ε_max):
    ``train --nproc 2`` writes one run (rank 0 alone) with the single-process run's schedules
    and statistics, and weights as close to it as one process's own run with every batch's rows
    reversed; a run stopped after epoch 1 and resumed under torchrun equals it bit for bit."""
    one, flip, two, split = (tmp_path / n for n in ("one", "flip", "two", "split"))
    cfg = config_from(None, dataset="mnist", epochs=2, data_dir=str(data_dir), **TINY)
    train(cfg, one, log=lambda *_: None)
    batch = Trainer.batch
    with monkeypatch.context() as m:  # the same batches, summed in another order
        m.setattr(Trainer, "batch", lambda self, idx: batch(self, idx.flip(0)))
        train(cfg, flip, log=lambda *_: None)
    r = CliRunner().invoke(main, ["train", *CLI_TINY, "--epochs", "2", "--data-dir", str(data_dir), "--out", str(two),
                                  "--nproc", "2"])
    assert r.exit_code == 0, r.output
    assert "2 processes" in r.output and "done" in r.output
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.h5"]

    r = CliRunner().invoke(main, ["train", *CLI_TINY, "--epochs", "1", "--data-dir", str(data_dir), "--out",
                                  str(split), "--nproc", "2"])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                           "-m", "certkit", "train", "--resume", str(split), "--epochs", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("epoch 2/2") == 1  # rank 0 alone prints

    a, f, b, c = (torch.load(d / "last.pt", weights_only=False) for d in (one, flip, two, split))
    assert all(torch.equal(b["model"][k], c["model"][k]) for k in b["model"])  # resumed = uninterrupted
    ma, mb, mc = (MetricsFile(d / "metrics.h5").read() for d in (one, two, split))
    assert list(mb["epoch"]) == list(mc["epoch"]) == [1, 2]  # one writer
    assert all((mb[k] == mc[k]).all() for k in mb if k != "train_time")
    # the ε schedule, warmup (the regularisers join the loss in epoch 1 only) and learning rate
    assert list(mb["eps"]) == list(ma["eps"]) and list(mb["lr"]) == list(ma["lr"])
    for k in ("loss", "tightness", "relu", "train_clean_err", "train_ibp_err", "unstable"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k
    for k in ("test_verified_err", "test_clean_err", "val_verified_err"):
        assert abs(mb[k] - ma[k]).max() <= 1.0, k  # at most 2 of 200 images on the edge

    # Weights: Adam moves an entry by g/(sqrt(v)+1e-8) × lr, so entries whose gradient is near
    # zero turn rounding into steps of up to ~lr, and the biases that feed a batch norm (zero
    # gradient: the norm subtracts them) drift by ~lr a step in any two runs that round
    # differently. Measured: the median entry differs by ~1e-8, 99.9% by < 5e-5, a few by ~lr
    # (5e-4), exactly as in the reversed-rows run.
    dead = _dead_biases(build_model("cnn-small", "mnist"))
    live = [k for k, w in a["model"].items() if k not in dead and w.is_floating_point()]

    def gap(other: dict) -> torch.Tensor:
        return torch.cat([(other["model"][k] - a["model"][k]).abs().flatten() for k in live])

    g2, gf = gap(b), gap(f)
    assert g2.median() < 1e-6 and (g2 > 1e-5).float().mean() < 0.02 and g2.max() < 2 * 12 * 5e-4
    assert g2.quantile(0.999) <= 10 * gf.quantile(0.999) + 1e-6  # no farther than the reversed rows
    assert max((b["model"][k] - a["model"][k]).abs().max() for k in dead) < 2 * 3 * 12 * 5e-4
    # what the bounds are computed on: the train-mode network (batch statistics; the dead biases cancel)
    x = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits = []
    for st in (a, f, b):
        net = build_model("cnn-small", "mnist")
        net.load_state_dict(st["model"])
        logits.append(net.train()(x).detach())
    assert (logits[2] - logits[0]).abs().max() <= 10 * (logits[1] - logits[0]).abs().max() + 1e-5


def test_a_dead_process_stops_the_run(tmp_path, data_dir):
    """kill -9 of one training process: the launcher stops the other and exits with one line."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "certkit", "train", *CLI_TINY, "--epochs", "200",
                             "--data-dir", str(data_dir), "--out", str(run), "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(lambda: (run / "config.json").exists(), proc)  # rank 0 writes it once both have met
        replicas = _replica_pids(proc.pid)
        assert len(replicas) == 2
        os.kill(replicas[0], signal.SIGKILL)
        err = proc.communicate(timeout=30)[1]
        assert proc.returncode == 2, err
        assert re.fullmatch(r"error: training process \d of 2 was killed by SIGKILL; the others were stopped",
                            err.strip().splitlines()[-1]), err
        assert "Traceback" not in err
        _wait_for(lambda: not _alive(replicas[1]), proc)
    finally:
        proc.kill()
        proc.communicate()


def _sleep(replica, started: str) -> None:
    Path(started, str(replica.rank)).touch()
    time.sleep(120)


def test_a_dead_launcher_takes_its_processes(tmp_path):
    """kill -9 of the launcher: its training processes follow it (no orphan waits on a peer)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_distributed_train import _sleep; from certkit.train.distributed import run_processes; "
            f"run_processes(2, _sleep, ({str(tmp_path)!r},))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), proc)
        replicas = _replica_pids(proc.pid)
        assert len(replicas) == 2
        proc.kill()
        proc.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in replicas))
    finally:
        proc.kill()
        proc.wait()


def _wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    """Until ``condition()``; fails after ``timeout`` s or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            pytest.fail("timed out" if proc is None or proc.poll() is None else f"exited: {proc.returncode}")
        time.sleep(0.1)


def _replica_pids(parent: int) -> list[int]:
    """The launched training processes among ``parent``'s children (not the resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_input_errors_are_one_line(tmp_path, data_dir, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(main, ["train", *CLI_TINY, "--nproc", "0", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--nproc must be >= 1" in r.output
    r = runner.invoke(main, ["train", *CLI_TINY, "--nproc", "2", "--compile", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--compile is not supported with data-parallel" in r.output
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = runner.invoke(main, ["train", *CLI_TINY, "--nproc", "2", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "under torchrun leave it out" in r.output
    # 101 training images in batches of 100: the last batch has 1 image for 2 processes
    replica = Replica(rank=0, world=2, local_rank=0, device=torch.device("cpu"), group=None)
    cfg = config_from(None, dataset="mnist", model="cnn-small", batch_size=100)
    with pytest.raises(InvalidInput, match="the last of an epoch has 1 .101 training images"):
        Trainer(cfg, _synthetic("mnist", 101), replica)
