"""The known response model: how a user reacts to one video or one inserted live stream.

Each function reads top to bottom: conditional probabilities, sampled labels, and the exact
marginal probabilities stored as ground truth (e.g. P(like) = P(click) · P(like | click)).
In a short-video feed "click" means engaged/played: watch time is positive only after a click,
and like / comment / share / follow / gift / long_view are possible only after a click; hate
("not interested") is possible only without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulation.config import BehaviourConfig, LabelLogit

LIVE_WATCH_SHAPE = 2.0
"""Gamma shape of a live watch time given a click; 2 keeps P(long view) in closed form."""

CONDITIONAL_LABELS: tuple[str, ...] = ("like", "comment", "share", "follow")
"""Labels drawn given a click, with a bonus when the view was long."""


@dataclass(frozen=True)
class Responses:
    """Sampled labels and their true marginal probabilities for N impressions (any shape)."""

    labels: dict[str, np.ndarray]
    """Label name -> int8 0/1 array; 'watch_time_s' -> float seconds. Videos have no 'gift'."""
    truth: dict[str, np.ndarray]
    """'p_<label>' -> marginal probability; 'expected_watch_time_s' -> E[watch_time_s]."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def label_logit(c: LabelLogit, affinity: np.ndarray, quality: np.ndarray,
                live_affinity: np.ndarray | float = 0.0) -> np.ndarray:
    """The logit of `c` without its long-view bonus (same shape as `affinity`)."""
    return c.bias + c.affinity * affinity + c.quality * quality + c.live_affinity * live_affinity


def _conditional_labels(
    coefs: dict[str, LabelLogit], click: np.ndarray, long: np.ndarray, p_click: np.ndarray,
    q_long: np.ndarray, affinity: np.ndarray, quality: np.ndarray,
    live_affinity: np.ndarray | float, rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Draw like/comment/share/follow given click and long view; return labels, marginals and
    P(follow | click) (which the live gift funnel needs)."""
    labels, truth = {}, {}
    p_follow_given_click = np.zeros_like(p_click)
    for name in CONDITIONAL_LABELS:
        c = coefs[name]
        base = label_logit(c, affinity, quality, live_affinity)
        p_given = sigmoid(base + c.long_view * long)
        labels[name] = (click & (rng.random(click.shape) < p_given)).astype(np.int8)
        p_cond = q_long * sigmoid(base + c.long_view) + (1.0 - q_long) * sigmoid(base)
        truth[f"p_{name}"] = p_click * p_cond
        if name == "follow":
            p_follow_given_click = p_cond
    return labels, truth, p_follow_given_click


def video_responses(
    affinity: np.ndarray, quality: np.ndarray, duration: np.ndarray, position: np.ndarray,
    request_index: np.ndarray, repeats: np.ndarray, bc: BehaviourConfig,
    rng: np.random.Generator,
) -> Responses:
    """Responses to videos; all inputs broadcast to one shape, e.g. (B, K).

    click ~ sigmoid(click logit - position bias - fatigue); given a click, the view is long
    with probability q, and the watched fraction is tau + (1 - tau)·U if long, else
    tau·Beta(2, 2) (tau = long_view_fraction), so E[watch | click] = duration · (tau + q) / 2.

    Args:
        affinity: user-topic affinity a.   quality: true item quality.
        duration: seconds.   position: 0-based slot shown.
        request_index: requests already served in the session.
        repeats: earlier items of the same topic in the same feed.
    """
    fatigue = (bc.position_bias * np.log1p(position) + bc.fatigue_per_request * request_index
               + bc.fatigue_repeat_topic * repeats)
    p_click = sigmoid(label_logit(bc.video_click, affinity, quality) - fatigue)
    q_long = sigmoid(label_logit(bc.video_long_view, affinity, quality)
                     - bc.long_view_duration * np.log(duration / 30.0))
    tau = bc.long_view_fraction
    click = rng.random(p_click.shape) < p_click
    long = click & (rng.random(p_click.shape) < q_long)
    fraction = np.where(long, tau + (1.0 - tau) * rng.random(p_click.shape),
                        tau * rng.beta(2.0, 2.0, p_click.shape))
    coefs = {"like": bc.video_like, "comment": bc.video_comment, "share": bc.video_share,
             "follow": bc.video_follow}
    labels, truth, _ = _conditional_labels(coefs, click, long, p_click, q_long, affinity,
                                           quality, 0.0, rng)
    p_hate_given_skip = sigmoid(label_logit(bc.video_hate, affinity, quality))
    labels["hate"] = (~click & (rng.random(p_click.shape) < p_hate_given_skip)).astype(np.int8)
    labels["click"] = click.astype(np.int8)
    labels["long_view"] = long.astype(np.int8)
    labels["watch_time_s"] = np.where(click, fraction * duration, 0.0)
    truth["p_click"] = p_click
    truth["p_hate"] = (1.0 - p_click) * p_hate_given_skip
    truth["p_long_view"] = p_click * q_long
    truth["expected_watch_time_s"] = p_click * duration * (tau + q_long) / 2.0
    return Responses(labels=labels, truth=truth)


def live_responses(
    affinity: np.ndarray, quality: np.ndarray, live_affinity: np.ndarray, position: int,
    request_index: np.ndarray, bc: BehaviourConfig, rng: np.random.Generator,
) -> Responses:
    """Responses to inserted live streams; inputs are (N,) arrays.

    click → (like, comment, share, follow) → gift. Given a click the watch time is
    Gamma(shape 2, mean m) with m = scale · exp(w_l · live_affinity + w_a · affinity), so it
    often lasts minutes; the view is long when watch >= live_long_view_s, which for shape 2
    has P = exp(-x)(1 + x) with x = threshold / (m / 2). Gift is possible only after a click
    and is likelier after a follow.
    """
    fatigue = bc.position_bias * np.log1p(position) + bc.fatigue_per_request * request_index
    p_click = sigmoid(label_logit(bc.live_click, affinity, quality, live_affinity) - fatigue)
    mean_watch = bc.live_watch_scale_s * np.exp(bc.live_watch_live_affinity * live_affinity
                                                + bc.live_watch_affinity * affinity)
    scale = mean_watch / LIVE_WATCH_SHAPE
    x = bc.live_long_view_s / scale
    q_long = np.exp(-x) * (1.0 + x)
    click = rng.random(p_click.shape) < p_click
    watch = np.where(click, rng.gamma(LIVE_WATCH_SHAPE, scale), 0.0)
    long = click & (watch >= bc.live_long_view_s)
    coefs = {"like": bc.live_like, "comment": bc.live_comment, "share": bc.live_share,
             "follow": bc.live_follow}
    labels, truth, p_follow = _conditional_labels(coefs, click, long, p_click, q_long,
                                                  affinity, quality, live_affinity, rng)
    gift_base = label_logit(bc.live_gift, affinity, quality, live_affinity)
    p_gift_given = sigmoid(gift_base + bc.gift_follow_bonus * labels["follow"])
    labels["gift"] = (click & (rng.random(p_click.shape) < p_gift_given)).astype(np.int8)
    p_hate_given_skip = sigmoid(label_logit(bc.live_hate, affinity, quality, live_affinity))
    labels["hate"] = (~click & (rng.random(p_click.shape) < p_hate_given_skip)).astype(np.int8)
    labels["click"] = click.astype(np.int8)
    labels["long_view"] = long.astype(np.int8)
    labels["watch_time_s"] = watch
    truth["p_click"] = p_click
    truth["p_gift"] = p_click * (p_follow * sigmoid(gift_base + bc.gift_follow_bonus)
                                 + (1.0 - p_follow) * sigmoid(gift_base))
    truth["p_hate"] = (1.0 - p_click) * p_hate_given_skip
    truth["p_long_view"] = p_click * q_long
    truth["expected_watch_time_s"] = p_click * mean_watch
    return Responses(labels=labels, truth=truth)
