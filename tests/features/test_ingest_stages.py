"""Ingest as separate passes (stage -> merge per date -> publish), staging leftovers, the screen."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from features import lake
from features.adapters import adapter_for
from features.contract import EVENT_SCHEMA
from features.ingest import (
    IngestConfig,
    PartitionMerge,
    discard,
    ingest,
    merge_partition,
    publish,
    stage_input,
)
from features.lake import scan_events
from features.validation import ParsedEvents, parse_float, parse_int, row_rules
from tests.features.test_ingest import (
    canonical_csv,
    events,
    hashes,
    kuairand_row,
    temp_entries,
    write_kuairand,
)


def mixed_input(tmp_path: Path) -> Path:
    """A canonical CSV over 3 dates with a bad row, an in-input duplicate and a padded cell."""
    cells = [{}] * 8 + [{"click": "5"}, {"event_id": "e000", "ts": "2022-04-22T10:00:00Z"},
                        {"event_id": "e100", "user_id": " 7 "}]
    return canonical_csv(tmp_path / "drop.csv", cells)


def test_stage_merge_publish_gives_the_same_lake_as_ingest(tmp_path):
    csv = mixed_input(tmp_path)
    events(3).write_parquet(tmp_path / "seed.parquet")          # a lake with rows already
    for root in ("a", "b"):
        ingest("canonical", tmp_path / "seed.parquet", tmp_path / root, tmp_path / f"q{root}")
    whole = ingest("canonical", csv, tmp_path / "a", tmp_path / "qa")

    seeded = hashes(tmp_path / "b")
    staged = stage_input("canonical", csv, tmp_path / "b", tmp_path / "qb")
    assert staged == pickle.loads(pickle.dumps(staged)), "paths and counts only: picklable"
    assert staged.staging_dir.parent == tmp_path / "b"
    assert lake.list_partitions(tmp_path / "b") == [date(2022, 4, 22), date(2022, 4, 23)]
    assert {k: v for k, v in hashes(tmp_path / "b").items() if not k.startswith(".")} == seeded
    merges = [merge_partition(staged, day) for day in reversed(staged.days)]
    assert all(m.path is None or m.path.is_relative_to(staged.staging_dir) for m in merges)
    parts = publish(staged, merges)

    assert parts.to_dict() | {"quarantine_path": ""} == whole.to_dict() | {"quarantine_path": ""}
    assert (parts.accepted, parts.quarantined, parts.duplicates, parts.duplicates_in_lake) == (
        6, 1, 4, 3)
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert hashes(tmp_path / "qa") == hashes(tmp_path / "qb")
    assert not staged.staging_dir.exists()
    assert temp_entries(tmp_path) == []
    padded = scan_events(tmp_path / "b").filter(pl.col("event_id") == "e100").collect()
    assert padded.get_column("user_id").to_list() == [7], "a padded cell is parsed, not rejected"


def test_merges_in_separate_processes_then_publish(tmp_path):
    frame = events(8)                                             # 3 dates
    frame.write_parquet(tmp_path / "in.parquet")
    ingest("canonical", tmp_path / "in.parquet", tmp_path / "a", tmp_path / "qa")
    staged = stage_input("canonical", tmp_path / "in.parquet", tmp_path / "b", tmp_path / "qb")
    assert len(staged.days) == 3
    spawn = multiprocessing.get_context("spawn")                   # no fork of Polars' threads
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        merges = list(pool.map(merge_partition, [staged] * len(staged.days), staged.days))
    assert sorted(m.day for m in merges) == list(staged.days)
    report = publish(staged, merges)
    assert report.accepted == 8
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert scan_events(tmp_path / "b").collect().equals(frame.sort("ts", "event_id"))


def test_a_killed_runs_staging_is_ignored_by_readers_and_cleaned(tmp_path):
    events(3).write_parquet(tmp_path / "seed.parquet")
    ingest("canonical", tmp_path / "seed.parquet", tmp_path / "lake", tmp_path / "quarantine")
    before = scan_events(tmp_path / "lake").collect()
    days = lake.list_partitions(tmp_path / "lake")
    events(8).write_parquet(tmp_path / "more.parquet")
    killed = stage_input("canonical", tmp_path / "more.parquet", tmp_path / "lake",
                         tmp_path / "quarantine")
    for day in killed.days:                                       # ... merged, then killed
        merge_partition(killed, day)
    assert killed.staging_dir.is_dir()

    assert lake.list_partitions(tmp_path / "lake") == days
    assert scan_events(tmp_path / "lake").collect().equals(before)

    report = ingest("canonical", tmp_path / "more.parquet", tmp_path / "lake",
                    tmp_path / "quarantine")
    assert not killed.staging_dir.exists(), "the next ingest removes the leftover"
    assert temp_entries(tmp_path) == []
    assert (report.accepted, report.duplicates_in_lake) == (5, 3)
    assert scan_events(tmp_path / "lake").collect().height == 8


def test_discard_leaves_nothing_behind(tmp_path):
    events(3).write_parquet(tmp_path / "seed.parquet")
    ingest("canonical", tmp_path / "seed.parquet", tmp_path / "lake", tmp_path / "quarantine")
    before = hashes(tmp_path)
    staged = stage_input("canonical", mixed_input(tmp_path), tmp_path / "lake",
                         tmp_path / "quarantine")
    merge_partition(staged, staged.days[0])
    discard(staged)
    discard(staged)                                               # harmless twice
    assert {k: v for k, v in hashes(tmp_path).items() if k != "drop.csv"} == before
    assert temp_entries(tmp_path) == []

    fresh = stage_input("canonical", tmp_path / "seed.parquet", tmp_path / "new-lake",
                        tmp_path / "q2")
    assert fresh.created_lake_dir
    discard(fresh)
    assert not (tmp_path / "new-lake").exists() and not (tmp_path / "q2").exists()


def test_publish_needs_every_staged_date_exactly_once(tmp_path):
    events(8).write_parquet(tmp_path / "in.parquet")
    staged = stage_input("canonical", tmp_path / "in.parquet", tmp_path / "lake",
                         tmp_path / "quarantine")
    merges = [merge_partition(staged, day) for day in staged.days]
    with pytest.raises(ValueError, match=r"missing \['2022-04-24'\]"):
        publish(staged, merges[:-1])
    with pytest.raises(ValueError, match=r"repeated \['2022-04-22'\]"):
        publish(staged, [*merges, merges[0]])
    with pytest.raises(ValueError, match="nothing staged for 2022-05-01"):
        merge_partition(staged, date(2022, 5, 1))
    other = stage_input("canonical", tmp_path / "in.parquet", tmp_path / "other-lake",
                        tmp_path / "quarantine")
    with pytest.raises(ValueError, match="merges of another staging"):
        publish(staged, [merge_partition(other, day) for day in other.days])
    discard(other)
    assert staged.staging_dir.is_dir(), "a refused publish touches nothing"
    publish(staged, merges)
    with pytest.raises(FileNotFoundError, match="staging directory is gone"):
        publish(staged, merges)


def test_a_merge_with_nothing_new_publishes_nothing_for_that_date(tmp_path):
    events(4).write_parquet(tmp_path / "in.parquet")
    ingest("canonical", tmp_path / "in.parquet", tmp_path / "lake", tmp_path / "quarantine")
    staged = stage_input("canonical", tmp_path / "in.parquet", tmp_path / "lake",
                         tmp_path / "quarantine")
    merges = [merge_partition(staged, day) for day in staged.days]
    assert all(m == PartitionMerge(m.day, m.staged_rows, 0, m.staged_rows, m.staged_rows, None)
               for m in merges)
    assert publish(staged, merges).partitions == ()


# ------------------------------------------------------------------ slices and the screen


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_small_slices_give_the_same_result(tmp_path, fmt):
    if fmt == "csv":
        rows = [kuairand_row(offset_ms=str(i * 3_600_000)) for i in range(30)]
        rows[7] = kuairand_row(offset_ms="7", is_click="2")
        rows[9] = kuairand_row(offset_ms="9", user_id="u9")       # bad rows in two slices
        rows[12] = rows[3]                                        # a duplicate, later slice
        rows[20] = kuairand_row(offset_ms="20", user_id=" 9")     # padded: checked, accepted
        path, source = write_kuairand(tmp_path / "log.csv", rows), "kuairand"
    else:
        path, source = tmp_path / "in.parquet", "canonical"
        frame = events(30)
        frame = pl.concat([frame, frame.slice(4, 1)]).with_columns(
            pl.when(pl.int_range(pl.len()) == 9).then(-1).otherwise(pl.col("position"))
            .cast(pl.Int32).alias("position"))
        frame.write_parquet(path)
    one = ingest(source, path, tmp_path / "a", tmp_path / "qa")
    many = ingest(source, path, tmp_path / "b", tmp_path / "qb",
                  config=IngestConfig(slice_rows=4, batch_rows=1))
    assert one.to_dict() | {"quarantine_path": ""} == many.to_dict() | {"quarantine_path": ""}
    assert (one.quarantined, one.duplicates) == ((2, 1) if fmt == "csv" else (1, 1))
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert pl.read_parquet(one.quarantine_path).equals(pl.read_parquet(many.quarantine_path))


def test_an_event_id_seen_with_two_timestamps_on_one_date_keeps_the_first(tmp_path):
    t0 = datetime(2022, 4, 22, 10, tzinfo=UTC)
    frame = events(4, step=timedelta(minutes=1)).with_columns(
        event_id=pl.Series(["x", "y", "x", "z"]),
        ts=pl.Series([t0 + timedelta(minutes=5), t0, t0, t0], dtype=EVENT_SCHEMA["ts"]),
    )
    frame.write_parquet(tmp_path / "in.parquet")
    report = ingest("canonical", tmp_path / "in.parquet", tmp_path / "lake", tmp_path / "q")
    assert (report.accepted, report.duplicates) == (3, 1)
    stored = scan_events(tmp_path / "lake").collect()
    assert stored.get_column("event_id").to_list() == ["y", "z", "x"]
    assert stored.filter(pl.col("event_id") == "x").get_column("ts").to_list() == [
        t0 + timedelta(minutes=5)], "the first row in the input, not the earliest ts"


def test_the_screen_checks_every_rule_of_the_contract():
    assert set(row_rules()) == set(ParsedEvents._validation_rules(with_cast=False))


def test_fast_parsing_agrees_wherever_it_gives_a_value():
    cells = pl.Series(["5", " 5", "5 ", "+5", "-0", "05", "1.5", " 1.5", "nan", "inf", "1e3",
                       "", " ", "x", None, "9223372036854775808", "\t7"])
    for parse in (parse_int, parse_float):
        frame = pl.DataFrame({"raw": cells}).select(
            fast=parse(pl.col("raw"), fast=True), slow=parse(pl.col("raw")))
        agree = frame.filter(pl.col("fast").is_not_null())
        assert agree.get_column("fast").equals(agree.get_column("slow"), check_names=False)
        assert frame.filter(pl.col("fast").is_null() & pl.col("slow").is_not_null()).height > 0


def test_kuairand_fast_fields_cover_the_contract():
    fast = adapter_for("kuairand").fields(pl.Schema({}), fast=True)
    assert [f.name for f in fast] == [f.name for f in adapter_for("kuairand").fields(
        pl.Schema({}))]
