"""The logging ranker samples Plackett-Luce rankings and logs exact slot propensities."""

from __future__ import annotations

import numpy as np
import pytest

from simulation.ranker import plackett_luce_top_k


def test_slot_propensities_are_conditional_softmax_probabilities():
    scores = np.array([1.0, 0.3, -0.5, 0.0, 2.0])
    n, k, temperature = 200_000, 3, 0.8
    chosen, prop = plackett_luce_top_k(np.tile(scores, (n, 1)), k, temperature,
                                       np.random.default_rng(0))
    assert chosen.shape == prop.shape == (n, k)
    assert all(len(set(row)) == k for row in chosen[:1000])  # no item twice in a feed
    w = np.exp(scores / temperature)
    placed = np.zeros(n)
    for j in range(k):
        expected = w[chosen[:, j]] / (w.sum() - placed)
        np.testing.assert_allclose(prop[:, j], expected, rtol=1e-12)
        placed += w[chosen[:, j]]
    assert np.all((prop > 0) & (prop <= 1))


def test_sampled_orderings_occur_with_their_logged_probability():
    scores = np.array([0.5, -0.2, 1.1, 0.0])
    n = 200_000
    chosen, prop = plackett_luce_top_k(np.tile(scores, (n, 1)), 2, 1.0, np.random.default_rng(1))
    pair = chosen[:, 0] * 10 + chosen[:, 1]
    prob = prop.prod(axis=1)
    for code in np.unique(pair):
        p = prob[pair == code][0]
        observed = np.mean(pair == code)
        assert abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n), (code, observed, p)


def test_propensities_stay_positive_for_peaked_scores():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 3.0, (64, 200))
    _, prop = plackett_luce_top_k(scores, 6, 0.5, rng)
    assert np.all((prop > 0) & (prop <= 1))


def test_propensities_are_exact_even_when_one_candidate_dominates():
    """Against the definition, slot by slot: the chosen one's weight over what is left."""
    rng = np.random.default_rng(3)
    scores = np.vstack([rng.normal(0.0, 3.0, (16, 12)), [[40.0] + [0.0] * 11]])
    chosen, prop = plackett_luce_top_k(scores, 4, 0.05, rng)
    for row in range(len(scores)):
        logits = scores[row] / 0.05
        left = list(range(len(logits)))
        for slot, item in enumerate(chosen[row]):
            exact = np.exp(logits[item] - np.logaddexp.reduce(logits[left]))
            assert prop[row, slot] == pytest.approx(exact, rel=1e-9, abs=1e-300)
            left.remove(item)
    _, p = plackett_luce_top_k(np.array([[800.0, 0.0, 0.0]]), 2, 1.0, rng)
    assert p[0, 1] == pytest.approx(0.5)  # the others' weights underflow; still exact
