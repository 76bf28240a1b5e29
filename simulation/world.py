"""The simulated world: users, authors, videos and live streams, drawn from the world stream.

The world depends only on `SimulatorConfig` (sizes, scales, seed), never on the behaviour
stream, so every allocation policy rolled out with the same seed meets the same world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from simulation.config import SimulatorConfig
from simulation.schemas import ITEM_SCHEMA, USER_SCHEMA

N_AGE_BUCKETS = 5
N_GENDERS = 2
N_ACTIVITY_GROUPS = 3

_HOUR_WEIGHTS = np.array(
    [1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 7, 6, 4, 4, 5, 6, 8, 10, 12, 12, 9, 4], dtype=float,
)
"""Relative popularity of each hour of the day as a user's preferred hour (evening peak)."""


def world_rng(seed: int) -> np.random.Generator:
    """The world-generation stream of `seed` (spawn key 0; behaviour uses key 1)."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(0,)))


@dataclass(frozen=True)
class World:
    """Every hidden and visible attribute of users and items, as numpy arrays.

    U users, V videos, L lives, A authors, T topics. Live arrays are indexed 0..L-1; the
    public item id of live j is V + j.
    """

    affinity: np.ndarray
    """(U, T) float: log(T · interest[u, t]); 0 means average interest."""
    ranker_affinity: np.ndarray
    """(U, T) float: the logging ranker's noisy estimate of `affinity`."""
    activity_group: np.ndarray
    """(U,) int: 0 low, 1 mid, 2 high activity."""
    age_bucket: np.ndarray
    """(U,) int in 0..4 (hidden)."""
    gender: np.ndarray
    """(U,) int in 0..1 (hidden)."""
    live_affinity: np.ndarray
    """(U,) float: latent taste for live streams (hidden)."""
    interrupt_sensitivity: np.ndarray
    """(U,) float in (0, 1): how much an inserted live stream annoys the user (hidden)."""
    preferred_hour: np.ndarray
    """(U,) int in 0..22: usual session start hour."""
    author_topic: np.ndarray
    """(A,) int: each author's main topic."""
    video_author: np.ndarray
    """(V,) int author id."""
    video_topic: np.ndarray
    """(V,) int topic."""
    video_quality: np.ndarray
    """(V,) float true quality."""
    video_quality_est: np.ndarray
    """(V,) float: the ranker's noisy quality estimate."""
    video_duration: np.ndarray
    """(V,) float seconds in [5, 300]."""
    live_author: np.ndarray
    """(L,) int author id."""
    live_topic: np.ndarray
    """(L,) int topic."""
    live_quality: np.ndarray
    """(L,) float true quality."""
    live_popularity: np.ndarray
    """(L,) float: observable popularity proxy (noisy quality, standardised over lives)."""
    live_start_hour: np.ndarray
    """(L,) int in 0..23: daily on-air start hour."""
    live_hours: np.ndarray
    """(L,) int in 2..6: daily on-air length."""
    on_air: np.ndarray
    """(L, 24) bool: live j is on air during hour h (windows wrap past midnight)."""

    @property
    def n_users(self) -> int:
        """Number of users U."""
        return int(self.activity_group.shape[0])

    @property
    def n_videos(self) -> int:
        """Number of videos V (also the item id of the first live)."""
        return int(self.video_topic.shape[0])


def _users(cfg: SimulatorConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Demographics, interests (shifted by demographics), live affinity, activity, hours."""
    n, t = cfg.n_users, cfg.n_topics
    age = rng.integers(0, N_AGE_BUCKETS, n)
    gender = rng.integers(0, N_GENDERS, n)
    offsets = rng.normal(0.0, cfg.demographic_scale, (N_AGE_BUCKETS, N_GENDERS, t))
    logits = rng.normal(0.0, cfg.interest_scale, (n, t)) + offsets[age, gender]  # (U, T)
    log_interest = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    affinity = log_interest + np.log(t)  # (U, T)
    lover = rng.random(n) < cfg.live_lover_share
    live_aff = np.where(lover, rng.normal(1.5, 0.5, n), rng.normal(-0.5, 0.4, n))
    slope = cfg.behaviour.interrupt_slope
    hours = rng.choice(23, size=n, p=_HOUR_WEIGHTS[:23] / _HOUR_WEIGHTS[:23].sum())
    return {
        "affinity": affinity,
        "ranker_affinity": affinity + rng.normal(0.0, cfg.ranker_noise, (n, t)),
        "activity_group": rng.choice(N_ACTIVITY_GROUPS, size=n, p=[0.4, 0.4, 0.2]),
        "age_bucket": age,
        "gender": gender,
        "live_affinity": live_aff,
        "interrupt_sensitivity": 1.0 / (1.0 + np.exp(slope * live_aff)),
        "preferred_hour": hours,
    }


def _items(cfg: SimulatorConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Authors with main topics; videos and lives by those authors, mostly on-topic."""
    author_topic = rng.integers(0, cfg.n_topics, cfg.n_authors)
    author_quality = rng.normal(0.0, 0.4, cfg.n_authors)
    v_author = rng.integers(0, cfg.n_authors, cfg.n_videos)
    off_topic = rng.random(cfg.n_videos) < 0.2
    v_topic = np.where(off_topic, rng.integers(0, cfg.n_topics, cfg.n_videos),
                       author_topic[v_author])
    v_quality = author_quality[v_author] + rng.normal(0.0, 0.4, cfg.n_videos)
    duration = np.clip(np.exp(rng.normal(np.log(30.0), 0.8, cfg.n_videos)), 5.0, 300.0)
    l_author = rng.choice(cfg.n_authors, size=cfg.n_lives, replace=cfg.n_lives > cfg.n_authors)
    l_quality = author_quality[l_author] + rng.normal(0.0, 0.4, cfg.n_lives)
    start = rng.integers(0, 24, cfg.n_lives)
    length = rng.integers(2, 7, cfg.n_lives)
    on_air = (np.arange(24)[None, :] - start[:, None]) % 24 < length[:, None]  # (L, 24)
    popularity = l_quality + rng.normal(0.0, cfg.quality_noise, cfg.n_lives)
    popularity = (popularity - popularity.mean()) / max(float(popularity.std()), 1e-9)
    return {
        "author_topic": author_topic,
        "video_author": v_author,
        "video_topic": v_topic,
        "video_quality": v_quality,
        "video_quality_est": v_quality + rng.normal(0.0, cfg.quality_noise, cfg.n_videos),
        "video_duration": duration,
        "live_author": l_author,
        "live_topic": author_topic[l_author],
        "live_quality": l_quality,
        "live_popularity": popularity,
        "live_start_hour": start,
        "live_hours": length,
        "on_air": on_air,
    }


def generate_world(cfg: SimulatorConfig) -> World:
    """Draw the world of `cfg` from its world stream (independent of any policy)."""
    rng = world_rng(cfg.seed)
    users = _users(cfg, rng)
    items = _items(cfg, rng)
    return World(**users, **items)


def users_frame(world: World) -> pl.DataFrame:
    """Hidden user attributes, for evaluating user models (one row per user)."""
    frame = pl.DataFrame({
        "user_id": np.arange(world.n_users),
        "activity_group": world.activity_group,
        "age_bucket": world.age_bucket,
        "gender": world.gender,
        "preferred_hour": world.preferred_hour,
        "live_affinity": world.live_affinity,
    })
    return frame.select([pl.col(n).cast(t) for n, t in USER_SCHEMA.items()])


def items_frame(world: World) -> pl.DataFrame:
    """Videos then lives in one id space: item_id, item_type, author, topic, quality, timing."""
    n_v, n_l = world.n_videos, int(world.live_topic.shape[0])
    is_live = np.arange(n_v + n_l) >= n_v
    frame = pl.DataFrame({
        "item_id": np.arange(n_v + n_l),
        "is_live": is_live,
        "author_id": np.concatenate([world.video_author, world.live_author]),
        "topic": np.concatenate([world.video_topic, world.live_topic]),
        "quality": np.concatenate([world.video_quality, world.live_quality]),
        "duration_s": np.concatenate([world.video_duration, np.zeros(n_l)]),
        "on_air_start_hour": np.concatenate([np.zeros(n_v, int), world.live_start_hour]),
        "on_air_hours": np.concatenate([np.zeros(n_v, int), world.live_hours]),
    })
    live = pl.col("is_live")
    exprs = {
        "item_type": pl.when(live).then(pl.lit("live")).otherwise(pl.lit("video")),
        "duration_s": pl.when(~live).then(pl.col("duration_s")),
        "on_air_start_hour": pl.when(live).then(pl.col("on_air_start_hour")),
        "on_air_hours": pl.when(live).then(pl.col("on_air_hours")),
    }
    return frame.select([exprs.get(n, pl.col(n)).cast(t).alias(n)
                         for n, t in ITEM_SCHEMA.items()])
