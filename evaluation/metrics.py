"""Ranking metrics: AUC, GAUC (user-weighted), logloss, calibration (ECE). numpy only.

All functions take 1-D arrays of equal length N: ``labels`` in {0, 1}, ``scores`` any real
(probabilities for logloss / ECE), ``groups`` integer ids (users) for GAUC.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from features.schema import TaskSpec

EPS = 1e-7


def _tied_ranks(sorted_keys: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """1-based ranks within groups of an already sorted array, ties averaged.

    sorted_keys (N,): sort keys, sorted within each group; group_start (N,): index of the
    first row of each row's group.
    """
    n = len(sorted_keys)
    idx = np.arange(n)
    new_tie = np.ones(n, dtype=bool)
    new_tie[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | (group_start[1:] != group_start[:-1])
    tie_first = np.maximum.accumulate(np.where(new_tie, idx, 0))
    tie_id = np.cumsum(new_tie) - 1
    tie_last = np.zeros(tie_id[-1] + 1, dtype=np.int64) if n else np.zeros(0, np.int64)
    np.maximum.at(tie_last, tie_id, idx)
    return (tie_first + tie_last[tie_id]) / 2.0 - group_start + 1.0


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count half); NaN if one class is absent,
    there are no rows, or a score is NaN or infinite."""
    if len(labels) == 0:
        return float("nan")
    return float(grouped_auc(labels, scores, np.zeros(len(labels), dtype=np.int64))[0][0])


def grouped_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC. Returns (auc per group (G,), rows per group (G,)); NaN where a group
    lacks positives or negatives, and everywhere when a score is not finite (a model that
    emits NaN is not measurable, not ranked in some groups only). Groups are ordered by
    sorted group id."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    order = np.lexsort((scores, group_index))
    g, s, y = group_index[order], scores[order], labels[order]
    n = len(g)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    idx = np.arange(n)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    ranks = _tied_ranks(s, group_start)
    n_groups = g[-1] + 1
    counts = np.bincount(g, minlength=n_groups).astype(np.float64)
    pos = np.bincount(g, weights=y, minlength=n_groups)
    neg = counts - pos
    rank_sum = np.bincount(g, weights=ranks * y, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    values[(pos == 0) | (neg == 0)] = np.nan
    if not np.isfinite(scores).all():  # NaN would sort as the top score: no ranking at all
        values[:] = np.nan
    return values, counts


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's impressions, over users
    with both classes (the usual industrial definition). NaN if no user qualifies."""
    values, counts = grouped_auc(labels, scores, groups)
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    return float(np.average(values[keep], weights=counts[keep]))


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 15
) -> float:
    """ECE over equal-width probability bins: sum_b (n_b / N) |mean(y_b) - mean(p_b)|."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, y, n_bins) - np.bincount(bins, p, n_bins))
    return float(gap.sum() / counts.sum())


def task_metrics(
    predictions: np.ndarray,
    labels: np.ndarray,
    user_ids: np.ndarray,
    tasks: Sequence[TaskSpec],
) -> dict[str, dict[str, float]]:
    """Metrics per task over rows whose label is observed.

    predictions (N, K): probabilities for binary tasks, predicted seconds for regression;
    labels (N, K) with NaN where unobserved (regression labels are log1p seconds).
    Binary: auc, gauc, logloss, ece, positive_rate, n. Regression: rmse_log, n.
    """
    result: dict[str, dict[str, float]] = {}
    for k, task in enumerate(tasks):
        observed = ~np.isnan(labels[:, k])
        y, p, users = labels[observed, k], predictions[observed, k], user_ids[observed]
        if task.kind == "binary":
            result[task.name] = {
                "auc": auc(y, p),
                "gauc": gauc(y, p, users),
                "logloss": logloss(y, p) if len(y) else float("nan"),
                "ece": expected_calibration_error(y, p),
                "positive_rate": float(y.mean()) if len(y) else float("nan"),
                "n": float(len(y)),
            }
        else:
            error = np.log1p(np.maximum(p, 0.0)) - y
            result[task.name] = {
                "rmse_log": float(np.sqrt(np.mean(error**2))) if len(y) else float("nan"),
                "n": float(len(y)),
            }
    return result
