"""The one training loop for rankers (and anything mapping a RankerBatch to (B, K) outputs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from models.batch import ExampleArrays
from models.losses import MultiTaskLoss


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing trained this way should be registered."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 2
    """Passes over the training split."""
    batch_size: int = 512
    """Examples per optimiser step."""
    learning_rate: float = 3e-3
    """Adam learning rate (dense and embedding parameters alike)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    seed: int = 0
    """Seeds parameter init and shuffling."""
    task_weights: Mapping[str, float] = field(default_factory=dict)
    """Fixed loss weight per task name (default 1.0); with uncertainty weighting, a constant
    factor on top of the learned weight."""
    loss_weighting: str = "fixed"
    """How task losses are combined: "fixed" (``task_weights``) or "uncertainty" (Kendall et
    al. 2018: learned per-task log-variances, see ``models.losses``)."""
    progress: bool = True
    """Show a progress bar per epoch."""

    def to_dict(self) -> dict:
        return asdict(self)


EpochCallback = Callable[[int, dict[str, float]], None]


def fit(
    model: nn.Module,
    loss_fn: MultiTaskLoss,
    train: ExampleArrays,
    config: TrainConfig,
    task_names: list[str],
    on_epoch_end: EpochCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns per-epoch mean losses ``{"loss", "loss_<task>"}`` and
    the effective task weights at the epoch's end ``{"weight_<task>"}``. The loss's own
    parameters (uncertainty weighting) are optimised with the model's.

    Raises TrainingDivergedError at the first non-finite loss.
    """
    torch.manual_seed(config.seed)
    optimiser = torch.optim.Adam(  # fused: one kernel for all parameters (CPU too)
        [*model.parameters(), *loss_fn.parameters()],
        lr=config.learning_rate, weight_decay=config.weight_decay, fused=True,
    )
    history = []
    for epoch in range(config.epochs):
        model.train()
        totals = np.zeros(len(task_names) + 1)
        steps = 0
        batches = train.batches(config.batch_size, shuffle=True, seed=config.seed + epoch)
        n_batches = math.ceil(len(train) / config.batch_size)
        bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not config.progress, leave=False, mininterval=1.0)
        for batch in bar:
            loss, per_task = loss_fn(model(batch), batch.labels, batch.label_mask)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss is {loss.item()} at epoch {epoch + 1}, step {steps + 1}; "
                    "lower the learning rate or check the labels"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            totals += np.concatenate([[loss.item()], per_task.numpy()])
            steps += 1
            bar.set_postfix(loss=f"{totals[0] / steps:.4f}")
        means = totals / max(steps, 1)
        record = {"loss": float(means[0])}
        record.update(
            {f"loss_{name}": float(v) for name, v in zip(task_names, means[1:], strict=True)}
        )
        record.update({f"weight_{name}": w for name, w in loss_fn.task_weights().items()})
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


@torch.no_grad()
def predict_outputs(model: nn.Module, data: ExampleArrays, batch_size: int = 4096) -> np.ndarray:
    """Raw model outputs (N, K) in row order, in eval mode."""
    model.eval()
    chunks = [model(batch).numpy() for batch in data.batches(batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
