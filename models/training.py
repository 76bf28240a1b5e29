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
from models.distributed import (
    Rank,
    dense_parameters,
    embedding_modules,
    embedding_optimizer_class,
    embedding_optimizer_kwargs,
    move_batch,
    per_rank_batch,
)
from models.losses import MultiTaskLoss


class TrainingDivergedError(FloatingPointError):
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
    shuffle: bool = True
    """Shuffle the training rows every epoch (seeded); False keeps file order (used to check
    that a distributed run computes what one process computes)."""
    embedding_optimizer: str = "adam"
    """Optimiser of the embedding tables: "adam" (like the dense parts), "adagrad",
    "rowwise_adagrad" or "sgd". Distributed training on CPU needs one that fbgemm's fused CPU
    kernel implements (not Adam; see ``models.distributed``); the CLI picks "adagrad" there."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 2:  # HoME's batch-normalised experts cannot train on one row
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")

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
    rank: Rank | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns per-epoch mean losses ``{"loss", "loss_<task>"}`` and
    the effective task weights at the epoch's end ``{"weight_<task>"}``. The loss's own
    parameters (uncertainty weighting) are optimised with the model's.

    Distributed (``rank`` given, see ``models.distributed``): ``model`` is the
    ``DistributedModelParallel`` from ``shard_ranker`` (its tables update themselves in the
    backward pass), ``train`` this rank's shard; each step takes ``batch_size // W`` rows
    here (global batch ``batch_size``) in an order of its own (seeded by seed, epoch and
    rank), the logged losses are means over all ranks, and
    ``on_epoch_end`` runs on every rank (it may call collectives).

    Raises TrainingDivergedError at the first non-finite loss (on every rank at once).
    """
    torch.manual_seed(config.seed + (0 if rank is None else 1_000_003 * rank.rank))  # dropout
    optimisers = make_optimisers(model, loss_fn, config, distributed=rank is not None)
    world = 1 if rank is None else rank.world_size
    batch_size = config.batch_size if rank is None else per_rank_batch(config.batch_size, world)
    device = torch.device("cpu") if rank is None else rank.device
    show = config.progress and (rank is None or rank.is_main)
    history = []
    for epoch in range(config.epochs):
        model.train()
        totals = np.zeros(len(task_names) + 1)
        steps = 0
        seed = config.seed + epoch + (0 if rank is None else 1_000_003 * rank.rank)
        batches = train.batches(batch_size, shuffle=config.shuffle, seed=seed)  # own order
        n_batches = train.n_batches(batch_size)
        bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not show or None, leave=False, mininterval=1.0)
        for batch in bar:
            if rank is not None:
                batch = move_batch(batch, device)
            loss, per_task = loss_fn(model(batch), batch.labels, batch.label_mask)
            value = loss.item() if rank is None else float(rank.all_mean([loss.item()])[0])
            if not math.isfinite(value):  # all ranks see the same mean: all stop together
                raise TrainingDivergedError(
                    f"loss is {value} at epoch {epoch + 1}, step {steps + 1}; "
                    "lower the learning rate or check the labels"
                )
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if rank is not None:  # DDP averages the model's gradients, not the loss's
                rank.average_gradients(loss_fn.parameters())
            for optimiser in optimisers:
                optimiser.step()
            totals += np.concatenate([[loss.item()], per_task.cpu().numpy()])
            steps += 1
            bar.set_postfix(loss=f"{totals[0] / steps:.4f}")
        means = totals / max(steps, 1)
        if rank is not None:
            means = rank.all_mean(means)
        record = {"loss": float(means[0])}
        record.update(
            {f"loss_{name}": float(v) for name, v in zip(task_names, means[1:], strict=True)}
        )
        record.update({f"weight_{name}": w for name, w in loss_fn.task_weights().items()})
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


def make_optimisers(model: nn.Module, loss_fn: MultiTaskLoss, config: TrainConfig,
                    distributed: bool = False) -> list[torch.optim.Optimizer]:
    """Adam over the dense parameters and the loss's own; the embedding tables get
    ``config.embedding_optimizer`` (one Adam for everything when that is "adam"). Distributed,
    the sharded tables are already optimised inside the backward pass (fused kernel), so only
    the dense Adam is returned."""
    def adam(params: list) -> torch.optim.Optimizer:  # fused: one kernel for all (CPU too)
        groups = [{"params": params}]
        loss_params = list(loss_fn.parameters())
        if loss_params:  # decay would pull the uncertainty log-variances (task weights) to 0
            groups.append({"params": loss_params, "weight_decay": 0.0})
        return torch.optim.Adam(groups, lr=config.learning_rate,
                                weight_decay=config.weight_decay, fused=True)

    if distributed:
        return [adam(dense_parameters(model))]
    if config.embedding_optimizer == "adam":
        return [adam(list(model.parameters()))]
    tables = make_table_optimiser(model, config.embedding_optimizer, config.learning_rate,
                                  config.weight_decay)
    in_tables = {id(p) for group in tables.param_groups for p in group["params"]}
    return [adam([p for p in model.parameters() if id(p) not in in_tables]), tables]


def make_table_optimiser(model: nn.Module, name: str, learning_rate: float,
                         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The single-process optimiser ``name`` over the trainable parameters of ``model``'s
    TorchRec embedding modules, with the hyperparameters the fused distributed kernel uses
    (so one process trains its tables as the sharded ones are trained)."""
    tables = {id(p) for module in embedding_modules(model).values()
              for p in module.parameters()}
    embedding = [p for p in model.parameters() if id(p) in tables]
    return embedding_optimizer_class(name)(
        embedding, **embedding_optimizer_kwargs(name, learning_rate, weight_decay))


@torch.no_grad()
def predict_outputs(model: nn.Module, data: ExampleArrays, batch_size: int = 4096) -> np.ndarray:
    """Raw model outputs (N, K) in row order, in eval mode."""
    model.eval()
    chunks = [model(batch).numpy() for batch in data.batches(batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
