"""The pretraining objectives and loop: AdaptSSR's loss against a hand computation, the
fusion coefficient against view similarity, InfoNCE, MIP, stages and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.pretraining import PretrainConfig, UserSequences, embed, plan_stages, pretrain
from models.user_encoders import (
    AdaptSSRConfig,
    UserEncoderConfig,
    adaptssr_loss,
    fusion_coefficient,
    info_nce_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def views(angles: list[tuple[float, float, float, float]]) -> list[torch.Tensor]:
    """Per user (anchor_1, positive_1, anchor_2, positive_2) angles → four (B, 2) tensors."""
    return [torch.tensor([unit(user[k]) for user in angles]) for k in range(4)]


def log1p_exp_neg(z: float) -> float:
    """-log sigmoid(z)."""
    return math.log(1.0 + math.exp(-z))


def test_adaptssr_loss_matches_a_hand_computation():
    # user 0 at 0° (both dropout passes of view 1) and 60° (view 2); user 1 mirrored at 180°
    # and 120°. Anchor view 1 of user 0: s_pos = 1, s_semi = cos 60° = 0.5 (both),
    # negatives cos 180° = -1 (×2), cos 120° = -0.5 (×2) → hardest -0.5;
    # d_pos = 0.5, d_neg = 1.0, lambda = 0.5 → z = 0.75.
    # Anchor view 2 of user 0 (60°): s_pos = 1, s_semi = 0.5, negatives cos 120° (×2),
    # cos 60° (×2) → hardest 0.5; d_pos = 0.5, d_neg = 0 → z = 0.25. User 1 is symmetric.
    # loss = (-log σ(0.75) - log σ(0.25)) / 2 = (0.38687 + 0.57594) / 2 = 0.48140
    expected = (log1p_exp_neg(0.75) + log1p_exp_neg(0.25)) / 2
    a1, p1, a2, p2 = views([(0, 0, 60, 60), (180, 180, 120, 120)])
    loss, stats = adaptssr_loss(a1, p1, a2, p2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.481405, abs=1e-5)
    assert stats["lambda"] == pytest.approx(0.5)
    # scale does not matter: the loss normalises
    scaled, _ = adaptssr_loss(3 * a1, 0.5 * p1, 2 * a2, p2)
    assert scaled.item() == pytest.approx(expected, abs=1e-6)


def reference_loss(angles, scope: str) -> float:
    """The paper's formula, written with scalar loops."""
    vectors = [[unit(a) for a in user] for user in angles]  # [user][view k] -> (2,)
    def cos(u, v):
        return u[0] * v[0] + u[1] * v[1]
    n = len(vectors)
    sides = []
    for anchor_k, positive_k, semi_ks in ((0, 1, (2, 3)), (2, 3, (0, 1))):
        terms, semi_means = [], []
        for i in range(n):
            anchor = vectors[i][anchor_k]
            s_pos = cos(anchor, vectors[i][positive_k])
            s_semi = [cos(anchor, vectors[i][k]) for k in semi_ks]
            s_neg = [cos(anchor, vectors[j][k]) for j in range(n) if j != i for k in range(4)]
            terms.append((s_pos - max(s_semi), min(s_semi) - max(s_neg)))
            semi_means.append(sum(s_semi) / 2)
        if scope == "batch":
            semi_means = [sum(semi_means) / n] * n
        lambdas = [min(max(1 - m, 0.0), 1.0) for m in semi_means]
        sides.append(sum(log1p_exp_neg(lam * d_pos + (1 - lam) * d_neg)
                         for lam, (d_pos, d_neg) in zip(lambdas, terms, strict=True)) / n)
    return sum(sides) / 2


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_adaptssr_loss_matches_the_formula_on_an_asymmetric_batch(scope):
    angles = [(0, 10, 40, 55), (100, 95, 170, 150), (250, 260, 255, 300)]
    loss, _ = adaptssr_loss(*views(angles), fusion=scope)
    assert loss.item() == pytest.approx(reference_loss(angles, scope), abs=1e-6)


def test_fusion_coefficient_moves_with_view_similarity():
    semi = torch.tensor([[0.9, 0.95], [0.5, 0.4], [-0.2, 0.1]])  # similar → dissimilar
    lam = fusion_coefficient(semi, "sample")
    assert lam.tolist() == pytest.approx([0.075, 0.55, 1.0])  # the last one clipped at 1
    assert lam[0] < lam[1] < lam[2]
    batch = fusion_coefficient(semi, "batch")
    assert torch.allclose(batch, batch[0].expand(3))
    # through the loss: the closer the explicit views, the smaller lambda
    close = adaptssr_loss(*views([(0, 5, 10, 12), (180, 185, 190, 192)]))[1]["lambda"]
    far = adaptssr_loss(*views([(0, 5, 80, 82), (180, 185, 260, 262)]))[1]["lambda"]
    assert close < far


def test_adaptssr_loss_rewards_the_right_order():
    good = adaptssr_loss(*views([(0, 2, 30, 32), (180, 182, 210, 212)]))[0]
    wrong = adaptssr_loss(*views([(0, 60, 3, 5), (180, 240, 183, 185)]))[0]  # semi > pos
    assert good < wrong


def test_info_nce_matches_a_hand_computation():
    # two users, orthogonal: views of user 0 at 0° and 0°, of user 1 at 90° and 90°;
    # each row: positive cos 1, two negatives cos 0 → -log(e^{1/t} / (e^{1/t} + 2))
    t = 0.5
    first, second = torch.tensor([unit(0), unit(90)]), torch.tensor([unit(0), unit(90)])
    loss, stats = info_nce_loss(first, second, t)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["cl_accuracy"] == 1.0


def test_stages_split_the_budget():
    assert plan_stages(PretrainConfig(method="adaptssr", steps=10)) == [("mip", 5),
                                                                      ("adaptssr", 5)]
    cold = PretrainConfig(method="adaptssr", steps=10,
                          adaptssr=AdaptSSRConfig(warm_start_fraction=0.0))
    assert plan_stages(cold) == [("adaptssr", 10)]
    assert plan_stages(PretrainConfig(method="cl4srec", steps=10)) == [("cl4srec", 10)]
    assert plan_stages(PretrainConfig(method="mip", steps=10)) == [("mip", 10)]
    assert plan_stages(PretrainConfig(method="none", steps=10)) == []
    with pytest.raises(ValueError, match="unknown pretraining method"):
        PretrainConfig(method="bert")


@pytest.fixture
def sequences(tiny_examples):
    examples, schema, _ = tiny_examples
    return UserSequences.from_frame(examples, schema.history_length, min_length=2), schema


def small_config(method: str, schema, steps: int = 6) -> PretrainConfig:
    encoder = UserEncoderConfig(embedding_dim=8, n_layers=1, n_heads=2, ffn_dim=16)
    return PretrainConfig(method=method, steps=steps, batch_size=16, log_every=2,
                          progress=False, encoder=encoder).for_schema(schema)


def test_sequences_are_distinct_windows_and_batches_hold_distinct_users(sequences):
    data, schema = sequences
    assert data.items.shape == (len(data), schema.history_length)
    assert (data.lengths >= 2).all()
    rows = data.sampler(16, seed=0)()
    assert len(np.unique(data.user_ids[rows])) == len(rows) == 16
    keys = {(u, tuple(i)) for u, i in zip(data.user_ids, data.items.tolist(), strict=True)}
    assert len(keys) == len(data)


@pytest.mark.parametrize("method", ["adaptssr", "cl4srec", "mip"])
def test_pretraining_is_reproducible_and_logs_diagnostics(sequences, method):
    data, schema = sequences
    config = small_config(method, schema)
    first, second = pretrain(data, config), pretrain(data, config)
    for name, value in first.encoder.state_dict().items():
        assert torch.equal(value, second.encoder.state_dict()[name]), name
    assert [r["step"] for r in first.history] == [2, 4, 6]
    expected = {"adaptssr": "acc_semi_neg", "cl4srec": "cl_accuracy", "mip": "mip_accuracy"}
    assert expected[method] in first.history[-1]
    vectors = embed(first.encoder, data)
    assert vectors.shape == (len(data), 8) and np.isfinite(vectors).all()


def test_contrastive_methods_refuse_a_single_user_and_mip_trains_on_one(sequences):
    data, schema = sequences
    one = data.user_ids == data.user_ids[0]
    single = UserSequences(data.user_ids[one], data.items[one], data.behaviors[one],
                           data.lengths[one])
    for method in ("adaptssr", "cl4srec"):
        with pytest.raises(ValueError, match="only 1 user"):
            pretrain(single, small_config(method, schema))
    assert pretrain(single, small_config("mip", schema)).history


def test_adaptssr_warm_start_runs_mip_first(sequences):
    data, schema = sequences
    history = pretrain(data, small_config("adaptssr", schema, steps=8)).history
    assert [r["stage"] for r in history] == [0.0, 0.0, 1.0, 1.0]
    assert "mip_accuracy" in history[0] and "lambda" in history[-1]
