"""What tells you a multi-task multi-gate ranker is healthy, measured on a trained model.

- ``expert_activity``: per expert, the fraction of zero activations in its output (expert
  collapse: a ReLU expert with > 90 % zeros is nearly dead), the fraction of its output units
  that are zero on every example (dead units), and the mean / std of its output (HoME's
  expert normalisation is meant to align these across experts);
- ``gate_usage``: the mean task-gate weight of every task on every expert (expert
  degradation: a shared expert that only one task uses);
- ``task_gradients``: the norm of each task's loss gradient at the shared layers (the input
  encoder, and the parameters above it that at least two tasks reach) and the cosine between
  tasks' gradients there (negative = the tasks pull the shared layers apart).

Everything runs in eval mode under no parameter update; experts are found as the
``blocks.Expert`` modules of the model, gates through ``last_gate_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.batch import ExampleArrays
from models.blocks import Expert
from models.losses import MultiTaskLoss

ZERO_TOLERANCE = 1e-6
"""An activation with |a| <= this counts as zero (ReLU zeros are exact; Swish never is)."""


@dataclass(frozen=True)
class ExpertActivity:
    """Per expert (E,): names, zero-activation fraction, dead-unit fraction, output mean/std."""

    names: list[str]
    zero_fraction: np.ndarray
    dead_unit_fraction: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def to_dict(self) -> dict:
        return {name: {"zero_fraction": float(z), "dead_unit_fraction": float(d),
                       "mean": float(m), "std": float(s)}
                for name, z, d, m, s in zip(self.names, self.zero_fraction,
                                            self.dead_unit_fraction, self.mean, self.std,
                                            strict=True)}


@dataclass(frozen=True)
class GateUsage:
    """Mean task-gate weights (K, E): row = task, column = expert (0 where masked)."""

    tasks: list[str]
    experts: list[str]
    weights: np.ndarray

    def to_dict(self) -> dict:
        return {task: dict(zip(self.experts, map(float, row), strict=True))
                for task, row in zip(self.tasks, self.weights, strict=True)}


@dataclass(frozen=True)
class TaskGradients:
    """Per task the gradient norm at each shared group (K, G), and the cosine between tasks'
    gradients over all shared parameters (K, K); ``shared_parameters`` lists the non-encoder
    parameters counted as shared."""

    tasks: list[str]
    groups: list[str]
    norms: np.ndarray
    cosine: np.ndarray
    shared_parameters: list[str]

    def to_dict(self) -> dict:
        return {
            "norms": {task: dict(zip(self.groups, map(float, row), strict=True))
                      for task, row in zip(self.tasks, self.norms, strict=True)},
            "cosine": {task: dict(zip(self.tasks, map(float, row), strict=True))
                       for task, row in zip(self.tasks, self.cosine, strict=True)},
            "shared_parameters": self.shared_parameters,
        }


def named_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``blocks.Expert`` of the model with its module path, in registration order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Expert)]


@torch.no_grad()
def expert_activity(
    model: nn.Module, data: ExampleArrays, max_rows: int = 8192, batch_size: int = 2048
) -> ExpertActivity:
    """Expert output statistics over the first ``max_rows`` rows of ``data`` (eval mode)."""
    experts = named_experts(model)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in experts}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: outputs[name].append(out.detach())
        )
        for name, module in experts
    ]
    model.eval()
    try:
        rows = np.arange(min(len(data), max_rows))
        for start in range(0, len(rows), batch_size):
            model(data.batch(rows[start:start + batch_size]))
    finally:
        for handle in handles:
            handle.remove()
    zero, dead, mean, std = [], [], [], []
    for name, _ in experts:
        a = torch.cat(outputs[name])  # (N, H)
        is_zero = a.abs() <= ZERO_TOLERANCE
        zero.append(is_zero.float().mean().item())
        dead.append(is_zero.all(dim=0).float().mean().item())
        mean.append(a.mean().item())
        std.append(a.std().item())
    return ExpertActivity([name for name, _ in experts], np.array(zero), np.array(dead),
                          np.array(mean), np.array(std))


@torch.no_grad()
def gate_usage(
    model: nn.Module, data: ExampleArrays, task_names: list[str], max_rows: int = 8192,
    batch_size: int = 2048,
) -> GateUsage | None:
    """Mean ``last_gate_weights`` over the first ``max_rows`` rows; None without gates."""
    if not getattr(model, "gate_expert_names", None):
        return None
    model.eval()
    total, count = None, 0
    rows = np.arange(min(len(data), max_rows))
    for start in range(0, len(rows), batch_size):
        model(data.batch(rows[start:start + batch_size]))
        weights = model.last_gate_weights  # (B, K, E)
        total = weights.sum(0) if total is None else total + weights.sum(0)
        count += weights.shape[0]
    mean = (total / max(count, 1)).numpy()  # (K, E)
    return GateUsage(list(task_names), list(model.gate_expert_names), mean)


def task_gradients(
    model: nn.Module, loss_fn: MultiTaskLoss, data: ExampleArrays, task_names: list[str],
    rows: int = 4096, seed: int = 0,
) -> TaskGradients:
    """Per-task gradients of the raw task losses on ``rows`` random rows (eval mode, so no
    BatchNorm statistics move; no optimiser step). Shared groups: ``encoder`` (the input
    encoder) and ``shared`` (every other parameter that at least two tasks' gradients reach);
    ``all_shared`` is both together."""
    model.eval()
    chosen = np.sort(np.random.default_rng(seed).choice(len(data), min(rows, len(data)),
                                                        replace=False))
    batch = data.batch(chosen)
    per_task = loss_fn.per_task(model(batch), batch.labels, batch.label_mask)  # (K,)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads: list[list[torch.Tensor]] = []
    for k in range(len(task_names)):
        if batch.label_mask[:, k].any():
            g = torch.autograd.grad(per_task[k], [p for _, p in named], retain_graph=True,
                                    allow_unused=True)
        else:
            g = (None,) * len(named)
        grads.append([torch.zeros_like(p) if gk is None else gk
                      for gk, (_, p) in zip(g, named, strict=True)])
    reached = np.array([[bool(grads[k][i].abs().sum() > 0) for i in range(len(named))]
                        for k in range(len(task_names))])  # (K, P)
    is_encoder = np.array([name.startswith("encoder.") for name, _ in named])
    is_shared = ~is_encoder & (reached.sum(0) >= 2)
    groups = {"encoder": is_encoder, "shared": is_shared, "all_shared": is_encoder | is_shared}
    norms = np.zeros((len(task_names), len(groups)))
    flat = []
    for k in range(len(task_names)):
        for j, selected in enumerate(groups.values()):
            vectors = [grads[k][i].reshape(-1) for i in np.flatnonzero(selected)]
            norms[k, j] = float(torch.cat(vectors).norm()) if vectors else 0.0
        flat.append(torch.cat([grads[k][i].reshape(-1)
                               for i in np.flatnonzero(groups["all_shared"])]))
    stacked = torch.stack(flat)  # (K, P_shared)
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cosine = (unit @ unit.T).numpy()  # (K, K)
    shared_names = [name for (name, _), s in zip(named, is_shared, strict=True) if s]
    return TaskGradients(list(task_names), list(groups), norms, cosine, shared_names)
