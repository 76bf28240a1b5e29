"""Histories strictly before each impression, train-only vocabularies, the time split."""

from __future__ import annotations

from datetime import date

import polars as pl
import pytest

from features.build import (
    FeatureBuildError,
    FeatureConfig,
    attach_histories,
    split_dates,
)
from features.encode import encode_examples
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
