"""Multi-task loss, kept outside the scoring modules.

Two ways to weight the tasks (``TrainConfig.loss_weighting``):

- ``fixed``: ``sum_k w_k L_k`` with the configured weights (default 1.0 each);
- ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): one learned log-variance
  ``s_k = log sigma_k^2`` per task,
  ``sum_k w_k (c_k exp(-s_k) L_k + s_k / 2)`` with ``c_k = 1`` for a binary task (BCE) and
  ``1/2`` for a regression task (MSE). A noisy task learns a large ``sigma_k`` and so a small
  effective weight; the ``s_k / 2`` term stops every ``sigma_k`` from growing without bound.
  A task with no observed label in a batch contributes nothing, its regulariser included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from features.schema import TaskSpec

WEIGHTINGS: tuple[str, ...] = ("fixed", "uncertainty")


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses over observed labels only.

    outputs, labels (B, K); mask (B, K) bool. Binary tasks: BCE on logits; regression: MSE.
    Returns (total scalar, per-task (K,) detached raw losses). A task with no observed label in
    the batch contributes 0. With ``weighting="uncertainty"`` the module has one parameter,
    ``log_variance`` (K,), which the optimiser must train with the model.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        weights: Mapping[str, float] | None = None,
        weighting: str = "fixed",
    ):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
        given = dict(weights or {})
        unknown = set(given) - {task.name for task in tasks}
        if unknown:
            raise ValueError(f"task weights for unknown tasks {sorted(unknown)}; "
                             f"tasks are {[task.name for task in tasks]}")
        bad = {name: w for name, w in given.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ValueError(f"task weights must be finite and >= 0, got {bad}")
        self.weighting = weighting
        self.task_names = [task.name for task in tasks]
        self.register_buffer("binary", torch.tensor([task.kind == "binary" for task in tasks]))
        self.register_buffer(
            "weights", torch.tensor([float(given.get(task.name, 1.0)) for task in tasks])
        )
        self.log_variance = (
            nn.Parameter(torch.zeros(len(tasks))) if weighting == "uncertainty" else None
        )

    def per_task(
        self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw (unweighted) mean loss per task over its observed labels, with graph. (K,)"""
        bce = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
        mse = (outputs - labels) ** 2
        elementwise = torch.where(self.binary.unsqueeze(0), bce, mse)  # (B, K)
        observed = mask.float()
        return (elementwise * observed).sum(0) / observed.sum(0).clamp(min=1.0)  # (K,)

    def forward(
        self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_task = self.per_task(outputs, labels, mask)  # (K,)
        if self.log_variance is None:
            return (per_task * self.weights).sum(), per_task.detach()
        scale = torch.where(self.binary, 1.0, 0.5)  # (K,)
        present = (mask.sum(0) > 0).float()  # (K,)
        s = self.log_variance
        weighted = scale * torch.exp(-s) * per_task + 0.5 * s * present  # (K,)
        return (weighted * self.weights).sum(), per_task.detach()

    def task_weights(self) -> dict[str, float]:
        """The effective weight of each task's raw loss now: ``w_k`` (fixed) or
        ``w_k c_k exp(-s_k)`` (uncertainty), for logging."""
        effective = self.weights.clone()
        if self.log_variance is not None:
            scale = torch.where(self.binary, 1.0, 0.5)
            effective = effective * scale * torch.exp(-self.log_variance.detach())
        return {name: float(w) for name, w in zip(self.task_names, effective, strict=True)}


def task_predictions(outputs: torch.Tensor, tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """Raw outputs (B, K) → predictions: probabilities for binary, seconds for regression."""
    binary = torch.tensor([task.kind == "binary" for task in tasks]).unsqueeze(0)
    return torch.where(binary, torch.sigmoid(outputs), torch.expm1(outputs.clamp(max=20.0)))
