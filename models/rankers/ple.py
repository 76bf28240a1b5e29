"""CGC and PLE: Customized Gate Control and Progressive Layered Extraction (Tang et al.,
RecSys 2020).

Each extraction level has shared experts and, per task, its own experts. A task's gate mixes
its own experts and the shared ones; a shared gate (every level but the last) mixes all of
them into the next level's shared input. CGC is one level; PLE stacks ``n_levels``.
    t_k^0 = s^0 = InputEncoder(batch)                                  # (B, F)
    t_k^l = softmax(W_k^l t_k^(l-1)) · [T_k^l(t_k^(l-1)), S^l(s^(l-1))]   # (B, H) per task
    s^l   = softmax(W_s^l s^(l-1)) · [T_1^l, …, T_K^l, S^l]             # (B, H), l < L
    logit_k = Tower_k(t_k^L)                                           # (B,) → (B, K)
"""

from __future__ import annotations

import torch
from torch import nn

from features.schema import ExampleSchema
from models.batch import RankerBatch
from models.blocks import (
    Expert,
    Gate,
    Tower,
    mix_experts,
    run_experts,
    run_towers,
    scatter_gate_weights,
)
from models.inputs import InputEncoder
from models.rankers.config import RankerConfig


class ExtractionLevel(nn.Module):
    """One PLE level. Named parts: ``shared`` experts, ``task`` experts (per task name),
    ``task_gates`` (per task name), ``shared_gate`` (None on the last level)."""

    def __init__(
        self, in_dim: int, task_names: list[str], config: RankerConfig, last: bool
    ) -> None:
        super().__init__()
        hidden, dropout = config.expert_hidden, config.dropout
        self.task_names = task_names
        self.shared = nn.ModuleList(
            Expert(in_dim, hidden, dropout) for _ in range(config.n_experts)
        )
        self.task = nn.ModuleDict({
            name: nn.ModuleList(
                Expert(in_dim, hidden, dropout) for _ in range(config.n_task_experts)
            )
            for name in task_names
        })
        per_task_gate = config.n_task_experts + config.n_experts
        self.task_gates = nn.ModuleDict({name: Gate(in_dim, per_task_gate) for name in task_names})
        n_all = config.n_experts + config.n_task_experts * len(task_names)
        self.shared_gate = None if last else Gate(in_dim, n_all)
        self.out_dim = hidden[-1]
        # columns of the (B, K, E_all) gate weights: shared experts, then each task's experts
        self.expert_columns = [f"shared.{e}" for e in range(config.n_experts)] + [
            f"task.{name}.{e}" for name in task_names for e in range(config.n_task_experts)
        ]

    def forward(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """task_inputs K × (B, F_in), shared_input (B, F_in) → (K × (B, H) task outputs,
        (B, H) shared output or None on the last level, (B, K, E_all) task gate weights)."""
        shared = run_experts(self.shared, shared_input)  # (B, S, H)
        own = [run_experts(self.task[name], x) for name, x in zip(self.task_names, task_inputs,
                                                                    strict=True)]  # K×(B, T, H)
        n_shared, n_own = shared.shape[1], own[0].shape[1]
        n_all = len(self.expert_columns)
        outputs, weights = [], []
        for k, (name, x) in enumerate(zip(self.task_names, task_inputs, strict=True)):
            gate = self.task_gates[name](x)  # (B, T + S)
            candidates = torch.cat([own[k], shared], dim=1)  # (B, T + S, H)
            outputs.append(mix_experts(candidates, gate))
            columns = [n_shared + k * n_own + j for j in range(n_own)] + list(range(n_shared))
            weights.append(scatter_gate_weights(gate.detach(), columns, n_all))
        shared_out = None
        if self.shared_gate is not None:
            everything = torch.cat([shared, *own], dim=1)  # (B, E_all, H)
            shared_out = mix_experts(everything, self.shared_gate(shared_input))
        return outputs, shared_out, torch.stack(weights, dim=1)


class PLE(nn.Module):
    """Named parts: ``encoder``, ``levels`` (ExtractionLevel list), ``towers``.

    ``forward`` returns raw outputs (B, K). ``last_gate_weights`` keeps the last level's task
    gate weights (B, K, E_all) over all of that level's experts, zero where a task's gate cannot
    see an expert (another task's own experts); ``gate_expert_names`` names the columns.
    """

    n_levels_override: int | None = None

    def __init__(
        self, schema: ExampleSchema, config: RankerConfig, user_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        n_levels = self.n_levels_override or config.n_levels
        if n_levels < 1:
            raise ValueError(f"PLE needs n_levels >= 1, got {n_levels}")
        names = [task.name for task in schema.tasks]
        self.encoder = InputEncoder(schema, config.inputs, user_encoder)
        dims = [self.encoder.out_dim] + [config.expert_hidden[-1]] * (n_levels - 1)
        self.levels = nn.ModuleList(
            ExtractionLevel(dim, names, config, last=level == n_levels - 1)
            for level, dim in enumerate(dims)
        )
        self.towers = nn.ModuleList(
            Tower(config.expert_hidden[-1], config.tower_hidden, config.dropout) for _ in names
        )
        self.binary_tasks = [task.kind == "binary" for task in schema.tasks]
        last = n_levels - 1
        self.gate_expert_names = [f"levels.{last}.{c}" for c in self.levels[last].expert_columns]
        self.last_gate_weights: torch.Tensor | None = None

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        x = self.encoder(batch)  # (B, F)
        task_inputs, shared = [x] * len(self.towers), x
        for level in self.levels:
            task_inputs, shared, weights = level(task_inputs, shared)
        self.last_gate_weights = weights  # (B, K, E_all)
        return run_towers(self.towers, torch.stack(task_inputs, dim=1))  # (B, K)


class CGC(PLE):
    """CGC: a single PLE extraction level (``n_levels`` is ignored)."""

    n_levels_override = 1
