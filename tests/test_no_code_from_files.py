"""Issue 35, item 1: loading a file never runs code from it and never reads outside its folder.

Checkpoints carry an ``os.system`` payload that would create a marker file; each test checks
the marker is absent after certkit refused the file (and, once, that trusting the file does
run it: the payload is live). CIFAR batches, ONNX external data and .gz inputs get the same
treatment with their own hostile files.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from certkit.checkpoints import UntrustedCheckpoint, load_checkpoint_state, save_checkpoint
from certkit.cli import main
from certkit.errors import InvalidInput, InvalidModel
from certkit.files import read_gz_capped
from certkit.onnx_io import read_proto
from certkit.ort_session import OrtSession
from certkit.train.data import load_cifar10, load_mnist
from certkit.train.loop import config_from, train
from certkit.vnnlib import VnnlibError, read_vnnlib

TINY = dict(model="mlp", limit=700, val_size=100, eval_limit=100, batch_size=100, schedule_start=1,
            schedule_length=1, eps=0.1, milestones=(2,))


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a hostile checkpoint or batch would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line_error(result, *needles: str) -> None:
    """Exit code 2, no traceback, nothing that reads as success, and one stderr line naming every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "wrote" not in result.stdout and "done" not in result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, result.stderr)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    """A one-epoch MNIST run (config.json, metrics.h5, last.pt, best.pt) written by this certkit."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(config_from("mnist", method="vanilla", epochs=1, data_dir=str(data_dir), **TINY), run,
          log=lambda *_: None)
    return run


def _copy_run(run_dir: Path, dest: Path, last: dict | None = None) -> Path:
    """A copy of the run, with ``last`` (saved by plain torch.save) as its last.pt."""
    shutil.copytree(run_dir, dest)
    if last is not None:
        torch.save(last, dest / "last.pt")
    return dest


def test_new_checkpoints_hold_plain_data_only(run_dir):
    for name in ("last.pt", "best.pt"):
        st = torch.load(run_dir / name, weights_only=True)  # raises if anything needs the full unpickler
        assert st["config"]["model"] == "mlp" and st["epoch"] == 1
        assert isinstance(st["config"], dict) and isinstance(st["generator"], torch.Tensor)


def test_saving_a_non_plain_value_is_a_bug_caught_at_save_time(tmp_path):
    with pytest.raises(TypeError, match="Namespace"):
        save_checkpoint({"config": argparse.Namespace(a=1)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_export_refuses_a_payload_checkpoint_without_running_it(tmp_path, run_dir):
    marker = tmp_path / "PWNED"
    st = torch.load(run_dir / "best.pt", weights_only=True)
    st["config"]["note"] = Payload(marker)
    torch.save(st, tmp_path / "evil.pt")
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(tmp_path / "evil.pt"), str(out)])
    _one_line_error(r, "evil.pt", "refused", "--trust-checkpoint")
    assert not marker.exists() and not out.exists()


def test_resume_refuses_a_payload_checkpoint_without_running_it(tmp_path, run_dir):
    marker = tmp_path / "PWNED"
    st = torch.load(run_dir / "last.pt", weights_only=True)
    st["payload"] = Payload(marker)
    run = _copy_run(run_dir, tmp_path / "run", last=st)
    before = (run / "last.pt").read_bytes(), (run / "metrics.h5").read_bytes()
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "2"])
    _one_line_error(r, "last.pt", "refused", "--trust-checkpoint")
    assert not marker.exists()
    assert ((run / "last.pt").read_bytes(), (run / "metrics.h5").read_bytes()) == before  # nothing written


def test_a_raw_pickle_and_garbage_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"config": {}, "p": Payload(marker)}, protocol=4))
    with pytest.raises(UntrustedCheckpoint, match="--trust-checkpoint"):
        load_checkpoint_state(tmp_path / "raw.pt")
    assert not marker.exists()
    for name, junk in (("text.pt", b"hello"), ("garbage.pt", b"garbage"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(junk)
        with pytest.raises(InvalidInput, match="not a certkit checkpoint") as e:
            load_checkpoint_state(tmp_path / name)
        assert not isinstance(e.value, UntrustedCheckpoint), name  # no pickle: trusting it would not help


def test_trust_checkpoint_really_uses_the_full_unpickler(tmp_path):
    """The refusals above are not vacuous: trusting the same file runs its payload."""
    marker = tmp_path / "PWNED"
    torch.save({"config": {}, "p": Payload(marker)}, tmp_path / "evil.pt")
    st = load_checkpoint_state(tmp_path / "evil.pt", trust=True)
    assert marker.exists() and st["p"] == 0  # os.system's exit status


def test_an_older_checkpoint_loads_only_with_trust_checkpoint(tmp_path, run_dir, data_dir):
    """A checkpoint that pickled a Namespace (as an older certkit might): refused, then exported
    and resumed with the flag."""
    st = torch.load(run_dir / "last.pt", weights_only=True)
    st["args"] = argparse.Namespace(**st["config"])
    run = _copy_run(run_dir, tmp_path / "run", last=st)
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(run / "last.pt"), str(out)])
    _one_line_error(r, "--trust-checkpoint")
    r = CliRunner().invoke(main, ["export", "--onnx", str(run / "last.pt"), str(out), "--trust-checkpoint",
                                  "--data-dir", str(data_dir), "--check-samples", "8"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "2", "--trust-checkpoint"])
    assert r.exit_code == 0, r.output
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2  # rewritten as plain data


def test_new_checkpoints_still_export_and_resume(tmp_path, run_dir, data_dir):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", "--onnx", str(run_dir / "best.pt"), str(out), "--data-dir",
                                  str(data_dir), "--check-samples", "8"])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out))
    run = _copy_run(run_dir, tmp_path / "run")
    r = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------- CIFAR-10 batches


def _batch(n: int = 4, **extra) -> bytes:
    """A CIFAR-10 python batch as the official files pickle it (protocol 2, numpy arrays)."""
    rng = np.random.default_rng(0)
    d = {"batch_label": "testing batch 1 of 1", "labels": list(range(n)),
         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
    return pickle.dumps({**d, **extra}, protocol=2)


def _cifar_dir(root: Path, payload: bytes) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("test_batch", "data_batch_1"):
        (folder / name).write_bytes(payload)
    return root


def test_a_tampered_cifar_batch_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "PWNED"
    data = _cifar_dir(tmp_path / "data", _batch(extra=Payload(marker)))
    with pytest.raises(InvalidInput, match=r"test_batch: refused .*system"):
        load_cifar10(data, "test")
    assert not marker.exists()
    r = CliRunner().invoke(main, ["train", "--dataset", "cifar10", "--model", "mlp", "--epochs", "1",
                                  "--data-dir", str(data), "--out", str(tmp_path / "run")])
    _one_line_error(r, "data_batch_1", "refused")
    assert not marker.exists() and not (tmp_path / "run" / "last.pt").exists()


def test_cifar_batches_written_the_official_way_still_load(tmp_path):
    x, y = load_cifar10(_cifar_dir(tmp_path / "data", _batch(5)), "test")
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(InvalidInput, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path / "data", "test")


def test_the_real_cifar_test_batch_reads_as_pickle_would(data_dir):
    path = data_dir / "cifar-10-batches-py" / "test_batch"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with open(path, "rb") as f:
        ref = pickle.load(f, encoding="latin1")  # the trusted real file, read the old way
    x, y = load_cifar10(data_dir, "test")
    assert np.array_equal(x.numpy().reshape(len(x), -1), ref["data"]) and y.tolist() == ref["labels"]


# ----------------------------------------------------------------------------- ONNX external data


def _external_model(folder: Path, location: str) -> tuple[Path, np.ndarray]:
    """folder/model.onnx: y = x @ w, with w stored as external data at ``location`` (relative to
    ``folder``); the data file is written there."""
    folder.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    target = Path(location) if Path(location).is_absolute() else folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(w.tobytes())
    t = numpy_helper.from_array(w, "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        t.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [t])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path, w


def test_external_data_beside_the_model_loads(tmp_path):
    path, w = _external_model(tmp_path / "m", "weights/w.bin")
    proto = read_proto(path)
    assert np.array_equal(numpy_helper.to_array(proto.graph.initializer[0]), w)
    x = np.ones((1, 4), np.float32)
    assert np.allclose(OrtSession(path).run(x), x @ w)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path, how):
    outside = tmp_path / "secret.bin"
    if how == "dotdot":
        path, _ = _external_model(tmp_path / "m", "../secret.bin")
    elif how == "absolute":
        path, _ = _external_model(tmp_path / "m", str(outside))
    else:
        path, _ = _external_model(tmp_path / "m", "w.bin")
        shutil.move(tmp_path / "m" / "w.bin", outside)
        (tmp_path / "m" / "w.bin").symlink_to(outside)
    assert outside.is_file()  # the data is there: only the check stops the read
    with pytest.raises(InvalidModel, match="refused: tensor 'w' keeps its data at .*not a file inside"):
        read_proto(path)
    with pytest.raises(InvalidModel, match="refused"):
        OrtSession(path)
    _one_line_error(CliRunner().invoke(main, ["inspect", str(path)]), "refused", "model's folder")


# ----------------------------------------------------------------------------- .gz inputs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A ~300 KiB gzip file that expands to 300 MiB of zeros (300 one-MiB members, written in ms)."""
    member = gzip.compress(bytes(2**20), compresslevel=9)
    path = tmp_path_factory.mktemp("bomb") / "bomb.gz"
    path.write_bytes(member * 300)
    assert path.stat().st_size < 2**20
    return path


def test_a_vnnlib_decompression_bomb_is_refused(tmp_path, bomb):
    prop = tmp_path / "prop.vnnlib.gz"
    shutil.copy(bomb, prop)
    with pytest.raises(VnnlibError, match="decompresses to more than 256 MiB"):
        read_vnnlib(prop)
    from certkit.vnncomp.worker import main as worker_main

    results = tmp_path / "out.txt"  # a VNN-COMP instance with that property answers `error`, nothing else
    assert worker_main([str(tmp_path / "any.onnx"), str(prop), str(results), "1e12", "", "0", "cpu"]) == 2
    assert results.read_text().strip() == "error"


def test_mnist_gz_files_are_capped_too(tmp_path, bomb):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(bomb, raw / name)
    with pytest.raises(InvalidInput, match="decompression bomb"):
        load_mnist(tmp_path, "test")


def test_gz_under_the_cap_reads_exactly_and_a_lower_cap_refuses(tmp_path):
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n" \
           "(assert (<= Y_0 0))\n"
    (tmp_path / "p.vnnlib").write_text(text)
    (tmp_path / "p.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    plain, zipped = read_vnnlib(tmp_path / "p.vnnlib"), read_vnnlib(tmp_path / "p.vnnlib.gz")
    assert plain.equals(zipped) and zipped.cases[0].upper.tolist() == [1.0]
    assert read_gz_capped(tmp_path / "p.vnnlib.gz", limit=len(text)) == text.encode()
    with pytest.raises(VnnlibError, match=f"more than {len(text) - 1} bytes"):
        read_vnnlib(tmp_path / "p.vnnlib.gz", gz_limit=len(text) - 1)
    (tmp_path / "cut.vnnlib.gz").write_bytes(gzip.compress(text.encode())[:20])
    with pytest.raises(VnnlibError, match="not a readable gzip file"):
        read_vnnlib(tmp_path / "cut.vnnlib.gz")


# ----------------------------------------------------------------------------- numpy files


def test_numpy_object_arrays_are_refused_not_unpickled(tmp_path):
    from certkit.boxes import load_array
    from certkit.verify import _npz_arrays

    obj = np.array([{"x": 1}], dtype=object)
    np.save(tmp_path / "obj.npy", obj)
    np.savez(tmp_path / "one.npz", a=obj)
    np.savez(tmp_path / "xy.npz", x=obj, y=np.zeros(1))
    for name in ("obj.npy", "one.npz"):
        with pytest.raises(InvalidInput, match="allow_pickle=False"):
            load_array(tmp_path / name)
    with pytest.raises(InvalidInput, match="allow_pickle=False"):
        _npz_arrays(tmp_path / "xy.npz")


def test_inputs_too_large_to_read_are_refused_before_reading(tmp_path):
    """A plain VNN-LIB file over the limit, and an .npz whose members expand past the memory
    allowance (declared sizes, which reading never exceeds), get one line and are not read."""
    from certkit.errors import InvalidInput
    from certkit.files import check_array_file_size
    from certkit.vnnlib import VnnlibError, read_vnnlib

    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0.0))\n"
                    "(assert (<= X_0 1.0))\n(assert (<= Y_0 0.0))\n" + " " * 5000)
    assert len(read_vnnlib(prop).cases) == 1
    with pytest.raises(VnnlibError, match="limit for a VNN-LIB file"):
        read_vnnlib(prop, gz_limit=4096)
    npz = tmp_path / "d.npz"
    np.savez_compressed(npz, x=np.zeros((64, 1024), np.float32), y=np.zeros(64, np.int64))  # 256 KiB, compressed
    assert npz.stat().st_size < 20_000
    check_array_file_size(npz, limit=1 << 20)
    with pytest.raises(InvalidInput, match="once read"):
        check_array_file_size(npz, limit=100_000)
