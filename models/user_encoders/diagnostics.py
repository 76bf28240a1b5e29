"""Health checks and plots of a pretrained user encoder: training curves, embedding
statistics (collapse shows as a mean cosine near 1 and a tiny effective rank), and a 2-D
PCA projection coloured by a user attribute."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CURVE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("mip_loss", "cl4srec_loss", "adaptssr_loss")),
    ("ordering accuracy", ("acc_pos_semi", "acc_semi_neg", "cl_accuracy", "mip_accuracy")),
    ("cosine similarity", ("sim_pos", "sim_semi", "sim_neg", "sim_hard_neg")),
    ("fusion coefficient", ("lambda",)),
)
"""Panels of the training-curve figure and the diagnostics each one draws (when logged)."""


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """(N, D) → (N, 2) coordinates on the first two principal components (deterministic
    signs: the largest-magnitude loading of each component is positive)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    if centred.shape[0] < 2:
        return np.zeros((centred.shape[0], 2))
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    top = components[:2]
    signs = np.sign(top[np.arange(top.shape[0]), np.abs(top).argmax(axis=1)])
    projected = centred @ (top * signs[:, None]).T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected


def embedding_stats(vectors: np.ndarray, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """``mean_norm``, ``mean_cosine`` between distinct users (≈1: collapsed) and
    ``effective_rank`` (exp of the entropy of the normalised singular values)."""
    if vectors.shape[0] < 2:
        return {}
    rng = np.random.default_rng(seed)
    rows = rng.choice(vectors.shape[0], size=min(sample, vectors.shape[0]), replace=False)
    chosen = vectors[rows]
    unit = chosen / np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    n = cosine.shape[0]
    singular = np.linalg.svd(chosen - chosen.mean(axis=0), compute_uv=False)
    share = singular / max(singular.sum(), 1e-12)
    entropy = -(share[share > 0] * np.log(share[share > 0])).sum()
    return {
        "mean_norm": float(np.linalg.norm(vectors, axis=1).mean()),
        "mean_cosine": float((cosine.sum() - n) / (n * (n - 1))),
        "effective_rank": float(np.exp(entropy)),
    }


def plot_training_curves(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """One panel per ``CURVE_GROUPS`` entry that has data, x = optimiser step."""
    groups = [(name, [k for k in keys if any(k in r for r in history)])
              for name, keys in CURVE_GROUPS]
    groups = [(name, keys) for name, keys in groups if keys] or [("loss", [])]
    figure, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for axis, (name, keys) in zip(axes[0], groups, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in history if key in r]
            axis.plot(*zip(*points, strict=True), label=key)
        axis.set_title(name)
        axis.set_xlabel("step")
        if keys:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_projection(points: np.ndarray, colours: Mapping[str, np.ndarray], title: str) -> Figure:
    """Scatter of (N, 2) ``points``, one panel per colouring (name → (N,) labels)."""
    panels = list(colours.items()) or [("users", np.zeros(points.shape[0]))]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for axis, (name, labels) in zip(axes[0], panels, strict=True):
        values = np.asarray(labels)
        for value in np.unique(values):
            chosen = values == value
            axis.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.6,
                         label=f"{name}={value}")
        axis.set_title(f"PCA of user vectors, coloured by {name}")
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
        if len(np.unique(values)) <= 10:
            axis.legend(fontsize=7, markerscale=2)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
