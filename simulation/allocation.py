"""Live-stream allocation: the observable request state and pluggable insertion policies.

A policy sees only what the platform observes at request time (no interest vectors, live
affinity, age or gender) and returns, per request, the probability of inserting the candidate
live stream at `SimulatorConfig.live_slot`. The simulator samples the action from it and logs
the probability of the action taken as its propensity.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class AllocationState:
    """Observable state of B requests that have an on-air live candidate; every field (B,)."""

    user_id: np.ndarray
    """int64 user id."""
    activity_group: np.ndarray
    """int 0 low / 1 mid / 2 high: the platform's activity segment of the user."""
    hour: np.ndarray
    """int hour of day (UTC) of the request."""
    request_index: np.ndarray
    """int requests already served in this session (0 for the first)."""
    lives_inserted_in_session: np.ndarray
    """int live streams inserted earlier in this session."""
    session_watch_time_s: np.ndarray
    """float total watch time (videos + lives) earlier in this session."""
    recent_click_rate: np.ndarray
    """float clicks / impressions earlier in this session (0 at the first request)."""
    past_live_impressions: np.ndarray
    """int live impressions of the user before this request (all sessions)."""
    past_live_watch_per_impression: np.ndarray
    """float live watch seconds per live impression before this request (0 if none)."""
    past_video_watch_per_impression: np.ndarray
    """float video watch seconds per video impression before this request (0 if none)."""
    candidate_item_id: np.ndarray
    """int64 item id of the on-air live candidate."""
    candidate_author_id: np.ndarray
    """int64 author id of the candidate."""
    candidate_popularity: np.ndarray
    """float observable popularity proxy of the candidate (e.g. log viewers, standardised)."""

    def __len__(self) -> int:
        """Number of requests B."""
        return int(self.user_id.shape[0])


STATE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AllocationState))
"""AllocationState field names, in order (also columns of allocations.parquet)."""


@runtime_checkable
class AllocationPolicy(Protocol):
    """Maps the observable state of B requests to insertion probabilities, shape (B,)."""

    def __call__(self, state: AllocationState) -> np.ndarray:
        """Return P(insert the candidate live) per request, values in [0, 1], shape (B,)."""
        ...


def policy_name(policy: AllocationPolicy) -> str:
    """The policy's `name` attribute, else its class name."""
    return str(getattr(policy, "name", type(policy).__name__))


@dataclass(frozen=True)
class LoggingAllocationPolicy:
    """The production-like logging policy: a logistic rule on observable features, clipped.

    logit = bias + live_watch · (log1p(past live watch / impression) - log1p(pivot))
            + popularity · candidate_popularity - per_insert · lives_inserted_in_session
            - per_request · request_index
    p = clip(sigmoid(logit), p_min, p_max), so both actions always have support.
    """

    name: str = "sim-logging-v1"
    """Policy name written to the events' `policy` column."""
    bias: float = -1.0
    """Intercept of the insertion logit."""
    live_watch: float = 0.8
    """Weight of the user's log past live watch per live impression."""
    live_watch_pivot_s: float = 20.0
    """Past live watch per impression (s) at which the live-watch term is zero."""
    popularity: float = 0.4
    """Weight of the candidate's popularity proxy."""
    per_insert: float = 0.3
    """Logit penalty per live already inserted in the session."""
    per_request: float = 0.01
    """Logit penalty per request already served in the session."""
    p_min: float = 0.05
    """Lower clip of the insertion probability."""
    p_max: float = 0.95
    """Upper clip of the insertion probability."""

    def __call__(self, state: AllocationState) -> np.ndarray:
        """Insertion probabilities, shape (B,), in [p_min, p_max]."""
        logit = (self.bias
                 + self.live_watch * (np.log1p(state.past_live_watch_per_impression)
                                      - np.log1p(self.live_watch_pivot_s))
                 + self.popularity * state.candidate_popularity
                 - self.per_insert * state.lives_inserted_in_session
                 - self.per_request * state.request_index)
        return np.clip(1.0 / (1.0 + np.exp(-logit)), self.p_min, self.p_max)


@dataclass(frozen=True)
class ConstantAllocationPolicy:
    """Inserts with the same probability everywhere (1.0: the greedy always-insert policy)."""

    p_insert: float
    """Insertion probability in [0, 1]."""
    name: str = "constant"
    """Policy name."""

    def __call__(self, state: AllocationState) -> np.ndarray:
        """`p_insert` for every request, shape (B,)."""
        return np.full(len(state), self.p_insert, dtype=np.float64)


ALWAYS_INSERT = ConstantAllocationPolicy(1.0, name="always-insert")
"""Greedy policy: insert the live candidate whenever one is on air."""
NEVER_INSERT = ConstantAllocationPolicy(0.0, name="never-insert")
"""Never insert a live stream."""
