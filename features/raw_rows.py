"""Raw rows (``features.schema.RAW_INPUT_COLUMNS``) as scoring reads them: checked, with
defaults for the optional columns, and cast to the dtypes ``features.encode.encode_examples``
reads in training: ``user_id``/``item_id``/``author_id`` Int64, ``item_type`` String, ``ts``
Datetime(us, UTC), ``duration_s`` Float64, ``position`` Int64, ``hist_item_id``/
``hist_behavior`` List(Int64), history oldest first. Used by ``recpipe score`` (files), the
``/rank`` service (requests, via ``serving.rows``) and the registered ranker pyfunc (pandas
frames), so all three read rows alike. Nothing here encodes: vocabularies and the history
window are applied by ``encode_examples`` only.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.contract import ITEM_TYPES
from features.schema import (
    BEHAVIOR_CODES,
    RAW_INPUT_COLUMNS,
    SEQUENCE_BEHAVIOR_FEATURE,
    SEQUENCE_ITEM_FEATURE,
)

DEFAULT_ITEM_TYPE = "video"
"""``item_type`` of a row or candidate that does not say (the feed is mostly short videos)."""

TS_DTYPE = pl.Datetime("us", "UTC")
HISTORY_DTYPE = pl.List(pl.Int64)
RAW_DTYPES: dict[str, pl.DataType] = {
    "user_id": pl.Int64(), "item_id": pl.Int64(), "author_id": pl.Int64(),
    "item_type": pl.String(), "ts": TS_DTYPE, "duration_s": pl.Float64(),
    "position": pl.Int64(), SEQUENCE_ITEM_FEATURE: HISTORY_DTYPE,
    SEQUENCE_BEHAVIOR_FEATURE: HISTORY_DTYPE,
}
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "ts")
"""Columns a file must have; the others of ``RAW_INPUT_COLUMNS`` default like a request's."""
BEHAVIOR_RANGE = (min(c for c in BEHAVIOR_CODES.values() if c > 0), max(BEHAVIOR_CODES.values()))


class RowsError(ValueError):
    """Raw rows that cannot be scored (missing column, bad type, null id, bad value)."""


def read_rows(path: Path) -> pl.DataFrame:
    """Read a Parquet or CSV file of raw rows (CSV history cells: JSON arrays, e.g.
    ``"[12, 40]"``)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise RowsError(f"{path}: no such file")
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix == ".csv":
            frame = pl.read_csv(path, infer_schema_length=10_000)
            return frame.with_columns(
                parse_json_list(name) for name in (SEQUENCE_ITEM_FEATURE, SEQUENCE_BEHAVIOR_FEATURE)
                if name in frame.columns and frame.schema[name] == pl.String
            )
    except (pl.exceptions.PolarsError, OSError) as error:
        raise RowsError(f"{path}: cannot read it as {suffix[1:]}: {error}") from error
    raise RowsError(f"{path}: unsupported file type {suffix or '(none)'}; use .parquet or .csv")


def parse_json_list(name: str) -> pl.Expr:
    return pl.col(name).str.json_decode(HISTORY_DTYPE)


def normalize_rows(frame: pl.DataFrame, where: str = "input") -> pl.DataFrame:
    """Check and cast a frame of raw rows to ``RAW_DTYPES`` (extra columns are kept, in place).

    Missing optional columns default as in a request: ``item_type`` "video", ``author_id``,
    ``duration_s`` and ``position`` null, empty history (as is a null history cell: an
    empty CSV cell, a null Parquet list); a missing ``hist_behavior`` next to
    a ``hist_item_id`` means "impression" for every entry. Raises ``RowsError`` naming the
    column and the first bad row (rows count from 1, as in ingest and allocation logs).
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        optional = [c for c in RAW_INPUT_COLUMNS if c not in REQUIRED_COLUMNS]
        raise RowsError(f"{where}: missing column(s) {missing}; raw rows need "
                        f"{list(REQUIRED_COLUMNS)} and may have {optional}")
    no_history = pl.lit(pl.Series([[]], dtype=HISTORY_DTYPE)).first()
    defaults = {
        "author_id": pl.lit(None, pl.Int64), "item_type": pl.lit(DEFAULT_ITEM_TYPE),
        "duration_s": pl.lit(None, pl.Float64), "position": pl.lit(None, pl.Int64),
        SEQUENCE_ITEM_FEATURE: no_history,
    }
    frame = frame.with_columns(
        expr.alias(name) for name, expr in defaults.items() if name not in frame.columns
    )
    if SEQUENCE_BEHAVIOR_FEATURE not in frame.columns:
        frame = frame.with_columns(
            pl.col(SEQUENCE_ITEM_FEATURE).list.eval(pl.lit(BEHAVIOR_CODES["impression"],
                                                          pl.Int64))
            .alias(SEQUENCE_BEHAVIOR_FEATURE)
        )
    casts = []
    for name, dtype in RAW_DTYPES.items():
        column = pl.col(name)
        if name == "ts":
            casts.append(_utc_expr(frame.schema[name], where))
        elif name == "item_type":
            casts.append(column.cast(pl.String).fill_null(DEFAULT_ITEM_TYPE))
        elif name in (SEQUENCE_ITEM_FEATURE, SEQUENCE_BEHAVIOR_FEATURE):  # null: no history
            casts.append(column.cast(dtype, strict=True).fill_null(no_history))
        else:
            casts.append(column.cast(dtype, strict=True))
    try:
        cast = frame.with_columns(casts)
    except pl.exceptions.PolarsError as error:
        raise RowsError(_cast_problem(frame, where)
                        or f"{where}: a column has the wrong type: {error}") from error
    _check_values(cast, where)
    return cast


def _cast_problem(frame: pl.DataFrame, where: str) -> str | None:
    """The first column whose values do not convert to ``RAW_DTYPES``: how many rows, the
    first of them and its value (None when no single value is to blame)."""
    for name, dtype in RAW_DTYPES.items():
        original = pl.col(name)
        if name == "ts" and frame.schema[name] == pl.String:
            converted = original.str.to_datetime(time_zone="UTC", time_unit="us", strict=False)
        elif name == "ts" or name == "item_type":
            continue
        else:
            converted = original.cast(dtype, strict=False)
        try:
            count, first = _first_bad(frame, converted.is_null() & original.is_not_null())
        except pl.exceptions.PolarsError:  # not even loosely convertible: the column's type
            return f"{where}: column {name} is {frame.schema[name]}, it must be {dtype}"
        if count:
            kind = "an ISO 8601 datetime" if name == "ts" else dtype
            return (f"{where}: {count} row(s) with {name} not {kind}; first at row "
                    f"{first + 1}: {name}={frame.get_column(name)[first]!r}")
    return None


def _utc_expr(dtype: pl.DataType, where: str) -> pl.Expr:
    column = pl.col("ts")
    if dtype == pl.String:
        parsed = column.str.to_datetime(time_zone="UTC", time_unit="us")
    elif isinstance(dtype, pl.Datetime):
        parsed = (column.dt.replace_time_zone("UTC") if dtype.time_zone is None
                  else column.dt.convert_time_zone("UTC"))
    else:
        raise RowsError(f"{where}: column ts is {dtype}; it must be a datetime or an ISO 8601 "
                        "string")
    return parsed.dt.cast_time_unit("us")


def _first_bad(frame: pl.DataFrame, bad: pl.Expr) -> tuple[int, int]:
    """(number of rows where ``bad``, index of the first)."""
    flags = frame.select(bad.fill_null(False).alias("bad")).get_column("bad")
    count = int(flags.sum())
    return count, (int(flags.arg_true()[0]) if count else -1)


def _check_values(frame: pl.DataFrame, where: str) -> None:
    lengths_differ = (pl.col(SEQUENCE_ITEM_FEATURE).list.len()
                      != pl.col(SEQUENCE_BEHAVIOR_FEATURE).list.len())
    low, high = BEHAVIOR_RANGE
    behaviors = pl.col(SEQUENCE_BEHAVIOR_FEATURE)
    checks = [
        *[(pl.col(name).is_null(), f"null {name}") for name in REQUIRED_COLUMNS],
        (~pl.col("item_type").is_in(ITEM_TYPES),
         f"item_type not one of {list(ITEM_TYPES)}"),
        (~pl.col("duration_s").is_finite(), "duration_s is NaN or infinite"),
        (pl.col("position") < 0, "negative position"),
        (pl.col(SEQUENCE_ITEM_FEATURE).list.eval(pl.element().is_null()).list.any(),
         f"null inside {SEQUENCE_ITEM_FEATURE}"),
        (lengths_differ, f"{SEQUENCE_ITEM_FEATURE} and {SEQUENCE_BEHAVIOR_FEATURE} lengths differ"),
        (behaviors.list.eval((pl.element() < low) | (pl.element() > high)
                             | pl.element().is_null()).list.any(),
         f"{SEQUENCE_BEHAVIOR_FEATURE} code outside {low}..{high} ({BEHAVIOR_CODES})"),
    ]
    for bad, what in checks:
        count, first = _first_bad(frame, bad)
        if count:
            value = frame.row(first, named=True)
            shown = {k: value[k] for k in RAW_INPUT_COLUMNS if k in value}
            raise RowsError(f"{where}: {count} row(s) with {what}; first at row {first + 1}: "
                            f"{shown}")
