"""The stochastic logging ranker: Plackett-Luce top-K sampling with exact slot propensities."""

from __future__ import annotations

import numpy as np


def plackett_luce_top_k(
    scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample an ordered top-k per row from Plackett-Luce(softmax(scores / temperature)).

    Gumbel-top-k: adding Gumbel noise to the logits and sorting is an exact PL sample.

    Args:
        scores: (B, C) candidate scores.
        k: slots to fill, k <= C.
        temperature: > 0; the PL logits are scores / temperature.
        rng: behaviour stream.

    Returns:
        chosen: (B, k) column indices into `scores`, slot 0 first.
        propensity: (B, k) P(item at slot j | items at slots < j) under the PL model, i.e.
            exp(s_j) / sum of exp(s) over the candidates not yet placed.
    """
    logits = scores / temperature  # (B, C)
    perturbed = logits + rng.gumbel(size=logits.shape)  # (B, C)
    top = np.argpartition(-perturbed, k - 1, axis=1)[:, :k]  # (B, k) unordered
    order = np.argsort(-np.take_along_axis(perturbed, top, axis=1), axis=1)
    chosen = np.take_along_axis(top, order, axis=1)  # (B, k)
    shift = logits.max(axis=1, keepdims=True)  # (B, 1)
    weights = np.exp(logits - shift)  # (B, C)
    total = weights.sum(axis=1, keepdims=True)  # (B, 1)
    w_chosen = np.take_along_axis(weights, chosen, axis=1)  # (B, k)
    placed_before = np.cumsum(w_chosen, axis=1) - w_chosen  # (B, k)
    remaining = np.maximum(total - placed_before, w_chosen)  # (B, k), guards rounding
    return chosen, w_chosen / remaining
