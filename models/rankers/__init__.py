"""Multi-task rankers, one file per family; ``build_ranker`` assembles one by name."""

from __future__ import annotations

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


__all__ = ["ARCHITECTURES", "RankerConfig", "build_ranker"]
