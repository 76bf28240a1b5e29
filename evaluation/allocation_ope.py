"""Off-policy evaluation of live-stream allocation policies on the simulator's logs.

The simulator's ``allocations`` table (``simulation.schemas.ALLOCATION_SCHEMA``) holds one
row per request with a live candidate: the observable state the policy saw, the action
(1 = insert), its propensity and the outcomes. This module turns it into estimator inputs:
target action distributions from any ``simulation.AllocationPolicy``, state features,
cross-fitted reward models, session episodes, and the exact ground truth of a request's
expected reward under insertion (the simulator's response model evaluated on its world).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl

from evaluation.ope import (
    BanditData,
    RewardRefit,
    SessionData,
    cross_fit,
    single_threaded,
)
from simulation.allocation import STATE_COLUMNS, AllocationPolicy, AllocationState
from simulation.config import SimulatorConfig
from simulation.responses import live_responses
from simulation.world import World, generate_world

LIVE_REWARDS: tuple[str, ...] = ("live_watch_time_s", "live_click")
"""Per-request rewards that are 0 unless the live is inserted (closed-form truth)."""

NUMERIC_STATE: tuple[str, ...] = (
    "request_index", "lives_inserted_in_session", "recent_click_rate",
    "candidate_popularity",
)
LOG_STATE: tuple[str, ...] = (
    "session_watch_time_s", "past_live_impressions", "past_live_watch_per_impression",
    "past_video_watch_per_impression",
)
"""State columns used as features as they are, and as log1p."""


def policy_state(frame: pl.DataFrame) -> AllocationState:
    """The ``AllocationState`` of every row, exactly as the logging policy saw it."""
    missing = [c for c in STATE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"allocation rows lack state columns {missing}")
    return AllocationState(**{c: frame[c].to_numpy() for c in STATE_COLUMNS})


def action_dist(policy: AllocationPolicy, frame: pl.DataFrame) -> np.ndarray:
    """(n, 2) target distribution [P(skip), P(insert)] of ``policy`` on the logged states."""
    p = np.asarray(policy(policy_state(frame)), dtype=np.float64)
    if p.shape != (frame.height,) or np.any((p < 0) | (p > 1)):
        raise ValueError("the policy must return (n,) insertion probabilities in [0, 1]")
    return np.stack([1.0 - p, p], axis=1)


def state_features(frame: pl.DataFrame) -> np.ndarray:
    """(n, D) float features of the observable state (activity one-hot, hour as sin/cos,
    counters, log1p of the watch and impression totals, candidate popularity)."""
    group = frame["activity_group"].to_numpy().astype(np.int64)
    hour = frame["hour"].to_numpy().astype(np.float64) * (2 * np.pi / 24)
    columns = [np.eye(3)[np.clip(group, 0, 2)], np.sin(hour)[:, None], np.cos(hour)[:, None]]
    columns += [frame[c].to_numpy().astype(np.float64)[:, None] for c in NUMERIC_STATE]
    columns += [np.log1p(np.maximum(frame[c].to_numpy().astype(np.float64), 0.0))[:, None]
                for c in LOG_STATE]
    return np.hstack(columns)


def bandit_data(frame: pl.DataFrame, reward: str,
                groups: np.ndarray | None = None) -> BanditData:
    """Single-step view: one row per decision, ``reward`` column as the reward."""
    return BanditData(reward=frame[reward].to_numpy().astype(np.float64),
                      action=frame["action"].to_numpy().astype(np.int64),
                      pscore=frame["propensity"].to_numpy().astype(np.float64),
                      groups=groups)


def session_data(frame: pl.DataFrame, reward: np.ndarray,
                 groups: np.ndarray | None = None) -> SessionData:
    """Sequential view; ``frame`` must be sorted by (session, request_index)."""
    return SessionData(episode=frame["session_id"].to_numpy(), reward=reward,
                       action=frame["action"].to_numpy().astype(np.int64),
                       pscore=frame["propensity"].to_numpy().astype(np.float64),
                       groups=groups)


def default_regressor() -> object:
    """The reward-model learner: gradient-boosted trees (scikit-learn), fixed seed."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1,
                                         max_leaf_nodes=31, random_state=0)


def reward_model(features: np.ndarray, action: np.ndarray, reward: np.ndarray,
                 n_actions: int = 2, n_folds: int = 2, seed: int = 0,
                 groups: np.ndarray | None = None,
                 make_regressor: Callable[[], object] = default_regressor) -> RewardRefit:
    """Cross-fitted q(x, a): one regressor per action (an action whose logged reward is
    constant gets that constant, e.g. live watch 0 when not inserted). Returns the
    refittable predictor ``model(weights or None) -> (n, A)``."""

    def fit_predict(train: np.ndarray, test: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        out = np.zeros((test.size, n_actions))
        for a in range(n_actions):
            mask = action[train] == a
            rows = train[mask]
            if rows.size == 0:
                continue
            y = reward[rows]
            if y.min() == y.max() or rows.size < 20:
                out[:, a] = float(np.average(y, weights=None if w is None else w[mask]))
                continue
            model = make_regressor()
            model.fit(features[rows], y, sample_weight=None if w is None else w[mask])
            out[:, a] = model.predict(features[test])
        return out

    @single_threaded  # tree fitting with spinning OpenMP threads is ~50x slower when busy
    def predict(weights: np.ndarray | None = None) -> np.ndarray:
        return cross_fit(fit_predict, len(reward), n_folds=n_folds, seed=seed, groups=groups,
                         sample_weight=weights)

    return predict


def insert_expectations(config: SimulatorConfig, frame: pl.DataFrame,
                        world: World | None = None) -> dict[str, np.ndarray]:
    """The simulator's exact E[reward | logged state, insert] per row for the live rewards:
    ``live_watch_time_s`` (P(click) x mean watch) and ``live_click``. Without insertion
    both are 0, so a policy's true per-request value on these rows is
    mean_i pi(insert | s_i) * E[reward | s_i, insert]."""
    world = world or generate_world(config)
    user = frame["user_id"].to_numpy().astype(np.int64)
    live = frame["candidate_item_id"].to_numpy().astype(np.int64) - world.n_videos
    responses = live_responses(world.affinity[user, world.live_topic[live]],
                               world.live_quality[live], world.live_affinity[user],
                               config.live_slot, frame["request_index"].to_numpy(),
                               config.behaviour, np.random.default_rng(0))
    return {"live_watch_time_s": responses.truth["expected_watch_time_s"],
            "live_click": responses.truth["p_click"]}


def true_value(dist: np.ndarray, expectation: np.ndarray) -> float:
    """Mean per-request value of a target (n, 2) distribution given E[reward | s, insert]."""
    return float(np.mean(dist[:, 1] * expectation))
