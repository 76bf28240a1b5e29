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
    # In log space, and as sums only: at slot j the remaining mass is the never-placed
    # candidates' plus the chosen ones' from slot j on (never total - placed, which loses
    # every digit once the placed weights dominate, and never a weight that underflows).
    l_chosen = np.take_along_axis(logits, chosen, axis=1)  # (B, k)
    unplaced = logits.copy()
    np.put_along_axis(unplaced, chosen, -np.inf, axis=1)
    peak = unplaced.max(axis=1, keepdims=True)  # (B, 1); -inf when k == C
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf: nothing left unplaced
        log_unplaced = peak + np.log(np.exp(unplaced - peak).sum(axis=1, keepdims=True))
    from_j = np.logaddexp.accumulate(l_chosen[:, ::-1], axis=1)[:, ::-1]  # (B, k)
    return chosen, np.exp(l_chosen - np.logaddexp(log_unplaced, from_j))
