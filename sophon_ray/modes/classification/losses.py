"""Suppression losses: minimised on the *adapted* model's restricted-domain query batch.

Each takes ``(logits [B, C], labels [B])`` and returns the batch mean. They saturate where the restricted
task has failed, so the outer loop converges instead of diverging as plain negative cross-entropy does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sophon_ray.registry import Registry

LOSSES: Registry = Registry("suppression loss")


@LOSSES.register("ice")
def ice(logits: Tensor, labels: Tensor) -> Tensor:
    """Inverse cross-entropy (paper form): mean of -log(1 - p_y), p = softmax(logits).

    Computed stably as -(logsumexp(z without z_y) - logsumexp(z)). Its gradient wrt z_y is p_y, which
    vanishes as p_y -> 0: the loss saturates once the restricted task fails.
    """
    masked = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))  # no one_hot: it syncs on CUDA
    return (torch.logsumexp(logits, dim=-1) - torch.logsumexp(masked, dim=-1)).mean()


@LOSSES.register("ice_code")
def ice_code(logits: Tensor, labels: Tensor) -> Tensor:
    """The official code's inverse cross-entropy: CrossEntropy(1 - logits, y) (a different saturating function)."""
    return F.cross_entropy(1.0 - logits, labels)


@LOSSES.register("klu")
def klu(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """KL(U || softmax(logits)) with U uniform over the C classes: mean of -(1/C) sum_j log(C p_j).

    Needs no labels; its gradient wrt z_j is p_j - 1/C, zero at the uniform prediction.
    """
    num_classes = logits.shape[-1]
    return (-(F.log_softmax(logits, dim=-1).mean(dim=-1)) - math.log(num_classes)).mean()
