"""Shared building blocks, written once: MLP, expert, feature-gate, gates, tower, attention.

Every ranker family in ``models.rankers`` is assembled from these; none of them re-implements
an expert, a gate or a tower.
"""

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


class FeatureGate(nn.Module):
    """HoME's low-rank feature-gate: ``x * 2 * sigmoid(x B A)``. (B, F) → (B, F).

    ``B`` (F, r) starts like a Linear layer, ``A`` (r, F) starts tiny (std ``init_std``), so at
    init ``x B A ≈ 0`` and the gate is the identity within about ``init_std * |x B|``; both
    factors still receive gradient from the first step (an exactly-zero ``A`` would leave ``B``
    without gradient until ``A`` moved). Each expert owns one, so experts see different views
    of the same input.
    """

    def __init__(self, dim: int, rank: int, init_std: float = 1e-3) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(dim, rank) / dim**0.5)  # B: (F, r)
        self.up = nn.Parameter(torch.randn(rank, dim) * init_std)  # A: (r, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 * torch.sigmoid(x @ self.down @ self.up)  # (B, F)


class Expert(nn.Sequential):
    """One expert. (B, in_dim) → (B, H) with H = ``hidden[-1]``.

    Plain: an MLP with ReLU (the MMoE / PLE expert). ``normalized`` (HoME's expert
    normalisation): Swish hidden layers, and the last Linear is followed by BatchNorm and Swish,
    so every expert's output has the same scale and no ReLU can die. ``feature_gate_rank`` > 0
    puts a private :class:`FeatureGate` in front.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        normalized: bool = False,
        feature_gate_rank: int = 0,
    ) -> None:
        layers: list[nn.Module] = []
        if feature_gate_rank > 0:
            layers.append(FeatureGate(in_dim, feature_gate_rank))
        if normalized:
            body = MLP(in_dim, hidden[:-1], dropout, activation=nn.SiLU)
            layers += [*body, nn.Linear(body.out_dim, hidden[-1]), nn.BatchNorm1d(hidden[-1]),
                       nn.SiLU()]
        else:
            layers += [*MLP(in_dim, hidden, dropout)]
        super().__init__(*layers)
        self.out_dim = hidden[-1]


class Gate(nn.Module):
    """Softmax mixture weights over ``n_experts``. (B, in_dim) → (B, E)."""

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.logits = nn.Linear(in_dim, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


class SelfGate(nn.Module):
    """HoME's self-gate over a node's own experts: sigmoid for one expert, softmax for more.
    (B, in_dim) → (B, E)."""

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.logits = nn.Linear(in_dim, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)  # (B, E)
        return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)


class Tower(nn.Module):
    """Task head: MLP then one output. (B, in_dim) → (B,) logit or value."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x)).squeeze(-1)


def run_experts(experts: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every expert on the same input. x (B, F) → (B, E, H).

    Plain ReLU experts of one shape (MMoE, PLE, CGC) run as one stacked computation: the
    first layers of all experts are one wide matmul, the later ones one batched matmul each;
    the same function with far fewer, larger ops. Anything else (normalised or feature-gated
    experts, dropout, or a forward hook, as the diagnostics install) runs expert by expert.
    """
    if _stackable(experts):
        return _stacked_experts(experts, x)
    return torch.stack([expert(x) for expert in experts], dim=1)


def _stackable(experts: Sequence[nn.Module]) -> bool:
    return len(experts) >= 2 and all(
        isinstance(e, Expert) and not e._forward_hooks and not e._forward_pre_hooks
        for e in experts
    ) and _same_plain_layers([list(e) for e in experts])


def _same_plain_layers(stacks: Sequence[Sequence[nn.Module]]) -> bool:
    """Every stack is Linear / ReLU layers only, all of the same shapes: they can run
    batched over the stacks."""
    def signature(layers: Sequence[nn.Module]) -> list:
        return [tuple(m.weight.shape) if isinstance(m, nn.Linear) else type(m) for m in layers]

    first = signature(stacks[0])
    return all(isinstance(m, (nn.Linear, nn.ReLU)) for layers in stacks for m in layers) and all(
        signature(layers) == first for layers in stacks)


def _batched_linear(layer: Sequence[nn.Linear], h: torch.Tensor) -> torch.Tensor:
    """Linear k on ``h[k]`` for every k, as one batched matmul. h (K, B, H_in) → (K, B, H_out)."""
    weight = torch.stack([m.weight for m in layer])  # (K, H_out, H_in)
    bias = torch.stack([m.bias for m in layer]).unsqueeze(1)  # (K, 1, H_out)
    return torch.baddbmm(bias, h, weight.transpose(1, 2))


def _stacked_experts(experts: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    linears = [[m for m in e if isinstance(m, nn.Linear)] for e in experts]  # E × L
    n_experts, batch = len(experts), x.shape[0]
    first = [layers[0] for layers in linears]
    weight = torch.cat([m.weight for m in first])  # (E * H1, F)
    bias = torch.cat([m.bias for m in first])  # (E * H1,)
    h = torch.relu(torch.addmm(bias, x, weight.T))  # (B, E * H1)
    h = h.view(batch, n_experts, -1).transpose(0, 1)  # (E, B, H1)
    for depth in range(1, len(linears[0])):
        h = torch.relu(_batched_linear([layers[depth] for layers in linears], h))  # (E, B, H)
    return h.transpose(0, 1)  # (B, E, H)


def run_gates(gates: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Several gates on the same input. x (B, F) → (B, K, E).

    Plain :class:`Gate` modules of one shape run as one Linear (their weights concatenated)
    and one softmax: the same function and parameters in two ops instead of 2K.
    """
    first = gates[0]
    if all(type(g) is Gate and g.logits.weight.shape == first.logits.weight.shape
           and not g._forward_hooks for g in gates):
        weight = torch.cat([g.logits.weight for g in gates])  # (K * E, F)
        bias = torch.cat([g.logits.bias for g in gates])  # (K * E,)
        logits = torch.addmm(bias, x, weight.T).view(x.shape[0], len(gates), -1)  # (B, K, E)
        return torch.softmax(logits, dim=-1)
    return torch.stack([gate(x) for gate in gates], dim=1)


def run_towers(towers: Sequence[nn.Module], inputs: torch.Tensor) -> torch.Tensor:
    """Tower k on ``inputs[:, k]`` for every k. inputs (B, K, H) → (B, K).

    Plain :class:`Tower` modules of one shape (Linear + ReLU, no dropout) run stacked: one
    batched matmul per layer over the K towers instead of K small ones.
    """
    layers = [[*tower.mlp, tower.out] for tower in towers]
    if not (all(type(t) is Tower and not t._forward_hooks for t in towers)
            and _same_plain_layers(layers)):
        return torch.stack([tower(h) for tower, h in zip(towers, inputs.unbind(1),
                                                         strict=True)], dim=1)
    h = inputs.transpose(0, 1)  # (K, B, H)
    for depth, module in enumerate(layers[0]):
        if isinstance(module, nn.ReLU):
            h = torch.relu(h)
        else:
            h = _batched_linear([tower[depth] for tower in layers], h)  # (K, B, H_out)
    return h.squeeze(-1).T  # (B, K)


def mix_experts(expert_outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum. expert_outputs (B, E, H), weights (B, E) → (B, H), or several
    gates at once: weights (B, K, E) → (B, K, H)."""
    if weights.dim() == 3:
        return torch.bmm(weights, expert_outputs)  # (B, K, H)
    return torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1)  # (B, H)


def scatter_gate_weights(
    weights: torch.Tensor, columns: Sequence[int], n_columns: int
) -> torch.Tensor:
    """Place a gate's weights over the experts it sees into a row over all experts (zeros for
    the experts it cannot see). weights (B, E_seen) → (B, n_columns)."""
    full = weights.new_zeros(weights.shape[0], n_columns)  # (B, E_all)
    full[:, list(columns)] = weights
    return full


class TargetAttention(nn.Module):
    """DIN-style attention pooling of a history by the target item.

    query (B, D), keys (B, T, D), mask (B, T) bool (True = real item) → (B, D).
    An empty history pools to zeros.

    The scorer is ``MLP([q, k, q * k, q - k])``; its first Linear is applied by parts,
    ``q (W_q + W_d) + k (W_k - W_d) + (q * k) W_p``, the same function without building the
    (B, T, 4D) concatenation, and with the query part computed once per row, not per item.
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.dim = dim

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first, _, last = self.score
        w_q, w_k, w_p, w_d = first.weight.split(self.dim, dim=1)  # 4 × (H, D)
        per_row = torch.addmm(first.bias, query, (w_q + w_d).T)  # (B, H)
        per_item = torch.cat([keys, query.unsqueeze(1) * keys], dim=-1) @ torch.cat(
            [w_k - w_d, w_p], dim=1).T  # (B, T, H)
        hidden = torch.relu_(per_item.add_(per_row.unsqueeze(1)))  # (B, T, H), in place
        scores = last(hidden).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows → 0
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)
