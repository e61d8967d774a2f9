"""Dataset readers: MNIST and CIFAR-10 from the shared copies, TinyImageNet from a synthetic folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from certkit.errors import InvalidInput
from certkit.train.data import load_dataset


def test_mnist_and_cifar(data_dir):
    x, y = load_dataset("mnist", data_dir, "test")
    assert x.shape == (10000, 1, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]
    x, y = load_dataset("cifar10", data_dir, "test")
    assert x.shape == (10000, 3, 32, 32) and y[:5].tolist() == [3, 8, 8, 0, 6]
    x, _ = load_dataset("cifar10", data_dir, "train")
    assert len(x) == 10000 * len(list((data_dir / "cifar-10-batches-py").glob("data_batch_*")))


def test_tinyimagenet_folder_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    colours = {}
    for wnid in ["n02", "n01", "n03"]:  # classes are the sorted wnids
        colours[wnid] = rng.integers(0, 256, 3, dtype=np.uint8)
        for split, folder in (("train", root / "train" / wnid / "images"), ("val", root / "val" / wnid)):
            folder.mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                img = np.broadcast_to(colours[wnid], (64, 64, 3)).copy()
                Image.fromarray(img).save(folder / f"{wnid}_{i}.JPEG", quality=100)
    x, y = load_dataset("tinyimagenet", tmp_path, "train")
    assert x.shape == (6, 3, 64, 64) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.abs(x[0, :, 10, 10].numpy().astype(int) - colours["n01"].astype(int)).max() <= 3
    xt, yt = load_dataset("tinyimagenet", tmp_path, "test")
    assert xt.shape == (3, 3, 64, 64) and yt.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name,expected", [("mnist", "t10k-images-idx3-ubyte"), ("cifar10", "test_batch"),
                                           ("tinyimagenet", "tiny-imagenet-200")])
def test_missing_files_say_what_is_expected_where(name, expected, tmp_path):
    with pytest.raises(InvalidInput, match=expected):
        load_dataset(name, tmp_path, "test")
