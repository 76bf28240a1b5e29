"""Multi-task loss, kept outside the scoring modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from features.schema import TaskSpec


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses over observed labels only.

    outputs, labels (B, K); mask (B, K) bool. Binary tasks: BCE on logits; regression: MSE.
    Returns (total scalar, per-task (K,) detached losses). A task with no observed label in
    the batch contributes 0.
    """

    def __init__(self, tasks: Sequence[TaskSpec], weights: Mapping[str, float] | None = None):
        super().__init__()
        self.binary = torch.tensor([task.kind == "binary" for task in tasks])
        given = weights or {}
        self.register_buffer(
            "weights", torch.tensor([float(given.get(task.name, 1.0)) for task in tasks])
        )

    def forward(
        self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bce = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
        mse = (outputs - labels) ** 2
        elementwise = torch.where(self.binary.unsqueeze(0), bce, mse)  # (B, K)
        observed = mask.float()
        per_task = (elementwise * observed).sum(0) / observed.sum(0).clamp(min=1.0)  # (K,)
        return (per_task * self.weights).sum(), per_task.detach()


def task_predictions(outputs: torch.Tensor, tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """Raw outputs (B, K) → predictions: probabilities for binary, seconds for regression."""
    binary = torch.tensor([task.kind == "binary" for task in tasks]).unsqueeze(0)
    return torch.where(binary, torch.sigmoid(outputs), torch.expm1(outputs.clamp(max=20.0)))
