"""Row-level validation of raw events: parse cells, check the contract, explain each rejection.

A source adapter (``features.adapters``) describes every contract column as a :class:`Field`:
a Polars expression over the raw columns of one input batch, plus the raw column it is parsed
from. :func:`validate_batch` evaluates those fields, lets dataframely check the result against
:class:`ParsedEvents` (the contract with wide integer types, so that ``click = 2`` is reported
as "outside {0,1}" rather than as an Int8 overflow), and splits the batch into

- accepted rows, in exactly the contract's columns and dtypes, and
- rejected rows: the raw cells as text, the 1-based ``row_number`` and a ``reason`` such as
  ``"click: outside {0,1} (2); ts: unparsable ('2022-13-45')"``.

A reason is ``"<column>: <problem>"`` optionally followed by `` (<detail>)``; the part without
the detail is its *code* (stable, countable). One column yields at most one reason: a cell that
failed to parse is reported as such, not also as missing.

Explaining rejections is the costly part, and nearly every row is valid, so large inputs are
first *screened* (:func:`screen`, lazily, in Polars' streaming engine): fields built with
``fast=True`` parse clean cells (no surrounding whitespace) without normalising them first, and
the contract's rules are evaluated as plain expressions. A row the screen passes is accepted by
:func:`validate_batch` with the same values; every other row goes through
:func:`validate_batch`, which gives the verdict and the reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import dataframely as dy
import polars as pl

from features.contract import (
    BINARY_LABELS,
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    ITEM_TYPES,
    QUARANTINE_REASON,
)

ROW_NUMBER = "row_number"
"""1-based data row of the input file (the header is not counted)."""

PARSED = "parsed"
"""Internal flag column: every non-empty raw cell of the row parsed."""

CLEAN = "_clean"
"""Column added by :func:`screen`: the row certainly passes validation."""

RAW_PREFIX = "raw:"
"""Prefix of the raw text columns while reasons are computed."""

NOT_INTEGER = "not an integer"
NOT_NUMBER = "not a number"
UNPARSABLE = "unparsable"
NOT_TEXT = "not text"

MAX_DETAIL_CHARS = 60
"""Raw values quoted in a reason are cut to this many characters."""

TS_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TS_END = datetime(2100, 1, 1, tzinfo=UTC)
"""Plausible event times: ``TS_MIN <= ts < TS_END``."""

_INT32_MAX = 2**31 - 1
_EPOCH_MS_LIMIT = 253_402_300_799_999
"""Epoch ms of 9999-12-31T23:59:59.999Z: larger values are not converted (Polars overflows)."""


@dataclass(frozen=True, eq=False)
class Field:
    """How one contract column is computed from the raw columns of an input batch.

    Attributes:
        name: the contract column (a key of ``EVENT_SCHEMA``).
        value: expression over the raw columns giving the parsed value in the validation dtype
            of :class:`ParsedEvents` (Int64 for every integer column); null when it is missing
            or failed to parse.
        raw: the raw column the value is parsed from, or None for derived / constant columns.
            A non-empty raw cell whose value comes out null is a parse failure.
        failure: what a parse failure is called in the reason (e.g. ``"not an integer"``).
    """

    name: str
    value: pl.Expr
    raw: str | None = None
    failure: str = UNPARSABLE


@dataclass(frozen=True)
class BatchResult:
    """One validated batch.

    Attributes:
        accepted: valid rows, contract columns and dtypes (after ``row_number`` when asked
            for), input order.
        rejected: invalid rows: ``row_number``, the raw columns as text, ``reason``.
        reason_codes: reason code -> number of rejected rows carrying it.
    """

    accepted: pl.DataFrame
    rejected: pl.DataFrame
    reason_codes: Counter[str]


class ParsedEvents(dy.Schema):
    """The event contract as checked row by row (integers wide, so bad values stay visible)."""

    row_number = dy.Int64(nullable=False)
    parsed = dy.Bool(nullable=False, check={"all_cells_parsed": lambda c: c})
    event_id = dy.String(nullable=False)
    ts = dy.Datetime(
        nullable=False, time_zone="UTC", time_unit="us", min=TS_MIN, max_exclusive=TS_END
    )
    user_id = dy.Int64(nullable=False)
    request_id = dy.String(nullable=True)
    item_id = dy.Int64(nullable=False)
    item_type = dy.String(nullable=False, check={"one_of": lambda c: c.is_in(ITEM_TYPES)})
    author_id = dy.Int64(nullable=True)
    position = dy.Int64(nullable=True, min=0, max=_INT32_MAX)
    duration_s = dy.Float64(nullable=True, min=0.0)
    click = dy.Int64(nullable=True, is_in=[0, 1])
    like = dy.Int64(nullable=True, is_in=[0, 1])
    follow = dy.Int64(nullable=True, is_in=[0, 1])
    comment = dy.Int64(nullable=True, is_in=[0, 1])
    share = dy.Int64(nullable=True, is_in=[0, 1])
    hate = dy.Int64(nullable=True, is_in=[0, 1])
    long_view = dy.Int64(nullable=True, is_in=[0, 1])
    gift = dy.Int64(nullable=True, is_in=[0, 1])
    watch_time_s = dy.Float64(nullable=True, min=0.0)
    propensity = dy.Float64(nullable=True, min_exclusive=0.0, max=1.0)
    policy = dy.String(nullable=True)
    source = dy.String(nullable=False)


if ParsedEvents.column_names() != [ROW_NUMBER, PARSED, *EVENT_COLUMNS]:  # pragma: no cover
    raise RuntimeError("ParsedEvents is out of sync with features.contract.EVENT_SCHEMA")


_RULE_TEXT: dict[str, str] = {
    **{f"{name}|is_in": "outside {0,1}" for name in BINARY_LABELS},
    **{f"{name}|min": "negative" for name in ("position", "duration_s", "watch_time_s")},
    "position|max": "too large",
    "ts|min": f"outside {TS_MIN.year}-{TS_END.year - 1}",
    "ts|max_exclusive": f"outside {TS_MIN.year}-{TS_END.year - 1}",
    "propensity|min_exclusive": "outside (0,1]",
    "propensity|max": "outside (0,1]",
    "item_type|check__one_of": "not one of " + "/".join(ITEM_TYPES),
}
"""dataframely rule name -> problem text (rules not listed fall back to generic texts)."""

_RULE_PRIORITY = {"nullability": 0, "nan": 1, "inf": 2}
"""Which failed rule of one column is reported (lowest first); others rank after these."""


# ------------------------------------------------------------------------------- parsing


def normalized(text: pl.Expr) -> pl.Expr:
    """Strip surrounding whitespace; an empty cell becomes null (missing)."""
    stripped = text.str.strip_chars()
    return pl.when(stripped.str.len_bytes() > 0).then(stripped)


def as_text(column: str, dtype: pl.DataType) -> pl.Expr:
    """The raw column as text (String columns as they are, others cast)."""
    expr = pl.col(column)
    return expr if dtype == pl.String() else expr.cast(pl.String)


def parse_int(text: pl.Expr, *, fast: bool = False) -> pl.Expr:
    """Text -> Int64; null when missing or not an integer.

    ``fast``: parse the cell as it is, without stripping whitespace first (a padded cell comes
    out null: see :func:`screen`); wherever the fast value is not null, it is the value.
    """
    return (text if fast else normalized(text)).cast(pl.Int64, strict=False)


def parse_float(text: pl.Expr, *, fast: bool = False) -> pl.Expr:
    """Text -> Float64; null when missing or not a number (nan/inf are caught by the rules).

    ``fast``: as for :func:`parse_int`.
    """
    return (text if fast else normalized(text)).cast(pl.Float64, strict=False)


def parse_timestamp(text: pl.Expr, *, fast: bool = False) -> pl.Expr:
    """ISO-8601 text -> Datetime(us, UTC); null when missing or unparsable.

    Accepts ``YYYY-MM-DD[T| ]HH:MM:SS[.fff…]`` with an optional offset (``Z``, ``+00:00``,
    ``+0000``); a timestamp without an offset is taken as UTC. ``fast``: as for
    :func:`parse_int`.
    """
    iso = (
        (text if fast else normalized(text))
        .str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
        .str.replace(r"Z$", "+00:00")
    )
    aware = iso.str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%z", time_unit="us", time_zone="UTC", strict=False
    )
    naive = iso.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False)
    return pl.coalesce(aware, naive.dt.replace_time_zone("UTC"))


def from_epoch_ms(millis: pl.Expr) -> pl.Expr:
    """Int64 epoch milliseconds -> Datetime(us, UTC); null beyond year 9999 either way."""
    in_range = millis.abs() <= _EPOCH_MS_LIMIT
    moment = pl.from_epoch(pl.when(in_range).then(millis), time_unit="ms")
    return moment.dt.cast_time_unit("us").dt.replace_time_zone("UTC")


def parse_as(
    column: str, target: pl.DataType, source: pl.DataType, *, fast: bool = False
) -> tuple[pl.Expr, str]:
    """Parse raw ``column`` (dtype ``source``) into the validation dtype of contract ``target``.

    Columns that already have a compatible native dtype (any integer for an integer column,
    any number for a float, any Datetime for ``ts``) are cast directly; everything else goes
    through its text (``fast``: see :func:`parse_int`; text columns are always normalised).
    Returns the expression and what a parse failure is called.
    """
    col = pl.col(column)
    if target.is_integer():
        if source.is_integer():
            return col.cast(pl.Int64, strict=False), NOT_INTEGER
        return parse_int(as_text(column, source), fast=fast), NOT_INTEGER
    if target.is_float():
        if source.is_integer() or source.is_float():
            return col.cast(pl.Float64), NOT_NUMBER
        return parse_float(as_text(column, source), fast=fast), NOT_NUMBER
    if isinstance(target, pl.Datetime):
        if isinstance(source, pl.Datetime):
            utc = col.dt.convert_time_zone("UTC") if source.time_zone else col
            return utc.dt.replace_time_zone("UTC").dt.cast_time_unit("us"), UNPARSABLE
        return parse_timestamp(as_text(column, source), fast=fast), UNPARSABLE
    return normalized(as_text(column, source)), NOT_TEXT


# ---------------------------------------------------------------------------- validation


def screen(raw: pl.LazyFrame, fields: Sequence[Field]) -> pl.LazyFrame:
    """Parse ``raw`` (raw columns + ``row_number``) lazily and flag the rows that certainly pass.

    ``fields`` are built with ``fast=True``. The result has ``row_number``, the raw columns
    renamed ``raw:<column>``, the contract columns in the validation dtypes of
    :class:`ParsedEvents`, and :data:`CLEAN`: every non-null raw cell parsed and every rule of
    :class:`ParsedEvents` holds. A clean row is one that :func:`validate_batch` (with the
    ordinary fields) accepts with the same values; a row that is not clean may still be
    valid (a padded cell, say) and must be given to :func:`validate_batch`.
    """
    _check_fields(fields)
    schema = raw.collect_schema()
    raw_columns = [c for c in schema.names() if c != ROW_NUMBER]
    parsed = pl.all_horizontal(
        True, *[pl.col(f.raw).is_null() | f.value.is_not_null() for f in fields if f.raw]
    )
    rules = [rule.fill_null(True) for rule in row_rules().values()]
    return raw.select(
        ROW_NUMBER,
        *[pl.col(c).alias(RAW_PREFIX + c) for c in raw_columns],
        parsed.alias(PARSED),
        *[field.value.alias(field.name) for field in fields],
    ).with_columns(pl.all_horizontal(*rules).alias(CLEAN))


def row_rules() -> dict[str, pl.Expr]:
    """The rules of :class:`ParsedEvents` as expressions (``"<column>|<rule>"`` -> true when
    the row passes; null counts as passing, as in dataframely)."""
    return {
        f"{name}|{rule}": expr
        for name, column in ParsedEvents.columns().items()
        for rule, expr in column.validation_rules(pl.col(name)).items()
    }


def validate_batch(
    raw: pl.DataFrame, fields: Sequence[Field], *, keep_row_number: bool = False
) -> BatchResult:
    """Split one raw batch (raw columns + ``row_number``) into accepted and rejected rows.

    ``keep_row_number``: the accepted rows keep ``row_number`` (Int64) as their first column.
    """
    _check_fields(fields)
    raw_columns = [c for c in raw.columns if c != ROW_NUMBER]
    parsed = raw.select(
        pl.col(ROW_NUMBER).cast(pl.Int64),
        (~pl.any_horizontal(False, *_parse_failures(fields, raw.schema))).alias(PARSED),
        *[field.value.alias(field.name) for field in fields],
    ).select(ParsedEvents.column_names())
    good, failure = ParsedEvents.filter(parsed)
    accepted = good.select(*([ROW_NUMBER] if keep_row_number else []), *EVENT_COLUMNS).cast(
        EVENT_SCHEMA  # type: ignore[arg-type]
    )
    details = failure.details()
    rules = [c for c in details.columns if "|" in c]
    raw_text = raw.select(
        pl.col(ROW_NUMBER).cast(pl.Int64),
        *[as_text(c, raw.schema[c]).alias(RAW_PREFIX + c) for c in raw_columns],
    )
    explained = details.join(raw_text, on=ROW_NUMBER, how="left", maintain_order="left")
    codes, reasons = _reason_lists(fields, rules)
    explained = explained.with_columns(codes.alias("_codes"), reasons.alias(QUARANTINE_REASON))
    _check_explained(explained)
    rejected = explained.select(
        ROW_NUMBER,
        *[pl.col(RAW_PREFIX + c).alias(c) for c in raw_columns],
        QUARANTINE_REASON,
    )
    counts = Counter(explained.get_column("_codes").explode().drop_nulls().to_list())
    return BatchResult(accepted=accepted, rejected=rejected, reason_codes=counts)


def _check_fields(fields: Sequence[Field]) -> None:
    names = [field.name for field in fields]
    if sorted(names) != sorted(EVENT_COLUMNS):
        missing = sorted(set(EVENT_COLUMNS) - set(names))
        extra = sorted(set(names) - set(EVENT_COLUMNS))
        raise ValueError(f"fields must cover the contract once: missing {missing}, extra {extra}")


def _parse_failures(fields: Sequence[Field], schema: pl.Schema) -> list[pl.Expr]:
    return [
        normalized(as_text(field.raw, schema[field.raw])).is_not_null() & field.value.is_null()
        for field in fields
        if field.raw is not None
    ]


def _reason_lists(fields: Sequence[Field], rules: Sequence[str]) -> tuple[pl.Expr, pl.Expr]:
    """Per row: the list of reason codes and the '; '-joined reasons, in contract order."""
    codes: list[pl.Expr] = []
    reasons: list[pl.Expr] = []
    for field in sorted(fields, key=lambda f: EVENT_COLUMNS.index(f.name)):
        cases = _column_cases(field, [r for r in rules if r.split("|", 1)[0] == field.name])
        if cases:
            codes.append(_first_case(cases, with_detail=False))
            reasons.append(_first_case(cases, with_detail=True))
    return (
        pl.concat_list(codes).list.drop_nulls(),
        pl.concat_list(reasons).list.drop_nulls().list.join("; "),
    )


_Case = tuple[pl.Expr, str, pl.Expr | None]


def _column_cases(field: Field, rules: Sequence[str]) -> list[_Case]:
    """(condition, code, detail) for each way this column can fail, most telling first."""
    cases: list[_Case] = []
    if field.raw is not None:
        raw = pl.col(RAW_PREFIX + field.raw)
        failed = normalized(raw).is_not_null() & pl.col(field.name).is_null()
        cases.append((failed, f"{field.name}: {field.failure}", _quoted(raw)))
    for rule in sorted(rules, key=lambda r: (_RULE_PRIORITY.get(r.split("|", 1)[1], 9), r)):
        suffix = rule.split("|", 1)[1]
        code = f"{field.name}: {_rule_text(rule, suffix)}"
        detail = None if suffix == "nullability" else _value_detail(field.name)
        cases.append((pl.col(rule) == "invalid", code, detail))
    return cases


def _rule_text(rule: str, suffix: str) -> str:
    if rule in _RULE_TEXT:
        return _RULE_TEXT[rule]
    if suffix == "nullability":
        return "missing"
    if suffix in ("nan", "inf"):
        return "not a finite number"
    return f"fails rule '{suffix}'"


def _first_case(cases: Sequence[_Case], *, with_detail: bool) -> pl.Expr:
    chain = None
    for condition, code, detail in cases:
        text = pl.lit(code)
        if with_detail and detail is not None:
            text = pl.concat_str(pl.lit(code + " ("), detail, pl.lit(")"))
        chain = pl.when(condition).then(text) if chain is None else chain.when(condition).then(text)
    assert chain is not None
    return chain.otherwise(pl.lit(None, dtype=pl.String))


def _quoted(text: pl.Expr) -> pl.Expr:
    cut = pl.when(text.str.len_chars() > MAX_DETAIL_CHARS).then(
        text.str.slice(0, MAX_DETAIL_CHARS) + "…"
    ).otherwise(text)
    return pl.concat_str(pl.lit("'"), cut, pl.lit("'"))


def _value_detail(name: str) -> pl.Expr:
    dtype = EVENT_SCHEMA[name]
    if isinstance(dtype, pl.Datetime):
        return pl.col(name).dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
    value = pl.col(name).cast(pl.String)
    return _quoted(value) if dtype == pl.String() else value


def _check_explained(explained: pl.DataFrame) -> None:
    unexplained = explained.filter(pl.col("_codes").list.len() == 0)
    if unexplained.height:  # a rule failed that no reason describes: a bug here, not bad data
        rows = unexplained.get_column(ROW_NUMBER).head(5).to_list()
        raise RuntimeError(f"rows {rows} were rejected without a reason")
