"""Raw rows (``features.schema.RAW_INPUT_COLUMNS``) from a ``/rank`` request: the same frame,
with the same dtypes, that ``features.raw_rows.normalize_rows`` makes of a file and that
``features.encode.encode_examples`` reads in training. Nothing here encodes.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from features.raw_rows import HISTORY_DTYPE, RAW_DTYPES, TS_DTYPE
from features.schema import (
    BEHAVIOR_CODES,
    RAW_INPUT_COLUMNS,
    SEQUENCE_BEHAVIOR_FEATURE,
    SEQUENCE_ITEM_FEATURE,
)
from serving.schemas import Context, RankRequest, utc


def request_time(context: Context, now: datetime) -> datetime:
    """``context.ts``, else today (of ``now``) at ``context.hour`` UTC, else ``now``."""
    if context.ts is not None:
        return utc(context.ts)
    now = utc(now)
    if context.hour is not None:
        return now.replace(hour=context.hour, minute=0, second=0, microsecond=0)
    return now


def request_rows(request: RankRequest, now: datetime) -> pl.DataFrame:
    """One raw row per candidate; the user, time and history are the request's (broadcast,
    not copied per candidate in Python)."""
    candidates = request.candidates
    frame = pl.DataFrame(
        {
            "item_id": [c.item_id for c in candidates],
            "author_id": [c.author_id for c in candidates],
            "item_type": [c.item_type for c in candidates],
            "duration_s": [c.duration_s for c in candidates],
            "position": [c.position for c in candidates],
        },
        schema={name: RAW_DTYPES[name] for name in
                ("item_id", "author_id", "item_type", "duration_s", "position")},
    )
    history_items = pl.Series([[h.item_id for h in request.history]], dtype=HISTORY_DTYPE)
    history_codes = pl.Series([[BEHAVIOR_CODES[h.behavior] for h in request.history]],
                              dtype=HISTORY_DTYPE)
    return frame.with_columns(
        pl.lit(request.user_id, pl.Int64).alias("user_id"),
        pl.lit(request_time(request.context, now), TS_DTYPE).alias("ts"),
        pl.lit(history_items).first().alias(SEQUENCE_ITEM_FEATURE),
        pl.lit(history_codes).first().alias(SEQUENCE_BEHAVIOR_FEATURE),
    ).select(RAW_INPUT_COLUMNS)
