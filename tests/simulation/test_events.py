"""Simulated events follow the contract and the response funnel; requests are well formed."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest

from features.contract import BINARY_LABELS, EVENT_SCHEMA, REQUIRED_NON_NULL
from simulation.schemas import GROUND_TRUTH_SCHEMA

AFTER_CLICK = ("like", "follow", "comment", "share", "long_view", "gift")


def test_events_match_the_contract_exactly(logged):
    assert list(logged.events.schema.items()) == list(EVENT_SCHEMA.items())
    assert list(logged.ground_truth.schema.items()) == list(GROUND_TRUTH_SCHEMA.items())


def test_event_ids_are_unique_and_shared_with_ground_truth(logged, small_config):
    ids = logged.events["event_id"]
    assert ids.n_unique() == logged.events.height
    assert ids.str.starts_with(f"sim{small_config.seed}-").all()
    assert logged.ground_truth["event_id"].equals(ids)


def test_contract_values(result):
    ev = result.events
    assert ev.select(pl.col(REQUIRED_NON_NULL).null_count()).sum_horizontal().item() == 0
    for name in BINARY_LABELS:
        values = set(ev[name].drop_nulls().unique().to_list())
        assert values <= {0, 1}, name
    non_gift = [n for n in BINARY_LABELS if n != "gift"]
    assert ev.select(pl.col(non_gift).null_count()).sum_horizontal().item() == 0
    assert ev["watch_time_s"].null_count() == 0 and ev["watch_time_s"].min() >= 0
    assert ev["duration_s"].drop_nulls().min() >= 0
    assert ev["propensity"].min() > 0 and ev["propensity"].max() <= 1
    assert set(ev["source"].unique()) == {"simulator"}
    assert set(ev["policy"].unique()) == {result.policy_name}
    assert ev["ts"].is_sorted()


def test_gift_and_duration_by_item_type(result):
    ev = result.events
    videos = ev.filter(pl.col("item_type") == "video")
    lives = ev.filter(pl.col("item_type") == "live")
    assert lives.height > 0
    assert videos["gift"].null_count() == videos.height
    assert lives["gift"].null_count() == 0
    assert videos["duration_s"].null_count() == 0
    assert lives["duration_s"].null_count() == lives.height
    gt = result.ground_truth.join(ev.select("event_id", "item_type"), on="event_id")
    assert gt.filter(pl.col("item_type") == "video")["p_gift"].null_count() == videos.height
    assert gt.filter(pl.col("item_type") == "live")["p_gift"].null_count() == 0


def test_labels_follow_the_funnel(result):
    ev = result.events
    no_click = ev.filter(pl.col("click") == 0)
    for name in AFTER_CLICK:
        assert no_click[name].fill_null(0).sum() == 0, name
    assert no_click["watch_time_s"].max() == 0
    clicked = ev.filter(pl.col("click") == 1)
    assert clicked["watch_time_s"].min() > 0
    assert clicked["hate"].sum() == 0
    for name in ("like", "follow", "hate", "long_view"):
        assert ev[name].sum() > 0, f"{name} never happens"


def test_long_view_matches_the_watched_fraction(result, small_config):
    tau = small_config.behaviour.long_view_fraction
    videos = result.events.filter(pl.col("item_type") == "video", pl.col("click") == 1)
    long = (videos["watch_time_s"] >= tau * videos["duration_s"]).cast(pl.Int8)
    assert long.equals(videos["long_view"], check_names=False)
    lives = result.events.filter(pl.col("item_type") == "live", pl.col("click") == 1)
    threshold = small_config.behaviour.live_long_view_s
    assert ((lives["watch_time_s"] >= threshold).cast(pl.Int8) == lives["long_view"]).all()


def test_requests_are_well_formed(result, small_config):
    k, slot = small_config.feed_size, small_config.live_slot
    per_request = result.events.group_by("request_id").agg(
        pl.col("user_id").n_unique().alias("users"),
        pl.len().alias("n"),
        (pl.col("item_type") == "live").sum().alias("lives"),
        pl.col("position").sort().alias("positions"),
        (pl.col("ts") - pl.duration(milliseconds=pl.col("position"))).n_unique().alias("req_ts"),
        pl.col("position").filter(pl.col("item_type") == "live").alias("live_pos"),
    )
    assert (per_request["users"] == 1).all() and (per_request["req_ts"] == 1).all()
    assert per_request["lives"].max() <= 1
    assert (per_request["n"] == k + per_request["lives"]).all()
    for row in per_request.iter_rows(named=True):
        assert row["positions"] == list(range(row["n"]))
        assert row["live_pos"] == ([slot] if row["lives"] else [])


def test_sessions_are_capped_spaced_and_inside_the_day(logged, small_config):
    cfg = small_config
    sessions = logged.sessions
    assert sessions["n_requests"].max() <= cfg.max_requests_per_session
    assert sessions["n_requests"].min() >= 1
    assert sessions.group_by("user_id", "date").len()["len"].max() == 1
    requests = (logged.allocations.select("user_id", "session_id", "ts", "request_index")
                .sort("session_id", "request_index"))
    gaps = requests.with_columns(
        gap=pl.col("ts").diff().over("session_id").dt.total_seconds(),
        steps=pl.col("request_index").diff().over("session_id"),
    ).drop_nulls("gap")
    low, high = cfg.request_gap_s
    assert (gaps["gap"] >= low * gaps["steps"]).all()
    assert (gaps["gap"] <= high * gaps["steps"]).all()
    first_day = cfg.start_date
    last_day = first_day + timedelta(days=cfg.days - 1)
    dates = logged.events["ts"].dt.date()
    assert dates.min() >= first_day and dates.max() <= last_day
    n_impressions = logged.events.height
    assert sessions["n_impressions"].sum() == n_impressions == logged.summary()["n_impressions"]
    assert logged.events["request_id"].n_unique() == logged.summary()["n_requests"]


def test_events_pass_the_ingest_validation(result):
    validation = pytest.importorskip("features.validation")
    adapters = pytest.importorskip("features.adapters")
    raw = result.events.with_row_index(validation.ROW_NUMBER, offset=1)
    batch = validation.validate_batch(raw, adapters.simulator_fields(raw.schema))
    assert batch.rejected.height == 0, batch.reason_codes
    assert batch.accepted.equals(result.events)
