"""HoME: Hierarchy of Multi-Gate Experts (Wang et al., Kuaishou 2024).

Tasks are grouped into categories (default: watch-time tasks {watch_time, long_view} vs
interaction tasks {click, like, follow}). Two levels of experts:

    x = InputEncoder(batch)                                              # (B, F)
    # category (meta) level: global experts G1 and per-category experts C1_c, all on x
    m_c = Gate_c(x) · [G1(x), C1_c(x)] + SelfGate_c(x) · C1_c(x)        # (B, H) per category
    m_g = Gate_g(x) · G1(x)                                              # (B, H)
    # task level: global experts G2 on m_g, category experts C2_c and task experts T2_t on m_c
    h_t = Gate_t(m_c) · [G2(m_g), C2_c(m_c), T2_t(m_c)] + SelfGate_t(m_c) · T2_t(m_c)
    logit_t = Tower_t(h_t)                                               # (B,) → (B, K)

The four parts of the paper:
- expert normalisation: every expert is MLP → BatchNorm → Swish (``Expert(normalized=True)``),
  so experts' outputs share one scale and none dies as a ReLU expert can (expert collapse);
- the hierarchy mask: a task's gate only sees global, own-category and own-task experts, and
  a category's representation only global and own-category experts, so nothing of another
  category is on a task's path (its gradient there is exactly zero; expert degradation);
- the feature-gate: each expert has a private low-rank gate ``x * 2 * sigmoid(x B A)`` on its
  input, near identity at init (``blocks.FeatureGate``), so experts see different views;
- the self-gate: each node (category, task) adds its own experts mixed by a gate that sees
  only them (sigmoid for one expert, softmax for more), a gated residual that keeps sparse
  tasks' own experts in use and gives the category level a direct path to every task's loss
  (expert underfitting).
Each of the last three can be switched off in ``RankerConfig`` for ablations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.schema import ExampleSchema
from models.batch import RankerBatch
from models.blocks import (
    Expert,
    Gate,
    SelfGate,
    Tower,
    mix_experts,
    run_experts,
    run_towers,
    scatter_gate_weights,
)
from models.inputs import InputEncoder
from models.rankers.config import RankerConfig


def resolve_categories(
    categories: Sequence[tuple[str, Sequence[str]]], task_names: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """The configured categories restricted to ``task_names`` (empty ones dropped), plus a
    category of its own for every task listed nowhere. Raises ValueError for a task listed in
    two categories."""
    seen: dict[str, str] = {}
    resolved: list[tuple[str, list[str]]] = []
    for category, tasks in categories:
        members = [task for task in tasks if task in task_names]
        for task in members:
            if task in seen:
                raise ValueError(f"task {task!r} is in categories {seen[task]!r} and "
                                 f"{category!r}; a task belongs to one category")
            seen[task] = category
        if members:
            resolved.append((category, members))
    taken = {category for category, _ in resolved}
    for task in task_names:
        if task not in seen:
            name = task if task not in taken else f"task_{task}"
            resolved.append((name, [task]))
            taken.add(name)
    return resolved


class HoME(nn.Module):
    """Named parts: ``encoder``; category level ``meta_global``, ``meta_category``,
    ``meta_global_gate``, ``meta_gates``, ``meta_self_gates``; task level ``task_global``,
    ``task_category``, ``task_own``, ``task_gates``, ``task_self_gates``; ``towers``.

    ``forward`` returns raw outputs (B, K). ``last_gate_weights`` keeps the task gates'
    weights (B, K, E_all) over every task-level expert, zero where the hierarchy mask hides an
    expert; ``gate_expert_names`` names the columns; ``categories`` lists (category, tasks).
    """

    def __init__(
        self, schema: ExampleSchema, config: RankerConfig, user_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        for field in ("n_experts", "n_category_experts", "n_task_experts"):
            if getattr(config, field) < 1:
                raise ValueError(f"HoME needs {field} >= 1, got {getattr(config, field)}")
        names = [task.name for task in schema.tasks]
        self.task_names = names
        self.categories = resolve_categories(config.task_categories, names)
        self.category_of = {task: cat for cat, tasks in self.categories for task in tasks}
        self.encoder = InputEncoder(schema, config.inputs, user_encoder)
        in_dim, width = self.encoder.out_dim, config.expert_hidden[-1]
        n_global, n_cat, n_own = config.n_experts, config.n_category_experts, config.n_task_experts

        def experts(dim: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(
                Expert(dim, config.expert_hidden, config.dropout, normalized=config.expert_norm,
                       feature_gate_rank=config.feature_gate_rank)
                for _ in range(count)
            )

        cats = [cat for cat, _ in self.categories]
        # category (meta) level: everything reads the encoder output x
        self.meta_global = experts(in_dim, n_global)
        self.meta_category = nn.ModuleDict({cat: experts(in_dim, n_cat) for cat in cats})
        self.meta_global_gate = Gate(in_dim, n_global)
        self.meta_gates = nn.ModuleDict({cat: Gate(in_dim, n_global + n_cat) for cat in cats})
        self.meta_self_gates = (
            nn.ModuleDict({cat: SelfGate(in_dim, n_cat) for cat in cats})
            if config.self_gate else None
        )
        # task level: global experts read m_g, a category's and its tasks' experts read m_c
        self.task_global = experts(width, n_global)
        self.task_category = nn.ModuleDict({cat: experts(width, n_cat) for cat in cats})
        self.task_own = nn.ModuleDict({task: experts(width, n_own) for task in names})
        self.task_gates = nn.ModuleDict(
            {task: Gate(width, n_global + n_cat + n_own) for task in names}
        )
        self.task_self_gates = (
            nn.ModuleDict({task: SelfGate(width, n_own) for task in names})
            if config.self_gate else None
        )
        self.towers = nn.ModuleList(
            Tower(width, config.tower_hidden, config.dropout) for _ in names
        )
        self.binary_tasks = [task.kind == "binary" for task in schema.tasks]
        self.gate_expert_names = (
            [f"task_global.{e}" for e in range(n_global)]
            + [f"task_category.{cat}.{e}" for cat in cats for e in range(n_cat)]
            + [f"task_own.{task}.{e}" for task in names for e in range(n_own)]
        )
        column = {name: i for i, name in enumerate(self.gate_expert_names)}
        self._gate_columns = {
            task: [column[f"task_global.{e}"] for e in range(n_global)]
            + [column[f"task_category.{self.category_of[task]}.{e}"] for e in range(n_cat)]
            + [column[f"task_own.{task}.{e}"] for e in range(n_own)]
            for task in names
        }
        self.last_gate_weights: torch.Tensor | None = None

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        x = self.encoder(batch)  # (B, F)
        # category level
        meta_global = run_experts(self.meta_global, x)  # (B, G, H)
        m_global = mix_experts(meta_global, self.meta_global_gate(x))  # (B, H)
        m_category: dict[str, torch.Tensor] = {}
        for cat, _ in self.categories:
            own = run_experts(self.meta_category[cat], x)  # (B, C, H)
            visible = torch.cat([meta_global, own], dim=1)  # (B, G + C, H)
            m = mix_experts(visible, self.meta_gates[cat](x))  # (B, H)
            if self.meta_self_gates is not None:
                m = m + mix_experts(own, self.meta_self_gates[cat](x))
            m_category[cat] = m
        # task level
        task_global = run_experts(self.task_global, m_global)  # (B, G, H)
        category_experts = {
            cat: run_experts(self.task_category[cat], m) for cat, m in m_category.items()
        }  # (B, C, H) each
        task_inputs, weights = [], []  # K × (B, H) tower inputs
        n_columns = len(self.gate_expert_names)
        for task in self.task_names:
            m = m_category[self.category_of[task]]  # (B, H)
            own = run_experts(self.task_own[task], m)  # (B, T, H)
            visible = torch.cat([task_global, category_experts[self.category_of[task]], own],
                                dim=1)  # (B, G + C + T, H)
            gate = self.task_gates[task](m)  # (B, G + C + T)
            h = mix_experts(visible, gate)  # (B, H)
            if self.task_self_gates is not None:
                h = h + mix_experts(own, self.task_self_gates[task](m))
            task_inputs.append(h)
            weights.append(scatter_gate_weights(gate.detach(), self._gate_columns[task],
                                                n_columns))
        self.last_gate_weights = torch.stack(weights, dim=1)  # (B, K, E_all)
        return run_towers(self.towers, torch.stack(task_inputs, dim=1))  # (B, K)
