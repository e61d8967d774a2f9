"""The graph cache: a converted network read back gives exactly the same bounds, without onnx;
entries follow the file's bytes; bad entries are converted again, never trusted or run."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from certkit.bounds import BoundedModel
from certkit.bounds.frozen import Unfreezable, decode, encode
from certkit.graph_cache import entry_path, load_bounded
from tests.conftest import REPO

LOAD_AND_BOUND = textwrap.dedent("""
    import sys, torch
    from certkit.complete import Solver
    solver = Solver(sys.argv[1])
    torch.manual_seed(0)
    x = torch.rand(3, *solver.input_shape, dtype=torch.float64)
    bounds = solver.bm.compute_bounds(x - 0.02, x + 0.02, "crown")
    torch.save(bounds, sys.argv[2])
    print(solver.from_cache, sorted(m for m in ("onnx", "onnx2torch", "onnxsim") if m in sys.modules))
    """)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 3)).eval()


def _export(model: nn.Module, path) -> None:
    torch.onnx.export(model, torch.zeros(1, 4), str(path), input_names=["x"], dynamo=False)


def _bounds(bm: BoundedModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.rand(5, *bm.graph.input_shape, dtype=bm.dtype)
    with torch.no_grad():
        return bm.compute_bounds(x - 0.1, x + 0.1, "crown")


@pytest.mark.parametrize("network", ["acasxu/onnx/ACASXU_run2a_1_1_batch_2000.onnx",
                                     "oval21_2022/onnx/cifar_base_kw.onnx"])
def test_a_cached_network_bounds_identically_and_loads_without_onnx(network, vnncomp_dir, tmp_path):
    env = {**os.environ, "CERTKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    runs = []
    for k in range(2):
        args = [sys.executable, "-c", LOAD_AND_BOUND, str(vnncomp_dir / network), str(tmp_path / f"{k}.pt")]
        out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.split()[0])
        if k == 1:
            assert out.stdout.strip() == "True []", out.stdout  # read back: no onnx, onnx2torch or onnxsim imported
    assert runs == ["False", "True"]
    first, second = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_an_entry_follows_the_files_bytes(tmp_path):
    cache, net = tmp_path / "cache", tmp_path / "net.onnx"
    _export(_mlp(0), net)
    first = load_bounded(net, directory=cache)
    assert not first.cached and first.stored
    again = load_bounded(net, directory=cache)
    assert again.cached and again.model.module is None
    assert all(torch.equal(a, b) for a, b in zip(_bounds(again.model), _bounds(BoundedModel(net).to(torch.float64))))

    _export(_mlp(1), net)  # the same path, other weights: converted again, never the old graph
    changed = load_bounded(net, directory=cache)
    assert not changed.cached
    fresh = _bounds(BoundedModel(net).to(torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(_bounds(changed.model), fresh))
    assert not torch.equal(_bounds(again.model)[0], fresh[0])
    assert len(list(cache.glob("*.pt"))) == 2

    other = tmp_path / "other.onnx"  # another file: its own entry
    _export(_mlp(2), other)
    assert entry_path(other, torch.float64, cache) != entry_path(net, torch.float64, cache)
    assert not load_bounded(other, directory=cache).cached
    assert entry_path(net, torch.float32, cache) != entry_path(net, torch.float64, cache)


def test_a_corrupt_or_hostile_entry_is_converted_again_and_never_run(tmp_path):
    cache, net = tmp_path / "cache", tmp_path / "net.onnx"
    _export(_mlp(0), net)
    entry = entry_path(net, torch.float64, cache)
    expected = _bounds(BoundedModel(net).to(torch.float64))

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    graph = encode(BoundedModel(net).to(torch.float64).graph, torch.float64)
    foreign = {"graph": {**graph, "nodes": [*graph["nodes"][:1],
                                            {**graph["nodes"][1], "op": {"~": "op", "class": "os.system", "state": {}}},
                                            *graph["nodes"][2:]]}, "nonfinite": ""}
    hostile = [b"not a torch file", pickle.dumps({"graph": RunsCode()})]
    for content in hostile + [foreign]:
        cache.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            entry.write_bytes(content)
        else:
            torch.save(content, entry)
        loaded = load_bounded(net, directory=cache)
        assert not loaded.cached
        assert all(torch.equal(a, b) for a, b in zip(_bounds(loaded.model), expected))
        assert load_bounded(net, directory=cache).cached  # replaced by a good entry
    assert not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match="not an operator class"):
        decode(foreign["graph"])


def test_a_graph_the_format_cannot_hold_stays_uncached_and_still_loads(tmp_path, monkeypatch):
    cache, net = tmp_path / "cache", tmp_path / "net.onnx"
    _export(_mlp(0), net)
    import certkit.graph_cache as gc

    def refuse(graph, dtype):
        raise Unfreezable("node 'x' holds a builtins.function")

    monkeypatch.setattr("certkit.bounds.frozen.encode", refuse)
    loaded = gc.load_bounded(net, directory=cache)
    assert not loaded.cached and not loaded.stored
    assert not cache.exists() or not list(cache.glob("*.pt"))
    assert all(torch.equal(a, b) for a, b in zip(_bounds(loaded.model), _bounds(BoundedModel(net).to(torch.float64))))


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    net = tmp_path / "net.onnx"
    _export(_mlp(0), net)
    monkeypatch.setenv("CERTKIT_CACHE", "off")
    from certkit.graph_cache import cache_dir

    assert cache_dir() is None
    assert not load_bounded(net).cached and not load_bounded(net).cached
    monkeypatch.setenv("CERTKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_a_stored_graph_moves_and_casts_like_the_module(tmp_path):
    net = tmp_path / "net.onnx"
    _export(_mlp(3), net)
    load_bounded(net, directory=tmp_path / "cache")  # converts and stores
    stored = load_bounded(net, directory=tmp_path / "cache").model
    assert stored.module is None and stored.dtype == torch.float64
    stored.to(torch.float32)
    module = BoundedModel(net)  # float32, as converted
    assert stored.dtype == torch.float32
    lo, up = _bounds(stored)
    ref_lo, ref_up = _bounds(module)
    np.testing.assert_allclose(lo.numpy(), ref_lo.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(up.numpy(), ref_up.numpy(), rtol=1e-5, atol=1e-5)


def test_concurrent_conversions_leave_one_good_entry(tmp_path):
    net = tmp_path / "net.onnx"
    _export(_mlp(0), net)
    env = {**os.environ, "CERTKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "certkit.cli", "cache", str(net)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "stored" in out
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporaries left, one entry
    assert load_bounded(net, directory=tmp_path / "cache").cached


def test_cache_command_refuses_what_cannot_be_bounded_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"], name="nms")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(bad))
    env = {**os.environ, "CERTKIT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "certkit.cli", "cache", str(bad)], env=env, cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "NonMaxSuppression" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))


def test_a_killed_run_instance_parent_leaves_no_solver_behind(tmp_path, vnncomp_dir):
    """SIGKILL to the run-instance process: its solver (in its own session) dies with it."""
    fam = vnncomp_dir / "acasxu"
    pidfile = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-m", "certkit.cli", "run-instance",
                               str(fam / "onnx/ACASXU_run2a_1_1_batch_2000.onnx"), str(fam / "vnnlib/prop_2.vnnlib"),
                               "--timeout", "120", "--results", str(tmp_path / "r.txt"), "--pidfile", str(pidfile)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < end:
            time.sleep(0.1)
        worker = int(pidfile.read_text())
        time.sleep(1.0)
        assert _alive(worker), "the solver should still be working on this instance"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        end = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_solving_from_the_cache_imports_nothing_heavy(vnncomp_dir, tmp_path):
    """verivital #7 (a convolution, average pooling; unsat by CROWN) solved in a fresh process
    with its graph cached: no onnx, onnx2torch, torchvision or torch._dynamo (whose import,
    once hidden behind torch.func in the pooling rule, took 2 s of the CROWN stage)."""
    fam = vnncomp_dir / "verivital_2021"
    onnx, prop = next(iter(__import__("csv").reader(open(fam / "instances.csv"))))[:2]
    code = textwrap.dedent("""
        import sys
        from certkit.complete import Solver
        from certkit.vnnlib import read_vnnlib
        solver = Solver(sys.argv[1])
        result = solver.solve(read_vnnlib(sys.argv[2]), 60)
        heavy = ("onnx", "onnx2torch", "torchvision", "torch._dynamo")
        print(solver.from_cache, result.status.vnncomp, [m for m in heavy if m in sys.modules])
        """)
    env = {**os.environ, "CERTKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "certkit.cli", "cache", str(fam / onnx)], env=env, cwd=REPO, check=True,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-c", code, str(fam / onnx), str(fam / prop)], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cached, answer, heavy = out.stdout.strip().split(" ", 2)
    assert cached == "True" and heavy == "[]", out.stdout
    assert answer in ("sat", "unsat")
