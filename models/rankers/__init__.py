"""Multi-task rankers, one file per family; ``build_ranker`` assembles one by name.

Every architecture maps a ``RankerBatch`` to raw outputs (B, K) and has ``towers`` (one
``blocks.Tower`` per task, in schema order), ``binary_tasks`` (K bools), ``last_gate_weights``
((B, K, E) task-gate weights of the latest forward, None without gates) and
``gate_expert_names`` (its E column names). Experts are ``blocks.Expert`` modules, which is how
``models.diagnostics`` finds them.
"""

from __future__ import annotations

import torch
from torch import nn

from features.schema import ExampleSchema
from models.rankers.config import RankerConfig
from models.rankers.home import HoME
from models.rankers.mmoe import MMoE
from models.rankers.ple import CGC, PLE
from models.rankers.shared_bottom import SharedBottom

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "cgc": CGC,
    "ple": PLE,
    "home": HoME,
}


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
