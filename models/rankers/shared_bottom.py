"""Shared-Bottom: one MLP shared by every task, one tower per task (Caruana, 1997).

    x = InputEncoder(batch)                    # (B, F)
    h = Bottom(x)                              # (B, H)
    logit_k = Tower_k(h)                       # (B,)  → stacked (B, K)

The baseline every multi-gate model has to beat: all tasks share all of the bottom.
"""

from __future__ import annotations

import torch
from torch import nn

from features.schema import ExampleSchema
from models.batch import RankerBatch
from models.blocks import Expert, Tower, run_towers
from models.inputs import InputEncoder
from models.rankers.config import RankerConfig


class SharedBottom(nn.Module):
    """Named parts: ``encoder``, ``bottom`` (one expert-shaped MLP), ``towers``.

    ``forward`` returns raw outputs (B, K). It has no gates: ``last_gate_weights`` is None.
    """

    def __init__(
        self, schema: ExampleSchema, config: RankerConfig, user_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.encoder = InputEncoder(schema, config.inputs, user_encoder)
        self.bottom = Expert(self.encoder.out_dim, config.expert_hidden, config.dropout)
        self.towers = nn.ModuleList(
            Tower(self.bottom.out_dim, config.tower_hidden, config.dropout) for _ in schema.tasks
        )
        self.binary_tasks = [task.kind == "binary" for task in schema.tasks]
        self.gate_expert_names: list[str] = []
        self.last_gate_weights: torch.Tensor | None = None

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        h = self.bottom(self.encoder(batch))  # (B, H)
        return run_towers(self.towers, h.unsqueeze(1).expand(-1, len(self.towers), -1))  # (B, K)
