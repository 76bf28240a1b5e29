"""Masked item prediction (MIP, BERT4Rec's cloze task): hide some behaviours, predict the
items from the bidirectional context.

Used alone as a baseline, and as the warm start of AdaptSSR (the authors pre-train with this
masked-language-model task first, then with self-supervised ranking). The output layer is
tied to the encoder's item table plus a bias; padding, unknown and the mask token are never
predicted. The head's parameters belong to the objective, not to the encoder: only the
encoder is saved.

Reads top to bottom: config → loss → objective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from features.vocab import FIRST_ID_INDEX
from models.user_encoders.augment import random_subset
from models.user_encoders.encoder import PaddedSequences, TransformerUserEncoder


@dataclass(frozen=True)
class MIPConfig:
    """Masked-item-prediction hyperparameters."""

    mask_ratio: float = 0.3
    """Share of each sequence hidden and predicted (the AdaptSSR authors' MLM stage: 0.3)."""

    def to_dict(self) -> dict:
        return asdict(self)


def mip_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of masked positions. logits (M, V), targets (M,) item indices.
    Returns (loss, {"mip_accuracy"})."""
    if targets.numel() == 0:
        return logits.sum() * 0.0, {"mip_accuracy": float("nan")}
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean().item()
    return loss, {"mip_accuracy": accuracy}


class MIPObjective(nn.Module):
    """Masks ``mask_ratio`` of each sequence (at least one behaviour when L ≥ 2, never all)
    and scores every item at the masked positions."""

    name = "mip"

    def __init__(self, encoder: TransformerUserEncoder, config: MIPConfig) -> None:
        super().__init__()
        self.config = config
        self.bias = nn.Parameter(torch.zeros(encoder.config.n_items + 1))
        never = torch.zeros(encoder.config.n_items + 1, dtype=torch.bool)
        never[:FIRST_ID_INDEX] = True  # padding and unknown
        never[encoder.config.mask_item] = True
        self.register_buffer("never_predicted", never)

    def forward(self, encoder: TransformerUserEncoder, batch: PaddedSequences,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        lengths = batch.lengths
        n_masked = torch.ceil(self.config.mask_ratio * lengths.double()).long()
        n_masked = torch.minimum(n_masked.clamp(min=1), (lengths - 1).clamp(min=0))  # (B,)
        masked = random_subset(batch.valid(), n_masked, generator)  # (B, T)
        targets = batch.items[masked]  # (M,)
        keep = targets >= FIRST_ID_INDEX  # unknown items are no target
        inputs = PaddedSequences(batch.items.masked_fill(masked, encoder.config.mask_item),
                                 batch.behaviors.masked_fill(masked, encoder.config.mask_behavior),
                                 lengths)
        hidden, _, table = encoder.encode_tokens(inputs.to_kjt(), with_item_table=True)
        states = hidden[masked][keep]  # (M, D)
        logits = states @ table.T + self.bias  # (M, V)
        logits = logits.masked_fill(self.never_predicted, float("-inf"))
        loss, diagnostics = mip_loss(logits, targets[keep])
        return loss, {"loss": loss.item(), **diagnostics}
