"""CL4SRec-style contrastive pretraining (Xie et al., ICDE 2022): InfoNCE on two augmented
views.

Each user's sequence is augmented twice (crop / mask / reorder, see ``augment``); the two
views are positives, the other 2(B - 1) views in the batch are negatives (NT-Xent over the
2B views, cosine similarity over a temperature). The baseline AdaptSSR argues against: it
assumes both views mean the same thing. Only the contrastive task is trained here (the
paper adds it to next-item prediction); ``warm_start_fraction`` > 0 spends that share of the
budget on masked item prediction first, as an ablation against AdaptSSR's warm start.

Reads top to bottom: config → loss → objective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.user_encoders.augment import AugmentConfig, augment
from models.user_encoders.encoder import PaddedSequences, TransformerUserEncoder


@dataclass(frozen=True)
class CL4SRecConfig:
    """Contrastive-learning hyperparameters (the augmentation rates live in AugmentConfig)."""

    temperature: float = 0.2
    """tau of the InfoNCE softmax over cosine similarities (set a priori, not tuned)."""
    warm_start_fraction: float = 0.0
    """Share of the step budget spent on masked item prediction first (0: none, the paper)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"CL4SRecConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.warm_start_fraction < 1.0:
            raise ValueError("CL4SRecConfig.warm_start_fraction must be in [0, 1), got "
                             f"{self.warm_start_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def info_nce_loss(view_1: torch.Tensor, view_2: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    """NT-Xent: view_1, view_2 (B, D) → (loss, {"cl_accuracy", "sim_pos", "sim_neg"})."""
    size = view_1.shape[0]
    z = F.normalize(torch.cat([view_1, view_2]), dim=-1)  # (2B, D)
    similarity = z @ z.T  # (2B, 2B)
    self_pairs = torch.eye(2 * size, dtype=torch.bool)
    logits = similarity.masked_fill(self_pairs, float("-inf")) / temperature
    targets = torch.cat([torch.arange(size, 2 * size), torch.arange(size)])  # (2B,)
    loss = F.cross_entropy(logits, targets)
    positive = similarity[torch.arange(2 * size), targets]
    negatives = similarity.masked_fill(self_pairs, 0.0).sum() - positive.sum()
    return loss, {
        "cl_accuracy": (logits.argmax(dim=1) == targets).float().mean().item(),
        "sim_pos": positive.mean().item(),
        "sim_neg": (negatives / max(2 * size * (2 * size - 2), 1)).item(),
    }


class CL4SRecObjective(nn.Module):
    """Two explicit views per user, encoded in one pass of (2B, T)."""

    name = "cl4srec"

    def __init__(self, config: CL4SRecConfig, augment_config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        self.augment_config = augment_config

    def forward(self, encoder: TransformerUserEncoder, batch: PaddedSequences,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        masks = (encoder.config.mask_item, encoder.config.mask_behavior)
        view_1 = augment(batch, self.augment_config, *masks, generator)
        view_2 = augment(batch, self.augment_config, *masks, generator)
        users = encoder.encode(PaddedSequences.cat([view_1, view_2]))  # (2B, D)
        first, second = users.split(batch.size)
        loss, diagnostics = info_nce_loss(first, second, self.config.temperature)
        return loss, {"loss": loss.item(), **diagnostics}
