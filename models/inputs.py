"""The input encoder every ranker shares: TorchRec embeddings + target attention + dense.

Pooled ids (user, author, item type, hour) go through an ``EmbeddingBagCollection``; the
target item and the behaviour history through an ``EmbeddingCollection`` whose item table is
shared by ``item_id`` and ``hist_item_id``, so attention compares items in one space.

``history_pooling="mean"`` instead averages the history in an ``EmbeddingBagCollection``
(same shared item table, MEAN pooling: no per-position embeddings, no padding, no attention):
the features of a plain DIN-less ranker (DeepCTR's MMOE/PLE see exactly these), cheaper and
blind to which past items resemble the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from torchrec.modules.embedding_configs import PoolingType

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE, ExampleSchema
from models.batch import POOLED_FEATURES, RankerBatch
from models.blocks import TargetAttention
from models.table_batched import pooled_lookup

HISTORY_POOLINGS: tuple[str, ...] = ("attention", "mean")


@dataclass(frozen=True)
class InputConfig:
    """Embedding sizes of the shared input encoder."""

    embedding_dim: int = 16
    """D: width of every embedding table."""
    attention_hidden: int = 32
    """Hidden width of the target-attention scorer."""
    history_pooling: str = "attention"
    """How the behaviour history becomes one (B, D) vector: "attention" (target attention,
    DIN-style) or "mean" (mean of item + behaviour embeddings over the real positions)."""

    def __post_init__(self) -> None:
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(f"InputConfig.history_pooling must be one of {HISTORY_POOLINGS}, "
                             f"got {self.history_pooling!r}")


class InputEncoder(nn.Module):
    """RankerBatch → (B, out_dim) features: pooled ids, target item, attended history, dense.

    ``user_encoder`` (optional) is a module mapping the batch to (B, D_u) user vectors; the
    self-supervised pretraining plugs in here.
    """

    def __init__(
        self, schema: ExampleSchema, config: InputConfig, user_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.pooled = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{name}", embedding_dim=dim, num_embeddings=schema.vocab_sizes[name],
                    feature_names=[name], pooling=PoolingType.SUM,
                )
                for name in POOLED_FEATURES
            ],
            device=torch.device("cpu"),
        )
        if config.history_pooling == "mean":
            self.sequence = EmbeddingBagCollection(
                tables=sequence_tables(schema, dim, EmbeddingBagConfig, pooling=PoolingType.MEAN),
                device=torch.device("cpu"),
            )
            self.attention = None
        else:
            self.sequence = EmbeddingCollection(
                tables=sequence_tables(schema, dim, EmbeddingConfig),
                device=torch.device("cpu"),
            )
            self.attention = TargetAttention(dim, config.attention_hidden)
        self.history_length = schema.history_length
        self.user_encoder = user_encoder
        user_dim = getattr(user_encoder, "out_dim", 0) if user_encoder is not None else 0
        self.out_dim = dim * (len(POOLED_FEATURES) + 2) + len(schema.dense_features) + user_dim

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        pooled = pooled_lookup(self.pooled, batch.pooled).values()  # (B, P * D)
        if self.attention is None:
            target, history = self.mean_history(batch)
        else:
            target, history = self.attended_history(batch)
        parts = [pooled, target, history, batch.dense]
        if self.user_encoder is not None:
            parts.append(self.user_encoder(batch))
        return torch.cat(parts, dim=-1)

    def attended_history(self, batch: RankerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Target item (B, D) and the history pooled by target attention (B, D)."""
        seq = self.sequence(batch.sequence)
        target = seq["item_id"].values()  # (B, D)
        items = seq[SEQUENCE_ITEM_FEATURE]
        history = items.to_padded_dense(desired_length=self.history_length)  # (B, T, D)
        history = history + seq[SEQUENCE_BEHAVIOR_FEATURE].to_padded_dense(
            desired_length=self.history_length
        )
        lengths = items.lengths()
        positions = torch.arange(self.history_length, device=lengths.device).unsqueeze(0)  # (1, T)
        mask = positions < lengths.unsqueeze(1)  # (B, T)
        return target, self.attention(target, history, mask)

    def mean_history(self, batch: RankerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Target item (B, D) and the mean over the history of item + behaviour embeddings
        (B, D); an empty history gives zeros."""
        bags = pooled_lookup(self.sequence, batch.sequence)  # MEAN pooling; a bag of one: itself
        history = bags[SEQUENCE_ITEM_FEATURE] + bags[SEQUENCE_BEHAVIOR_FEATURE]  # (B, D)
        return bags["item_id"], history


def sequence_tables(schema: ExampleSchema, dim: int, table: type, **options) -> list:
    """The item table (shared by the target and the history) and the behaviour table."""
    return [
        table(name="t_item", embedding_dim=dim, num_embeddings=schema.vocab_sizes["item_id"],
              feature_names=["item_id", SEQUENCE_ITEM_FEATURE], **options),
        table(name="t_behavior", embedding_dim=dim, num_embeddings=schema.n_behaviors,
              feature_names=[SEQUENCE_BEHAVIOR_FEATURE], **options),
    ]
