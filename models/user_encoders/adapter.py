"""``PretrainedUserEncoder``: a pretrained encoder as the ranker's ``user_encoder`` slot.

``InputEncoder`` calls ``user_encoder(batch)`` and concatenates the (B, out_dim) result, so
the adapter reads the history (``hist_item_id`` / ``hist_behavior``) from
``RankerBatch.sequence``, translates the ranker's item indices into the encoder's (the two
vocabularies differ when the ranker was built on another night's examples) and encodes it.

- ``freeze=True``: the encoder's parameters get no gradient and it stays in eval mode (no
  dropout) even while the ranker trains;
- ``freeze=False``: it is fine-tuned with the ranker.

The translation table is a buffer, so the ranker's state dict carries it; ``spec()`` plus
``from_spec`` rebuild an identical (untrained) adapter for ``load_state_dict``, which is how
a saved ranker that contains one is restored without the registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE
from features.vocab import FIRST_ID_INDEX, UNKNOWN_INDEX, Vocabulary
from models.batch import RankerBatch
from models.user_encoders.encoder import (
    TransformerUserEncoder,
    UserEncoderConfig,
    history_kjt,
)


def item_index_map(encoder_items: Sequence, ranker_items: Sequence) -> torch.Tensor:
    """(n_ranker_rows,) int64: ranker item index → encoder item index (padding → padding,
    unknown and items the encoder never saw → unknown). Both arguments are the raw ids of
    ``Vocabulary.ids["item_id"]``."""
    position = {raw: index + FIRST_ID_INDEX for index, raw in enumerate(encoder_items)}
    table = torch.full((len(ranker_items) + FIRST_ID_INDEX,), UNKNOWN_INDEX, dtype=torch.int64)
    table[0] = 0
    for index, raw in enumerate(ranker_items):
        table[index + FIRST_ID_INDEX] = position.get(raw, UNKNOWN_INDEX)
    return table


class PretrainedUserEncoder(nn.Module):
    """RankerBatch → (B, out_dim) user vectors from the batch's behaviour history."""

    def __init__(self, encoder: TransformerUserEncoder, freeze: bool = True,
                 item_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.freeze = freeze
        self.out_dim = encoder.out_dim
        if item_map is None:
            item_map = torch.arange(encoder.config.n_items, dtype=torch.int64)
        self.register_buffer("item_map", item_map.to(torch.int64).clone())
        if freeze:
            for parameter in self.encoder.parameters():
                parameter.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> PretrainedUserEncoder:
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward(self, batch: RankerBatch) -> torch.Tensor:
        items = batch.sequence[SEQUENCE_ITEM_FEATURE]
        behaviors = batch.sequence[SEQUENCE_BEHAVIOR_FEATURE]
        sequence = history_kjt(self.item_map[items.values()], behaviors.values(),
                               items.lengths(), self.encoder.config.max_length)
        if self.freeze:
            with torch.no_grad():
                return self.encoder(sequence)  # (B, D)
        return self.encoder(sequence)  # (B, D)

    def spec(self) -> dict:
        """What ``from_spec`` needs to rebuild this adapter's architecture (JSON-able)."""
        return {"encoder": self.encoder.config.to_dict(), "freeze": self.freeze,
                "n_ranker_items": int(self.item_map.shape[0])}

    @classmethod
    def from_spec(cls, spec: dict) -> PretrainedUserEncoder:
        """An adapter of the same shape with fresh weights; load a state dict into it."""
        encoder = TransformerUserEncoder(UserEncoderConfig.from_dict(spec["encoder"]))
        item_map = torch.zeros(int(spec["n_ranker_items"]), dtype=torch.int64)
        return cls(encoder, freeze=bool(spec["freeze"]), item_map=item_map)

    @classmethod
    def for_vocabularies(cls, encoder: TransformerUserEncoder, encoder_vocab: Vocabulary,
                         ranker_vocab: Vocabulary | None, freeze: bool = True
                         ) -> PretrainedUserEncoder:
        """Adapter translating ``ranker_vocab`` item indices (None: the encoder's own)."""
        target = ranker_vocab or encoder_vocab
        item_map = item_index_map(encoder_vocab.ids["item_id"], target.ids["item_id"])
        return cls(encoder, freeze=freeze, item_map=item_map)
