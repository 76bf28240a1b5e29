"""Multi-task rankers, one file per family; ``build_ranker`` assembles one by name."""

from __future__ import annotations

import torch
from torch import nn

from features.schema import ExampleSchema
from models.rankers.config import RankerConfig
from models.rankers.mmoe import MMoE

ARCHITECTURES: dict[str, type[nn.Module]] = {"mmoe": MMoE}


def build_ranker(
    schema: ExampleSchema, config: RankerConfig, user_encoder: nn.Module | None = None
) -> nn.Module:
    """Instantiate ``config.arch`` for ``schema``; raises ValueError for an unknown arch."""
    if config.arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown ranker architecture {config.arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[config.arch](schema, config, user_encoder)


def init_output_bias(model: nn.Module, targets: torch.Tensor) -> None:
    """Start every task tower at its base rate (binary: log-odds of the training positive
    rate; regression: the training mean), so the first epochs are spent on ranking, not on
    finding the intercept. targets (N, K) with NaN where unobserved."""
    means = torch.nanmean(targets, dim=0)  # (K,)
    for tower, mean, binary in zip(model.towers, means, model.binary_tasks, strict=True):
        if torch.isnan(mean):
            continue
        value = torch.logit(mean.clamp(1e-4, 1 - 1e-4)) if binary else mean
        with torch.no_grad():
            tower.out.bias.fill_(float(value))


__all__ = ["ARCHITECTURES", "RankerConfig", "build_ranker", "init_output_bias"]
