"""Specification matrices: linear functions of the outputs to bound."""

from __future__ import annotations

import torch
from torch import Tensor


def margin_matrix(labels: Tensor, num_classes: int) -> Tensor:
    """C of shape (B, K-1, K) with rows e_y − e_j for every j ≠ y.

    Lower bounds of C·f(x) are the margins f_y − f_j; the sample is verified when all of
    them are > 0.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    B, K = labels.shape[0], num_classes
    eye = torch.eye(K, device=labels.device)
    C = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j is e_y - e_j
    # the K-1 classes other than y in increasing order: j for j < y, j+1 for j >= y (no boolean
    # indexing, which would make a GPU wait)
    j = torch.arange(K - 1, device=labels.device).expand(B, K - 1)
    keep = j + (j >= labels.unsqueeze(1)).long()
    return torch.gather(C, 1, keep.unsqueeze(-1).expand(B, K - 1, K))
