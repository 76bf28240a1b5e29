"""Ground truth is calibrated: labels average to the stored marginal probabilities."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from simulation.config import BehaviourConfig
from simulation.responses import live_responses, video_responses

LABELS = ("click", "like", "follow", "comment", "share", "hate", "long_view")


def assert_calibrated(y: np.ndarray, p: np.ndarray, what: str, sigmas: float = 4.0) -> None:
    """Sum of Bernoulli(p) labels is within `sigmas` binomial standard deviations of sum p."""
    sd = np.sqrt(np.sum(p * (1.0 - p)))
    assert abs(y.sum() - p.sum()) <= sigmas * sd + 1.0, (what, y.sum(), p.sum(), sd)


def assert_mean_matches(x: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Sum of x is within 4 standard errors (from the residuals) of the sum of expectations."""
    residual = x - expected
    assert abs(residual.sum()) <= 4.0 * np.sqrt(np.sum(residual**2)), what


@pytest.fixture(scope="module")
def joined(result):
    return result.events.join(result.ground_truth, on="event_id")


@pytest.mark.parametrize("item_type", ["video", "live"])
def test_simulated_labels_match_marginals(joined, item_type):
    rows = joined.filter(pl.col("item_type") == item_type)
    assert rows.height > 250
    labels = LABELS + (("gift",) if item_type == "live" else ())
    for name in labels:
        assert_calibrated(rows[name].to_numpy(), rows[f"p_{name}"].to_numpy(), name)
    assert_mean_matches(rows["watch_time_s"].to_numpy(),
                        rows["expected_watch_time_s"].to_numpy(), "watch_time_s")


def test_click_probability_is_calibrated_per_decile(joined):
    binned = joined.with_columns(pl.col("p_click").qcut(10, labels=[str(i) for i in range(10)])
                                 .alias("bin"))
    for _, part in binned.group_by("bin"):
        assert_calibrated(part["click"].to_numpy(), part["p_click"].to_numpy(), "click bin")


def _grid(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"affinity": rng.uniform(-2.5, 2.0, n), "quality": rng.normal(0.0, 0.6, n),
            "live_affinity": rng.normal(0.0, 1.0, n)}


def test_video_response_model_is_calibrated_and_consistent():
    g, n = _grid(200_000, 1), 200_000
    rng = np.random.default_rng(2)
    duration = np.clip(np.exp(rng.normal(np.log(30.0), 0.8, n)), 5.0, 300.0)
    position = rng.integers(0, 7, n)
    r = video_responses(g["affinity"], g["quality"], duration, position, rng.integers(0, 30, n),
                        rng.integers(0, 3, n), BehaviourConfig(), np.random.default_rng(3))
    for name in LABELS:
        assert_calibrated(r.labels[name], r.truth[f"p_{name}"], name)
    assert_mean_matches(r.labels["watch_time_s"], r.truth["expected_watch_time_s"], "watch")
    assert "gift" not in r.labels
    assert np.corrcoef(g["affinity"], r.truth["p_hate"])[0, 1] < -0.3
    assert np.corrcoef(g["affinity"], r.truth["p_click"])[0, 1] > 0.3
    assert r.truth["p_click"][position == 0].mean() > r.truth["p_click"][position == 6].mean()
    assert np.all(r.labels["watch_time_s"] <= duration)


def test_live_response_model_is_calibrated_and_driven_by_live_affinity():
    g, n = _grid(200_000, 4), 200_000
    rng = np.random.default_rng(5)
    r = live_responses(g["affinity"], g["quality"], g["live_affinity"], 2,
                       rng.integers(0, 30, n), BehaviourConfig(), np.random.default_rng(6))
    for name in (*LABELS, "gift"):
        assert_calibrated(r.labels[name], r.truth[f"p_{name}"], name)
    assert_mean_matches(r.labels["watch_time_s"], r.truth["expected_watch_time_s"], "watch")
    assert r.labels["gift"].sum() > 100
    gift_after_follow = r.labels["gift"][r.labels["follow"] == 1].mean()
    gift_without_follow = r.labels["gift"][(r.labels["follow"] == 0) & (r.labels["click"] == 1)]
    assert gift_after_follow > gift_without_follow.mean()
    lovers = g["live_affinity"] > 1.0
    for key in ("p_click", "p_follow", "p_gift", "expected_watch_time_s"):
        assert r.truth[key][lovers].mean() > 2 * r.truth[key][~lovers].mean(), key
    watch = r.labels["watch_time_s"][r.labels["click"] == 1]
    assert np.median(watch) > 60.0  # a clicked live is watched for minutes
