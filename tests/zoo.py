"""Standard architectures exported to ONNX the way users export them: torchvision classifiers
and transformers with seeded random weights, small inputs and 10 classes (shared by
tests/test_zoo.py and benchmarks/zoo.py)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn


class TransformerClassifier(nn.Module):
    """A ``torch.nn.TransformerEncoder`` over a sequence of 6 tokens of 8 features, mean-pooled."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class SoftmaxMLP(nn.Module):
    """An MLP with LeakyReLU and ReLU6 ending in Softmax."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = nn.functional.leaky_relu(self.fc1(x), 0.1)
        h = nn.functional.relu6(self.fc2(h))
        return torch.softmax(self.fc3(h), -1)


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10, **kw)

    return make


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


# name -> (constructor, per-sample input shape)
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (_tv("resnet18"), (3, 32, 32)),
    "mobilenet_v2": (_tv("mobilenet_v2"), (3, 32, 32)),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), (3, 32, 32)),
    "squeezenet1_1": (_tv("squeezenet1_1"), (3, 64, 64)),
    "efficientnet_b0": (_tv("efficientnet_b0"), (3, 32, 32)),
    "vit": (_vit, (3, 32, 32)),
    "transformer_encoder": (TransformerClassifier, (6, 8)),
    "softmax_mlp": (SoftmaxMLP, (20,)),
}


def export(name: str, folder: Path, dynamo: bool = False, seed: int = 0) -> Path:
    """Export ``name`` with seeded weights (eval mode, batch-norm statistics randomised so
    they are not the identity) to ``folder/name.onnx``, opset 17, dynamic batch; reused when
    present."""
    path = Path(folder) / f"{name}{'_dynamo' if dynamo else ''}.onnx"
    if path.is_file():
        return path
    make, shape = ZOO[name]
    torch.manual_seed(seed)
    model = make().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.Linear) and not m.weight.any():  # ViT's head starts at zero
                nn.init.normal_(m.weight, std=0.1)
    x = torch.rand(1, *shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), opset_version=18, dynamo=True, input_names=["input"],
                              verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
