"""Batches of examples as TorchRec inputs.

A ``RankerBatch`` carries
- ``pooled``: KeyedJaggedTensor of single-valued ids for the EmbeddingBagCollection
  (keys = ``POOLED_FEATURES``, one value per row each);
- ``sequence``: KeyedJaggedTensor for the EmbeddingCollection: the target ``item_id``
  (one value per row), the history ``hist_item_id`` and ``hist_behavior`` (jagged, ≤ T);
- ``dense`` (B, F) float, ``labels`` (B, K) float and ``label_mask`` (B, K) bool (False where
  the source did not observe the label); ``user_ids`` (B,) raw ids, for GAUC only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torchrec import KeyedJaggedTensor

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE, ExampleSchema

POOLED_FEATURES: tuple[str, ...] = ("user_id", "author_id", "item_type", "hour")
SEQUENCE_FEATURES: tuple[str, ...] = ("item_id", SEQUENCE_ITEM_FEATURE, SEQUENCE_BEHAVIOR_FEATURE)


@dataclass
class RankerBatch:
    """One mini-batch; see the module docstring for the fields' shapes."""

    pooled: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    dense: torch.Tensor  # (B, F)
    labels: torch.Tensor  # (B, K)
    label_mask: torch.Tensor  # (B, K) bool
    user_ids: torch.Tensor  # (B,)

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])


@dataclass
class ExampleArrays:
    """Examples held as flat numpy arrays (jagged lists as values + offsets)."""

    pooled: dict[str, np.ndarray]  # name -> (N,) int64
    target_item: np.ndarray  # (N,) int64
    hist_values: dict[str, np.ndarray]  # name -> (sum of lengths,) int64
    hist_offsets: np.ndarray  # (N + 1,) int64
    dense: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N, K) float32, NaN where unobserved
    user_ids: np.ndarray  # (N,) int64

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, schema: ExampleSchema) -> ExampleArrays:
        """Read the encoded example columns written by ``features.build``."""
        hist_items = frame.get_column(f"{SEQUENCE_ITEM_FEATURE}_idx")
        lengths = hist_items.list.len().to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        labels = np.stack(
            [frame.get_column(task.column).cast(pl.Float32).fill_null(np.nan).to_numpy()
             if task.column in frame.columns else np.full(frame.height, np.nan, np.float32)
             for task in schema.tasks],
            axis=1,
        ).astype(np.float32)
        return cls(
            pooled={name: frame.get_column(f"{name}_idx").to_numpy().astype(np.int64)
                    for name in POOLED_FEATURES},
            target_item=frame.get_column("item_id_idx").to_numpy().astype(np.int64),
            hist_values={
                SEQUENCE_ITEM_FEATURE: hist_items.explode().drop_nulls().to_numpy()
                .astype(np.int64),
                SEQUENCE_BEHAVIOR_FEATURE: frame.get_column(SEQUENCE_BEHAVIOR_FEATURE).explode()
                .drop_nulls().to_numpy().astype(np.int64),
            },
            hist_offsets=offsets,
            dense=frame.select(schema.dense_features).to_numpy().astype(np.float32),
            labels=labels,
            user_ids=frame.get_column("user_id").to_numpy().astype(np.int64),
        )

    @classmethod
    def from_parquet(cls, path: Path, schema: ExampleSchema) -> ExampleArrays:
        return cls.from_frame(pl.read_parquet(path), schema)

    def __len__(self) -> int:
        return int(self.target_item.shape[0])

    def batch(self, rows: np.ndarray) -> RankerBatch:
        """Assemble the rows ``rows`` (1-D int array) into a RankerBatch."""
        size = len(rows)
        ones = torch.ones(size, dtype=torch.int64)
        pooled_ids = np.concatenate([self.pooled[name][rows] for name in POOLED_FEATURES])
        pooled = KeyedJaggedTensor.from_lengths_sync(
            keys=list(POOLED_FEATURES),
            values=torch.from_numpy(pooled_ids),
            lengths=ones.repeat(len(POOLED_FEATURES)),
        )
        starts, ends = self.hist_offsets[rows], self.hist_offsets[rows + 1]
        lengths = ends - starts
        flat = _ranges(starts, lengths)
        sequence = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SEQUENCE_FEATURES),
            values=torch.from_numpy(np.concatenate([
                self.target_item[rows],
                self.hist_values[SEQUENCE_ITEM_FEATURE][flat],
                self.hist_values[SEQUENCE_BEHAVIOR_FEATURE][flat],
            ])),
            lengths=torch.cat([ones, torch.from_numpy(lengths), torch.from_numpy(lengths)]),
        )
        labels = torch.from_numpy(self.labels[rows])
        mask = ~torch.isnan(labels)
        return RankerBatch(
            pooled=pooled,
            sequence=sequence,
            dense=torch.from_numpy(self.dense[rows]),
            labels=torch.nan_to_num(labels, nan=0.0),
            label_mask=mask,
            user_ids=torch.from_numpy(self.user_ids[rows]),
        )

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[RankerBatch]:
        """Mini-batches over all rows; shuffled reproducibly when ``shuffle``. A last batch
        of one row joins the one before it: batch-normalised experts cannot train on one row."""
        order = np.arange(len(self))
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        starts = self._batch_starts(batch_size)
        for start, end in zip(starts, [*starts[1:], len(order)], strict=True):
            yield self.batch(order[start:end])

    def n_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields."""
        return len(self._batch_starts(batch_size))

    def _batch_starts(self, batch_size: int) -> list[int]:
        starts = list(range(0, len(self), batch_size))
        if len(starts) > 1 and len(self) - starts[-1] == 1:
            starts.pop()
        return starts


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts[row_of] + np.arange(total) - first[row_of]
