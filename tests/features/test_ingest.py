"""Ingestion: adapters, row-level quarantine reasons, duplicates, atomic idempotent lake writes."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from features import lake
from features.adapters import KUAIRAND_COLUMNS
from features.contract import EVENT_COLUMNS, EVENT_SCHEMA
from features.ingest import IngestConfig, IngestError, IngestReport, ingest
from features.lake import scan_events

T0 = datetime(2022, 4, 22, 10, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)

KUAIRAND_ROW: dict[str, str] = {
    "user_id": "1", "video_id": "10", "date": "20220422", "hourmin": "1800",
    "time_ms": str(T0_MS), "is_click": "1", "is_like": "0", "is_follow": "0",
    "is_comment": "0", "is_forward": "1", "is_hate": "0", "long_view": "1",
    "play_time_ms": "3000", "duration_ms": "12500", "profile_stay_time": "0",
    "comment_stay_time": "0", "is_profile_enter": "0", "is_rand": "1", "tab": "1",
}


# ----------------------------------------------------------------------------- helpers


def kuairand_row(**overrides: str) -> dict[str, str]:
    """A valid KuaiRand row; ``offset_ms`` shifts time_ms (distinct events)."""
    row = dict(KUAIRAND_ROW)
    offset = int(overrides.pop("offset_ms", "0"))
    row["time_ms"] = str(T0_MS + offset)
    row.update(overrides)
    return row


def write_kuairand(path: Path, rows: list[dict[str, str]], columns=KUAIRAND_COLUMNS) -> Path:
    lines = [",".join(columns)] + [",".join(row.get(c, "") for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def events(n: int, start: datetime = T0, step: timedelta = timedelta(hours=7)) -> pl.DataFrame:
    """``n`` valid canonical events, ``step`` apart (so they span several dates)."""
    rows = []
    for i in range(n):
        rows.append({
            "event_id": f"e{i:03d}", "ts": start + i * step, "user_id": i % 3,
            "request_id": f"r{i}", "item_id": 100 + i,
            "item_type": "live" if i % 4 == 0 else "video", "author_id": 7, "position": i % 5,
            "duration_s": 10.5, "click": i % 2, "like": 0, "follow": None, "comment": 0,
            "share": 0, "hate": 0, "long_view": 1, "gift": 0 if i % 4 == 0 else None,
            "watch_time_s": 2.25, "propensity": 0.25, "policy": "sim-logging",
            "source": "canonical",
        })
    return pl.DataFrame(rows, schema=EVENT_SCHEMA)


def canonical_csv(path: Path, cells: list[dict[str, str]]) -> Path:
    """A canonical CSV with valid rows overridden cell by cell (one dict per row)."""
    frame = events(len(cells)).with_columns(pl.all().cast(pl.String))
    rows = [{**frame.row(i, named=True), **cell} for i, cell in enumerate(cells)]
    pl.DataFrame(rows, schema={c: pl.String for c in EVENT_COLUMNS}).write_csv(path)
    return path


def run(tmp_path: Path, source: str, path: Path, **kwargs) -> IngestReport:
    report = ingest(source, path, tmp_path / "lake", tmp_path / "quarantine", **kwargs)
    assert report.input_rows == report.accepted + report.quarantined + report.duplicates
    return report


def hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def temp_entries(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob(f"{lake.TEMP_PREFIX}*")]


def lake_events(tmp_path: Path) -> pl.DataFrame:
    return scan_events(tmp_path / "lake").collect()


# ------------------------------------------------------------------- KuaiRand mapping


def test_kuairand_row_maps_to_the_contract(tmp_path):
    csv = write_kuairand(tmp_path / "log.csv", [
        kuairand_row(), kuairand_row(offset_ms="1", is_rand="0", video_id="11"),
    ])
    report = run(tmp_path, "kuairand", csv)
    assert (report.accepted, report.quarantined, report.duplicates) == (2, 0, 0)
    frame = lake_events(tmp_path)
    assert frame.schema == pl.Schema(EVENT_SCHEMA)
    first = frame.row(0, named=True)
    assert first["event_id"] == f"kuairand-1-10-{T0_MS}"
    assert first["ts"] == T0
    assert (first["user_id"], first["item_id"], first["item_type"]) == (1, 10, "video")
    assert (first["duration_s"], first["watch_time_s"]) == (12.5, 3.0)
    assert (first["click"], first["share"], first["long_view"], first["like"]) == (1, 1, 1, 0)
    assert first["gift"] is None, "gift is not observed by KuaiRand: null, not zero"
    for unobserved in ("request_id", "author_id", "position", "propensity"):
        assert first[unobserved] is None
    assert frame.get_column("policy").to_list() == ["kuairand-random", "kuairand-production"]
    assert set(frame.get_column("source")) == {"kuairand"}
    assert report.partitions == (date(2022, 4, 22),)


# ------------------------------------------------------------------ rejection reasons


KUAIRAND_FAULTS = [
    ({"user_id": ""}, "user_id: missing", "user_id: missing"),
    ({"user_id": "abc"}, "user_id: not an integer ('abc')", "user_id: not an integer"),
    ({"video_id": "1.5"}, "item_id: not an integer ('1.5')", "item_id: not an integer"),
    ({"time_ms": "soon"}, "ts: unparsable ('soon')", "ts: unparsable"),
    ({"time_ms": ""}, "ts: missing", "ts: missing"),
    ({"time_ms": "-1"}, "ts: outside 1970-2099 (1969-12-31T23:59:59.999Z)",
     "ts: outside 1970-2099"),
    ({"time_ms": "9000000000000000"}, "ts: unparsable ('9000000000000000')", "ts: unparsable"),
    ({"is_click": "2"}, "click: outside {0,1} (2)", "click: outside {0,1}"),
    ({"is_like": "-1"}, "like: outside {0,1} (-1)", "like: outside {0,1}"),
    ({"is_hate": "yes"}, "hate: not an integer ('yes')", "hate: not an integer"),
    ({"play_time_ms": "-3000"}, "watch_time_s: negative (-3.0)", "watch_time_s: negative"),
    ({"duration_ms": "-5"}, "duration_s: negative (-0.005)", "duration_s: negative"),
    ({"play_time_ms": "nan"}, "watch_time_s: not a finite number (NaN)",
     "watch_time_s: not a finite number"),
    ({"is_rand": "7"}, "policy: is_rand not 0 or 1 ('7')", "policy: is_rand not 0 or 1"),
]


@pytest.mark.parametrize(("cells", "reason", "code"), KUAIRAND_FAULTS)
def test_kuairand_fault_is_quarantined_with_its_reason(tmp_path, cells, reason, code):
    rows = [kuairand_row(), kuairand_row(offset_ms="5", **cells)]
    csv = write_kuairand(tmp_path / "log.csv", rows)
    report = run(tmp_path, "kuairand", csv)
    assert (report.accepted, report.quarantined, report.duplicates) == (1, 1, 0)
    assert report.quarantine_reasons == {code: 1}
    bad = pl.read_parquet(report.quarantine_path)
    assert bad.get_column("reason").to_list() == [reason]
    assert bad.get_column("row_number").to_list() == [2]
    assert bad.get_column("file").to_list() == ["log.csv"]
    raw_column, raw_value = next(iter(cells.items()))
    assert bad.get_column(raw_column).to_list() == [raw_value or None], "raw cell kept as is"
    assert bad.columns == ["file", "row_number", *KUAIRAND_COLUMNS, "reason"]


CANONICAL_FAULTS = [
    ({"event_id": ""}, "event_id: missing", "event_id: missing"),
    ({"ts": "2022-13-45"}, "ts: unparsable ('2022-13-45')", "ts: unparsable"),
    ({"ts": "2022-04-22"}, "ts: unparsable ('2022-04-22')", "ts: unparsable"),
    ({"ts": "2100-01-01T00:00:00Z"}, "ts: outside 1970-2099 (2100-01-01T00:00:00Z)",
     "ts: outside 1970-2099"),
    ({"user_id": "u7"}, "user_id: not an integer ('u7')", "user_id: not an integer"),
    ({"item_id": ""}, "item_id: missing", "item_id: missing"),
    ({"item_type": "clip"}, "item_type: not one of video/live ('clip')",
     "item_type: not one of video/live"),
    ({"position": "-1"}, "position: negative (-1)", "position: negative"),
    ({"gift": "3"}, "gift: outside {0,1} (3)", "gift: outside {0,1}"),
    ({"propensity": "1.7"}, "propensity: outside (0,1] (1.7)", "propensity: outside (0,1]"),
    ({"propensity": "0"}, "propensity: outside (0,1] (0.0)", "propensity: outside (0,1]"),
    ({"propensity": "high"}, "propensity: not a number ('high')", "propensity: not a number"),
    ({"watch_time_s": "-3"}, "watch_time_s: negative (-3.0)", "watch_time_s: negative"),
    ({"source": ""}, "source: missing", "source: missing"),
]


@pytest.mark.parametrize(("cells", "reason", "code"), CANONICAL_FAULTS)
def test_canonical_fault_is_quarantined_with_its_reason(tmp_path, cells, reason, code):
    csv = canonical_csv(tmp_path / "events.csv", [{}, cells, {}])
    report = run(tmp_path, "canonical", csv)
    assert (report.accepted, report.quarantined) == (2, 1)
    assert report.quarantine_reasons == {code: 1}
    bad = pl.read_parquet(report.quarantine_path)
    assert bad.get_column("reason").to_list() == [reason]
    assert bad.get_column("row_number").to_list() == [2]


def test_several_faults_in_one_row_are_all_named(tmp_path):
    csv = write_kuairand(tmp_path / "log.csv", [
        kuairand_row(user_id="abc", is_click="2", play_time_ms="-3000"),
        kuairand_row(offset_ms="1", is_click="2"),
    ])
    report = run(tmp_path, "kuairand", csv)
    assert report.quarantined == 2
    bad = pl.read_parquet(report.quarantine_path)
    assert bad.get_column("reason").to_list() == [
        "user_id: not an integer ('abc'); click: outside {0,1} (2); watch_time_s: negative (-3.0)",
        "click: outside {0,1} (2)",
    ]
    assert report.quarantine_reasons == {
        "click: outside {0,1}": 2, "user_id: not an integer": 1, "watch_time_s: negative": 1,
    }


def test_inputs_with_the_same_name_keep_their_own_quarantine(tmp_path):
    reports = []
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        frame = events(3).with_columns(event_id=pl.format(f"{day}-{{}}", pl.col("event_id")))
        frame.with_columns(user_id=pl.Series([1, None, 3])).write_parquet(
            tmp_path / day / "events.parquet")
        reports.append(run(tmp_path, "canonical", tmp_path / day / "events.parquet"))
    first, second = (r.quarantine_path for r in reports)
    assert first != second and first.name.startswith("events-")
    for report, day in zip(reports, ("day1", "day2"), strict=True):
        assert pl.read_parquet(report.quarantine_path)["event_id"].to_list() == [f"{day}-e001"]
    again = run(tmp_path, "canonical", tmp_path / "day1" / "events.parquet")
    assert again.quarantine_path == first  # the same input, the same file


def test_simulator_rows_must_say_simulator(tmp_path):
    out = tmp_path / "sim-run"
    out.mkdir()
    frame = events(3).with_columns(source=pl.Series(["simulator", "kuairand", "simulator"]))
    frame.write_parquet(out / "events.parquet")
    report = run(tmp_path, "simulator", out)
    assert (report.accepted, report.quarantined) == (2, 1)
    assert report.quarantine_reasons == {"source: not 'simulator'": 1}
    assert report.quarantine_path.parent == tmp_path / "quarantine" / "simulator"
    assert report.quarantine_path.name.startswith("sim-run-")
    bad = pl.read_parquet(report.quarantine_path)
    assert bad.get_column("reason").to_list() == ["source: not 'simulator' ('kuairand')"]
    assert bad.get_column("event_id").to_list() == ["e001"], "raw columns as text"


# -------------------------------------------------------------------- nulls and parsing


def test_a_header_only_file_ingests_nothing(tmp_path):
    csv = write_kuairand(tmp_path / "log.csv", [])
    report = run(tmp_path, "kuairand", csv)
    assert (report.input_rows, report.accepted, report.partitions) == (0, 0, ())
    assert pl.read_parquet(report.quarantine_path).height == 0
    assert lake_events(tmp_path).height == 0


def test_empty_labels_stay_null(tmp_path):
    csv = canonical_csv(tmp_path / "events.csv", [{"click": "", "watch_time_s": " "}, {}])
    report = run(tmp_path, "canonical", csv)
    assert report.accepted == 2
    frame = lake_events(tmp_path).sort("event_id")
    assert frame.get_column("click").to_list() == [None, 1]
    assert frame.get_column("watch_time_s").to_list() == [None, 2.25]
    assert frame.get_column("follow").null_count() == 2


@pytest.mark.parametrize("text", [
    "2022-04-22T10:00:00Z", "2022-04-22 10:00:00", "2022-04-22T10:00:00.000+00:00",
    "2022-04-22T18:00:00+08:00", "2022-04-22T10:00:00.000000+0000",
])
def test_timestamp_formats_are_read_as_utc(tmp_path, text):
    csv = canonical_csv(tmp_path / "events.csv", [{"ts": text}])
    run(tmp_path, "canonical", csv)
    assert lake_events(tmp_path).get_column("ts").to_list() == [T0]


def test_canonical_parquet_and_csv_give_the_same_lake(tmp_path):
    frame = events(9)
    frame.write_parquet(tmp_path / "in.parquet")
    frame.write_csv(tmp_path / "in.csv")
    a = ingest("canonical", tmp_path / "in.parquet", tmp_path / "a", tmp_path / "qa")
    b = ingest("canonical", tmp_path / "in.csv", tmp_path / "b", tmp_path / "qb")
    assert a.to_dict() | {"input_path": "", "quarantine_path": ""} == b.to_dict() | {
        "input_path": "", "quarantine_path": ""}
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert scan_events(tmp_path / "a").collect().equals(frame.sort("ts", "event_id"))


def test_canonical_parquet_with_other_native_dtypes_is_cast(tmp_path):
    frame = events(4).with_columns(
        pl.col("user_id").cast(pl.Int32), pl.col("click").cast(pl.Int64),
        pl.col("ts").dt.replace_time_zone(None).dt.cast_time_unit("ns"),
        pl.col("duration_s").cast(pl.Float32), pl.col("position").cast(pl.String),
    )
    frame.write_parquet(tmp_path / "in.parquet")
    report = run(tmp_path, "canonical", tmp_path / "in.parquet")
    assert report.accepted == 4
    assert lake_events(tmp_path).equals(events(4).sort("ts", "event_id"))


def test_extra_columns_are_ignored_with_a_note(tmp_path):
    events(2).with_columns(debug=pl.lit("x")).write_parquet(tmp_path / "in.parquet")
    report = run(tmp_path, "canonical", tmp_path / "in.parquet")
    assert report.accepted == 2
    assert report.notes == ("in.parquet: ignored extra columns ['debug']",)
    assert lake_events(tmp_path).columns == list(EVENT_COLUMNS)


def test_canonical_directory_of_mixed_files(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    frame = events(6)
    frame.head(3).write_parquet(folder / "a.parquet")
    frame.tail(3).write_csv(folder / "b.csv")
    (folder / "README.md").write_text("not data")
    report = run(tmp_path, "canonical", folder)
    assert (report.input_rows, report.accepted) == (6, 6)
    assert report.notes == ("drop: ignored entries ['README.md']",)
    assert report.quarantine_path.name.startswith("drop-")


# --------------------------------------------------------------------------- duplicates


def test_duplicates_within_the_input_keep_the_first(tmp_path):
    csv = write_kuairand(tmp_path / "log.csv", [
        kuairand_row(play_time_ms="1000"),
        kuairand_row(offset_ms="1"),
        kuairand_row(play_time_ms="1000"),          # exact duplicate row
        kuairand_row(play_time_ms="9000"),          # same event_id, other values
    ])
    report = run(tmp_path, "kuairand", csv)
    assert (report.input_rows, report.accepted, report.duplicates) == (4, 2, 2)
    assert report.duplicates_in_lake == 0
    frame = lake_events(tmp_path)
    assert frame.filter(pl.col("ts") == T0).get_column("watch_time_s").to_list() == [1.0]


def test_reingest_is_byte_identical_and_counts_duplicates(tmp_path):
    csv = canonical_csv(tmp_path / "events.csv", [{}] * 8 + [{"click": "5"}])
    first = run(tmp_path, "canonical", csv)
    assert (first.accepted, first.quarantined) == (8, 1)
    assert len(first.partitions) == 3
    before = hashes(tmp_path / "lake"), hashes(tmp_path / "quarantine")
    second = run(tmp_path, "canonical", csv)
    assert (hashes(tmp_path / "lake"), hashes(tmp_path / "quarantine")) == before
    assert (second.accepted, second.quarantined, second.duplicates) == (0, 1, 8)
    assert second.duplicates_in_lake == 8
    assert second.partitions == ()
    assert temp_entries(tmp_path / "lake", tmp_path / "quarantine") == []


def test_a_corrupt_lake_partition_is_named_and_nothing_changes(tmp_path):
    from features.lake import LakeError

    csv = canonical_csv(tmp_path / "events.csv", [{}] * 8)
    run(tmp_path, "canonical", csv)
    broken = sorted((tmp_path / "lake" / "events").glob("date=*/part-0.parquet"))[0]
    broken.write_bytes(b"garbage")
    before = hashes(tmp_path / "lake")
    with pytest.raises(LakeError, match=f"{broken}: this lake partition cannot be read"):
        run(tmp_path, "canonical", csv)
    assert hashes(tmp_path / "lake") == before
    assert temp_entries(tmp_path / "lake", tmp_path / "quarantine") == []


def test_new_rows_join_an_existing_partition_and_the_lake_row_wins(tmp_path):
    frame = events(4, step=timedelta(minutes=10))
    frame.head(2).write_parquet(tmp_path / "day1.parquet")
    run(tmp_path, "canonical", tmp_path / "day1.parquet")
    changed = frame.with_columns(watch_time_s=pl.lit(99.0)).reverse()   # overlaps e000, e001
    changed.write_parquet(tmp_path / "day1-again.parquet")
    report = run(tmp_path, "canonical", tmp_path / "day1-again.parquet")
    assert (report.accepted, report.duplicates, report.duplicates_in_lake) == (2, 2, 2)
    assert report.partitions == (date(2022, 4, 22),)
    stored = pl.read_parquet(lake.partition_file(tmp_path / "lake", date(2022, 4, 22)))
    assert stored.get_column("event_id").to_list() == ["e000", "e001", "e002", "e003"]
    assert stored.get_column("watch_time_s").to_list() == [2.25, 2.25, 99.0, 99.0]


def test_partitions_follow_the_utc_date_and_are_sorted(tmp_path):
    midnight = datetime(2022, 4, 23, tzinfo=UTC)
    cells = [
        {"event_id": "b", "ts": "2022-04-23T00:00:00Z"},
        {"event_id": "z", "ts": "2022-04-22T23:59:59.999Z"},
        {"event_id": "a", "ts": "2022-04-23T08:00:00+08:00"},      # the same instant as "b"
    ]
    report = run(tmp_path, "canonical", canonical_csv(tmp_path / "e.csv", cells))
    assert report.partitions == (date(2022, 4, 22), date(2022, 4, 23))
    day2 = pl.read_parquet(lake.partition_file(tmp_path / "lake", date(2022, 4, 23)))
    assert day2.get_column("event_id").to_list() == ["a", "b"]
    assert day2.get_column("ts").to_list() == [midnight, midnight]


def test_small_batches_give_the_same_result(tmp_path):
    again = {"event_id": "e000", "ts": "2022-04-22T10:00:00Z"}   # the first row's event, again
    cells = [{}] * 10 + [{"user_id": "x"}, again]
    csv = canonical_csv(tmp_path / "e.csv", cells)
    one = ingest("canonical", csv, tmp_path / "a", tmp_path / "qa")
    many = ingest("canonical", csv, tmp_path / "b", tmp_path / "qb",
                  config=IngestConfig(batch_rows=3))
    assert (many.accepted, many.quarantined, many.duplicates) == (10, 1, 1)
    assert one.to_dict()["quarantine_reasons"] == many.to_dict()["quarantine_reasons"]
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert pl.read_parquet(one.quarantine_path).equals(pl.read_parquet(many.quarantine_path))


# ------------------------------------------------------------------------- bad inputs


def seeded_lake(tmp_path: Path) -> dict[str, str]:
    """Ingest a few events so there is a lake to leave untouched; returns its hashes."""
    events(3).write_parquet(tmp_path / "seed.parquet")
    run(tmp_path, "canonical", tmp_path / "seed.parquet")
    return hashes(tmp_path)


def assert_untouched(tmp_path: Path, before: dict[str, str]) -> None:
    assert hashes(tmp_path) == before
    assert temp_entries(tmp_path) == []


def test_missing_columns_are_fatal_and_named(tmp_path):
    before = seeded_lake(tmp_path)
    columns = [c for c in KUAIRAND_COLUMNS if c not in ("time_ms", "is_click")]
    csv = write_kuairand(tmp_path / "x.csv", [kuairand_row()], columns=columns)
    before[csv.name] = hashlib.sha256(csv.read_bytes()).hexdigest()
    with pytest.raises(IngestError) as err:
        ingest("kuairand", csv, tmp_path / "lake", tmp_path / "quarantine")
    assert str(err.value) == f"{csv}: missing columns ['time_ms', 'is_click'] for source 'kuairand'"
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("x.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a CSV: binary content"),
    ("x.csv", b"PAR1\x15\x04\x15\x10", "not a CSV: it is a Parquet file"),
    ("x.csv", b"", "not a CSV: empty file"),
    ("x.csv", b"user_id,video\xff\xfe_id\n", "not a CSV: not UTF-8 text"),
    ("x.parquet", b"user_id,video_id\n1,2\n", "not a Parquet file"),
    ("x.txt", b"user_id\n", "unsupported file type '.txt'"),
])
def test_a_file_that_is_not_what_its_source_says_is_fatal(tmp_path, name, content, problem):
    before = seeded_lake(tmp_path)
    path = tmp_path / name
    path.write_bytes(content)
    before[name] = hashlib.sha256(content).hexdigest()
    with pytest.raises(IngestError, match=problem) as err:
        ingest("canonical", path, tmp_path / "lake", tmp_path / "quarantine")
    assert str(err.value).startswith(f"{path}: ")
    assert_untouched(tmp_path, before)


def test_a_ragged_csv_line_is_fatal_and_leaves_the_lake_untouched(tmp_path):
    before = seeded_lake(tmp_path)
    csv = write_kuairand(tmp_path / "x.csv", [kuairand_row()])
    with csv.open("a") as handle:
        handle.write(",".join(KUAIRAND_ROW.values()) + ",extra,cells\n")
    before[csv.name] = hashlib.sha256(csv.read_bytes()).hexdigest()
    with pytest.raises(IngestError, match=f"{csv}: unreadable csv file"):
        ingest("kuairand", csv, tmp_path / "lake", tmp_path / "quarantine")
    assert_untouched(tmp_path, before)


def test_missing_paths_and_empty_directories_are_fatal(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "sim").mkdir()
    cases = [
        ("canonical", tmp_path / "nope.csv", "does not exist"),
        ("canonical", tmp_path / "empty", "empty directory"),
        ("simulator", tmp_path / "sim", "no events.parquet"),
        ("elsewhere", tmp_path / "nope.csv", "unknown source 'elsewhere'"),
    ]
    for source, path, problem in cases:
        with pytest.raises(IngestError, match=problem):
            ingest(source, path, tmp_path / "lake", tmp_path / "quarantine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sim"], "nothing written"


def test_a_failed_publish_is_rolled_back(tmp_path, monkeypatch):
    frame = events(8)                       # 3 dates
    frame.head(2).write_parquet(tmp_path / "first.parquet")
    run(tmp_path, "canonical", tmp_path / "first.parquet")
    frame.write_parquet(tmp_path / "first.parquet")    # same quarantine name, more dates
    before = hashes(tmp_path / "lake"), hashes(tmp_path / "quarantine")
    calls = {"n": 0}
    real_rename = lake._rename

    def flaky_rename(src: Path, dst: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(lake, "_rename", flaky_rename)
    with pytest.raises(OSError, match="disk full"):
        ingest("canonical", tmp_path / "first.parquet", tmp_path / "lake", tmp_path / "quarantine")
    assert calls["n"] == 2, "one new partition was published, then rolled back"
    assert (hashes(tmp_path / "lake"), hashes(tmp_path / "quarantine")) == before
    assert temp_entries(tmp_path) == []
    assert [p.name for p in (tmp_path / "lake" / "events").iterdir()] == ["date=2022-04-22"]


# ------------------------------------------------------------------ report and reader


def test_report_counts_must_add_up():
    with pytest.raises(AssertionError, match="lost rows"):
        IngestReport(
            source="canonical", input_path=Path("x"), input_rows=3, accepted=1, quarantined=1,
            duplicates=0, duplicates_in_lake=0, quarantine_reasons={}, partitions=(),
            quarantine_path=Path("q"),
        )


def test_report_is_json_ready(tmp_path):
    csv = canonical_csv(tmp_path / "e.csv", [{}, {"click": "2"}])
    summary = json.loads(json.dumps(run(tmp_path, "canonical", csv).to_dict()))
    assert summary["partitions"] == ["2022-04-22"]
    assert summary["quarantine_reasons"] == {"click: outside {0,1}": 1}
    assert re.search(r"quarantine/canonical/e-[0-9a-f]{8}\.parquet$", summary["quarantine_path"])


def test_scan_events_filters_dates_inclusively(tmp_path):
    events(12).write_parquet(tmp_path / "in.parquet")      # 2022-04-22 .. 2022-04-25
    run(tmp_path, "canonical", tmp_path / "in.parquet")
    root = tmp_path / "lake"
    assert lake.list_partitions(root) == [date(2022, 4, d) for d in (22, 23, 24, 25)]
    window = scan_events(root, date(2022, 4, 23), date(2022, 4, 24)).collect()
    assert window.columns == list(EVENT_COLUMNS)
    assert set(window.get_column("ts").dt.date()) == {date(2022, 4, 23), date(2022, 4, 24)}
    assert scan_events(root, start=date(2022, 4, 25)).collect().height == 3
    assert scan_events(root, end=date(2022, 4, 1)).collect().schema == pl.Schema(EVENT_SCHEMA)
    with pytest.raises(FileNotFoundError):
        scan_events(tmp_path / "no-lake")


def test_a_second_ingest_into_a_lake_being_written_stops_and_touches_nothing(tmp_path):
    """Two workspaces may point at one lake (``--lake``): the second writer must not take
    the first one's staging for a leftover."""
    from features.lake import LakeBusyError, writer_lock

    csv = canonical_csv(tmp_path / "events.csv", [{}] * 8)
    run(tmp_path, "canonical", csv)
    before = hashes(tmp_path / "lake")
    with writer_lock(tmp_path / "lake"):  # another process's ingest, as far as flock goes
        staging = tmp_path / "lake" / ".tmp-ingest-inflight"
        staging.mkdir()
        with pytest.raises(LakeBusyError, match="being written by another ingest"):
            run(tmp_path, "canonical", csv)
        assert staging.is_dir()
    assert hashes(tmp_path / "lake") == before


def test_an_unreadable_csv_line_is_named(tmp_path):
    good = canonical_csv(tmp_path / "good.csv", [{}] * 5).read_text().splitlines()
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join([*good[:3], good[3] + ",extra", *good[4:]]) + "\n")
    with pytest.raises(IngestError, match=r"ragged.csv: unreadable csv file \(line 4 has"):
        run(tmp_path, "canonical", ragged)
    many = canonical_csv(tmp_path / "many.csv", [{}] * 1200).read_text().splitlines()
    latin = tmp_path / "latin.csv"  # the bad byte after the first 64 KB the sniffing reads
    latin.write_bytes("\n".join(many[:1100]).encode() + b"\n" + many[1100].encode()[:-1]
                      + b"\xe9\n")
    with pytest.raises(IngestError, match=r"line 1101 is not valid UTF-8"):
        run(tmp_path, "canonical", latin)
    assert not (tmp_path / "lake").exists()
