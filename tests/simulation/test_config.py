"""SimulatorConfig rejects unusable settings and round-trips through its manifest form."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from simulation.config import BehaviourConfig, LabelLogit, SimulatorConfig


def test_config_round_trips_through_json():
    cfg = SimulatorConfig(n_users=10, seed=3, request_gap_s=(25, 60),
                          behaviour=replace(BehaviourConfig(), live_gift=LabelLogit(-5.0),
                                            end_bias=(-1.0, -1.2, -1.4)))
    assert SimulatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("changes", [
    {"n_users": 0}, {"live_slot": 7}, {"candidate_size": 3}, {"candidate_size": 10_000},
    {"ranker_temperature": 0.0}, {"live_share_cap": 0.0}, {"request_gap_s": (30, 20)},
    {"max_requests_per_session": 60},
])
def test_invalid_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        SimulatorConfig(**changes)


def test_unknown_behaviour_fields_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        BehaviourConfig.from_dict({"click_bias": 1.0})


def test_a_world_without_a_single_session_is_refused_not_summarised():
    from simulation.simulator import simulate

    empty = replace(SimulatorConfig(), n_users=1, days=1, seed=7, n_videos=50, n_lives=5,
                    n_authors=10, candidate_size=20)
    with pytest.raises(ValueError, match="started no session"):
        simulate(empty)
