"""Source adapters: find a source's input files, check them, and map raw columns to the contract.

Sources:

- ``canonical``: Parquet or CSV files (one file or a directory of them) already in the
  contract's columns; extra columns are ignored (and noted), missing ones are fatal.
- ``simulator``: a simulator output directory holding ``events.parquet`` in the contract's
  columns; every row must say ``source = "simulator"``.
- ``kuairand``: the public KuaiRand log CSV (19 integer columns, see :data:`KUAIRAND_COLUMNS`),
  one file or a directory of them.

Everything here happens before anything is written: a file that is not what its source says
raises :class:`IngestError` naming the file and the problem.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from features.contract import BINARY_LABELS, EVENT_COLUMNS, EVENT_SCHEMA
from features.validation import (
    NOT_INTEGER,
    NOT_NUMBER,
    ROW_NUMBER,
    UNPARSABLE,
    Field,
    as_text,
    from_epoch_ms,
    normalized,
    parse_as,
    parse_float,
    parse_int,
)

SOURCES: tuple[str, ...] = ("canonical", "simulator", "kuairand")

KUAIRAND_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)
"""The columns of a KuaiRand log CSV, in file order."""

KUAIRAND_LABELS: dict[str, str] = {
    "click": "is_click", "like": "is_like", "follow": "is_follow", "comment": "is_comment",
    "share": "is_forward", "hate": "is_hate", "long_view": "long_view",
}
"""Contract label -> KuaiRand column (``gift`` is not observed: null)."""

SIMULATOR_FILE = "events.parquet"

Format = Literal["csv", "parquet"]
_SUFFIXES: dict[str, Format] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_SNIFF_BYTES = 64 * 1024


class IngestError(ValueError):
    """An input that is not what its source says it is; the message names the file."""


@dataclass(frozen=True)
class InputFile:
    """One checked input file.

    Attributes:
        path: the file.
        format: ``"csv"`` or ``"parquet"``.
        schema: its columns as they will be read (CSV: every column String).
    """

    path: Path
    format: Format
    schema: pl.Schema


@dataclass(frozen=True, eq=False)
class Adapter:
    """How to read one source.

    Attributes:
        source: the source name (also the ``source`` value of its rows, except canonical).
        formats: file formats the source comes in.
        columns: raw columns every input file must have (they are read, and quarantined).
        fields: input schema -> one :class:`Field` per contract column; with ``fast=True``
            the fields that :func:`features.validation.screen` takes.
    """

    source: str
    formats: tuple[Format, ...]
    columns: tuple[str, ...]
    fields: Callable[..., list[Field]]

    def scan(self, file: InputFile, offset: int = 0, length: int | None = None) -> pl.LazyFrame:
        """Lazy scan of ``file``: the adapter's raw columns plus a 1-based ``row_number``.

        ``offset``, ``length``: only these data rows (row numbers stay those of the file).
        """
        if file.format == "csv":
            lf = pl.scan_csv(file.path, infer_schema=False)
        else:
            lf = pl.scan_parquet(file.path)
        if offset or length is not None:
            # slice first: a slice after the row index would not reach the reader, which
            # would then parse every row before ``offset`` in full
            lf = lf.slice(offset, length)
        return lf.select(self.columns).with_row_index(ROW_NUMBER, offset=1 + offset)


# ------------------------------------------------------------------------------- fields


def canonical_fields(schema: pl.Schema, *, fast: bool = False) -> list[Field]:
    """Contract columns read as they are (text parsed, native dtypes cast).

    ``fast``: cells are parsed without normalising them first (for the screen:
    :func:`features.validation.screen`).
    """
    fields = []
    for name in EVENT_COLUMNS:
        value, failure = parse_as(name, EVENT_SCHEMA[name], schema[name], fast=fast)
        fields.append(Field(name, value, raw=name, failure=failure))
    return fields


def simulator_fields(schema: pl.Schema, *, fast: bool = False) -> list[Field]:
    """Canonical columns, but ``source`` must be ``"simulator"``."""
    source = normalized(as_text("source", schema["source"]))
    only_simulator = pl.when(source == "simulator").then(source)
    return [
        Field("source", only_simulator, raw="source", failure="not 'simulator'")
        if field.name == "source" else field
        for field in canonical_fields(schema, fast=fast)
    ]


def kuairand_fields(_schema: pl.Schema, *, fast: bool = False) -> list[Field]:
    """The KuaiRand mapping (ms -> s, ``is_forward`` -> share, ``is_rand`` -> policy).

    A KuaiRand file is a CSV, so every raw column is text whatever the schema says.
    ``event_id`` is ``kuairand-{user_id}-{video_id}-{time_ms}`` (``?`` for a part that is
    missing or bad, the row being quarantined for that part anyway). ``fast``: as for
    :func:`canonical_fields`.
    """
    def integer(column: str) -> pl.Expr:
        return parse_int(pl.col(column), fast=fast)

    def number(column: str) -> pl.Expr:
        return parse_float(pl.col(column), fast=fast)

    user = integer("user_id")
    video = integer("video_id")
    millis = integer("time_ms")
    is_rand = integer("is_rand")
    parts = [part.cast(pl.String).fill_null("?") for part in (user, video, millis)]
    event_id = pl.concat_str(pl.lit("kuairand"), *parts, separator="-")
    policy = (
        pl.when(is_rand == 1).then(pl.lit("kuairand-random"))
        .when(is_rand == 0).then(pl.lit("kuairand-production"))
    )
    labels = [
        Field(label, integer(KUAIRAND_LABELS[label]), raw=KUAIRAND_LABELS[label],
              failure=NOT_INTEGER)
        for label in BINARY_LABELS if label in KUAIRAND_LABELS
    ]
    return [
        Field("event_id", event_id),
        Field("ts", from_epoch_ms(millis), raw="time_ms", failure=UNPARSABLE),
        Field("user_id", user, raw="user_id", failure=NOT_INTEGER),
        Field("request_id", pl.lit(None, dtype=pl.String)),
        Field("item_id", video, raw="video_id", failure=NOT_INTEGER),
        Field("item_type", pl.lit("video")),
        Field("author_id", pl.lit(None, dtype=pl.Int64)),
        Field("position", pl.lit(None, dtype=pl.Int64)),
        Field("duration_s", number("duration_ms") / 1000.0, raw="duration_ms",
              failure=NOT_NUMBER),
        *labels,
        Field("gift", pl.lit(None, dtype=pl.Int64)),
        Field("watch_time_s", number("play_time_ms") / 1000.0, raw="play_time_ms",
              failure=NOT_NUMBER),
        Field("propensity", pl.lit(None, dtype=pl.Float64)),
        Field("policy", policy, raw="is_rand", failure="is_rand not 0 or 1"),
        Field("source", pl.lit("kuairand")),
    ]


ADAPTERS: dict[str, Adapter] = {
    "canonical": Adapter("canonical", ("parquet", "csv"), EVENT_COLUMNS, canonical_fields),
    "simulator": Adapter("simulator", ("parquet",), EVENT_COLUMNS, simulator_fields),
    "kuairand": Adapter("kuairand", ("csv",), KUAIRAND_COLUMNS, kuairand_fields),
}


def adapter_for(source: str) -> Adapter:
    """The adapter of ``source``; IngestError for an unknown source."""
    if source not in ADAPTERS:
        raise IngestError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    return ADAPTERS[source]


# ------------------------------------------------------------------------- input files


def resolve_inputs(adapter: Adapter, input_path: Path) -> tuple[list[InputFile], list[str]]:
    """Find and check every input file of ``input_path`` for ``adapter``.

    Returns the files in the order they are ingested (sorted by name) and notes for the
    report (ignored files and columns). Raises IngestError on the first bad file.
    """
    paths, notes = _candidate_paths(adapter, input_path)
    files = []
    for path in paths:
        file = _inspect(adapter, path)
        extra = [c for c in file.schema.names() if c not in adapter.columns]
        if extra:
            notes.append(f"{path.name}: ignored extra columns {extra}")
        files.append(file)
    return files, notes


def _candidate_paths(adapter: Adapter, input_path: Path) -> tuple[list[Path], list[str]]:
    if not input_path.exists():
        raise IngestError(f"{input_path}: does not exist (source {adapter.source!r})")
    if adapter.source == "simulator" and input_path.is_dir():
        events = input_path / SIMULATOR_FILE
        if not events.is_file():
            raise IngestError(
                f"{input_path}: no {SIMULATOR_FILE} in this simulator output directory"
            )
        return [events], []
    if input_path.is_file():
        return [input_path], []
    entries = sorted(p for p in input_path.iterdir() if not p.name.startswith("."))
    paths = [p for p in entries if p.is_file() and _format_of(p) in adapter.formats]
    if not paths:
        wanted = sorted(s for s, f in _SUFFIXES.items() if f in adapter.formats)
        raise IngestError(
            f"{input_path}: empty directory: no {'/'.join(wanted)} files for source "
            f"{adapter.source!r}"
        )
    ignored = [p.name for p in entries if p not in paths]
    return paths, ([f"{input_path.name}: ignored entries {ignored}"] if ignored else [])


def _format_of(path: Path) -> Format | None:
    return _SUFFIXES.get(path.suffix.lower())


def _inspect(adapter: Adapter, path: Path) -> InputFile:
    fmt = _format_of(path)
    if fmt not in adapter.formats:
        wanted = "/".join(adapter.formats)
        raise IngestError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r} for source "
            f"{adapter.source!r} (expected {wanted})"
        )
    schema = _csv_schema(path) if fmt == "csv" else _parquet_schema(path)
    missing = [c for c in adapter.columns if c not in schema]
    if missing:
        raise IngestError(f"{path}: missing columns {missing} for source {adapter.source!r}")
    nested = [c for c in adapter.columns if schema[c].is_nested()]
    if nested:
        raise IngestError(f"{path}: columns {nested} are nested, expected scalar values")
    return InputFile(path=path, format=fmt, schema=schema)


def _csv_schema(path: Path) -> pl.Schema:
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise IngestError(f"{path}: cannot be read ({exc.strerror})") from exc
    if not head.strip():
        raise IngestError(f"{path}: not a CSV: empty file (no header line)")
    if head.startswith(b"PAR1"):
        raise IngestError(f"{path}: not a CSV: it is a Parquet file")
    if b"\x00" in head:
        raise IngestError(f"{path}: not a CSV: binary content")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not a CSV: not UTF-8 text (byte {exc.start})") from exc
    try:
        return pl.scan_csv(path, infer_schema=False).collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise IngestError(f"{path}: not a readable CSV: {error_summary(exc)}") from exc


def _parquet_schema(path: Path) -> pl.Schema:
    try:
        return pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise IngestError(f"{path}: not a Parquet file: {error_summary(exc)}") from exc


def locate_csv_problem(path: Path) -> str | None:
    """Where a CSV file stops being readable, for the error message: the first line that
    is not UTF-8 or has another number of fields than the header (None if none does; lines
    with quotes are not counted, a quoted field may hold a separator or a line break).
    Reads the whole file, so only call it once a read has failed."""
    def fields(text: str) -> int:
        return len(next(csv.reader([text]), []))

    with Path(path).open("rb") as handle:
        expected = None
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number} is not valid UTF-8"
            if expected is None:
                expected = fields(text)
            elif text.strip() and '"' not in text and fields(text) != expected:
                return f"line {number} has {fields(text)} fields, the header has {expected}"
    return None


def error_summary(exc: BaseException) -> str:
    """The first line of an exception's message (Polars appends hints on further lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
