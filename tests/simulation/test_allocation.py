"""Live allocation: observable state only, consistent propensities, on-air lives, and the
trade-off the allocation work depends on (greedy insertion buys live watch with retention)."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import polars as pl
import pytest

from simulation.allocation import (
    ALWAYS_INSERT,
    NEVER_INSERT,
    STATE_COLUMNS,
    AllocationState,
    LoggingAllocationPolicy,
)
from simulation.schemas import ALLOCATION_SCHEMA
from simulation.simulator import rollout_value, simulate

HIDDEN = ("affinity", "interest", "live_affinity", "age_bucket", "gender",
          "interrupt_sensitivity", "preferred_hour", "quality", "norm")


class SpyPolicy:
    """Logging policy that records every state it is shown."""

    name = "spy"

    def __init__(self) -> None:
        self.states: list[AllocationState] = []
        self.inner = LoggingAllocationPolicy()

    def __call__(self, state: AllocationState) -> np.ndarray:
        self.states.append(state)
        return self.inner(state)


def test_state_holds_no_hidden_truth():
    names = [f.name for f in fields(AllocationState)]
    assert names == list(STATE_COLUMNS)
    for name in names:
        assert not any(h in name for h in HIDDEN if h != "quality"), name
        assert name != "candidate_quality"
    assert set(STATE_COLUMNS) <= set(ALLOCATION_SCHEMA)


def test_allocations_log_exactly_what_the_policy_saw(small_config, logged):
    spy = SpyPolicy()
    result = simulate(small_config, spy)
    assert result.events.drop("policy").equals(logged.events.drop("policy"))
    seen = pl.DataFrame({name: np.concatenate([getattr(s, name) for s in spy.states])
                         for name in STATE_COLUMNS})
    seen = seen.with_columns(p=np.concatenate([spy.inner(s) for s in spy.states]))
    key = ["user_id", "request_index", "past_video_watch_per_impression"]  # unique per row
    logged_rows = result.allocations.sort(key)
    seen = seen.sort(key)
    assert not seen.select(key).is_duplicated().any()
    assert seen.height == logged_rows.height
    for name in STATE_COLUMNS:
        np.testing.assert_allclose(seen[name].to_numpy().astype(float),
                                   logged_rows[name].to_numpy().astype(float), err_msg=name)
    np.testing.assert_allclose(seen["p"].to_numpy(), logged_rows["p_insert"].to_numpy())


def test_allocation_propensities_match_the_logged_action(logged):
    a = logged.allocations
    assert list(a.schema.items()) == list(ALLOCATION_SCHEMA.items())
    assert a["p_insert"].min() >= 0.05 and a["p_insert"].max() <= 0.95
    expected = pl.when(pl.col("action") == 1).then("p_insert").otherwise(1 - pl.col("p_insert"))
    assert a.select((pl.col("propensity") - expected).abs().max()).item() < 1e-15
    assert a["propensity"].min() > 0 and a["propensity"].max() <= 1
    assert a["candidate_propensity"].min() > 0 and a["candidate_propensity"].max() <= 1
    inserted = a.filter(pl.col("action") == 1)
    lives = logged.events.filter(pl.col("item_type") == "live")
    both = lives.join(inserted, on="request_id", how="full", coalesce=True)
    assert both.height == lives.height == inserted.height
    assert (both["item_id"] == both["candidate_item_id"]).all()
    assert (both["propensity"] == both["p_insert"]).all()
    assert (both["live_watch_time_s"] == both["watch_time_s"]).all()
    assert (both["live_click"] == both["click"]).all()
    not_inserted = a.filter(pl.col("action") == 0)
    assert not_inserted["live_watch_time_s"].max() == 0 and not_inserted["live_click"].max() == 0


def test_lives_are_candidates_and_inserted_only_while_on_air(result):
    items = result.items.filter(pl.col("item_type") == "live")
    on_air = ((pl.col("hour") - pl.col("on_air_start_hour")) % 24) < pl.col("on_air_hours")
    cands = result.allocations.join(items, left_on="candidate_item_id", right_on="item_id")
    assert cands.height == result.allocations.height
    assert (cands["hour"] == cands["ts"].dt.hour()).all()
    assert cands.select(on_air.all()).item()
    shown = result.events.filter(pl.col("item_type") == "live").join(items, on="item_id")
    assert shown.with_columns(hour=pl.col("ts").dt.hour()).select(on_air.all()).item()
    assert (shown["author_id"] == shown["author_id_right"]).all()


def test_session_outcomes_are_repeated_per_session(logged):
    a = logged.allocations
    per_session = a.group_by("session_id").agg(pl.col("next_day_return").n_unique().alias("n"))
    assert (per_session["n"] == 1).all()
    joined = a.join(logged.sessions, on="session_id", suffix="_s")
    assert (joined["next_day_return"] == joined["next_day_return_s"]).all()
    last = joined.filter(pl.col("request_index") == pl.col("n_requests") - 1)
    assert (last["session_end"] == 1).all()
    assert (joined.filter(pl.col("request_index") < pl.col("n_requests") - 1)["session_end"]
            == 0).all()


def test_logging_policy_respects_the_live_share_cap(logged, small_config):
    share = logged.summary()["live_share"]
    assert 0.02 < share < small_config.live_share_cap


def test_never_insert_shows_no_live(small_config):
    value = simulate(small_config, NEVER_INSERT)
    assert value.events.filter(pl.col("item_type") == "live").height == 0
    assert value.summary()["live_share"] == 0.0
    assert value.allocations["propensity"].min() == 1.0


@pytest.mark.parametrize("seed", [3, 11])
def test_greedy_insertion_raises_live_watch_but_loses_retention(small_config, seed):
    cfg = replace(small_config, seed=seed)
    logging, greedy = rollout_value(cfg, LoggingAllocationPolicy()), rollout_value(cfg,
                                                                                   ALWAYS_INSERT)
    assert greedy["live_share"] > 0.9 > 0.3 > logging["live_share"]
    assert greedy["live_watch_time"] > 2 * logging["live_watch_time"]
    assert greedy["retention"] < logging["retention"] - 0.05
    assert greedy["watch_time_per_user"] < logging["watch_time_per_user"]
    assert greedy["requests_per_session"] < logging["requests_per_session"]


@pytest.mark.parametrize("bad", [lambda s: np.full(len(s) + 1, 0.5),
                                 lambda s: np.full(len(s), 1.5),
                                 lambda s: np.full(len(s), np.nan)])
def test_invalid_policy_outputs_are_rejected(small_config, bad):
    with pytest.raises(ValueError, match="allocation policy"):
        simulate(replace(small_config, days=1), bad)
