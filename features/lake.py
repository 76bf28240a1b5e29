"""The Parquet event lake: ``lake_dir/events/date=YYYY-MM-DD/part-0.parquet``.

Each partition holds the events of one UTC date of ``ts``, sorted by ``(ts, event_id)``, in
exactly the contract's columns and dtypes. Writers stage files in a temporary directory inside
the target directory and publish them with renames (:class:`Publisher`), so a reader never
sees a partial partition. One writer at a time per lake (there is no lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import polars as pl

from features.contract import EVENT_COLUMNS, EVENT_SCHEMA

EVENTS_DIR = "events"
PART_FILE = "part-0.parquet"
SORT_KEY: tuple[str, ...] = ("ts", "event_id")
TEMP_PREFIX = ".tmp-"
"""Temporary directories start with this (readers skip dot-entries)."""

_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


def events_dir(lake_dir: Path) -> Path:
    """The directory holding the event partitions."""
    return Path(lake_dir) / EVENTS_DIR


def partition_name(day: date) -> str:
    """``date=YYYY-MM-DD``."""
    return f"date={day.isoformat()}"


def partition_file(lake_dir: Path, day: date) -> Path:
    """The Parquet file of one date partition (it may not exist)."""
    return events_dir(lake_dir) / partition_name(day) / PART_FILE


def list_partitions(lake_dir: Path) -> list[date]:
    """Dates that have a partition file, ascending."""
    root = events_dir(lake_dir)
    if not root.is_dir():
        return []
    days = []
    for entry in root.iterdir():
        match = _PARTITION.match(entry.name)
        if match and (entry / PART_FILE).is_file():
            days.append(date.fromisoformat(match.group(1)))
    return sorted(days)


def scan_events(
    lake_dir: Path, start: date | None = None, end: date | None = None
) -> pl.LazyFrame:
    """Lazy scan of the lake's events with UTC dates in ``[start, end]`` (both inclusive).

    Only the partitions in range are opened; the result has exactly the contract's columns
    and dtypes (no ``date`` column). An empty lake gives an empty frame; a ``lake_dir`` that
    does not exist raises FileNotFoundError.
    """
    if not Path(lake_dir).is_dir():
        raise FileNotFoundError(f"{lake_dir}: no such lake directory")
    if start is not None and end is not None and start > end:
        raise ValueError(f"start {start} is after end {end}")
    days = [
        d for d in list_partitions(lake_dir)
        if (start is None or d >= start) and (end is None or d <= end)
    ]
    if not days:
        return pl.LazyFrame(schema=EVENT_SCHEMA)
    files = [partition_file(lake_dir, d) for d in days]
    return pl.scan_parquet(files).select(EVENT_COLUMNS).cast(EVENT_SCHEMA)  # type: ignore[arg-type]


def read_partition(lake_dir: Path, day: date) -> pl.DataFrame | None:
    """The events of one partition, or None when it does not exist.

    Raises:
        LakeError: the file is corrupt or not in the contract (naming it).
    """
    path = partition_file(lake_dir, day)
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path).select(EVENT_COLUMNS).cast(EVENT_SCHEMA)  # type: ignore[arg-type]
    except pl.exceptions.PolarsError as error:
        raise LakeError(f"{path}: this lake partition cannot be read ({error}); restore it "
                        "from a backup, or delete it and ingest its logs again") from error


class LakeError(ValueError):
    """A lake file that is not a readable partition of the event contract."""


def write_events(events: pl.DataFrame, path: Path, *, presorted: bool = False) -> None:
    """Write a partition file: contract columns, sorted by (ts, event_id), deterministic bytes.

    ``presorted``: ``events`` is sorted by :data:`SORT_KEY` already (not checked).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = events.select(EVENT_COLUMNS).cast(EVENT_SCHEMA)  # type: ignore[arg-type]
    if not presorted:
        frame = frame.sort(SORT_KEY)
    frame.write_parquet(path, compression="zstd", compression_level=1, statistics=True)


@contextmanager
def writer_lock(lake_dir: Path) -> Iterator[None]:
    """Hold the lake's writer lock (an OS ``flock`` on the lake directory itself, created if
    needed; released when the process ends, so a killed writer leaves none behind) or raise
    LakeBusyError. One ingest per lake at a time, whichever workspace or ``--lake`` it comes
    from: a second one would remove the first one's staging as a leftover."""
    lake_dir = Path(lake_dir)
    lake_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(lake_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LakeBusyError(f"lake {lake_dir} is being written by another ingest; start "
                                "again when it has finished") from None
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


class LakeBusyError(ValueError):
    """Another process holds the lake's writer lock."""


@contextmanager
def temp_dir(parent: Path) -> Iterator[Path]:
    """A fresh temporary directory inside ``parent``, removed on exit whatever happens.

    ``parent`` is created if needed, and removed again on exit if it was created here and
    is left empty.
    """
    parent = Path(parent)
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if created and not any(parent.iterdir()):
            parent.rmdir()


@dataclass
class Publisher:
    """Moves staged files and directories into place; undoes all of it if any move fails.

    A new directory is renamed into place whole (``os.rename``); a file that replaces an
    existing one goes in with ``os.replace`` after the old one is hard-linked (or copied)
    next to the staged file, so that :meth:`rollback` can restore it. A staged entry must be
    on the same filesystem as its target (stage inside the target's tree: :func:`temp_dir`).
    """

    _undo: list[tuple[Path, Path | None]] = field(default_factory=list)

    def publish_dir(self, staged: Path, target: Path) -> None:
        """Rename the staged directory to ``target`` (which must not exist)."""
        if target.exists():
            raise FileExistsError(f"{target}: already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        _rename(staged, target)
        self._undo.append((target, None))

    def publish_file(self, staged: Path, target: Path) -> None:
        """Atomically put the staged file at ``target``, keeping a backup of the old one."""
        target.parent.mkdir(parents=True, exist_ok=True)
        backup = None
        if target.exists():
            backup = staged.with_name(f"{staged.name}.backup")
            _link_or_copy(target, backup)
        _replace(staged, target)
        self._undo.append((target, backup))

    def rollback(self) -> None:
        """Undo every publish, newest first (restore backups, remove new entries)."""
        while self._undo:
            target, backup = self._undo.pop()
            if backup is not None:
                os.replace(backup, target)
            elif target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
