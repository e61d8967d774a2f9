"""How wide IBP's intervals are at every ReLU layer: the fast method's "why", in numbers.

The paper's argument (ALGORITHMS.md §5–6) is that with the default initialisation IBP's
interval widths grow layer by layer, exponentially in depth, which makes early training
unstable, while IBP initialisation keeps them near the input's width and L_tightness keeps
them there during the warmup. :func:`relu_input_widths` measures exactly that: the mean IBP
interval width of every ReLU layer's input on the ε-boxes of a batch, and its ratio to the
mean width of the input box. The training loop records it before training and after the ε
ramp's last epoch in the note ``relu_widths`` of RUN_DIR/metrics.h5 (:func:`widths_of`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from certkit.bounds import BoundedModel
from certkit.bounds.graph import Graph
from certkit.bounds.ops import ElementwiseAffine
from certkit.train.metrics import MetricsFile


@dataclass
class WidthProfile:
    """Mean IBP interval widths (upper − lower, averaged over the batch and the neurons)."""

    eps: float
    input_width: float  # of the input box after the model's normalisation, as L_tightness sees it
    widths: list[float]  # of every ReLU layer's input, in graph order
    relative: list[float]  # widths / input_width (0 where the input box has no width)


def normalised_input(graph: Graph) -> str:
    """The node after the input normalisation (the box the reference implementation sees)."""
    name = graph.input.name
    while len(graph.consumers[name]) == 1 and isinstance(graph.by_name[graph.consumers[name][0]].op,
                                                         ElementwiseAffine):
        name = graph.consumers[name][0]
    return name


@torch.no_grad()
def relu_input_widths(bm: BoundedModel, x: Tensor, eps: float) -> WidthProfile:
    """The :class:`WidthProfile` of ``bm`` on the ε-boxes around the images ``x`` (clamped to
    [0, 1]). Train-mode batch norms use ``x``'s statistics, as a training step bounds its batch
    (the forward pass records them, and updates their running statistics: pass a copy, see
    :func:`model_widths`). IBP intervals of nested boxes are nested, so the widths grow with ε."""
    bm(x)
    bounds = bm.intervals((x - eps).clamp(0, 1), (x + eps).clamp(0, 1), "ibp")
    lo0, up0 = bounds[normalised_input(bm.graph)]
    input_width = float((up0 - lo0).mean())
    widths = [float((bounds[n.inputs[0]][1] - bounds[n.inputs[0]][0]).mean()) for n in bm.graph.relus]
    relative = [w / input_width if input_width > 0 else 0.0 for w in widths]
    return WidthProfile(eps, input_width, widths, relative)


def model_widths(model: nn.Module, input_shape: tuple[int, ...], x: Tensor, eps: float) -> WidthProfile:
    """:func:`relu_input_widths` of a train-mode copy of ``model``, leaving the run untouched: its
    batch norms' running statistics and the global random state (building the bound graph draws
    an example input) are as before."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        twin = copy.deepcopy(model).train()
        return relu_input_widths(BoundedModel(twin, input_shape), x, eps)


def widths_of(run_dir: str | Path) -> dict[int, WidthProfile]:
    """The profiles a training run recorded, by epoch (0: before training)."""
    notes = MetricsFile(Path(run_dir) / "metrics.h5").notes()
    return {epoch: WidthProfile(**p) for epoch, p in notes.get("relu_widths", {}).items()}
