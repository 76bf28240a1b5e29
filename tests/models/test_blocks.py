"""The shared blocks: the fast paths compute exactly the plain formulas."""

from __future__ import annotations

import pytest
import torch

from models.blocks import (
    Expert,
    Gate,
    SelfGate,
    TargetAttention,
    Tower,
    mix_experts,
    run_experts,
    run_gates,
    run_towers,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_target_attention_by_parts_equals_the_concatenated_scorer():
    torch.manual_seed(0)
    attention = TargetAttention(dim=8, hidden=12)
    query, keys = torch.randn(6, 8), torch.randn(6, 5, 8)
    mask = torch.rand(6, 5) > 0.3
    mask[0] = False  # an empty history
    q = query.unsqueeze(1).expand_as(keys)
    scores = attention.score(torch.cat([q, keys, q * keys, q - keys], dim=-1)).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    expected = torch.einsum("bt,btd->bd", weights, keys)
    torch.testing.assert_close(attention(query, keys, mask), expected)
    assert (attention(query, keys, mask)[0] == 0).all()


def test_stacked_experts_equal_expert_by_expert_with_gradients():
    torch.manual_seed(0)
    experts = [Expert(10, (8, 4)) for _ in range(3)]
    x = torch.randn(7, 10, requires_grad=True)
    fast = run_experts(experts, x)  # (B, E, H)
    slow = torch.stack([expert(x) for expert in experts], dim=1)
    torch.testing.assert_close(fast, slow)
    targets = [x, experts[2][0].weight, experts[1][2].bias]
    for a, b in zip(torch.autograd.grad(fast.square().sum(), targets),
                    torch.autograd.grad(slow.square().sum(), targets), strict=True):
        torch.testing.assert_close(a, b)


def test_batched_gates_and_towers_equal_one_by_one_with_gradients():
    torch.manual_seed(0)
    gates = [Gate(10, 3) for _ in range(4)]
    towers = [Tower(6, (5, 4)) for _ in range(4)]
    x = torch.randn(7, 10, requires_grad=True)
    inputs = torch.randn(7, 4, 6, requires_grad=True)
    fast = run_gates(gates, x).square().sum() + run_towers(towers, inputs).square().sum()
    slow = (torch.stack([g(x) for g in gates], dim=1).square().sum()
            + torch.stack([t(inputs[:, k]) for k, t in enumerate(towers)], dim=1).square().sum())
    torch.testing.assert_close(fast, slow)
    targets = [x, inputs, gates[1].logits.weight, towers[2].mlp[2].weight, towers[3].out.bias]
    for a, b in zip(torch.autograd.grad(fast, targets), torch.autograd.grad(slow, targets),
                    strict=True):
        torch.testing.assert_close(a, b)
    assert run_towers(towers, inputs).shape == (7, 4)
    dropout = [Tower(6, (5,), dropout=0.5).eval() for _ in range(2)]  # not stackable: a loop
    torch.testing.assert_close(run_towers(dropout, inputs[:, :2]),
                               torch.stack([t(inputs[:, k]) for k, t in enumerate(dropout)], 1))


def test_hooked_or_normalised_experts_run_one_by_one():
    torch.manual_seed(0)
    experts = [Expert(10, (8, 4)) for _ in range(2)]
    seen = []
    handle = experts[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
    run_experts(experts, torch.randn(3, 10))
    handle.remove()
    assert len(seen) == 1  # the diagnostics' hooks see every expert's output
    normalised = [Expert(10, (8, 4), normalized=True, feature_gate_rank=2) for _ in range(2)]
    assert run_experts(normalised, torch.randn(3, 10)).shape == (3, 2, 4)


def test_mix_experts_one_gate_or_many():
    outputs = torch.randn(4, 3, 5)
    weights = torch.softmax(torch.randn(4, 2, 3), dim=-1)
    many = mix_experts(outputs, weights)  # (B, K, H)
    assert many.shape == (4, 2, 5)
    torch.testing.assert_close(many[:, 1], mix_experts(outputs, weights[:, 1]))
    torch.testing.assert_close(many[:, 0], torch.einsum("beh,be->bh", outputs, weights[:, 0]))


def test_self_gate_is_sigmoid_for_one_expert_softmax_for_more():
    x = torch.randn(5, 6)
    one, three = SelfGate(6, 1)(x), SelfGate(6, 3)(x)
    assert ((one > 0) & (one < 1)).all()
    torch.testing.assert_close(three.sum(-1), torch.ones(5))
