"""Batch scoring of files: raw rows in (Parquet/CSV), the same rows out with per-task scores.

The input columns come back unchanged and in order, followed by ``score_<task>`` per task and
``score`` (the blended score). Rows are checked and cast by ``features.raw_rows.normalize_rows``,
encoded by ``features.encode.encode_examples`` and scored by the same ``Scorer`` as the
service, in chunks (bounded memory per forward pass, a progress bar). The output is written to
a temporary file beside it and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from features.raw_rows import RowsError, normalize_rows, read_rows
from features.schema import SEQUENCE_ITEM_FEATURE, SPARSE_FEATURES
from features.vocab import UNKNOWN_INDEX
from serving.scorer import Scorer

BLENDED_COLUMN = "score"
OUTPUT_SUFFIXES = (".parquet", ".csv")


def score_columns(scorer: Scorer) -> list[str]:
    return [f"score_{name}" for name in scorer.task_names] + [BLENDED_COLUMN]


def score_file(input_path: Path, output_path: Path, scorer: Scorer,
               chunk_rows: int = 65_536, progress: bool = True) -> dict:
    """Score every row of ``input_path`` into ``output_path``; returns a summary (rows,
    columns added, unknown-id counts). Raises ``RowsError`` for unreadable or invalid input,
    ValueError for ``chunk_rows`` < 1."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if output_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise RowsError(f"{output_path}: unsupported output type {output_path.suffix or '(none)'}"
                        f"; use {' or '.join(OUTPUT_SUFFIXES)}")
    frame = read_rows(input_path)
    added = score_columns(scorer)
    clash = [name for name in added if name in frame.columns]
    if clash:
        raise RowsError(f"{input_path}: already has column(s) {clash}, which scoring adds; "
                        "rename or drop them first")
    rows = normalize_rows(frame, where=str(input_path))
    predictions = np.zeros((rows.height, len(scorer.task_names)), np.float32)
    unknown = dict.fromkeys([*SPARSE_FEATURES, "history"], 0)
    chunks = range(0, rows.height, chunk_rows)
    for start in tqdm(chunks, desc="scoring", unit="chunk", disable=not progress or None,
                      leave=False):
        encoded = scorer.encode(rows.slice(start, chunk_rows))
        predictions[start:start + encoded.height] = scorer.predict_encoded(encoded)
        for name, count in count_unknown(encoded).items():
            unknown[name] += count
    out = frame.with_columns(
        *[pl.Series(f"score_{name}", predictions[:, k])
          for k, name in enumerate(scorer.task_names)],
        pl.Series(BLENDED_COLUMN, scorer.blend(predictions)),
    )
    write_atomically(out, output_path)
    return {"input": str(input_path), "output": str(output_path), "rows": rows.height,
            "columns_added": added, "task_weights": scorer.task_weights,
            "unknown_ids": unknown}


def count_unknown(encoded: pl.DataFrame) -> dict[str, int]:
    """Rows whose id fell back to the unknown index, per sparse feature; history entries."""
    counts = encoded.select(
        *[(pl.col(f"{name}_idx") == UNKNOWN_INDEX).sum().alias(name) for name in SPARSE_FEATURES],
        (pl.col(f"{SEQUENCE_ITEM_FEATURE}_idx").explode() == UNKNOWN_INDEX).sum()
        .alias("history"),
    ).row(0, named=True)
    return {name: int(value or 0) for name, value in counts.items()}


def write_atomically(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` as Parquet or CSV (list columns as JSON arrays) via a temp file and a
    rename in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if path.suffix.lower() == ".parquet":
            frame.write_parquet(temp)
        else:
            frame.with_columns(
                pl.format("[{}]", pl.col(name).cast(pl.List(pl.String)).list.join(", "))
                .alias(name)
                for name, dtype in frame.schema.items() if isinstance(dtype, pl.List)
            ).write_csv(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
