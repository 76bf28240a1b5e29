"""AdaptSSR: augmentation-adaptive self-supervised ranking (Yu et al., NeurIPS 2023).

Instead of pulling two augmented views of a user together (contrastive learning assumes
they mean the same thing; crops and masks of a noisy, multi-interest history often do not),
AdaptSSR asks for an *order* of similarities:

    implicit positive  >  explicit (semi-positive) views  >  other users' views

For each user the batch holds two explicitly augmented views (crop / mask / reorder, see
``augment``), and each view is encoded twice with different dropout masks, the implicit
augmentation. For the anchor a (view 1, first pass):
- the implicit positive p is view 1's second pass;
- the semi-positives are both passes of view 2;
- the negatives are all four encodings of every other user in the batch.
Similarities are cosines. In-batch hard negative sampling keeps, per anchor, only the
hardest pair of each constraint: ``d_pos = s(a, p) - max s(a, semi)`` and
``d_neg = min s(a, semi) - max s(a, negatives)``. The augmentation-adaptive fusion weighs the
two constraints inside one pairwise ranking loss

    loss = -log sigmoid(lambda * d_pos + (1 - lambda) * d_neg),
    lambda = 1 - s(a, semi)   (detached; the mean over the two semi-positives)

so when the explicit views stay similar (a mild augmentation) the loss mostly separates
them from other users, and when the augmentation changed the sequence a lot (low
similarity) it mostly keeps them below the implicit positive instead of forcing them
together. The loss is computed for view 2's anchor symmetrically and averaged.

The paper estimates lambda per sample; the authors' public code averages it over the batch
(``fusion="batch"``). lambda is clipped to [0, 1] (it leaves that range only when the two
views are anti-correlated, where the unclipped form would reward the wrong order). Warm
start: the first ``warm_start_fraction`` of the step budget trains masked item prediction
(``mip``), as the authors pre-train with MLM before AdaptSSR.

Reads top to bottom: config → fusion coefficient → loss → objective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.user_encoders.augment import AugmentConfig, augment
from models.user_encoders.encoder import PaddedSequences, TransformerUserEncoder

FUSION_SCOPES: tuple[str, ...] = ("sample", "batch")


@dataclass(frozen=True)
class AdaptSSRConfig:
    """AdaptSSR hyperparameters (the augmentation rates live in ``AugmentConfig``)."""

    fusion: str = "sample"
    """Scope of the fusion coefficient: "sample" (the paper) or "batch" (the authors' code)."""
    hard_negatives: bool = True
    """In-batch hard negative sampling (hardest pair per constraint); False: mean pairs."""
    warm_start_fraction: float = 0.5
    """Share of the step budget spent on masked item prediction first (authors: 20 + 20
    epochs)."""

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_SCOPES:
            raise ValueError(f"AdaptSSRConfig.fusion must be one of {FUSION_SCOPES}, "
                             f"got {self.fusion!r}")
        if not 0.0 <= self.warm_start_fraction < 1.0:
            raise ValueError("AdaptSSRConfig.warm_start_fraction must be in [0, 1), got "
                             f"{self.warm_start_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def fusion_coefficient(semi_similarity: torch.Tensor, scope: str = "sample") -> torch.Tensor:
    """lambda (B,) from the similarities (B, S) of each anchor to its explicitly augmented
    views: 1 - their mean, per sample or averaged over the batch, detached, in [0, 1]."""
    similarity = semi_similarity.detach().mean(dim=1)  # (B,)
    if scope == "batch":
        similarity = similarity.mean().expand_as(similarity)
    return (1.0 - similarity).clamp(0.0, 1.0)


def _other_users(similarity: torch.Tensor) -> torch.Tensor:
    """(B, B) similarities without the diagonal → (B, B - 1)."""
    size = similarity.shape[0]
    off_diagonal = ~torch.eye(size, dtype=torch.bool)
    return similarity[off_diagonal].view(size, size - 1)


def _anchor_terms(anchor: torch.Tensor, positive: torch.Tensor, semis: list[torch.Tensor],
                  everyone: list[torch.Tensor], hard: bool) -> tuple[torch.Tensor, ...]:
    """s_pos (B,), s_semi (B, 2), s_neg (B, 4(B-1)) and the two margins (B,)."""
    s_pos = (anchor * positive).sum(-1)  # (B,)
    s_semi = torch.stack([(anchor * semi).sum(-1) for semi in semis], dim=1)  # (B, 2)
    s_neg = torch.cat([_other_users(anchor @ view.T) for view in everyone], dim=1)
    if hard:
        d_pos = s_pos - s_semi.max(dim=1).values  # (B,)
        d_neg = s_semi.min(dim=1).values - s_neg.max(dim=1).values  # (B,)
    else:
        d_pos = s_pos - s_semi.mean(dim=1)
        d_neg = s_semi.mean(dim=1) - s_neg.mean(dim=1)
    return s_pos, s_semi, s_neg, d_pos, d_neg


def adaptssr_loss(
    anchor_1: torch.Tensor, positive_1: torch.Tensor,
    anchor_2: torch.Tensor, positive_2: torch.Tensor,
    fusion: str = "sample", hard_negatives: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The augmentation-adaptive multiple pairwise ranking loss.

    anchor_v, positive_v (B, D): two dropout passes of explicit view v (any scale; they are
    L2-normalised here). Returns (loss, diagnostics): ordering accuracies ``acc_pos_semi``
    (s_pos > s_semi) and ``acc_semi_neg`` (s_semi > s_neg), mean ``lambda``, mean
    similarities and ``sim_hard_neg``, the mean of each anchor's hardest negative. Watch
    the last one: while it exceeds ``sim_semi`` most margins are negative, the loss sits
    above log 2, and collapsing every user onto one direction (all margins 0, loss exactly
    log 2) is a descent direction; the accuracies stay high through such a collapse.
    """
    a1, p1, a2, p2 = (F.normalize(x, dim=-1) for x in (anchor_1, positive_1, anchor_2,
                                                        positive_2))
    everyone = [a1, p1, a2, p2]
    losses, stats = [], []
    for anchor, positive, semis in ((a1, p1, [a2, p2]), (a2, p2, [a1, p1])):
        s_pos, s_semi, s_neg, d_pos, d_neg = _anchor_terms(anchor, positive, semis, everyone,
                                                           hard_negatives)
        lam = fusion_coefficient(s_semi, fusion)  # (B,)
        losses.append(-F.logsigmoid(lam * d_pos + (1.0 - lam) * d_neg).mean())
        stats.append({
            "acc_pos_semi": (s_pos.unsqueeze(1) > s_semi).float().mean().item(),
            "acc_semi_neg": (s_semi.unsqueeze(2) > s_neg.unsqueeze(1)).float().mean().item(),
            "lambda": lam.mean().item(),
            "sim_pos": s_pos.mean().item(),
            "sim_semi": s_semi.mean().item(),
            "sim_neg": s_neg.mean().item(),
            "sim_hard_neg": s_neg.max(dim=1).values.mean().item(),
        })
    loss = (losses[0] + losses[1]) / 2
    return loss, {name: (stats[0][name] + stats[1][name]) / 2 for name in stats[0]}


class AdaptSSRObjective(nn.Module):
    """Two explicit views per user, each encoded twice in one pass of (4B, T)."""

    name = "adaptssr"

    def __init__(self, config: AdaptSSRConfig, augment_config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        self.augment_config = augment_config

    def forward(self, encoder: TransformerUserEncoder, batch: PaddedSequences,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        masks = (encoder.config.mask_item, encoder.config.mask_behavior)
        view_1 = augment(batch, self.augment_config, *masks, generator)
        view_2 = augment(batch, self.augment_config, *masks, generator)
        size = batch.size
        # dropout draws independent masks for every row, so the repeated rows are the
        # implicitly augmented views
        users = encoder.encode(PaddedSequences.cat([view_1, view_1, view_2, view_2]))  # (4B, D)
        a1, p1, a2, p2 = users.split(size)
        loss, diagnostics = adaptssr_loss(a1, p1, a2, p2, self.config.fusion,
                                          self.config.hard_negatives)
        return loss, {"loss": loss.item(), **diagnostics}
