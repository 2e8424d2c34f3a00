"""Label-free adaptation on the restricted inputs, before labelled fine-tuning: what source-free domain adaptation
methods do, as an attacker's first move. It sees the inputs only (:func:`inputs_of` drops the labels before
anything else touches the data), and trains every parameter of the released model with the recipe's optimizer.

- ``pseudo-label``: the model's own confident predictions (max probability >= ``threshold``, recomputed every
  batch) as targets; cross-entropy on those.
- ``entropy``: information maximisation (SHOT): minimise the mean prediction entropy while maximising the entropy
  of the mean prediction (confident and diverse), so the model cannot collapse onto one class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sophon_ray.registry import Registry

AdaptLoss = Callable[[Tensor, float], Tensor]   # (logits, threshold) -> scalar
ADAPT_LOSSES: Registry[AdaptLoss] = Registry("label-free adaptation")


@ADAPT_LOSSES.register("pseudo-label")
def pseudo_label_loss(logits: Tensor, threshold: float) -> Tensor:
    """Cross-entropy against the model's own argmax where its max probability >= threshold (0 if none is)."""
    probs = logits.detach().softmax(-1)
    confidence, target = probs.max(-1)
    keep = confidence >= threshold
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


@ADAPT_LOSSES.register("entropy")
def information_maximisation_loss(logits: Tensor, threshold: float) -> Tensor:
    """Mean per-sample entropy minus the entropy of the mean prediction (SHOT's IM loss)."""
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(-1).mean()
    mean = p.mean(0)
    diversity = -(mean * (mean + 1e-8).log()).sum()
    return per_sample - diversity


def inputs_of(dataset: Dataset) -> Tensor:
    """The inputs of ``dataset`` as one tensor; the labels are never read (TensorDatasets: the first tensor only;
    other datasets: the first element of each item)."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[0]
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def adapt(model: nn.Module, inputs: Tensor, method: str, epochs: int, optimizer: torch.optim.Optimizer,
          batch_size: int, generator: torch.Generator, threshold: float = 0.9,
          device: torch.device | str = "cpu") -> list[float]:
    """``epochs`` of label-free adaptation of ``model`` on ``inputs`` (a tensor: no labels exist here) with
    ``method`` (:data:`ADAPT_LOSSES`), in train mode; the mean loss per epoch."""
    loss_fn = ADAPT_LOSSES.get(method)
    model.train()
    losses = []
    for _ in range(epochs):
        order, total, steps = torch.randperm(len(inputs), generator=generator), 0.0, 0
        for start in range(0, len(inputs), batch_size):
            x = inputs[order[start:start + batch_size]].to(device)
            loss = loss_fn(model(x), threshold)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(1, steps))
    return losses
