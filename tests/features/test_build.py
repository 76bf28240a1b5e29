"""Histories strictly before each impression, train-only vocabularies, the time split, and
the bucketed (bounded-memory) build writing exactly what the whole-lake build writes."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import features.build as build
from features.build import (
    SPLITS,
    FeatureBuildError,
    FeatureConfig,
    attach_histories,
    build_examples,
    merge_windows,
    plan_build,
    profile_lake,
    split_dates,
)
from features.encode import encode_examples
from features.lake import partition_file, write_events
from features.schema import SPARSE_FEATURES, ExampleSchema
from features.vocab import UNKNOWN_INDEX, Vocabulary


def test_history_holds_only_strictly_earlier_impressions(tiny_events):
    frame = attach_histories(tiny_events, history_length=5)
    by_event = {row["event_id"]: row for row in tiny_events.iter_rows(named=True)}
    for row in frame.iter_rows(named=True):
        earlier = tiny_events.filter(
            (pl.col("user_id") == row["user_id"]) & (pl.col("ts") < row["ts"])
        ).sort("ts", "event_id")
        expected = earlier.get_column("item_id").to_list()[-5:]
        assert row["hist_item_id"] == expected, row["event_id"]
        assert len(row["hist_behavior"]) == len(expected)
        assert by_event[row["event_id"]]["item_id"] == row["item_id"]


def test_impressions_of_one_request_do_not_see_each_other(tiny_events):
    frame = attach_histories(tiny_events, history_length=50)
    pairs = frame.group_by("user_id", "ts").agg(pl.col("hist_item_id"), pl.len().alias("n"))
    shared = pairs.filter(pl.col("n") > 1)
    assert shared.height > 0
    for histories in shared.get_column("hist_item_id").to_list():
        assert all(h == histories[0] for h in histories)  # same past, none sees the other


def test_behavior_code_reflects_the_strongest_signal(tiny_events):
    frame = attach_histories(tiny_events, history_length=50).sort("user_id", "ts", "event_id")
    last = frame.filter(pl.col("user_id") == 0).row(-1, named=True)
    past = tiny_events.filter(pl.col("user_id") == 0).sort("ts", "event_id")
    past = past.filter(pl.col("ts") < last["ts"])
    for code, row in zip(last["hist_behavior"], past.iter_rows(named=True), strict=True):
        if row["like"] or row["follow"]:
            assert code == 4
        elif row["long_view"]:
            assert code == 3
        elif row["click"]:
            assert code == 2
        else:
            assert code == 1


def test_split_dates_puts_test_last_and_rejects_too_few_dates():
    days = [date(2026, 1, d) for d in range(1, 6)]
    split = split_dates(days, FeatureConfig(valid_days=1, test_days=2))
    assert split == {"train": days[:2], "valid": days[2:3], "test": days[3:]}
    with pytest.raises(FeatureBuildError, match="needs at least 3"):
        split_dates(days[:2], FeatureConfig())


def test_unseen_ids_map_to_the_unknown_index(tiny_events):
    frame = attach_histories(tiny_events, 4).with_columns(pl.col("ts").dt.hour().alias("hour"))
    train = frame.filter(pl.col("item_id") != 7)
    vocab = Vocabulary.fit(train, SPARSE_FEATURES)
    schema = ExampleSchema(4, {f: vocab.size(f) for f in SPARSE_FEATURES})
    encoded = encode_examples(frame, vocab, schema)
    assert set(encoded.filter(pl.col("item_id") == 7).get_column("item_id_idx")) == {
        UNKNOWN_INDEX
    }
    hist = encoded.get_column("hist_item_id_idx").explode().drop_nulls()
    assert hist.min() >= UNKNOWN_INDEX
    assert (hist == UNKNOWN_INDEX).sum() > 0  # item 7 in histories is unknown too
    round_trip = Vocabulary.from_json(vocab.to_json())
    assert round_trip == vocab


def test_slots_of_one_request_do_not_see_each_other_even_with_later_timestamps(tiny_events):
    # the simulator stamps slot j of a request at request time + j ms
    staggered = tiny_events.with_columns(
        pl.col("ts") + pl.duration(milliseconds=pl.col("position"))
    )
    frame = attach_histories(staggered, history_length=50)
    per_request = frame.group_by("request_id").agg(pl.col("hist_item_id"), pl.len().alias("n"))
    shared = per_request.filter(pl.col("n") > 1)
    assert shared.height > 0
    for histories in shared.get_column("hist_item_id").to_list():
        assert all(h == histories[0] for h in histories)


def test_history_ends_where_the_impressions_request_started(tiny_events):
    """Interleaved requests of one user: C at t=2 and t=4, D at t=3; A at t=0 and t=1, B at
    t=1; one impression without a request at t=5. Each impression sees only what happened
    before its request was ranked (its request's first impression)."""
    one = tiny_events.head(1)
    rows = [("a0", 0, "A", 10), ("a1", 1, "A", 11), ("b1", 1, "B", 12), ("c2", 2, "C", 13),
            ("d3", 3, "D", 14), ("c4", 4, "C", 15), ("x5", 5, None, 16)]
    start = one.get_column("ts")[0]
    events = pl.concat([one.with_columns(
        pl.lit(event_id).alias("event_id"), pl.lit(start + timedelta(seconds=second)).alias("ts"),
        pl.lit(request, pl.String).alias("request_id"), pl.lit(item).alias("item_id"),
        pl.lit(7).alias("user_id")) for event_id, second, request, item in rows])
    histories = dict(attach_histories(events, history_length=10)
                     .select("event_id", "hist_item_id").iter_rows())
    assert histories == {"a0": [], "a1": [], "b1": [10], "c2": [10, 11, 12],
                         "d3": [10, 11, 12, 13], "c4": [10, 11, 12], "x5": [10, 11, 12, 13, 14, 15]}


def write_lake(events: pl.DataFrame, lake: Path) -> Path:
    """A lake holding ``events`` (one partition per UTC date), without going through ingest."""
    for (day,), part in events.group_by(pl.col("ts").dt.date()):
        write_events(part, partition_file(lake, day))
    return lake


def read_examples(out: Path) -> dict[str, pl.DataFrame | str]:
    """Every file of an examples dir: frames for Parquet, text for JSON."""
    files: dict[str, pl.DataFrame | str] = {
        name: pl.read_parquet(out / f"{name}.parquet") for name in SPLITS
    }
    files.update({name: (out / name).read_text() for name in ("vocab.json", "schema.json")})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}.parquet" for name in SPLITS] + ["vocab.json", "schema.json"]
    )
    return files


@pytest.fixture
def tiny_lake(tmp_path, tiny_events) -> Path:
    # staggered slots and some requests without id: every history rule is exercised
    events = tiny_events.with_columns(
        pl.col("ts") + pl.duration(milliseconds=pl.col("position")),
        pl.when(pl.col("user_id") % 3 == 0).then(None).otherwise(pl.col("request_id"))
        .alias("request_id"),
    )
    return write_lake(events, tmp_path / "lake")


@pytest.mark.parametrize(("other", "named"), [
    ({"source": "kuairand"}, "canonical (1,200 events), kuairand (1,200 events)"),
    ({"source": "simulator", "event_id": "sim1-0badf00d-"}, "simulator sim1-0badf00d"),
])
def test_a_lake_mixing_two_logs_is_refused_naming_them(tmp_path, tiny_events, other, named):
    """Two logs in one lake (another source, or another simulated world) share ids and dates:
    examples built from both would mean nothing, so the build refuses and writes nothing."""
    first = tiny_events if other["source"] != "simulator" else tiny_events.with_columns(
        source=pl.lit("simulator"), event_id=pl.concat_str(pl.lit("sim0-0badf00d-"), "event_id"))
    second = tiny_events.with_columns(
        source=pl.lit(other["source"]),
        event_id=pl.concat_str(pl.lit(other.get("event_id", "k")), "event_id"))
    lake = write_lake(pl.concat([first, second]), tmp_path / "lake")
    with pytest.raises(FeatureBuildError, match="mixes logs") as refused:
        build_examples(lake, tmp_path / "examples")
    assert named in str(refused.value) and "--home" in str(refused.value)
    assert not (tmp_path / "examples").exists()


def test_a_canonical_log_may_name_its_own_sources(tmp_path, tiny_events):
    """Canonical rows keep their own ``source`` (apps, say): one log, not a mix."""
    apps = tiny_events.with_columns(source=pl.when(pl.col("user_id") % 2 == 0)
                                    .then(pl.lit("ios")).otherwise(pl.lit("android")))
    lake = write_lake(apps, tmp_path / "lake")
    assert build.lake_origins(lake) == {"canonical": apps.height}
    assert sum(build_examples(lake, tmp_path / "examples").rows.values()) == apps.height


@pytest.mark.parametrize("max_rows", [2_000_000, 100])
def test_bucketed_build_writes_exactly_the_whole_lake_build(tiny_lake, tmp_path, max_rows):
    out = tmp_path / "examples"
    whole = build_examples(tiny_lake, out, FeatureConfig(history_length=6, user_buckets=1))
    expected = read_examples(out)
    config = FeatureConfig(history_length=6, user_buckets=3, max_rows_in_memory=max_rows)
    bucketed = build_examples(tiny_lake, out, config)
    got = read_examples(out)
    assert bucketed == whole
    for name in SPLITS:  # same rows, same order, same dtypes
        assert_frame_equal(got[name], expected[name])
        assert got[name].get_column("event_id").to_list() == (
            expected[name].sort("ts", "event_id").get_column("event_id").to_list()
        )
    assert got["vocab.json"] == expected["vocab.json"]
    assert got["schema.json"] == expected["schema.json"]
    assert "user_buckets" not in json.loads(got["schema.json"])["config"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_bucketed_build_does_not_leak_across_the_time_split(tiny_lake, tmp_path, tiny_events):
    out = tmp_path / "examples"
    report = build_examples(tiny_lake, out, FeatureConfig(history_length=6, user_buckets=3,
                                                          max_rows_in_memory=100))
    frames = {name: pl.read_parquet(out / f"{name}.parquet") for name in SPLITS}
    assert sum(report.rows.values()) == tiny_events.height
    for earlier, later in zip(SPLITS, SPLITS[1:], strict=False):
        assert frames[earlier].get_column("ts").max() < frames[later].get_column("ts").min()
    vocab = Vocabulary.from_json((out / "vocab.json").read_text())
    train_dates = [date.fromisoformat(d) for d in report.dates["train"]]
    train_events = tiny_events.filter(pl.col("ts").dt.date().is_in(train_dates))
    assert set(vocab.ids["item_id"]) == set(train_events.get_column("item_id"))
    assert set(vocab.ids["user_id"]) == set(train_events.get_column("user_id"))
    for name in SPLITS:  # every history item is strictly earlier than its impression
        for row in frames[name].select("user_id", "ts", "hist_item_id").iter_rows(named=True):
            past = tiny_events.filter((pl.col("user_id") == row["user_id"])
                                      & (pl.col("ts") < row["ts"]))
            assert set(row["hist_item_id"]) <= set(past.get_column("item_id"))


def test_a_failed_build_leaves_the_previous_examples_untouched(tiny_lake, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "examples"
    build_examples(tiny_lake, out, FeatureConfig(history_length=6, valid_days=2))
    before = read_examples(out)

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(build, "merge_parts", fail)
    with pytest.raises(OSError, match="disk full"):
        build_examples(tiny_lake, out, FeatureConfig(history_length=6, user_buckets=3))
    after = read_examples(out)
    for name, value in before.items():
        if isinstance(value, pl.DataFrame):
            assert_frame_equal(after[name], value)
        else:
            assert after[name] == value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "lake"]


def test_the_plan_picks_k_from_the_row_count_and_windows_cover_every_row():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hours = pl.DataFrame({
        "hour": [start + timedelta(hours=h) for h in range(0, 96, 2)],
        "rows": [300_000 if h % 24 == 12 else 10_000 for h in range(0, 96, 2)],
    }).with_columns(pl.col("hour").dt.cast_time_unit("us"), pl.col("rows").cast(pl.UInt32))
    # 1,640,000 rows over 4 dates; the noon hours hold 300,000 each
    assert plan_build(hours, FeatureConfig()).buckets == 1
    assert plan_build(hours, FeatureConfig(max_rows_in_memory=500_000)).buckets == 4
    assert plan_build(hours, FeatureConfig(user_buckets=3)).buckets == 3
    plan = plan_build(hours, FeatureConfig(max_rows_in_memory=250_000))
    assert plan.dates["test"] == [date(2026, 1, 4)]
    for name, days in plan.dates.items():
        mine = hours.filter(pl.col("hour").dt.date().is_in(days))
        windows = plan.windows[name]
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:], strict=False))
        counts = [mine.filter(pl.col("hour").is_between(lo, hi, closed="left"))
                  .get_column("rows").sum() for lo, hi in windows]
        assert sum(counts) == mine.get_column("rows").sum()
        # half the rows of a bucket per window; an hour bigger than that stands alone
        assert all(c <= 250_000 // build.MERGE_WINDOW_DIVISOR or c == 300_000 for c in counts)
        assert len(windows) > len(days)
    assert merge_windows(hours.head(0), 10) == []


def test_profile_lake_counts_rows_per_hour(tiny_lake, tiny_events):
    hours = profile_lake(tiny_lake)
    assert hours.get_column("rows").sum() == tiny_events.height
    assert hours.get_column("hour").is_sorted()
    empty = tiny_lake.parent / "empty"
    empty.mkdir()
    assert profile_lake(empty).height == 0
    with pytest.raises(FeatureBuildError, match="no events"):
        build_examples(empty, tiny_lake.parent / "out")


def test_vocabulary_fits_a_lazy_frame_like_its_rows(tiny_events):
    frame = tiny_events.with_columns(pl.col("ts").dt.hour().cast(pl.Int64).alias("hour"))
    assert Vocabulary.fit(frame.lazy(), SPARSE_FEATURES) == Vocabulary.fit(frame,
                                                                           SPARSE_FEATURES)


@pytest.mark.parametrize("field", ["history_length", "valid_days", "test_days"])
def test_feature_config_needs_at_least_one_of_each(field):
    with pytest.raises(ValueError, match=f"{field} must be at least 1"):
        FeatureConfig(**{field: 0})
