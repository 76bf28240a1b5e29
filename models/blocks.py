"""Shared building blocks, written once: MLP, expert, gate, tower, target attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear → activation (→ dropout) per hidden size. (B, in_dim) → (B, hidden[-1])."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        super().__init__(*layers)
        self.out_dim = in_dim


class Gate(nn.Module):
    """Softmax mixture weights over ``n_experts``. (B, in_dim) → (B, E)."""

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.logits = nn.Linear(in_dim, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class Tower(nn.Module):
    """Task head: MLP then one output. (B, in_dim) → (B,) logit or value."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)


def mix_experts(expert_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum. expert_outputs (B, E, H), weights (B, E) → (B, H)."""
    return torch.einsum("beh,be->bh", expert_outputs, weights)


class TargetAttention(nn.Module):
    """DIN-style attention pooling of a history by the target item.

    query (B, D), keys (B, T, D), mask (B, T) bool (True = real item) → (B, D).
    An empty history pools to zeros.
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)  # (B, T, D)
        scores = self.score(torch.cat([q, keys, q * keys, q - keys], dim=-1)).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows → 0
        return torch.einsum("bt,btd->bd", weights, keys)
