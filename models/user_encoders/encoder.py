"""The user encoder: a small Transformer over the behaviour sequence, pooled to one vector.

Named parts (TorchRec style): ``embeddings`` (an ``EmbeddingCollection`` with an item table
and a behaviour-type table, each with one extra row for the mask token), ``positions``
(recency: position 0 is the most recent behaviour), ``transformer`` (bidirectional, padding
masked), ``pooling`` (attention pooling with a learned query). An empty history maps to a
learned ``empty`` vector.

Sequences travel in two forms:
- ``PaddedSequences``: (B, T) item / behaviour indices, oldest first, left-aligned, padding 0
  after ``lengths`` — what the augmentations edit;
- a ``KeyedJaggedTensor`` with keys ``hist_item_id`` / ``hist_behavior`` — what the encoder
  reads (the same keys as ``RankerBatch.sequence``).

Because padding never reaches the transformer unmasked and positions count from the most
recent behaviour, a user's vector does not depend on how much padding surrounds the sequence
or on the other rows of the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE, ExampleSchema
from features.vocab import FIRST_ID_INDEX

HISTORY_KEYS: tuple[str, str] = (SEQUENCE_ITEM_FEATURE, SEQUENCE_BEHAVIOR_FEATURE)


@dataclass(frozen=True)
class UserEncoderConfig:
    """Architecture of the user encoder; saved with every checkpoint so it can be rebuilt."""

    embedding_dim: int = 32
    """D: width of the item / behaviour / position embeddings and of the user vector."""
    n_layers: int = 2
    """Transformer layers."""
    n_heads: int = 2
    """Attention heads per layer (must divide D)."""
    ffn_dim: int = 128
    """Hidden width of each layer's feed-forward block."""
    dropout: float = 0.1
    """Dropout on the input embeddings and inside every layer (the implicit augmentation)."""
    n_items: int = 0
    """Rows of the item vocabulary (padding + unknown + ids); the mask token is row n_items."""
    n_behaviors: int = 5
    """Behaviour codes (``features.schema.BEHAVIOR_CODES``); the mask token is row n_behaviors."""
    max_length: int = 20
    """T: longest history read. ``history_kjt`` (what the ranker adapter and pretraining
    build inputs with) keeps the most recent T behaviours of longer ones; ``forward`` itself
    expects rows of at most T."""

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "n_layers", "n_heads", "ffn_dim", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"user encoder {name} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.embedding_dim % self.n_heads:
            raise ValueError(f"user encoder n_heads ({self.n_heads}) must divide embedding_dim "
                             f"({self.embedding_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"user encoder dropout must be in [0, 1), got {self.dropout}")

    def for_schema(self, schema: ExampleSchema) -> UserEncoderConfig:
        """This config sized to an example schema's vocabulary and history length."""
        return replace(self, n_items=schema.vocab_sizes["item_id"],
                       n_behaviors=schema.n_behaviors, max_length=schema.history_length)

    @property
    def mask_item(self) -> int:
        return self.n_items

    @property
    def mask_behavior(self) -> int:
        return self.n_behaviors

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UserEncoderConfig:
        return cls(**data)


@dataclass
class PaddedSequences:
    """A batch of behaviour sequences as dense (B, T) index tensors, oldest first."""

    items: torch.Tensor  # (B, T) int64, 0 after lengths
    behaviors: torch.Tensor  # (B, T) int64, 0 after lengths
    lengths: torch.Tensor  # (B,) int64

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    def valid(self) -> torch.Tensor:
        """(B, T) bool: True on real behaviours."""
        positions = torch.arange(self.items.shape[1], device=self.lengths.device)  # (T,)
        positions = positions.unsqueeze(0)  # (1, T)
        return positions < self.lengths.unsqueeze(1)

    def to_kjt(self) -> KeyedJaggedTensor:
        """The encoder's input: whatever sits in the padding is dropped here."""
        valid = self.valid()
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(HISTORY_KEYS),
            values=torch.cat([self.items[valid], self.behaviors[valid]]),
            lengths=torch.cat([self.lengths, self.lengths]),
        )

    def repeat(self, times: int) -> PaddedSequences:
        """The batch stacked ``times`` times: (times * B, T)."""
        return PaddedSequences(self.items.repeat(times, 1), self.behaviors.repeat(times, 1),
                               self.lengths.repeat(times))

    @staticmethod
    def cat(parts: list[PaddedSequences]) -> PaddedSequences:
        return PaddedSequences(torch.cat([p.items for p in parts]),
                               torch.cat([p.behaviors for p in parts]),
                               torch.cat([p.lengths for p in parts]))


def history_kjt(
    items: torch.Tensor, behaviors: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> KeyedJaggedTensor:
    """Jagged histories (values oldest first per row, ``lengths`` (B,)) → the encoder's KJT,
    keeping only the most recent ``max_length`` behaviours of longer rows."""
    if lengths.numel() and int(lengths.max()) > max_length:
        ends = torch.cumsum(lengths, 0)  # (B,)
        kept = lengths.clamp(max=max_length)  # (B,)
        device = lengths.device
        row = torch.repeat_interleave(torch.arange(len(lengths), device=device), kept)
        offset_in_row = torch.arange(int(kept.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(kept, 0) - kept, kept)
        index = ends[row] - kept[row] + offset_in_row
        items, behaviors, lengths = items[index], behaviors[index], kept
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(HISTORY_KEYS), values=torch.cat([items, behaviors]),
        lengths=torch.cat([lengths, lengths]),
    )


def append_item_table_row(sequence: KeyedJaggedTensor, n_items: int) -> KeyedJaggedTensor:
    """A history KJT with one more row: every item id 0 .. n_items - 1 under the item key,
    nothing under the behaviour key (B rows → B + 1)."""
    items, behaviors = (sequence[key] for key in HISTORY_KEYS)
    every = torch.arange(n_items, device=items.values().device)
    one = torch.tensor([n_items], device=every.device)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(HISTORY_KEYS),
        values=torch.cat([items.values(), every, behaviors.values()]),
        lengths=torch.cat([items.lengths(), one, behaviors.lengths(), one * 0]),
    )


class AttentionPooling(nn.Module):
    """One learned query attends over the valid positions. (B, T, D), (B, T) → (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = (hidden @ self.query).masked_fill(~valid, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=-1)  # (B, T)
        return torch.einsum("bt,btd->bd", weights, hidden)  # (B, D)


class TransformerUserEncoder(nn.Module):
    """Behaviour history → user vector (B, D). See the module docstring for the parts."""

    def __init__(self, config: UserEncoderConfig) -> None:
        super().__init__()
        if config.n_items <= FIRST_ID_INDEX:
            raise ValueError(f"UserEncoderConfig.n_items must exceed {FIRST_ID_INDEX} "
                             f"(padding + unknown + ids), got {config.n_items}; use for_schema")
        if config.embedding_dim % config.n_heads:
            raise ValueError(f"embedding_dim {config.embedding_dim} is not divisible by "
                             f"n_heads {config.n_heads}")
        self.config = config
        dim = config.embedding_dim
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="t_item", embedding_dim=dim,
                                num_embeddings=config.n_items + 1,
                                feature_names=[SEQUENCE_ITEM_FEATURE]),
                EmbeddingConfig(name="t_behavior", embedding_dim=dim,
                                num_embeddings=config.n_behaviors + 1,
                                feature_names=[SEQUENCE_BEHAVIOR_FEATURE]),
            ],
            device=torch.device("cpu"),
        )
        self.positions = nn.Embedding(config.max_length, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.input_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            dim, config.n_heads, config.ffn_dim, config.dropout, activation="gelu",
            batch_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.n_layers,
                                                 enable_nested_tensor=False)
        self.pooling = AttentionPooling(dim)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.out_dim = dim
        for table in self.embeddings.embeddings.values():
            nn.init.normal_(table.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    @property
    def item_table(self) -> torch.Tensor:
        """The item embedding weight (n_items + 1, D), mask row last. Only on a plain
        (unsharded) encoder; MIP reads the table through ``encode_tokens(...,
        with_item_table=True)``, which works sharded too."""
        return self.embeddings.embeddings["t_item"].weight

    def encode_tokens(self, sequence: KeyedJaggedTensor, with_item_table: bool = False
                      ) -> tuple[torch.Tensor, ...]:
        """Contextual states (B, T, D) and the valid mask (B, T) of a history KJT; with
        ``with_item_table`` also the whole item table (n_items + 1, D), mask row last (MIP
        ties its output layer to it).

        The table comes from the same embedding lookup as the sequence (one extra row asks
        for every item id), not from the weight: under ``DistributedModelParallel`` the
        table is sharded and has no weight to read, its fused optimiser updates it once per
        lookup, and the gradient reaching each row is the same sum as through the weight."""
        length = self.config.max_length
        if with_item_table:
            sequence = append_item_table_row(sequence, self.config.n_items + 1)
        embedded = self.embeddings(sequence)
        items = embedded[SEQUENCE_ITEM_FEATURE]
        behaviors = embedded[SEQUENCE_BEHAVIOR_FEATURE]
        lengths = items.lengths()  # (B,) or (B + 1,)
        x = items.to_padded_dense(desired_length=length)  # (B, T, D)
        x = x + behaviors.to_padded_dense(desired_length=length)
        table = None
        if with_item_table:  # the extra row is last: its values are the table
            table = items.values()[-(self.config.n_items + 1):]  # (V, D)
            lengths, x = lengths[:-1], x[:-1]
        positions = torch.arange(length, device=lengths.device).unsqueeze(0)  # (1, T)
        valid = positions < lengths.unsqueeze(1)  # (B, T)
        recency = (lengths.unsqueeze(1) - 1 - positions).clamp(min=0)  # (B, T) 0 = newest
        x = self.input_dropout(self.input_norm(x + self.positions(recency)))  # (B, T, D)
        # an empty row attends to its (padding) first slot so that no softmax sees only -inf;
        # its output is replaced by ``empty`` in forward
        attend = valid.clone()
        attend[:, 0] |= lengths == 0
        hidden = self.transformer(x, src_key_padding_mask=~attend)  # (B, T, D)
        return (hidden, valid) if table is None else (hidden, valid, table)

    def forward(self, sequence: KeyedJaggedTensor) -> torch.Tensor:
        hidden, valid = self.encode_tokens(sequence)  # (B, T, D), (B, T)
        has_history = valid[:, 0]  # (B,)
        attend = valid | ~has_history.unsqueeze(1)
        pooled = self.pooling(hidden, attend)  # (B, D)
        return torch.where(has_history.unsqueeze(1), pooled, self.empty.expand_as(pooled))

    def encode(self, sequences: PaddedSequences) -> torch.Tensor:
        """User vectors (B, D) of padded sequences."""
        return self(sequences.to_kjt())


def build_user_encoder(
    config: UserEncoderConfig, seed: int | None = None
) -> TransformerUserEncoder:
    """A freshly initialised encoder; with ``seed``, initialised reproducibly without touching
    the global RNG state."""
    if seed is None:
        return TransformerUserEncoder(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TransformerUserEncoder(config)
