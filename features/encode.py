"""Raw rows → model inputs: the one feature path shared by training and serving."""

from __future__ import annotations

import polars as pl

from features.schema import (
    SEQUENCE_BEHAVIOR_FEATURE,
    SEQUENCE_ITEM_FEATURE,
    SPARSE_FEATURES,
    ExampleSchema,
)
from features.vocab import Vocabulary


def encode_examples(
    raw: pl.DataFrame, vocab: Vocabulary, schema: ExampleSchema
) -> pl.DataFrame:
    """Encode raw rows (``features.schema.RAW_INPUT_COLUMNS``) into model inputs.

    The single feature path for training and serving. Adds ``<sparse>_idx`` (Int64),
    ``hist_item_id_idx`` / ``hist_behavior`` (List[Int64], at most N long), and the dense
    columns of ``features.schema.DENSE_FEATURES`` (Float32).
    """
    n = schema.history_length
    frame = raw.with_columns(pl.col("ts").dt.hour().cast(pl.Int64).alias("hour"))
    frame = vocab.encode_frame(frame, SPARSE_FEATURES)
    hist_items = pl.col(SEQUENCE_ITEM_FEATURE).list.tail(n)
    return frame.with_columns(
        hist_items.list.eval(vocab.encode(pl.element(), "item_id"))
        .alias(f"{SEQUENCE_ITEM_FEATURE}_idx"),
        pl.col(SEQUENCE_BEHAVIOR_FEATURE).list.tail(n).cast(pl.List(pl.Int64)),
        pl.col("duration_s").fill_null(0.0).clip(lower_bound=0.0).log1p()
        .cast(pl.Float32).alias("duration_log"),
        (pl.col("position").fill_null(0).cast(pl.Float32) / 10.0).alias("position_frac"),
        (hist_items.list.len().cast(pl.Float32) / max(n, 1)).alias("hist_length_frac"),
    )
