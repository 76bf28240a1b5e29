"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

E shared experts; one softmax gate per task mixes them; one tower per task.
    x = InputEncoder(batch)                    # (B, F)
    h_e = Expert_e(x)                          # (B, E, H)
    g_k = softmax(W_k x)                       # (B, E) per task
    logit_k = Tower_k(sum_e g_k,e h_e)         # (B,)  → stacked (B, K)
"""

from __future__ import annotations

import torch
from torch import nn

from features.schema import ExampleSchema
from models.batch import RankerBatch
from models.blocks import Expert, Gate, Tower, mix_experts, run_experts, run_gates, run_towers
from models.inputs import InputEncoder
from models.rankers.config import RankerConfig


class MMoE(nn.Module):
    """Named parts: ``encoder``, ``experts``, ``gates``, ``towers``.

    ``forward`` returns raw outputs (B, K): logits for binary tasks, values for regression.
    ``last_gate_weights`` keeps the (B, K, E) gate weights of the latest call for diagnostics;
    ``gate_expert_names`` names its E columns (module paths of the experts).
    """

    def __init__(
        self, schema: ExampleSchema, config: RankerConfig, user_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.encoder = InputEncoder(schema, config.inputs, user_encoder)
        self.experts = nn.ModuleList(
            Expert(self.encoder.out_dim, config.expert_hidden, config.dropout)
            for _ in range(config.n_experts)
        )
        expert_dim = self.experts[0].out_dim
        self.gates = nn.ModuleList(
            Gate(self.encoder.out_dim, config.n_experts) for _ in schema.tasks
        )
        self.towers = nn.ModuleList(
            Tower(expert_dim, config.tower_hidden, config.dropout) for _ in schema.tasks
        )
        self.binary_tasks = [task.kind == "binary" for task in schema.tasks]
        self.gate_expert_names = [f"experts.{e}" for e in range(config.n_experts)]
        self.last_gate_weights: torch.Tensor | None = None

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        x = self.encoder(batch)  # (B, F)
        experts = run_experts(self.experts, x)  # (B, E, H)
        weights = run_gates(self.gates, x)  # (B, K, E)
        self.last_gate_weights = weights.detach()
        mixed = mix_experts(experts, weights)  # (B, K, H)
        return run_towers(self.towers, mixed)  # (B, K)
