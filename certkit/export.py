"""BN-fused ONNX export, checked against onnxruntime and against the checkpoint's IBP bounds."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch import Tensor

from certkit import __version__
from certkit.errors import CertkitError
from certkit.files import write_atomically

OPSET = 13


class ExportCheckFailed(CertkitError):
    """The exported file does not compute what the checkpoint computes: nothing is written."""


def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of Conv2d/Linear ``layer`` with eval-mode ``bn`` folded into its weight and bias."""
    fused = copy.deepcopy(layer)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(
        bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
    w = layer.weight.detach()
    fused.weight = nn.Parameter(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
    b = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
    fused.bias = nn.Parameter(b * scale + shift)
    return fused


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a Conv2d or
    Linear inside an ``nn.Sequential`` folded into that layer."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = seq._modules[a], seq._modules[b]
            if isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                seq._modules[a] = _fold(layer, bn)
                seq._modules[b] = nn.Identity()
    return model


def export_onnx(model: nn.Module, out: str | Path, input_shape: tuple[int, ...], metadata: dict[str, Any],
                check_inputs: Tensor, check_eps: float, pixel_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Write ``model`` (BN folded) to ``out`` with ``metadata``, after two checks on ``check_inputs``:
    onnxruntime's outputs within 1e-4 of PyTorch's, and the file's IBP bounds on ε-boxes equal
    to the checkpoint's. Raises ExportCheckFailed (writing nothing) when either fails."""
    from certkit.bounds import compute_bounds
    from certkit.ort_session import run_onnxruntime

    model = copy.deepcopy(model).eval()
    fused = fuse_batchnorm(model)
    example = torch.zeros(1, *input_shape)
    report: dict[str, Any] = {}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fused, example, tmp, dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(tmp)
        left = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
        if left:
            raise ExportCheckFailed(f"batch norm could not be folded: {', '.join(left)}")
        meta = {"certkit_version": __version__, "input_shape": json.dumps(list(input_shape)),
                "pixel_range": json.dumps(list(pixel_range)), **{k: _meta_str(v) for k, v in metadata.items()}}
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)

        x = check_inputs.float()
        with torch.no_grad():
            ref = model(x).numpy()
        got = run_onnxruntime(tmp, x.numpy())
        diff = float(np.abs(ref - got).max())
        report["max_abs_diff"] = diff
        if not diff <= 1e-4:
            raise ExportCheckFailed(f"onnxruntime differs from PyTorch by {diff:.3g} (> 1e-4)")
        lo, up = (x - check_eps).clamp(*pixel_range), (x + check_eps).clamp(*pixel_range)
        with torch.no_grad():
            lb_ref, ub_ref = compute_bounds(model, lo, up, method="ibp")
            lb, ub = compute_bounds(tmp, lo, up, method="ibp")
        scale = 1e-4 * (1 + torch.maximum(lb_ref.abs(), ub_ref.abs()))
        gap = float(torch.maximum((lb - lb_ref).abs() / scale, (ub - ub_ref).abs() / scale).max())
        report["ibp_rel_gap"] = gap * 1e-4
        if not gap <= 1:
            raise ExportCheckFailed(f"IBP bounds of the ONNX file differ from the checkpoint's (relative {gap:.3g}e-4)")

    write_atomically(out, write)
    return report


def _meta_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def read_metadata(model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """The metadata properties of an ONNX file or model (empty for files not made by certkit)."""
    from certkit.onnx_io import read_proto

    proto = model if isinstance(model, onnx.ModelProto) else read_proto(model)
    return {p.key: p.value for p in proto.metadata_props}


def pixel_range_of(meta: dict[str, str], default: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """The input pixel range recorded by ``certkit export`` (``default`` for other files)."""
    return tuple(json.loads(meta["pixel_range"])) if "pixel_range" in meta else default


CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def export_checkpoint(ckpt: str | Path, out: str | Path, data_dir: str | None = None, check_samples: int = 64,
                      trust_checkpoint: bool = False) -> dict:
    """``certkit export --onnx``: a training checkpoint to a checked, BN-fused ONNX file
    (``trust_checkpoint``: ``--trust-checkpoint``, read a checkpoint that needs the unsafe unpickler)."""
    from certkit.train.data import load_dataset, to_float
    from certkit.train.loop import load_checkpoint
    from certkit.train.models import DATASETS, model_args

    model, cfg, _ = load_checkpoint(ckpt, trust=trust_checkpoint)
    info = DATASETS[cfg.dataset]
    x, _ = load_dataset(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir, "test")
    meta = {"dataset": cfg.dataset, "eps": cfg.eps_test, "eps_train": cfg.eps, "training_method": cfg.method,
            "model": cfg.model, "model_args": model_args(cfg.model, **cfg.arch),  # sizes: {"width": 8}, …
            "class_names": CLASS_NAMES.get(cfg.dataset, [str(i) for i in range(info.num_classes)]),
            "mean": list(info.mean), "std": list(info.std)}
    return export_onnx(model, out, info.shape, meta, to_float(x[:check_samples]), cfg.eps_test)
