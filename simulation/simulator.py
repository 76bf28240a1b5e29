"""The feed simulator: day by day, all active users' sessions step in lockstep, request by request.

One request: the logging ranker samples K videos from a random candidate subset
(Plackett-Luce, exact slot propensities); the logging system picks one on-air live candidate
(topic-preferring); the allocation policy gives P(insert) and the action is sampled; users
respond (`simulation.responses`); the session ends with a hazard that grows with
dissatisfaction and interruptions. After the day, each user returns tomorrow with a
probability set by the session's satisfaction and live insertions; absent users come back
with a small base probability.

Randomness: the world comes from spawn key (0,) of the seed; day d's behaviour from spawn
keys (1, d, k), one stream per concern (schedule, ranker, live candidate, allocation,
responses, session), so different policies meet the same world and, until their paths
diverge, the same draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from features.contract import EVENT_SCHEMA
from simulation.allocation import (
    STATE_COLUMNS,
    AllocationPolicy,
    AllocationState,
    LoggingAllocationPolicy,
    policy_name,
)
from simulation.config import SimulatorConfig
from simulation.ranker import plackett_luce_top_k
from simulation.responses import Responses, live_responses, sigmoid, video_responses
from simulation.schemas import ALLOCATION_SCHEMA, GROUND_TRUTH_SCHEMA, SESSION_SCHEMA
from simulation.world import World, generate_world, items_frame, users_frame

SOURCE = "simulator"
_STREAMS = ("schedule", "ranker", "live", "allocation", "response", "session")
_DAY_S = 86_400


@dataclass(frozen=True)
class SimulationResult:
    """Everything one simulation produced, as Polars frames, plus its true summary."""

    config: SimulatorConfig
    """The configuration that produced this result."""
    policy_name: str
    """Name of the allocation policy that was rolled out (the events' `policy`)."""
    events: pl.DataFrame
    """One row per impression, exactly `features.contract.EVENT_SCHEMA`, sorted by ts."""
    ground_truth: pl.DataFrame
    """Per event_id: true marginal label probabilities and expected watch time."""
    allocations: pl.DataFrame
    """One row per request with an on-air live candidate: state, action, outcomes."""
    sessions: pl.DataFrame
    """One row per user-day session: totals, insertions, P(return), next_day_return."""
    users: pl.DataFrame
    """Hidden user attributes (activity_group, age_bucket, gender, ...)."""
    items: pl.DataFrame
    """Videos then lives in one item id space."""

    def summary(self) -> dict[str, float]:
        """True values of the rolled-out policy (see `summarize_sessions`)."""
        return summarize_sessions(self.sessions, self.config.n_users)


def summarize_sessions(sessions: pl.DataFrame, n_users: int) -> dict[str, float]:
    """Policy value from the session table.

    session_watch_time / video_watch_time / live_watch_time: mean seconds per user-day
    session; retention: mean true next-day return probability per session; live_share:
    inserted lives / requests; watch_time_per_user: total watch over the horizon / users
    (the long-term value retention feeds).
    """
    s = sessions
    total = s["video_watch_time_s"] + s["live_watch_time_s"]
    n_requests = int(s["n_requests"].sum())
    return {
        "session_watch_time": float(total.mean()),
        "video_watch_time": float(s["video_watch_time_s"].mean()),
        "live_watch_time": float(s["live_watch_time_s"].mean()),
        "retention": float(s["p_return"].mean()),
        "live_share": float(s["lives_inserted"].sum()) / max(n_requests, 1),
        "watch_time_per_user": float(total.sum()) / n_users,
        "requests_per_session": float(s["n_requests"].mean()),
        "n_sessions": int(s.height),
        "n_requests": n_requests,
        "n_impressions": int(s["n_impressions"].sum()),
    }


@dataclass
class _History:
    """Per-user running observables across sessions, all (U,)."""

    live_impressions: np.ndarray
    live_watch: np.ndarray
    video_impressions: np.ndarray
    video_watch: np.ndarray

    @classmethod
    def empty(cls, n_users: int) -> _History:
        """All zeros."""
        return cls(*(np.zeros(n_users) for _ in range(4)))


@dataclass
class _Day:
    """Per-session accumulators of one day's S sessions, all (S,)."""

    users: np.ndarray
    session_ids: np.ndarray
    t: np.ndarray
    n_requests: np.ndarray
    n_impressions: np.ndarray
    video_watch: np.ndarray
    live_watch: np.ndarray
    lives_inserted: np.ndarray
    clicks: np.ndarray

    @classmethod
    def start(cls, users: np.ndarray, first_session_id: int, t0: np.ndarray) -> _Day:
        """S sessions starting at seconds-of-day `t0`."""
        s = users.shape[0]
        zeros = [np.zeros(s) for _ in range(6)]
        ids = first_session_id + np.arange(s, dtype=np.int64)
        return cls(users, ids, t0.astype(np.int64), *zeros)


@dataclass
class _Log:
    """Chunks of output columns, concatenated once at the end."""

    events: list[dict[str, np.ndarray]] = field(default_factory=list)
    allocations: list[dict[str, np.ndarray]] = field(default_factory=list)
    sessions: list[dict[str, np.ndarray]] = field(default_factory=list)
    n_requests: int = 0
    n_sessions: int = 0


def day_streams(seed: int, day: int) -> dict[str, np.random.Generator]:
    """Independent behaviour generators of one day, keyed by concern."""
    return {name: np.random.default_rng(np.random.SeedSequence(entropy=seed,
                                                               spawn_key=(1, day, k)))
            for k, name in enumerate(_STREAMS)}


@dataclass(frozen=True)
class _Run:
    """What every day and step of one simulation shares."""

    cfg: SimulatorConfig
    world: World
    policy: AllocationPolicy
    policy_name: str
    history: _History
    log: _Log


def simulate(config: SimulatorConfig,
             allocation_policy: AllocationPolicy | None = None,
             on_day: Callable[[int], None] | None = None) -> SimulationResult:
    """Run the simulation; `allocation_policy=None` rolls out `LoggingAllocationPolicy()`;
    `on_day(day)` after each simulated day (a progress bar).

    Raises:
        ValueError: the world produced no session at all (too few users or days), so there
            is nothing to log or summarise.
    """
    policy = LoggingAllocationPolicy() if allocation_policy is None else allocation_policy
    world = generate_world(config)
    run = _Run(config, world, policy, policy_name(policy), _History.empty(config.n_users),
               _Log())
    u0 = day_streams(config.seed, 0)["schedule"].random(config.n_users)
    active = u0 < np.asarray(config.behaviour.initial_active_prob)[world.activity_group]
    for day in range(config.days):
        active = _simulate_day(run, day, active)
        if on_day is not None:
            on_day(day)
    if run.log.n_sessions == 0:
        raise ValueError(f"{config.n_users} users over {config.days} days started no session "
                         f"(world seed {config.seed}); simulate more users or days")
    return _result(config, world, run.policy_name, run.log)


def rollout_value(config: SimulatorConfig,
                  policy: AllocationPolicy | None) -> dict[str, float]:
    """On-policy true value of `policy` (None: the logging policy) on the world of
    `config.seed`: the summary of `simulate(config, policy)`."""
    return simulate(config, policy).summary()


def _session_starts(cfg: SimulatorConfig, world: World, users: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """(S,) start second of day: preferred hour + N(0.5 h, 1 h), wrapped onto [0, 23 h) so
    a session (under an hour) never crosses midnight."""
    jitter = rng.normal(1800.0, 3600.0, cfg.n_users)[users]
    start = world.preferred_hour[users] * 3600.0 + jitter
    return np.mod(start, _DAY_S - 3600.0).astype(np.int64)


def _simulate_day(run: _Run, day: int, active: np.ndarray) -> np.ndarray:
    """Run every active user's session of `day`; return tomorrow's active mask (U,)."""
    cfg, world, log = run.cfg, run.world, run.log
    rngs = day_streams(cfg.seed, day)
    users = np.flatnonzero(active)
    sess = _Day.start(users, log.n_sessions, _session_starts(cfg, world, users,
                                                              rngs["schedule"]))
    log.n_sessions += users.shape[0]
    first_alloc_chunk = len(log.allocations)
    alive = np.arange(users.shape[0])
    for r in range(cfg.max_requests_per_session):
        if alive.size == 0:
            break
        ended = _step(run, day, r, alive, sess, rngs)
        alive = alive[~ended]
    returned = _end_of_day(cfg, world, day, sess, log, rngs["session"])
    for chunk in log.allocations[first_alloc_chunk:]:
        chunk["next_day_return"] = returned[chunk.pop("session_slot")].astype(np.int8)
    comeback_p = np.asarray(cfg.behaviour.comeback_prob)[world.activity_group]
    tomorrow = rngs["schedule"].random(cfg.n_users) < comeback_p
    tomorrow[users] = returned
    return tomorrow


def _end_of_day(cfg: SimulatorConfig, world: World, day: int, sess: _Day, log: _Log,
                rng: np.random.Generator) -> np.ndarray:
    """Sample next-day returns (S,) from satisfaction and interruptions; log the sessions."""
    bc, u = cfg.behaviour, sess.users
    group = world.activity_group[u]
    total = sess.video_watch + sess.live_watch
    satisfaction = np.minimum(total / np.asarray(bc.norm_watch_s)[group], 2.0)
    logit = (np.asarray(bc.return_bias)[group] + bc.return_satisfaction * (satisfaction - 1.0)
             - bc.return_interrupt * world.interrupt_sensitivity[u] * sess.lives_inserted)
    p_return = sigmoid(logit)
    returned = rng.random(cfg.n_users)[u] < p_return
    log.sessions.append({
        "session_id": sess.session_ids, "user_id": u.astype(np.int64),
        "day": np.full(u.shape[0], day, dtype=np.int32),
        "activity_group": group.astype(np.int8),
        "n_requests": sess.n_requests.astype(np.int32),
        "n_impressions": sess.n_impressions.astype(np.int32),
        "video_watch_time_s": sess.video_watch, "live_watch_time_s": sess.live_watch,
        "lives_inserted": sess.lives_inserted.astype(np.int32),
        "clicks": sess.clicks.astype(np.int32),
        "p_return": p_return, "next_day_return": returned.astype(np.int8),
    })
    return returned


def _video_feed(cfg: SimulatorConfig, world: World, u: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Logging ranker for B users: (B, K) video ids and their PL slot propensities."""
    n, c = cfg.n_videos, cfg.candidate_size
    perm = rng.permutation(n)
    offsets = rng.integers(0, n, u.shape[0])
    cand = perm[(offsets[:, None] + np.arange(c)[None, :]) % n]  # (B, C) distinct videos
    scores = (world.ranker_affinity[u[:, None], world.video_topic[cand]]
              + world.video_quality_est[cand])  # (B, C)
    chosen, propensity = plackett_luce_top_k(scores, cfg.feed_size, cfg.ranker_temperature,
                                             rng)
    return np.take_along_axis(cand, chosen, axis=1), propensity


def _live_candidates(cfg: SimulatorConfig, world: World, u: np.ndarray, hour: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick one on-air live per request by Gumbel-max over topic preference + quality.

    Returns (rows with a candidate, their live index 0..L-1, P(that live | on-air set)).
    """
    on_air = world.on_air[:, hour].T  # (B, L)
    rows = np.flatnonzero(on_air.any(axis=1))
    if rows.size == 0:
        return rows, rows, np.zeros(0)
    mask = on_air[rows]  # (N, L)
    score = (world.ranker_affinity[u[rows, None], world.live_topic[None, :]]
             + cfg.live_quality_weight * world.live_popularity[None, :])  # (N, L)
    score = np.where(mask, score, -np.inf)
    live = np.argmax(score + rng.gumbel(size=score.shape), axis=1)  # (N,)
    weights = np.exp(score - score.max(axis=1, keepdims=True))  # (N, L), 0 off air
    prob = weights[np.arange(rows.size), live] / weights.sum(axis=1)
    return rows, live, prob


def _checked(p: Any, n: int, name: str) -> np.ndarray:
    """Validate a policy's output: float array of shape (n,) with values in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"allocation policy {name!r} returned shape {p.shape}, expected ({n},)")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError(f"allocation policy {name!r} returned probabilities outside [0, 1]")
    return p


def _state(world: World, u: np.ndarray, rows: np.ndarray, live: np.ndarray, hour: np.ndarray,
           r: int, idx: np.ndarray, sess: _Day, history: _History) -> AllocationState:
    """Observable state of the requests `rows` (local to the step) that have a candidate."""
    s, uu = idx[rows], u[rows]
    n_live, n_vid = history.live_impressions[uu], history.video_impressions[uu]
    return AllocationState(
        user_id=uu.astype(np.int64),
        activity_group=world.activity_group[uu],
        hour=hour[rows],
        request_index=np.full(rows.size, r, dtype=np.int64),
        lives_inserted_in_session=sess.lives_inserted[s].astype(np.int64),
        session_watch_time_s=sess.video_watch[s] + sess.live_watch[s],
        recent_click_rate=sess.clicks[s] / np.maximum(sess.n_impressions[s], 1.0),
        past_live_impressions=n_live.astype(np.int64),
        past_live_watch_per_impression=history.live_watch[uu] / np.maximum(n_live, 1.0),
        past_video_watch_per_impression=history.video_watch[uu] / np.maximum(n_vid, 1.0),
        candidate_item_id=(world.n_videos + live).astype(np.int64),
        candidate_author_id=world.live_author[live].astype(np.int64),
        candidate_popularity=world.live_popularity[live],
    )


def _repeats(topics: np.ndarray) -> np.ndarray:
    """(B, K) number of earlier slots in the same feed with the same topic."""
    out = np.zeros(topics.shape, dtype=np.float64)
    for j in range(1, topics.shape[1]):
        out[:, j] = (topics[:, :j] == topics[:, j:j + 1]).sum(axis=1)
    return out


@dataclass(frozen=True)
class _Feed:
    """One step's B requests (local rows 0..B-1) and the N of them with a live candidate."""

    idx: np.ndarray
    """(B,) session slots of the day."""
    u: np.ndarray
    """(B,) user ids."""
    request_ids: np.ndarray
    """(B,) global request numbers."""
    ts_us: np.ndarray
    """(B,) request timestamps (µs since the epoch)."""
    videos: np.ndarray
    """(B, K) video ids in ranker order."""
    position: np.ndarray
    """(B, K) shown positions (shifted by one after an inserted live)."""
    video_propensity: np.ndarray
    """(B, K) Plackett-Luce slot propensities."""
    video: Responses
    """(B, K) video responses."""
    rows: np.ndarray
    """(N,) local rows with an on-air live candidate."""
    live: np.ndarray
    """(N,) candidate live index 0..L-1."""
    candidate_propensity: np.ndarray
    """(N,) P(candidate | on-air set)."""
    state: AllocationState
    """(N,) what the policy saw."""
    p_insert: np.ndarray
    """(N,) the policy's insertion probabilities."""
    action: np.ndarray
    """(N,) bool: inserted."""
    lives: Responses
    """(M,) responses to the M inserted lives, rows `rows[action]`."""

    @property
    def inserted(self) -> np.ndarray:
        """(M,) local rows that got a live."""
        return self.rows[self.action]


def _serve(run: _Run, day: int, r: int, idx: np.ndarray, sess: _Day,
           rngs: dict[str, np.random.Generator]) -> _Feed:
    """Rank videos, allocate the live slot and draw the users' responses for one step."""
    cfg, world = run.cfg, run.world
    u, b = sess.users[idx], idx.shape[0]
    hour = sess.t[idx] // 3600
    videos, v_prop = _video_feed(cfg, world, u, rngs["ranker"])  # (B, K)
    rows, live, cand_prob = _live_candidates(cfg, world, u, hour, rngs["live"])
    state = _state(world, u, rows, live, hour, r, idx, sess, run.history)
    p_insert = (_checked(run.policy(state), rows.size, run.policy_name) if rows.size
                else np.zeros(0))
    action = rngs["allocation"].random(rows.size) < p_insert
    ins, ins_live = rows[action], live[action]
    shifted = np.zeros(b, dtype=bool)
    shifted[ins] = True
    slots = np.arange(cfg.feed_size)[None, :]
    position = slots + ((slots >= cfg.live_slot) & shifted[:, None])  # (B, K)
    v_topic = world.video_topic[videos]  # (B, K)
    video = video_responses(world.affinity[u[:, None], v_topic], world.video_quality[videos],
                            world.video_duration[videos], position, r, _repeats(v_topic),
                            cfg.behaviour, rngs["response"])
    lives = live_responses(world.affinity[u[ins], world.live_topic[ins_live]],
                           world.live_quality[ins_live], world.live_affinity[u[ins]],
                           cfg.live_slot, r, cfg.behaviour, rngs["response"])
    request_ids = run.log.n_requests + np.arange(b, dtype=np.int64)
    run.log.n_requests += b
    return _Feed(idx, u, request_ids, _request_ts_us(cfg, day, sess.t[idx]), videos, position,
                 v_prop, video, rows, live, cand_prob, state, p_insert, action, lives)


def _step(run: _Run, day: int, r: int, idx: np.ndarray, sess: _Day,
          rngs: dict[str, np.random.Generator]) -> np.ndarray:
    """Serve request `r` of the B alive sessions `idx`; return which ones ended (B,)."""
    cfg, b = run.cfg, idx.shape[0]
    feed = _serve(run, day, r, idx, sess, rngs)
    _log_events(run, feed)
    ins = feed.inserted
    v_watch = feed.video.labels["watch_time_s"].sum(axis=1)  # (B,)
    l_watch, l_click, n_items = np.zeros(b), np.zeros(b), np.full(b, cfg.feed_size)
    l_watch[ins], l_click[ins] = feed.lives.labels["watch_time_s"], feed.lives.labels["click"]
    n_items[ins] += 1
    clicks = feed.video.labels["click"].sum(axis=1) + l_click  # (B,)
    _update(sess, run.history, feed, v_watch, l_watch, clicks, n_items, cfg.feed_size)
    ended = _session_ends(cfg, run.world, r, feed.u, sess.lives_inserted[idx], clicks / n_items,
                          v_watch + l_watch, rngs["session"])
    _log_allocations(run, feed, sess, v_watch, l_watch, ended)
    sess.t[idx] += rngs["session"].integers(cfg.request_gap_s[0], cfg.request_gap_s[1] + 1, b)
    return ended


def _request_ts_us(cfg: SimulatorConfig, day: int, t: np.ndarray) -> np.ndarray:
    """(B,) request timestamps in microseconds since the epoch (UTC)."""
    start = datetime(cfg.start_date.year, cfg.start_date.month, cfg.start_date.day,
                     tzinfo=UTC)
    epoch_s = int(start.timestamp()) + day * _DAY_S
    return (epoch_s + t) * 1_000_000


def _update(sess: _Day, history: _History, feed: _Feed, v_watch: np.ndarray,
            l_watch: np.ndarray, clicks: np.ndarray, n_items: np.ndarray, k: int) -> None:
    """Add this request's (B,) outcomes to the session accumulators and the user history."""
    idx, u, ins = feed.idx, feed.u, feed.inserted
    sess.n_requests[idx] += 1
    sess.n_impressions[idx] += n_items
    sess.video_watch[idx] += v_watch
    sess.live_watch[idx] += l_watch
    sess.lives_inserted[idx[ins]] += 1
    sess.clicks[idx] += clicks
    history.video_impressions[u] += k
    history.video_watch[u] += v_watch
    history.live_impressions[u[ins]] += 1
    history.live_watch[u[ins]] += l_watch[ins]


def _session_ends(cfg: SimulatorConfig, world: World, r: int, u: np.ndarray,
                  lives_inserted: np.ndarray, click_rate: np.ndarray, watch: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """(B,) bool: the session ends after this request (hazard, or the request cap).

    logit = end_bias[group] - end_click_rate · click rate - end_watch · log1p(watch / 30 s)
            + end_interrupt · sensitivity · lives inserted so far in the session.
    """
    bc = cfg.behaviour
    logit = (np.asarray(bc.end_bias)[world.activity_group[u]]
             - bc.end_click_rate * click_rate - bc.end_watch * np.log1p(watch / 30.0)
             + bc.end_interrupt * world.interrupt_sensitivity[u] * lives_inserted)
    ended = rng.random(u.shape[0]) < sigmoid(logit)
    return ended | (r == cfg.max_requests_per_session - 1)


def _impressions(user: np.ndarray, request: np.ndarray, ts_us: np.ndarray, item: np.ndarray,
                 author: np.ndarray, position: np.ndarray, duration: np.ndarray,
                 propensity: np.ndarray, resp: Responses, is_live: bool) -> dict[str, np.ndarray]:
    """One chunk of N impression columns (inputs (N,) or reshaped to (N,))."""
    n = user.shape[0]
    chunk = {
        "user_id": user, "request": request, "ts_us": ts_us, "item_id": item,
        "is_live": np.full(n, is_live), "author_id": author, "position": position,
        "duration_s": duration, "propensity": propensity,
        "gift": np.zeros(n, dtype=np.int8), "p_gift": np.full(n, np.nan),
    }
    for name, values in {**resp.labels, **resp.truth}.items():
        chunk[name] = values.reshape(n)
    return chunk


def _log_events(run: _Run, feed: _Feed) -> None:
    """Append this step's B*K video and M live impressions as flat column chunks."""
    world, slot = run.world, run.cfg.live_slot
    videos, k = feed.videos, feed.videos.shape[1]
    run.log.events.append(_impressions(
        np.repeat(feed.u, k), np.repeat(feed.request_ids, k),
        (feed.ts_us[:, None] + feed.position * 1000).ravel(), videos.ravel(),
        world.video_author[videos].ravel(), feed.position.ravel(),
        world.video_duration[videos].ravel(), feed.video_propensity.ravel(), feed.video,
        is_live=False))
    ins, ins_live, m = feed.inserted, feed.live[feed.action], int(feed.action.sum())
    if m:
        run.log.events.append(_impressions(
            feed.u[ins], feed.request_ids[ins], feed.ts_us[ins] + slot * 1000,
            world.n_videos + ins_live, world.live_author[ins_live], np.full(m, slot),
            np.full(m, np.nan), feed.p_insert[feed.action], feed.lives, is_live=True))


def _log_allocations(run: _Run, feed: _Feed, sess: _Day, v_watch: np.ndarray,
                     l_watch: np.ndarray, ended: np.ndarray) -> None:
    """Append one row per request with a live candidate (state, action, outcomes)."""
    rows, b = feed.rows, feed.idx.shape[0]
    outcome = {name: np.zeros(b, dtype=np.int8) for name in ("click", "follow", "gift")}
    for name in outcome:
        outcome[name][feed.inserted] = feed.lives.labels[name]
    chunk = {name: getattr(feed.state, name) for name in STATE_COLUMNS}
    p, action = feed.p_insert, feed.action
    chunk.update({
        "request": feed.request_ids[rows], "ts_us": feed.ts_us[rows],
        "session": sess.session_ids[feed.idx[rows]], "session_slot": feed.idx[rows],
        "candidate_propensity": feed.candidate_propensity, "action": action.astype(np.int8),
        "propensity": np.where(action, p, 1.0 - p), "p_insert": p,
        "live_watch_time_s": l_watch[rows], "video_watch_time_s": v_watch[rows],
        "live_click": outcome["click"][rows], "live_follow": outcome["follow"][rows],
        "live_gift": outcome["gift"][rows], "session_end": ended[rows].astype(np.int8),
    })
    run.log.allocations.append(chunk)


def _concat(chunks: list[dict[str, np.ndarray]]) -> pl.DataFrame:
    """Concatenate column chunks into one frame (empty frame if there are none)."""
    if not chunks:
        return pl.DataFrame()
    return pl.DataFrame({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})


def _typed(frame: pl.DataFrame, schema: dict[str, pl.DataType],
           exprs: dict[str, pl.Expr]) -> pl.DataFrame:
    """Select `schema`'s columns in order, built by `exprs` or taken by name, and cast."""
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    cols = [exprs.get(name, pl.col(name)).cast(dtype).alias(name)
            for name, dtype in schema.items()]
    return frame.select(cols)


def _ids(prefix: str, column: str) -> pl.Expr:
    """String ids `prefix` + integer column."""
    return pl.concat_str(pl.lit(prefix), pl.col(column).cast(pl.String))


def _event_frames(raw: pl.DataFrame, world: str,
                  policy: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Contract events and their ground truth, sorted by (ts, user, position)."""
    if not raw.is_empty():
        raw = raw.sort(["ts_us", "user_id", "position"]).with_row_index("row")
    live = pl.col("is_live")
    exprs = {
        "event_id": _ids(f"{world}-", "row"),
        "ts": pl.col("ts_us"),
        "request_id": _ids(f"{world}-r", "request"),
        "item_type": pl.when(live).then(pl.lit("live")).otherwise(pl.lit("video")),
        "duration_s": pl.col("duration_s").fill_nan(None),
        "gift": pl.when(live).then(pl.col("gift")),
        "policy": pl.lit(policy),
        "source": pl.lit(SOURCE),
    }
    events = _typed(raw, EVENT_SCHEMA, exprs)
    truth = _typed(raw, GROUND_TRUTH_SCHEMA, {"event_id": exprs["event_id"],
                                              "p_gift": pl.col("p_gift").fill_nan(None)})
    return events, truth


def _allocation_frame(raw: pl.DataFrame, world: str) -> pl.DataFrame:
    """Typed allocation table sorted by request time."""
    if not raw.is_empty():
        raw = raw.sort(["ts_us", "user_id"])
    ts = pl.col("ts_us").cast(ALLOCATION_SCHEMA["ts"])
    return _typed(raw, ALLOCATION_SCHEMA, {
        "request_id": _ids(f"{world}-r", "request"), "ts": ts, "date": ts.dt.date(),
        "session_id": _ids(f"{world}-s", "session"),
    })


def _session_frame(raw: pl.DataFrame, cfg: SimulatorConfig) -> pl.DataFrame:
    """Typed session table in session order."""
    first_day = pl.lit(cfg.start_date, dtype=pl.Date)
    return _typed(raw, SESSION_SCHEMA, {
        "session_id": _ids(f"sim{cfg.seed}-s", "session_id"),
        "date": first_day + pl.duration(days=pl.col("day")),
    })


def _result(cfg: SimulatorConfig, world: World, policy: str, log: _Log) -> SimulationResult:
    """Assemble the typed frames of a finished run."""
    events, truth = _event_frames(_concat(log.events), cfg.world_id(), policy)
    return SimulationResult(
        config=cfg, policy_name=policy, events=events, ground_truth=truth,
        allocations=_allocation_frame(_concat(log.allocations), cfg.world_id()),
        sessions=_session_frame(_concat(log.sessions), cfg),
        users=users_frame(world), items=items_frame(world),
    )
