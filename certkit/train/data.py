"""Datasets read by certkit itself: MNIST (idx files, torchvision layout), CIFAR-10 (python
batches) and TinyImageNet (image folders).

Images come back as uint8 tensors (N, C, H, W) and int64 labels; ``to_float`` maps
pixels to [0, 1]. Missing files give an error that lists what is expected where.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from certkit.errors import InvalidInput
from certkit.files import read_gz_capped

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_data_dir() -> Path:
    """$CERTKIT_DATA, else ../shared/data beside the repository, else ./data."""
    env = os.environ.get("CERTKIT_DATA")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def _open_maybe_gz(path: Path) -> bytes:
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            return read_gz_capped(p) if p.suffix == ".gz" else p.read_bytes()
    raise FileNotFoundError(path)


def _parse_idx(raw: bytes) -> np.ndarray:
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """MNIST from ``data_dir/MNIST/raw/`` (or ``data_dir`` itself), gzipped or not."""
    data_dir = Path(data_dir)
    img_name, lbl_name = _MNIST_FILES[split]
    for raw in (data_dir / "MNIST" / "raw", data_dir / "raw", data_dir):
        try:
            images = _parse_idx(_open_maybe_gz(raw / img_name))
            labels = _parse_idx(_open_maybe_gz(raw / lbl_name))
            break
        except FileNotFoundError:
            continue
    else:
        raise InvalidInput(f"MNIST {split} split not found: expected {data_dir}/MNIST/raw/{img_name}.gz and "
                           f"{lbl_name}.gz (the four original files, torchvision layout); set --data-dir")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """CIFAR-10 python batches from ``data_dir/cifar-10-batches-py/`` (training: every
    ``data_batch_*`` present)."""
    data_dir = Path(data_dir)
    folder = next((d for d in (data_dir / "cifar-10-batches-py", data_dir) if (d / "test_batch").is_file()), None)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    files = [] if folder is None else [folder / n for n in names if (folder / n).is_file()]
    if not files:
        raise InvalidInput(f"CIFAR-10 {split} split not found: expected {data_dir}/cifar-10-batches-py/"
                           f"{'test_batch' if split == 'test' else 'data_batch_1 … data_batch_5'} "
                           "(the standard python batches); set --data-dir")
    xs, ys = [], []
    for f in files:
        x, y = _read_cifar_batch(f)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# The only globals the official CIFAR-10 python batches reference: numpy's array reconstruction
# (its module is numpy.core before numpy 2, numpy._core after), ndarray and dtype; plus
# _codecs.encode, with which Python 3 writes bytes at the batches' protocol 2 (a batch
# re-saved by Python 3). None of them runs code.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A CIFAR-10 batch that references a global outside :data:`_CIFAR_GLOBALS`."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_CIFAR_GLOBALS`: a tampered batch whose pickle
    calls ``os.system`` (or anything else) is refused before the call, where ``pickle.load``
    would run it."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"it references {module}.{name}, which a CIFAR-10 batch never "
                                   "contains (only numpy arrays); a tampered or foreign file") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels of one python batch, read without running code."""
    try:
        with open(path, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="latin1").load()
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["labels"], dtype=np.int64).reshape(-1)
    except _ForbiddenGlobal as e:
        raise InvalidInput(f"{path}: refused as a CIFAR-10 batch: {e}") from None
    except Exception as e:
        raise InvalidInput(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise InvalidInput(f"{path}: not a CIFAR-10 python batch ({len(x)} images but {len(y)} labels)")
    return x, y


def load_tinyimagenet(data_dir: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """TinyImageNet from ``data_dir/tiny-imagenet-200/``: ``train/<wnid>/images/*.JPEG`` and the
    validation split reorganised by class, ``val/<wnid>/*.JPEG`` (or ``val/<wnid>/images/``).
    Classes are the sorted wnids of ``train/``; ``split="test"`` reads the 10k val images."""
    from PIL import Image

    data_dir = Path(data_dir)
    root = next((d for d in (data_dir / "tiny-imagenet-200", data_dir) if (d / "train").is_dir()), None)
    sub = "train" if split == "train" else "val"
    if root is None or not (root / sub).is_dir():
        raise InvalidInput(f"TinyImageNet {split} split not found: expected {data_dir}/tiny-imagenet-200/train/"
                           "<wnid>/images/*.JPEG and val/<wnid>/*.JPEG (val reorganised by class); set --data-dir")
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    images, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = root / sub / wnid
        if (folder / "images").is_dir():
            folder = folder / "images"
        for f in sorted(folder.glob("*.[jJpP][pPnN][eEgG]*")):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.uint8).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise InvalidInput(f"TinyImageNet {split} split: no images under {root / sub}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10, "tinyimagenet": load_tinyimagenet}


def load_dataset(name: str, data_dir: str | Path | None, split: str) -> tuple[Tensor, Tensor]:
    """(uint8 images N×C×H×W, int64 labels) of a named dataset split."""
    if name not in LOADERS:
        raise InvalidInput(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name](default_data_dir() if data_dir is None else data_dir, split)


def to_float(images: Tensor) -> Tensor:
    """uint8 pixels to float32 in [0, 1]."""
    return images.float().div_(255)


def augment(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Random horizontal flip and random crop with ``pad``-pixel edge padding, batched (no loop
    over samples). ``x`` is float (B, C, H, W)."""
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1).to(x.device), x.flip(-1), x)
    if pad == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows, cols]
