"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import auc, expected_calibration_error, gauc, logloss


def test_auc_counts_ties_as_half():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert auc(labels, scores) == pytest.approx(0.75)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_auc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 2)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(labels, scores) == pytest.approx(pairwise)


def test_gauc_by_hand():
    # user 1: AUC 1.0 over 3 rows; user 2: AUC 0.0 over 2 rows; user 3: one class → skipped.
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([0, 1, 1, 1, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.2, 0.7, 0.3, 0.4])
    assert gauc(labels, scores, users) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


def test_logloss_and_ece():
    labels = np.array([1, 0])
    assert logloss(labels, np.array([0.8, 0.2])) == pytest.approx(-np.log(0.8))
    probabilities = np.array([0.1, 0.1, 0.9, 0.9])
    assert expected_calibration_error(np.array([0, 0, 1, 1]), probabilities) == pytest.approx(0.1)


def test_a_task_without_observed_labels_gets_nan_metrics():
    from evaluation.metrics import task_metrics
    from features.schema import TaskSpec

    tasks = (TaskSpec("click", "binary", "click"), TaskSpec("gift", "binary", "gift"))
    labels = np.array([[1.0, np.nan], [0.0, np.nan], [1.0, np.nan]])  # gift never observed
    predictions = np.array([[0.9, 0.1], [0.2, 0.1], [0.7, 0.1]])
    metrics = task_metrics(predictions, labels, np.array([1, 1, 2]), tasks)
    assert metrics["click"]["auc"] == pytest.approx(1.0)
    assert metrics["gift"]["n"] == 0
    assert all(np.isnan(metrics["gift"][name]) for name in ("auc", "gauc", "logloss"))


def test_a_nan_or_infinite_score_makes_auc_and_gauc_nan_not_a_top_score():
    labels = np.array([1, 0, 1, 0])
    users = np.array([1, 1, 2, 2])
    for bad in (np.nan, np.inf):
        scores = np.array([bad, 0.1, 0.2, 0.3])  # sorted last, NaN would rank positive first
        assert np.isnan(auc(labels, scores))
        assert np.isnan(gauc(labels, scores, users))
