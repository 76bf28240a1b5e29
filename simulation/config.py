"""Configuration of the feed simulator: world sizes, timing, and the known behaviour model.

Every number that shapes the simulated world or the users' behaviour lives here, in frozen
dataclasses with one line of doc per field, so a manifest can rebuild the exact run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import date
from typing import Any


@dataclass(frozen=True)
class LabelLogit:
    """Coefficients of one label's logit in the response model.

    logit = bias + affinity·a + quality·q + live_affinity·l + long_view·1[long view]
    where a = log(n_topics · interest[user, topic]), q = item quality, l = user live affinity.
    """

    bias: float
    """Intercept of the logit."""
    affinity: float = 0.0
    """Weight of the user-topic affinity a."""
    quality: float = 0.0
    """Weight of the item quality q."""
    live_affinity: float = 0.0
    """Weight of the user's latent live-stream affinity l."""
    long_view: float = 0.0
    """Added when the impression was a long view (for labels conditional on a click)."""


@dataclass(frozen=True)
class BehaviourConfig:
    """The known response, session-ending and returning model (see `simulation.responses`)."""

    video_click: LabelLogit = LabelLogit(-0.9, affinity=0.9, quality=0.6)
    """P(click) of a video before position bias and fatigue."""
    video_long_view: LabelLogit = LabelLogit(-1.2, affinity=0.6, quality=0.5)
    """P(long view | click) of a video before the duration term."""
    long_view_duration: float = 0.5
    """Subtracted from the long-view logit per unit of log(duration_s / 30)."""
    video_like: LabelLogit = LabelLogit(-3.7, affinity=0.5, quality=0.4, long_view=0.9)
    """P(like | click) of a video."""
    video_comment: LabelLogit = LabelLogit(-5.3, affinity=0.4, quality=0.3, long_view=0.6)
    """P(comment | click) of a video."""
    video_share: LabelLogit = LabelLogit(-5.8, affinity=0.4, quality=0.5, long_view=0.6)
    """P(share | click) of a video."""
    video_follow: LabelLogit = LabelLogit(-5.4, affinity=0.5, quality=0.3, long_view=0.8)
    """P(follow author | click) of a video (follows are rare: about 1% of impressions)."""
    video_hate: LabelLogit = LabelLogit(-3.3, affinity=-0.9, quality=-0.4)
    """P(hate | no click) of a video: 'not interested', likelier at low affinity."""
    live_click: LabelLogit = LabelLogit(-1.7, affinity=0.5, quality=0.4, live_affinity=1.3)
    """P(click) of an inserted live stream before position bias and fatigue."""
    live_like: LabelLogit = LabelLogit(-2.9, affinity=0.3, live_affinity=0.5, long_view=0.6)
    """P(like | click) of a live stream."""
    live_comment: LabelLogit = LabelLogit(-3.4, affinity=0.3, live_affinity=0.6, long_view=0.6)
    """P(comment | click) of a live stream."""
    live_share: LabelLogit = LabelLogit(-4.9, affinity=0.3, quality=0.3, long_view=0.4)
    """P(share | click) of a live stream."""
    live_follow: LabelLogit = LabelLogit(-4.2, affinity=0.3, live_affinity=0.8, long_view=0.7)
    """P(follow streamer | click) of a live stream."""
    live_gift: LabelLogit = LabelLogit(-5.5, quality=0.3, live_affinity=1.0)
    """P(gift | click, no follow) of a live stream."""
    gift_follow_bonus: float = 1.5
    """Added to the gift logit when the viewer followed the streamer (click → follow → gift)."""
    live_hate: LabelLogit = LabelLogit(-4.0, affinity=-0.5, live_affinity=-0.8)
    """P(hate | no click) of a live stream."""
    position_bias: float = 0.25
    """Click logit penalty per unit of log(1 + position)."""
    fatigue_per_request: float = 0.02
    """Click logit penalty per request already served in the session."""
    fatigue_repeat_topic: float = 0.3
    """Click logit penalty per earlier item of the same topic in the same feed."""
    long_view_fraction: float = 0.8
    """A video view is long when watch_time / duration >= this fraction."""
    live_watch_scale_s: float = 70.0
    """Mean live watch time given a click, before the affinity multipliers (seconds)."""
    live_watch_live_affinity: float = 0.5
    """Log mean live watch time gains this per unit of live affinity."""
    live_watch_affinity: float = 0.25
    """Log mean live watch time gains this per unit of topic affinity."""
    live_long_view_s: float = 120.0
    """A live view is long when it lasts at least this many seconds."""
    interrupt_slope: float = 2.0
    """Interruption sensitivity = sigmoid(-interrupt_slope · live_affinity) per user."""
    end_bias: tuple[float, float, float] = (-0.9, -1.5, -2.1)
    """Session-end logit after a request, by activity group (low, mid, high)."""
    end_click_rate: float = 1.5
    """Session-end logit falls by this times the request's click rate."""
    end_watch: float = 0.35
    """Session-end logit falls by this per unit of log1p(request watch time / 30 s)."""
    end_interrupt: float = 0.45
    """Session-end logit rises by this per live inserted so far, times the user's sensitivity."""
    norm_watch_s: tuple[float, float, float] = (450.0, 700.0, 950.0)
    """Typical session watch time by activity group; satisfaction is watch / norm."""
    return_bias: tuple[float, float, float] = (0.3, 1.0, 1.8)
    """Next-day return logit at satisfaction 1, by activity group."""
    return_satisfaction: float = 1.2
    """Return logit gains this per unit of min(satisfaction, 2) - 1."""
    return_interrupt: float = 0.25
    """Return logit falls by this per live inserted in the session, times the sensitivity."""
    comeback_prob: tuple[float, float, float] = (0.05, 0.1, 0.2)
    """Daily probability that a user who did not come back returns, by activity group."""
    initial_active_prob: tuple[float, float, float] = (0.5, 0.75, 0.95)
    """Probability of a session on the first day, by activity group."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BehaviourConfig:
        """Rebuild from `asdict` / JSON output (nested logits as dicts, tuples as lists)."""
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, default = data[f.name], f.default
            if isinstance(default, LabelLogit):
                value = LabelLogit(**value)
            elif isinstance(default, tuple):
                value = tuple(value)
            values[f.name] = value
        unknown = set(data) - set(values)
        if unknown:
            raise ValueError(f"unknown BehaviourConfig fields: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class SimulatorConfig:
    """World size, timing and seeds of one simulation."""

    n_users: int = 2000
    """Number of users."""
    days: int = 7
    """Number of simulated days."""
    seed: int = 0
    """Master seed: the world and the behaviour draw from separate streams derived from it."""
    n_videos: int = 5000
    """Number of short videos."""
    n_lives: int = 200
    """Number of live streams (item ids n_videos .. n_videos + n_lives - 1)."""
    n_authors: int = 500
    """Number of authors; each has a main topic, videos and lives belong to authors."""
    n_topics: int = 16
    """Number of content topics."""
    feed_size: int = 6
    """Videos per feed request (K)."""
    max_requests_per_session: int = 30
    """Hard cap on requests in one session."""
    live_slot: int = 2
    """Position at which an allocated live stream is inserted (videos after it shift by one)."""
    start_date: date = date(2026, 11, 2)
    """First simulated day (UTC)."""
    live_share_cap: float = 0.3
    """Platform constraint for evaluation: inserted lives / requests must stay below this."""
    candidate_size: int = 200
    """Videos scored by the logging ranker per request (a random subset)."""
    ranker_temperature: float = 0.7
    """Plackett-Luce temperature of the logging ranker (higher = more exploration)."""
    ranker_noise: float = 0.6
    """Std of the ranker's error on user-topic affinity (fixed per user and topic)."""
    quality_noise: float = 0.3
    """Std of the ranker's and the popularity proxy's error on item quality."""
    live_quality_weight: float = 0.5
    """Weight of estimated quality in the logging system's live-candidate choice."""
    interest_scale: float = 1.0
    """Std of a user's own topic-interest logits."""
    demographic_scale: float = 1.0
    """Std of the (age_bucket, gender) topic-preference offsets added to interest logits."""
    live_lover_share: float = 0.15
    """Share of users who love live streams (live affinity ~ N(1.5, 0.5), else N(-0.5, 0.4))."""
    request_gap_s: tuple[int, int] = (20, 90)
    """Seconds between consecutive requests of a session, uniform on [low, high]."""
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    """The response, session and return model."""

    def __post_init__(self) -> None:
        """Reject configurations the simulator cannot run."""
        positive = ("n_users", "days", "n_videos", "n_lives", "n_authors", "n_topics",
                    "feed_size", "max_requests_per_session", "candidate_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"SimulatorConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.live_slot <= self.feed_size:
            raise ValueError(f"live_slot must be in [0, feed_size={self.feed_size}], "
                             f"got {self.live_slot}")
        if not self.feed_size <= self.candidate_size <= self.n_videos:
            raise ValueError("need feed_size <= candidate_size <= n_videos, got "
                             f"{self.feed_size}, {self.candidate_size}, {self.n_videos}")
        if self.ranker_temperature <= 0:
            raise ValueError(f"ranker_temperature must be > 0, got {self.ranker_temperature}")
        if not 0 < self.live_share_cap <= 1:
            raise ValueError(f"live_share_cap must be in (0, 1], got {self.live_share_cap}")
        low, high = self.request_gap_s
        if not 0 < low <= high:
            raise ValueError(f"request_gap_s must satisfy 0 < low <= high, got {low, high}")
        if self.max_requests_per_session * high >= 3600:
            raise ValueError("max_requests_per_session * request_gap_s[1] must be under one "
                             "hour so a session never crosses midnight")

    def world_id(self) -> str:
        """``sim<seed>-<8 hex>``, the prefix of the world's event, request and session ids:
        a digest of every setting but ``days`` (more days only extend a world: its earlier
        days come out the same). Two worlds never share ids, so one lake can tell them apart."""
        settings = {k: v for k, v in self.to_dict().items() if k != "days"}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        return f"sim{self.seed}-{digest.hexdigest()[:8]}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (dates as ISO strings; tuples become lists in JSON)."""
        out = asdict(self)
        out["start_date"] = self.start_date.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatorConfig:
        """Rebuild a config from `to_dict` output, e.g. a manifest's "config"."""
        values = dict(data)
        if isinstance(values.get("start_date"), str):
            values["start_date"] = date.fromisoformat(values["start_date"])
        if "request_gap_s" in values:
            values["request_gap_s"] = tuple(values["request_gap_s"])
        if "behaviour" in values:
            values["behaviour"] = BehaviourConfig.from_dict(values["behaviour"])
        return cls(**values)
