"""The canonical event contract: one row per impression, whatever the source.

Every source adapter (simulator, KuaiRand, canonical Parquet/CSV) produces exactly these
columns with these dtypes; the lake under ``lake/events/date=YYYY-MM-DD/`` stores them.
Labels a source does not observe are null, never zero.
"""

from __future__ import annotations

import polars as pl

BINARY_LABELS: tuple[str, ...] = (
    "click", "like", "follow", "comment", "share", "hate", "long_view", "gift",
)
"""0/1 labels (Int8, nullable)."""

CONTINUOUS_LABELS: tuple[str, ...] = ("watch_time_s",)
"""Non-negative float labels (Float64, nullable)."""

LABELS: tuple[str, ...] = BINARY_LABELS + CONTINUOUS_LABELS

ITEM_TYPES: tuple[str, ...] = ("video", "live")

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),          # unique per impression; duplicates are dropped
    "ts": pl.Datetime("us", "UTC"),   # impression time
    "user_id": pl.Int64(),
    "request_id": pl.String(),        # feed request the impression belongs to (nullable)
    "item_id": pl.Int64(),
    "item_type": pl.String(),         # one of ITEM_TYPES
    "author_id": pl.Int64(),          # nullable
    "position": pl.Int32(),           # 0-based slot in the feed (nullable)
    "duration_s": pl.Float64(),       # item length in seconds (nullable, >= 0)
    **{name: pl.Int8() for name in BINARY_LABELS},
    "watch_time_s": pl.Float64(),
    "propensity": pl.Float64(),       # logging probability of this impression given its
    # request's candidates, in (0, 1]; the simulator logs the slot's Plackett-Luce probability
    # for a video and P(insert) of the chosen candidate for a live
    "policy": pl.String(),            # logging policy name (nullable)
    "source": pl.String(),            # simulator / kuairand / canonical
}
"""Column name -> Polars dtype, in contract order."""

EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_SCHEMA)
REQUIRED_NON_NULL: tuple[str, ...] = ("event_id", "ts", "user_id", "item_id", "item_type", "source")

QUARANTINE_REASON = "reason"
"""Column added to quarantined rows: why the row was rejected."""


def empty_events() -> pl.DataFrame:
    """An empty frame with the contract's columns and dtypes."""
    return pl.DataFrame(schema=EVENT_SCHEMA)
