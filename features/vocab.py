"""Id vocabularies: raw id -> dense index, fitted on the training window only.

Index 0 is padding, index 1 is the reserved "unknown" bucket for ids never seen in training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl

PADDING_INDEX = 0
UNKNOWN_INDEX = 1
FIRST_ID_INDEX = 2


@dataclass(frozen=True)
class Vocabulary:
    """Sorted raw ids per feature; the index of ``ids[f][i]`` is ``i + FIRST_ID_INDEX``."""

    ids: Mapping[str, tuple[int | str, ...]]

    @classmethod
    def fit(cls, frame: pl.DataFrame | pl.LazyFrame, features: Sequence[str]) -> Vocabulary:
        """Fit on ``frame`` (the training rows only); nulls are not part of a vocabulary.

        A LazyFrame is aggregated by the streaming engine: only the distinct ids of each
        feature are ever held, never the rows.
        """
        distinct = pl.collect_all(
            [frame.lazy().select(name).drop_nulls().unique() for name in features],
            engine="streaming",
        )
        ids = {
            name: tuple(values.get_column(name).sort().to_list())
            for name, values in zip(features, distinct, strict=True)
        }
        return cls(ids)

    def size(self, feature: str) -> int:
        """Number of embedding rows the feature needs (ids + padding + unknown)."""
        return len(self.ids[feature]) + FIRST_ID_INDEX

    @cached_property
    def _lookups(self) -> dict[str, tuple[pl.Series, pl.Series]]:
        """Per feature, the (raw ids, indices) Series; built once, since serving encodes on
        every request and rebuilding them dominated its encoding time."""
        return {
            name: (pl.Series(list(known)),
                   pl.Series(range(FIRST_ID_INDEX, FIRST_ID_INDEX + len(known)), dtype=pl.Int64))
            for name, known in self.ids.items()
        }

    def encode(self, column: pl.Expr, feature: str) -> pl.Expr:
        """Map raw ids to indices; unknown ids and nulls go to ``UNKNOWN_INDEX``."""
        old, new = self._lookups[feature]
        return column.replace_strict(
            old=old, new=new, default=UNKNOWN_INDEX, return_dtype=pl.Int64
        )

    def encode_frame(self, frame: pl.DataFrame, features: Sequence[str]) -> pl.DataFrame:
        """Add ``<feature>_idx`` columns for every feature in ``features``."""
        return frame.with_columns(
            self.encode(pl.col(name), name).alias(f"{name}_idx") for name in features
        )

    def to_json(self) -> str:
        return json.dumps({name: list(values) for name, values in self.ids.items()})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls({name: tuple(values) for name, values in json.loads(text).items()})

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls.from_json(path.read_text())
