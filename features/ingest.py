"""Ingest raw behaviour logs into the event lake, quarantining bad rows with a reason.

``ingest(source, input_path, lake_dir, quarantine_dir)`` runs three passes; the first two
write only inside a staging directory ``lake_dir/.tmp-ingest-<id>/``, and each is a public
function, so that a flow can fan the per-date merges out (to other processes or machines that
share the file system; every argument and result is a small frozen dataclass of paths,
dates and counts):

1. :func:`stage_input`: one pass over each input file in Polars' streaming engine, a slice
   of rows per query (``IngestConfig.slice_rows``; memory grows with the slice, not the
   input). Every row is parsed and *screened* (:func:`features.validation.screen`); rows that
   certainly pass go straight into per-date staging files (Arrow IPC), the few others are
   checked in batches of ``IngestConfig.batch_rows`` rows by
   :func:`features.validation.validate_batch`, which accepts them or rejects them with their
   reasons. The rejected rows become the staged quarantine file.
2. :func:`merge_partition`, one date at a time (independent dates may run concurrently, in
   any process): drop duplicate ``event_id``s (the lake's row, then the first occurrence in
   the input, wins) and stage the new partition file, sorted by ``(ts, event_id)``; a date that
   gains no rows is not rewritten, so re-ingesting an input leaves the lake byte-identical.
   Memory is bounded by one date partition (old and new rows, about 0.5 GB for 1.2M rows),
   not by the input; merges running side by side add up.

Staging needs disk beside the lake: about 180 bytes per valid input row, until the publish.
3. :func:`publish`: the quarantine file, then each changed partition, by rename; if any step
   fails, every rename already done is undone. Either way the staging directory is removed.
   :func:`discard` removes it without publishing (after a failed merge).

Duplicates are detected within a date partition: the event_id need not embed the date, but the
same event always has the same ``ts``. A file that is not what its source says raises
:class:`IngestError` before anything is written.

Leftovers. Readers never see staging: :mod:`features.lake` reads only
``events/date=YYYY-MM-DD/part-0.parquet``, and staging lives beside ``events/`` in a dot
directory. A process killed before or during the merges leaves its staging directory behind;
the next :func:`stage_input` into the same lake removes every ``lake_dir/.tmp-*`` entry (and
``.tmp-*`` entries in the quarantine directory of its source) before staging anything. That
is safe because a lake has one writer at a time: :func:`ingest` holds the lake's writer lock
(:func:`features.lake.writer_lock`) from staging to publish, and a second ingest stops with
LakeBusyError (callers of the three passes one by one must hold it themselves). A kill
*during* :func:`publish` (a few renames) can leave part of that ingest published; ingesting
the same input again completes it (the published rows then count as duplicates in the
lake).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from features import lake
from features.adapters import (
    SOURCES,
    Adapter,
    IngestError,
    InputFile,
    adapter_for,
    error_summary,
    locate_csv_problem,
    resolve_inputs,
)
from features.contract import EVENT_COLUMNS, EVENT_SCHEMA, QUARANTINE_REASON
from features.validation import CLEAN, RAW_PREFIX, ROW_NUMBER, screen, validate_batch

__all__ = [
    "SOURCES", "IngestConfig", "IngestError", "IngestReport", "PartitionMerge", "StagedIngest",
    "discard", "ingest", "merge_partition", "publish", "stage_input",
]

log = logging.getLogger(__name__)

FILE_COLUMN = "file"
"""Quarantine column: name of the input file the row came from."""

STAGING_PREFIX = f"{lake.TEMP_PREFIX}ingest-"
"""Name prefix of staging directories in the lake root (a dot entry: readers skip it)."""

# staging layout (<slice> = <input file index>-<slice index>, <batch> = <slice>-<batch index>):
_ACCEPTED = "accepted"   # accepted/{<slice>,<batch>-checked}/date=YYYY-MM-DD/*.ipc: valid
_SUSPECT = "suspect"     # suspect/<slice>.parquet: raw rows the screen did not pass
_REJECTED = "rejected"   # rejected/<batch>.parquet: quarantined rows, with reasons
_OUT = "out"             # out/date=YYYY-MM-DD/part-0.parquet: merged partitions
_QUARANTINE = "quarantine.parquet"  # the input's rejected rows, in input order
_STAGE_BATCH = 20_000
"""Rows per record batch (row group) of staging files: a partitioned sink buffers one for
each date it has open."""

_SLICE_ROWS = {"csv": 4_000_000, "parquet": 1_000_000}
"""Default rows per screening query. Each query's memory grows with its slice: Polars'
Parquet reader decodes ahead of a slower pipeline without bound (pola-rs/polars#28569), so
Parquet gets small slices; a CSV slice costs a skim of the rows before it, so CSV gets large
ones."""

_ORDER = "_order"
"""Staging column: position in the input (file index * 2**40 + row number); lower wins."""
_FILE_STRIDE = 2**40


@dataclass(frozen=True)
class IngestConfig:
    """Tuning of one ingest run.

    Attributes:
        batch_rows: rows that failed the screen are validated (and explained) this many at a
            time; bounds the memory of that step, whatever share of the input is bad.
        slice_rows: rows screened per streaming query (each query's memory grows with it);
            None: 4M for CSV, 1M for Parquet (see ``_SLICE_ROWS``).
    """

    batch_rows: int = 500_000
    slice_rows: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_rows", "slice_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

    def slice_rows_for(self, file_format: str) -> int:
        """Rows screened per streaming query for a file of this format."""
        if self.slice_rows is not None:
            return self.slice_rows
        return _SLICE_ROWS[file_format]


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


MergeAll = Callable[["StagedIngest", Sequence[date]], list["PartitionMerge"]]
"""Runs :func:`merge_partition` for each date (in any order or place), returns the merges in
the dates' order."""


@dataclass(frozen=True)
class StagedIngest:
    """The outcome of :func:`stage_input`: an input validated into a staging directory.

    Attributes:
        source: the source adapter used.
        input_path: the file or directory staged.
        lake_dir: the lake the input goes to.
        quarantine_path: where :func:`publish` puts the quarantine file.
        staging_dir: the staging directory (inside ``lake_dir``).
        days: UTC dates that have staged valid rows, ascending; each needs a
            :func:`merge_partition` before :func:`publish`.
        input_rows: data rows read.
        staged_rows: valid rows staged (duplicates not yet dropped).
        quarantined: rows rejected by validation.
        quarantine_reasons: reason code -> rows carrying it.
        notes: things worth knowing that are not errors (ignored columns, files).
        created_lake_dir: ``lake_dir`` did not exist before (:func:`discard` removes it again
            when it is left empty).
    """

    source: str
    input_path: Path
    lake_dir: Path
    quarantine_path: Path
    staging_dir: Path
    days: tuple[date, ...]
    input_rows: int
    staged_rows: int
    quarantined: int
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    created_lake_dir: bool = False


@dataclass(frozen=True)
class PartitionMerge:
    """The outcome of :func:`merge_partition` for one date.

    Attributes:
        day: the UTC date.
        staged_rows: valid rows of the input with this date.
        accepted: rows new to the lake.
        duplicates: staged rows dropped (``staged_rows - accepted``).
        duplicates_in_lake: the part of ``duplicates`` already in the lake.
        path: the staged partition file (old and new rows) to publish, or None when the date
            gains no rows (its partition is left as it is).
    """

    day: date
    staged_rows: int
    accepted: int
    duplicates: int
    duplicates_in_lake: int
    path: Path | None


def ingest(
    source: str,
    input_path: Path,
    lake_dir: Path,
    quarantine_dir: Path,
    *,
    config: IngestConfig | None = None,
    merge_all: MergeAll | None = None,
) -> IngestReport:
    """Validate ``input_path`` as ``source``, add its new events to the lake, quarantine the rest.

    The three passes in one call: :func:`stage_input`, :func:`merge_partition` for every
    staged date, :func:`publish`; on any error the staging is discarded and the lake and
    quarantine are left as they were.

    Args:
        source: ``"canonical"``, ``"simulator"`` or ``"kuairand"`` (see features.adapters).
        input_path: a file, or a directory of files, of that source.
        lake_dir: the lake root; events go to ``lake_dir/events/date=YYYY-MM-DD/``.
        quarantine_dir: rejected rows go to
            ``quarantine_dir/<source>/<input stem>-<hash8>.parquet`` (:func:`quarantine_name`).
        config: tuning (defaults: :class:`IngestConfig`).
        merge_all: runs :func:`merge_partition` for every staged date and returns the merges
            in that order, e.g. as Prefect mapped tasks (``flows.partitions``); None: one
            after the other, here.

    Holds the lake's writer lock (``features.lake.writer_lock``) from staging to publish.

    Raises:
        IngestError: the input is missing or not what ``source`` says (before any write).
        LakeBusyError: another ingest is writing this lake.
    """
    created = not Path(lake_dir).exists()
    try:
        with lake.writer_lock(Path(lake_dir)):
            staged = stage_input(source, input_path, lake_dir, quarantine_dir, config=config)
            try:
                dates = tqdm(staged.days, desc="ingest: merge dates", unit="date",
                             leave=False, disable=None)  # None: shown on a terminal only
                merges = (merge_all(staged, staged.days) if merge_all is not None
                          else [merge_partition(staged, day) for day in dates])
            except BaseException:
                discard(staged)
                raise
            report = publish(staged, merges)
    except BaseException:
        if created and Path(lake_dir).is_dir() and not any(Path(lake_dir).iterdir()):
            Path(lake_dir).rmdir()  # a first ingest that failed leaves no lake behind
        raise
    log.info("ingest %s: %s", report.input_path, report.to_dict())
    return report


# --------------------------------------------------------------------- pass 1: stage


def stage_input(
    source: str,
    input_path: Path,
    lake_dir: Path,
    quarantine_dir: Path,
    *,
    config: IngestConfig | None = None,
) -> StagedIngest:
    """Validate ``input_path`` into a new staging directory of ``lake_dir`` (pass 1).

    Removes what killed ingests left in ``lake_dir`` first (see the module docstring). Writes
    nothing else; on any error the new staging directory is removed again.

    Raises:
        IngestError: the input is missing, not what ``source`` says, or unreadable.
    """
    config = config or IngestConfig()
    adapter = adapter_for(source)
    input_path, lake_dir = Path(input_path), Path(lake_dir)
    files, notes = resolve_inputs(adapter, input_path)
    quarantine_path = Path(quarantine_dir) / adapter.source / quarantine_name(input_path)
    created = not lake_dir.exists()
    lake_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(lake_dir, quarantine_path.parent)
    staging = lake_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        counts = _Counts()
        for index, file in enumerate(files):
            _stage_file(adapter, index, file, staging, config, counts)
        _write_quarantine(adapter, counts.rejected_files, staging / _QUARANTINE)
    except BaseException:
        _remove_staging(staging, lake_dir if created else None)
        raise
    return StagedIngest(
        source=adapter.source,
        input_path=input_path,
        lake_dir=lake_dir,
        quarantine_path=quarantine_path,
        staging_dir=staging,
        days=tuple(sorted(counts.days)),
        input_rows=counts.input_rows,
        staged_rows=counts.staged_rows,
        quarantined=counts.quarantined,
        quarantine_reasons=dict(sorted(counts.reasons.items())),
        notes=tuple(notes),
        created_lake_dir=created,
    )


@dataclass
class _Counts:
    input_rows: int = 0
    staged_rows: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    days: set[date] = field(default_factory=set)
    rejected_files: list[Path] = field(default_factory=list)


def _stage_file(
    adapter: Adapter, index: int, file: InputFile, staging: Path, config: IngestConfig,
    counts: _Counts,
) -> None:
    """Screen one input file, a slice of rows at a time, then check the rows it did not pass."""
    fields = adapter.fields(file.schema, fast=True)
    size = config.slice_rows_for(file.format)
    suspects = []
    bar = tqdm(desc=f"ingest {file.path.name}", unit="rows", unit_scale=True, leave=False,
               disable=None)  # None: shown on a terminal only
    for piece in itertools.count():
        suspect_path = staging / _SUSPECT / f"{index:05d}-{piece:06d}.parquet"
        rows, suspect_rows = _stage_slice(
            screen(adapter.scan(file, piece * size, size), fields), adapter.columns, index,
            file, suspect_path, config, counts,
        )
        counts.input_rows += rows
        bar.update(rows)
        suspects.append((suspect_path, suspect_rows))
        if rows < size:
            break
    bar.close()
    for suspect_path, suspect_rows in suspects:
        _check_suspects(adapter, index, file, suspect_path, suspect_rows, config, counts)


def _stage_slice(
    screened: pl.LazyFrame, raw_columns: Sequence[str], index: int, file: InputFile,
    suspect_path: Path, config: IngestConfig, counts: _Counts,
) -> tuple[int, int]:
    """One streaming query: clean rows to per-date staging files, the rest (raw) to
    ``suspect_path``. Returns the rows read and the rows left for :func:`_check_suspects`."""
    order = pl.lit(index * _FILE_STRIDE, pl.Int64) + pl.col(ROW_NUMBER).cast(pl.Int64)
    clean = screened.filter(pl.col(CLEAN)).select(
        order.alias(_ORDER), *[pl.col(c).cast(EVENT_SCHEMA[c]) for c in EVENT_COLUMNS]
    )
    suspect = screened.filter(~pl.col(CLEAN)).select(
        ROW_NUMBER, *[pl.col(RAW_PREFIX + c).alias(c) for c in raw_columns]
    )
    staging = suspect_path.parent.parent
    sunk: list[pl.io.partition.SinkedPathsCallbackArgs] = []
    try:
        pl.collect_all([
            _sink_accepted(
                clean, staging / _ACCEPTED / suspect_path.stem, lazy=True,
                sinked_paths_callback=sunk.append,
            ),
            suspect.sink_parquet(
                suspect_path, compression="uncompressed",
                row_group_size=min(config.batch_rows, _STAGE_BATCH), mkdir=True, lazy=True,
            ),
        ], engine="streaming")
    except pl.exceptions.PolarsError as exc:
        where = locate_csv_problem(file.path) if file.format == "csv" else None
        raise IngestError(
            f"{file.path}: unreadable {file.format} file"
            f"{f' ({where})' if where else ''}: {error_summary(exc)}"
        ) from exc
    clean_rows = 0
    for written in (p for args in sunk for p in args.paths):
        counts.days.add(_day_of(Path(written.path)))
        clean_rows += written.num_rows
    counts.staged_rows += clean_rows
    suspect_rows = pl.scan_parquet(suspect_path).select(pl.len()).collect().item()
    return clean_rows + suspect_rows, suspect_rows


def _check_suspects(
    adapter: Adapter, index: int, file: InputFile, suspect_path: Path, suspect_rows: int,
    config: IngestConfig, counts: _Counts,
) -> None:
    """Validate the rows the screen did not pass, ``batch_rows`` at a time: stage the valid
    ones, explain the others."""
    fields = adapter.fields(file.schema)
    staging = suspect_path.parent.parent
    for start in range(0, suspect_rows, config.batch_rows):
        # a slice per batch: the Parquet reader would decode the whole file ahead otherwise
        batch = pl.scan_parquet(suspect_path).slice(start, config.batch_rows).collect()
        result = validate_batch(batch, fields, keep_row_number=True)
        accepted = result.accepted.select(
            (pl.lit(index * _FILE_STRIDE, pl.Int64) + pl.col(ROW_NUMBER)).alias(_ORDER),
            *EVENT_COLUMNS,
        )
        name = f"{suspect_path.stem}-{start // config.batch_rows:06d}"
        if accepted.height:
            _sink_accepted(accepted.lazy(), staging / _ACCEPTED / f"{name}-checked")
            counts.days.update(accepted.get_column("ts").dt.date().unique().to_list())
        if result.rejected.height:
            path = staging / _REJECTED / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            result.rejected.select(
                pl.lit(file.path.name).alias(FILE_COLUMN), pl.all()
            ).write_parquet(path)
            counts.rejected_files.append(path)
        counts.staged_rows += accepted.height
        counts.quarantined += result.rejected.height
        counts.reasons.update(result.reason_codes)


def _sink_accepted(rows: pl.LazyFrame, base: Path, **kwargs: Any) -> pl.LazyFrame | None:
    """Sink valid rows to ``base/date=YYYY-MM-DD/<n>.ipc`` by the UTC date of ts.

    Arrow IPC, uncompressed: next to nothing to encode or decode (the merge maps it back), at
    the price of disk (about 180 bytes a row, until the publish).
    """
    return rows.sink_ipc(
        _by_date(base), compression="uncompressed", record_batch_size=_STAGE_BATCH, mkdir=True,
        **kwargs,
    )


def _by_date(base: Path) -> pl.PartitionBy:
    """Partitioned sink target: ``base/date=YYYY-MM-DD/<n>.parquet`` by the UTC date of ts."""
    return pl.PartitionBy(base, key={"date": pl.col("ts").dt.date()}, include_key=False)


def _day_of(path: Path) -> date:
    return date.fromisoformat(path.parent.name.removeprefix("date="))


def quarantine_name(input_path: Path) -> str:
    """``<input stem>-<8 hex of its absolute path>.parquet``: one file per input, the same one
    when that input is ingested again (idempotent), never another input's (two days' logs
    both called ``events.csv`` keep their own rejected rows)."""
    where = hashlib.sha256(str(Path(input_path).resolve()).encode()).hexdigest()[:8]
    return f"{Path(input_path).stem}-{where}.parquet"


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


# ------------------------------------------------------------------------ pass 2: merge


def merge_partition(staged: StagedIngest, day: date) -> PartitionMerge:
    """Merge the staged rows of one date with its lake partition (pass 2, one date).

    Drops duplicate event_ids (the lake's row, then the earliest row of the input, wins) and
    stages the partition file when the date gains rows. Reads the staging directory and the
    lake, writes only ``staging_dir/out/`` (atomically, so a retried merge is harmless): merges
    of different dates may run at the same time, in different processes.
    """
    name = lake.partition_name(day)
    files = sorted((staged.staging_dir / _ACCEPTED).glob(f"*/{name}/*.ipc"))
    if not files:
        raise ValueError(f"{staged.staging_dir}: nothing staged for {day} (staged: "
                         f"{[d.isoformat() for d in staged.days]})")
    new = pl.read_ipc(files).rechunk()  # contiguous: the gathers below are random access
    staged_rows = new.height
    candidates = new.select(pl.all().gather(_first_per_event(new))).drop(_ORDER)
    del new  # one copy of the date's rows at a time, besides the lake's
    existing = lake.read_partition(staged.lake_dir, day)
    fresh = candidates
    if existing is not None:
        fresh = candidates.filter(~pl.col("event_id").is_in(existing.get_column("event_id")))
    merge = PartitionMerge(
        day=day, staged_rows=staged_rows, accepted=fresh.height,
        duplicates=staged_rows - fresh.height,
        duplicates_in_lake=candidates.height - fresh.height, path=None,
    )
    if fresh.height == 0:
        return merge
    rows = fresh if existing is None else pl.concat([existing, fresh]).sort(lake.SORT_KEY)
    del candidates, fresh, existing
    out = staged.staging_dir / _OUT
    path = out / name / lake.PART_FILE
    temp = out / f".{name}-{uuid.uuid4().hex}.parquet"
    lake.write_events(rows, temp, presorted=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, path)
    return PartitionMerge(**{**merge.__dict__, "path": path})


def _first_per_event(new: pl.DataFrame) -> pl.Series:
    """Positions in ``new`` of one row per event_id, the earliest in the input, in
    (ts, event_id) order."""
    position = new.select(pl.arg_sort_by(*lake.SORT_KEY, _ORDER)).to_series()
    # the same event has the same ts: its copies are neighbours, the earliest first; only rows
    # whose ts repeats the previous row's can be copies, so compare event_ids of those only
    ts = new.get_column("ts").gather(position)
    tied = (ts == ts.shift()).fill_null(False).arg_true()
    if tied.len():
        event_id = new.get_column("event_id")
        repeat = event_id.gather(position.gather(tied)) == event_id.gather(
            position.gather(tied - 1))
        position = position.scatter(tied.filter(repeat), None).drop_nulls()
    # distinct 64-bit hashes prove the ids distinct (a collision only costs the exact check)
    hashes = new.get_column("event_id").hash().gather(position)
    if hashes.n_unique() < position.len():
        # an event_id with several ts on one date: keep its earliest row all the same
        kept = new.select(pl.col("event_id", _ORDER).gather(position))
        earliest = pl.col(_ORDER) == pl.col(_ORDER).min().over("event_id")
        position = position.filter(kept.select(earliest).to_series())
    return position


# ---------------------------------------------------------------------- pass 3: publish


def publish(staged: StagedIngest, merges: Sequence[PartitionMerge]) -> IngestReport:
    """Put the quarantine file and every merged partition in place, all or nothing (pass 3).

    ``merges`` holds one :class:`PartitionMerge` per staged date, in any order. The staging
    directory is removed afterwards, whether the publish worked or was rolled back.

    Raises:
        ValueError: ``merges`` does not cover the staged dates exactly once, or comes from
            another staging.
        FileNotFoundError: the staging directory is gone (published or discarded already).
    """
    by_day = {m.day: m for m in merges}
    if len(by_day) != len(merges) or set(by_day) != set(staged.days):
        missing = sorted(set(staged.days) - set(by_day))
        extra = sorted(set(by_day) - set(staged.days))
        repeated = sorted(d for d, n in Counter(m.day for m in merges).items() if n > 1)
        raise ValueError(
            f"publish needs one merge per staged date: missing {_iso(missing)}, "
            f"not staged {_iso(extra)}, repeated {_iso(repeated)}"
        )
    foreign = [m.day.isoformat() for m in merges
               if m.path is not None and not m.path.is_relative_to(staged.staging_dir)]
    if foreign or sum(m.staged_rows for m in merges) != staged.staged_rows:
        raise ValueError(
            f"merges of another staging: {staged.staged_rows} rows staged in "
            f"{staged.staging_dir}, merges count {sum(m.staged_rows for m in merges)}"
            + (f"; partitions staged elsewhere for {foreign}" if foreign else "")
        )
    if not staged.staging_dir.is_dir():
        raise FileNotFoundError(
            f"{staged.staging_dir}: staging directory is gone (published or discarded already)"
        )
    written = sorted((m for m in merges if m.path is not None), key=lambda m: m.day)
    report = IngestReport(
        source=staged.source,
        input_path=staged.input_path,
        input_rows=staged.input_rows,
        accepted=sum(m.accepted for m in merges),
        quarantined=staged.quarantined,
        duplicates=sum(m.duplicates for m in merges),
        duplicates_in_lake=sum(m.duplicates_in_lake for m in merges),
        quarantine_reasons=dict(staged.quarantine_reasons),
        partitions=tuple(m.day for m in written),
        quarantine_path=staged.quarantine_path,
        notes=staged.notes,
    )
    try:
        _publish(staged, written)
    finally:
        discard(staged)
    return report


def _iso(days: Sequence[date]) -> list[str]:
    return [d.isoformat() for d in days]


def _publish(staged: StagedIngest, written: Sequence[PartitionMerge]) -> None:
    """Rename the quarantine file and every new partition into place, all or nothing.

    ``lake_dir/events`` exists afterwards even when nothing was accepted, so that a reader
    sees an empty lake rather than a missing one.
    """
    lake.events_dir(staged.lake_dir).mkdir(parents=True, exist_ok=True)
    target = staged.quarantine_path
    with ExitStack() as stack:
        # the quarantine file goes in from beside its target (same file system, and the
        # backup of the file it replaces lives there too)
        near = stack.enter_context(lake.temp_dir(target.parent)) / target.name
        _move(staged.staging_dir / _QUARANTINE, near)
        publisher = lake.Publisher()
        try:
            publisher.publish_file(near, target)
            for merge in written:
                assert merge.path is not None
                partition = lake.partition_file(staged.lake_dir, merge.day)
                if partition.parent.exists():
                    publisher.publish_file(merge.path, partition)
                else:
                    publisher.publish_dir(merge.path.parent, partition.parent)
        except BaseException:
            publisher.rollback()
            raise


def _move(src: Path, dst: Path) -> None:
    """Rename, or copy when ``dst`` is on another file system."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------- cleanup


def discard(staged: StagedIngest) -> None:
    """Remove the staging directory of ``staged`` without publishing anything.

    Also removes ``lake_dir`` when :func:`stage_input` created it and it is left empty.
    Harmless when the staging directory is gone already.
    """
    _remove_staging(staged.staging_dir, staged.lake_dir if staged.created_lake_dir else None)


def remove_leftovers(lake_dir: Path, quarantine_dir: Path | None = None) -> list[Path]:
    """Remove what killed ingests left: ``.tmp-*`` entries of the lake root and of
    ``quarantine_dir`` (the quarantine directory of one source). Returns what was removed.

    Only for a lake with no ingest in flight (one writer at a time).
    """
    removed = []
    for parent in (Path(lake_dir), quarantine_dir):
        if parent is None or not Path(parent).is_dir():
            continue
        for entry in sorted(Path(parent).glob(f"{lake.TEMP_PREFIX}*")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.warning("removed leftovers of an interrupted ingest: %s", [str(p) for p in removed])
    return removed


def _remove_staging(staging: Path, created_lake_dir: Path | None) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    lake_dir = created_lake_dir
    if lake_dir is not None and lake_dir.is_dir() and not any(lake_dir.iterdir()):
        lake_dir.rmdir()
