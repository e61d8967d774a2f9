"""The model registry: the paper's CNN-7, Wide-ResNet and ResNeXt, and small CPU-sized models.

Every model takes pixels in [0, 1]: input normalisation is its first layer. With
``bn=True`` (the default) every hidden Conv/Linear is followed by batch norm, then
ReLU; the classifier has no BN (ALGORITHMS.md §9).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data."""

    name: str
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, (0.0,), (1.0,)),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "tinyimagenet": DatasetInfo("tinyimagenet", (3, 64, 64), 200, (0.4802, 0.4481, 0.3975),
                                (0.2302, 0.2265, 0.2262)),
}


class Normalize(nn.Module):
    """(x − mean) / std per channel: the first layer, so models see pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _bn(kind: str, n: int, bn: bool) -> list[nn.Module]:
    if not bn:
        return []
    return [nn.BatchNorm2d(n) if kind == "conv" else nn.BatchNorm1d(n)]


def _conv_block(cin: int, cout: int, k: int, stride: int, pad: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad), *_bn("conv", cout, bn), nn.ReLU()]


def _fc_block(fin: int, fout: int, bn: bool) -> list[nn.Module]:
    return [nn.Linear(fin, fout), *_bn("fc", fout, bn), nn.ReLU()]


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def cnn7_linear(width: int) -> int:
    """Units of CNN-7's hidden linear layer at channel multiplier ``width``: 8·width (512 at the
    paper's 64), but at least 128, the linear layer of the CPU-sized CNN-7 at width 8 (a
    narrower one would make the classifier's input the bottleneck)."""
    return max(128, 8 * width)


def cnn7(data: DatasetInfo, bn: bool = True, width: int = 64) -> nn.Sequential:
    """CNN-7: five 3×3 convs (width, width, 2·width s2, 2·width, 2·width [s2 on TinyImageNet]),
    Linear :func:`cnn7_linear` (512), Linear K. The paper's model is ``width`` 64."""
    c, h, _ = data.shape
    strides = [1, 1, 2, 1, 2 if data.name == "tinyimagenet" else 1]
    widths = [width, width, 2 * width, 2 * width, 2 * width]
    linear = cnn7_linear(width)
    layers: list[nn.Module] = [Normalize(data.mean, data.std)]
    cin = c
    for w, s in zip(widths, strides):
        layers += _conv_block(cin, w, 3, s, 1, bn)
        cin, h = w, _out_size(h, 3, s, 1)
    layers += [nn.Flatten(), *_fc_block(cin * h * h, linear, bn), nn.Linear(linear, data.num_classes)]
    return nn.Sequential(*layers)


def cnn_small(data: DatasetInfo, bn: bool = True) -> nn.Sequential:
    """conv 16 k4 s2 → conv 32 k4 s2 → linear 100 → linear K (CPU-sized)."""
    c, h, _ = data.shape
    h1 = _out_size(h, 4, 2, 1)
    h2 = _out_size(h1, 4, 2, 1)
    return nn.Sequential(
        Normalize(data.mean, data.std),
        *_conv_block(c, 16, 4, 2, 1, bn),
        *_conv_block(16, 32, 4, 2, 1, bn),
        nn.Flatten(),
        *_fc_block(32 * h2 * h2, 100, bn),
        nn.Linear(100, data.num_classes),
    )


def mlp(data: DatasetInfo, bn: bool = True, depth: int = 2, hidden: int = 256) -> nn.Sequential:
    """Flatten → ``depth`` × (Linear ``hidden``-BN-ReLU) → Linear K."""
    layers: list[nn.Module] = [Normalize(data.mean, data.std), nn.Flatten()]
    fin = data.shape[0] * data.shape[1] * data.shape[2]
    for _ in range(depth):
        layers += _fc_block(fin, hidden, bn)
        fin = hidden
    layers.append(nn.Linear(fin, data.num_classes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``body(x) + shortcut(x)`` followed by ReLU; the shortcut is 1×1 Conv(-BN) when shapes change."""

    def __init__(self, body: nn.Sequential, cin: int, cout: int, stride: int, bn: bool):
        super().__init__()
        self.body = body
        if cin != cout or stride != 1:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0), *_bn("conv", cout, bn))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _head(cin: int, h: int, data: DatasetInfo, bn: bool) -> list[nn.Module]:
    return [nn.Flatten(), *_fc_block(cin * h * h, 512, bn), nn.Linear(512, data.num_classes)]


def wide_resnet(data: DatasetInfo, bn: bool = True) -> nn.Sequential:
    """Stem conv 16, basic blocks of widths 128, 256 (s2), 512 (s2), Linear 512, Linear K."""
    c, h, _ = data.shape
    layers: list[nn.Module] = [Normalize(data.mean, data.std), *_conv_block(c, 16, 3, 1, 1, bn)]
    cin = 16
    for w, s in [(128, 1), (256, 2), (512, 2)]:
        body = nn.Sequential(nn.Conv2d(cin, w, 3, s, 1), *_bn("conv", w, bn), nn.ReLU(),
                             nn.Conv2d(w, w, 3, 1, 1), *_bn("conv", w, bn))
        layers.append(ResidualBlock(body, cin, w, s, bn))
        cin, h = w, _out_size(h, 3, s, 1)
    return nn.Sequential(*layers, *_head(cin, h, data, bn))


def resnext(data: DatasetInfo, bn: bool = True, cardinality: int = 2, width: int = 32) -> nn.Sequential:
    """Stem conv 64, bottleneck blocks (1×1 → grouped 3×3 → 1×1 ×2) per stage, Linear 512, Linear K."""
    c, h, _ = data.shape
    layers: list[nn.Module] = [Normalize(data.mean, data.std), *_conv_block(c, 64, 3, 1, 1, bn)]
    cin = 64
    for stage, s in enumerate([1, 2, 2]):
        gw = cardinality * width * 2**stage
        cout = 2 * gw
        body = nn.Sequential(nn.Conv2d(cin, gw, 1, 1, 0), *_bn("conv", gw, bn), nn.ReLU(),
                             nn.Conv2d(gw, gw, 3, s, 1, groups=cardinality), *_bn("conv", gw, bn), nn.ReLU(),
                             nn.Conv2d(gw, cout, 1, 1, 0), *_bn("conv", cout, bn))
        layers.append(ResidualBlock(body, cin, cout, s, bn))
        cin, h = cout, _out_size(h, 3, s, 1)
    return nn.Sequential(*layers, *_head(cin, h, data, bn))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn7": cnn7,
    "wide-resnet": wide_resnet,
    "resnext": resnext,
    "cnn-small": cnn_small,
    "mlp": mlp,
}


# the size options each model takes (``certkit train --width/--depth/--hidden``) and their defaults
ARCH_OPTIONS: dict[str, dict[str, int]] = {"cnn7": {"width": 64}, "mlp": {"depth": 2, "hidden": 256}}


def model_args(name: str, **arch: int | None) -> dict[str, int]:
    """The size options of model ``name``, defaults filled in for those given as None.

    Raises ValueError for an unknown model, an option the model does not take, or a size < 1:
    a checkpoint or ONNX file records the result, so that it rebuilds the same model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    takes = ARCH_OPTIONS.get(name, {})
    given = {k: v for k, v in arch.items() if v is not None}
    for key, value in given.items():
        if key not in takes:
            which = ", ".join(f"--{k}" for k in takes) or "no size option"
            raise ValueError(f"--{key} does not apply to model {name!r} (it takes {which})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{key} must be a whole number >= 1, got {value!r}")
    return {**takes, **given}


def model_label(name: str, **arch: int | None) -> str:
    """A short name of the model and its non-default sizes, e.g. ``cnn7-w8``, ``mlp-d6-h128``
    (run directories: the default sizes keep the plain name they had before these options)."""
    defaults = ARCH_OPTIONS.get(name, {})
    return name + "".join(f"-{k[0]}{v}" for k, v in model_args(name, **arch).items() if v != defaults[k])


def build_model(name: str, dataset: str, bn: bool = True, **arch: int | None) -> nn.Module:
    """A registered model for a registered dataset; ``arch``: its size options (see
    :data:`ARCH_OPTIONS`; None means the default)."""
    args = model_args(name, **arch)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return MODELS[name](DATASETS[dataset], bn=bn, **args)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
