"""Ingest raw behaviour logs into the event lake, quarantining bad rows with a reason.

``ingest(source, input_path, lake_dir, quarantine_dir)`` reads in three passes, all staged
inside a temporary directory of ``lake_dir`` until the final publish:

1. validate: scan the input lazily, in batches of ``IngestConfig.batch_rows`` rows; every
   batch is parsed and checked (:mod:`features.validation`); valid rows are staged per UTC
   date, bad rows with their reason;
2. merge, one date partition at a time: drop duplicate ``event_id``s (the lake's row, then
   the first occurrence in the input, wins) and write the new partition file, sorted by
   ``(ts, event_id)``; a date that gains no rows is not rewritten, so re-ingesting an input
   leaves the lake byte-identical;
3. publish: the quarantine file, then each changed partition, by rename; if any step fails,
   every rename already done is undone and the temporary directories are removed.

Duplicates are detected within a date partition: the event_id need not embed the date, but the
same event always has the same ``ts``. A file that is not what its source says raises
:class:`IngestError` before anything is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl

from features import lake
from features.adapters import (
    SOURCES,
    Adapter,
    IngestError,
    InputFile,
    adapter_for,
    error_summary,
    resolve_inputs,
)
from features.contract import QUARANTINE_REASON
from features.validation import ROW_NUMBER, validate_batch

__all__ = ["SOURCES", "IngestConfig", "IngestError", "IngestReport", "ingest"]

log = logging.getLogger(__name__)

FILE_COLUMN = "file"
"""Quarantine column: name of the input file the row came from."""

_DATE = "_date"


@dataclass(frozen=True)
class IngestConfig:
    """Tuning of one ingest run.

    Attributes:
        batch_rows: rows parsed and validated at a time; bounds the memory of the first pass
            (the merge holds one date partition, old and new rows, at a time).
    """

    batch_rows: int = 500_000

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {self.batch_rows}")


@dataclass(frozen=True)
class IngestReport:
    """What one ingest did. ``input_rows == accepted + quarantined + duplicates``, always.

    Attributes:
        source: the source adapter used.
        input_path: the file or directory ingested.
        input_rows: data rows read (headers not counted).
        accepted: rows newly written to the lake.
        quarantined: rows rejected by validation (written to ``quarantine_path``).
        duplicates: valid rows dropped because their event_id was already seen, earlier in
            the input or in the lake.
        duplicates_in_lake: the part of ``duplicates`` that matched rows already in the lake.
        quarantine_reasons: reason code (e.g. ``"click: outside {0,1}"``) -> rows carrying it;
            a row with several reasons counts under each.
        partitions: UTC dates whose partition was written (created or extended), ascending.
        quarantine_path: the quarantine file of this input (written even when empty).
        notes: things worth knowing that are not errors (ignored columns, files).
    """

    source: str
    input_path: Path
    input_rows: int
    accepted: int
    quarantined: int
    duplicates: int
    duplicates_in_lake: int
    quarantine_reasons: dict[str, int]
    partitions: tuple[date, ...]
    quarantine_path: Path
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        total = self.accepted + self.quarantined + self.duplicates
        if self.input_rows != total:
            raise AssertionError(
                f"ingest of {self.input_path} lost rows: input_rows={self.input_rows} but "
                f"accepted + quarantined + duplicates = {total}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths and dates as strings)."""
        return {
            "source": self.source,
            "input_path": str(self.input_path),
            "input_rows": self.input_rows,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "duplicates_in_lake": self.duplicates_in_lake,
            "quarantine_reasons": dict(self.quarantine_reasons),
            "partitions": [d.isoformat() for d in self.partitions],
            "quarantine_path": str(self.quarantine_path),
            "notes": list(self.notes),
        }


@dataclass
class _Staged:
    """Outcome of the validation pass (files live in the staging directory)."""

    input_rows: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    rejected_files: list[Path] = field(default_factory=list)


@dataclass
class _Merged:
    """Outcome of the merge pass."""

    accepted: int = 0
    duplicates: int = 0
    duplicates_in_lake: int = 0
    days: list[date] = field(default_factory=list)


def ingest(
    source: str,
    input_path: Path,
    lake_dir: Path,
    quarantine_dir: Path,
    *,
    config: IngestConfig | None = None,
) -> IngestReport:
    """Validate ``input_path`` as ``source``, add its new events to the lake, quarantine the rest.

    Args:
        source: ``"canonical"``, ``"simulator"`` or ``"kuairand"`` (see features.adapters).
        input_path: a file, or a directory of files, of that source.
        lake_dir: the lake root; events go to ``lake_dir/events/date=YYYY-MM-DD/``.
        quarantine_dir: rejected rows go to ``quarantine_dir/<source>/<input stem>.parquet``.
        config: tuning (defaults: :class:`IngestConfig`).

    Raises:
        IngestError: the input is missing or not what ``source`` says (before any write).
    """
    config = config or IngestConfig()
    adapter = adapter_for(source)
    input_path, lake_dir = Path(input_path), Path(lake_dir)
    files, notes = resolve_inputs(adapter, input_path)
    quarantine_path = Path(quarantine_dir) / adapter.source / f"{input_path.stem}.parquet"
    with ExitStack() as stack:
        stage = stack.enter_context(lake.temp_dir(lake_dir))
        quarantine_stage = stack.enter_context(lake.temp_dir(quarantine_path.parent))
        staged = _validate(adapter, files, stage, config)
        merged = _merge(lake_dir, stage)
        staged_quarantine = quarantine_stage / quarantine_path.name
        _write_quarantine(adapter, staged.rejected_files, staged_quarantine)
        _publish(lake_dir, stage, merged.days, staged_quarantine, quarantine_path)
    report = IngestReport(
        source=adapter.source,
        input_path=input_path,
        input_rows=staged.input_rows,
        accepted=merged.accepted,
        quarantined=staged.quarantined,
        duplicates=merged.duplicates,
        duplicates_in_lake=merged.duplicates_in_lake,
        quarantine_reasons=dict(sorted(staged.reasons.items())),
        partitions=tuple(merged.days),
        quarantine_path=quarantine_path,
        notes=tuple(notes),
    )
    log.info("ingest %s: %s", input_path, report.to_dict())
    return report


# --------------------------------------------------------------------- pass 1: validate


def _validate(
    adapter: Adapter, files: Sequence[InputFile], stage: Path, config: IngestConfig
) -> _Staged:
    """Parse and check every batch; stage valid rows per date and rejected rows with reasons."""
    staged = _Staged()
    for file_index, file in enumerate(files):
        fields = adapter.fields(file.schema)
        for batch_index, batch in enumerate(_read_batches(adapter, file, config.batch_rows)):
            result = validate_batch(batch, fields)
            name = f"{file_index:05d}-{batch_index:06d}.parquet"
            _stage_accepted(result.accepted, stage, name)
            if result.rejected.height:
                path = stage / "rejected" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                result.rejected.select(
                    pl.lit(file.path.name).alias(FILE_COLUMN), pl.all()
                ).write_parquet(path)
                staged.rejected_files.append(path)
            staged.input_rows += batch.height
            staged.quarantined += result.rejected.height
            staged.reasons.update(result.reason_codes)
    return staged


def _read_batches(adapter: Adapter, file: InputFile, rows: int) -> Iterator[pl.DataFrame]:
    """The file's raw batches, in order; a read error (e.g. a ragged CSV line) is fatal."""
    try:
        batches = adapter.scan(file).collect_batches(chunk_size=rows)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
    except pl.exceptions.PolarsError as exc:
        raise IngestError(
            f"{file.path}: unreadable {file.format} file: {error_summary(exc)}"
        ) from exc


def _stage_accepted(accepted: pl.DataFrame, stage: Path, name: str) -> None:
    by_day = accepted.with_columns(pl.col("ts").dt.date().alias(_DATE)).partition_by(
        _DATE, as_dict=True, maintain_order=True, include_key=False
    )
    for (day,), rows in by_day.items():
        path = stage / "accepted" / lake.partition_name(day) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.write_parquet(path)


# ------------------------------------------------------------------------ pass 2: merge


def _merge(lake_dir: Path, stage: Path) -> _Merged:
    """Per date: drop duplicate event_ids, append to the lake's rows, stage the new file."""
    merged = _Merged()
    accepted_root = stage / "accepted"
    day_dirs = sorted(accepted_root.iterdir()) if accepted_root.is_dir() else []
    for day_dir in day_dirs:
        day = date.fromisoformat(day_dir.name.removeprefix("date="))
        new = pl.concat([pl.read_parquet(p) for p in sorted(day_dir.glob("*.parquet"))])
        unique = new.unique(subset="event_id", keep="first", maintain_order=True)
        existing = lake.read_partition(lake_dir, day)
        fresh = unique
        if existing is not None:
            fresh = unique.filter(~pl.col("event_id").is_in(existing.get_column("event_id")))
        merged.duplicates += new.height - fresh.height
        merged.duplicates_in_lake += unique.height - fresh.height
        if fresh.height == 0:
            continue
        rows = fresh if existing is None else pl.concat([existing, fresh])
        lake.write_events(rows, stage / "out" / lake.partition_name(day) / lake.PART_FILE)
        merged.accepted += fresh.height
        merged.days.append(day)
    return merged


# ---------------------------------------------------------------------- pass 3: publish


def _write_quarantine(adapter: Adapter, rejected: Sequence[Path], path: Path) -> None:
    """One file for the whole input, in input order (an empty file when nothing was rejected)."""
    if rejected:
        pl.concat([pl.scan_parquet(p) for p in rejected]).sink_parquet(path)
        return
    schema = {
        FILE_COLUMN: pl.String, ROW_NUMBER: pl.Int64,
        **{c: pl.String for c in adapter.columns}, QUARANTINE_REASON: pl.String,
    }
    pl.DataFrame(schema=schema).write_parquet(path)


def _publish(
    lake_dir: Path, stage: Path, days: Sequence[date], staged_quarantine: Path,
    quarantine_path: Path,
) -> None:
    """Rename the quarantine file and every new partition into place, all or nothing.

    ``lake_dir/events`` exists afterwards even when nothing was accepted, so that a reader
    sees an empty lake rather than a missing one.
    """
    lake.events_dir(lake_dir).mkdir(parents=True, exist_ok=True)
    publisher = lake.Publisher()
    try:
        publisher.publish_file(staged_quarantine, quarantine_path)
        for day in days:
            staged_dir = stage / "out" / lake.partition_name(day)
            target = lake.partition_file(lake_dir, day)
            if target.parent.exists():
                publisher.publish_file(staged_dir / lake.PART_FILE, target)
            else:
                publisher.publish_dir(staged_dir, target.parent)
    except BaseException:
        publisher.rollback()
        raise
