"""IBP initialisation (ALGORITHMS.md §5): keep the interval width stable through depth at init."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from certkit.bounds.graph import Graph
from certkit.bounds.ops import Add, Conv2d, Linear


def ibp_sigma(fan_in: int) -> float:
    """σ = √(2π) / n: with W ~ N(0, σ²), E|W| = σ√(2/π) and the width gain n·E|W|/2 is 1."""
    return math.sqrt(2 * math.pi) / fan_in


def _layers(graph: Graph) -> list:
    return [n for n in graph.nodes[1:] if isinstance(n.op, (Linear, Conv2d)) and n.op.module is not None]


def _after_residual(graph: Graph, name: str) -> bool:
    """Whether the node's input is ReLU(Add(…)), looking through reshapes."""
    node = graph.by_name[graph.by_name[name].inputs[0]]
    while node.op is not None and node.op.kind in ("reshape", "permute"):
        node = graph.by_name[node.inputs[0]]
    if node.op is None or node.op.kind != "relu":
        return False
    return isinstance(graph.by_name[node.inputs[0]].op, Add)


@torch.no_grad()
def ibp_init(model: nn.Module, graph: Graph) -> list[str]:
    """Draw every Conv/Linear weight but the classifier's from N(0, (√(2π)/fan_in)²), halve
    those fed by a residual addition, reset BN to γ=1, β=0; biases keep PyTorch's default.
    Returns the names of the re-initialised graph nodes."""
    layers = _layers(graph)
    done = []
    for node in layers[:-1]:  # the last one is the classifier
        w = node.op.module.weight
        fan_in = w[0].numel()  # in_features, or in_channels/groups · kH · kW
        w.normal_(0.0, ibp_sigma(fan_in))
        if _after_residual(graph, node.name):
            w.mul_(0.5)
        done.append(node.name)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.fill_(1.0)
            m.bias.zero_()
    return done
