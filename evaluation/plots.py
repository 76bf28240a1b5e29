"""Report plots (matplotlib, Agg backend): each function returns a Figure to log or save.

numpy in, Figure out; no torch and no MLflow here, so the plots are tested on plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def reliability_curve(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width probability bins (the same bins as ``metrics.expected_calibration_error``):
    (mean predicted probability, observed positive rate, rows) per non-empty bin."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    keep = counts > 0
    mean_p = np.bincount(bins, p, n_bins)[keep] / counts[keep]
    rate = np.bincount(bins, y, n_bins)[keep] / counts[keep]
    return mean_p, rate, counts[keep]


def reliability_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ece: Mapping[str, float] | None = None,
    n_bins: int = 15,
) -> Figure:
    """One reliability diagram per binary task: ``curves[task] = (labels, probabilities)``.
    Points are bins (area ∝ rows); the diagonal is perfect calibration."""
    tasks = list(curves)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3.4),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        labels, probabilities = curves[task]
        mean_p, rate, counts = reliability_curve(labels, probabilities, n_bins)
        top = max(float(mean_p.max(initial=0.0)), float(rate.max(initial=0.0)), 0.05) * 1.05
        ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--")
        ax.plot(mean_p, rate, color="tab:blue", linewidth=1)
        ax.scatter(mean_p, rate, s=10 + 200 * counts / max(counts.sum(), 1), color="tab:blue")
        title = task if ece is None or task not in ece else f"{task}  ECE {ece[task]:.4f}"
        ax.set(title=title, xlabel="predicted probability", xlim=(0, top), ylim=(0, top))
    axes[0][0].set_ylabel("observed positive rate")
    fig.tight_layout()
    return fig


def gate_heatmap(weights: np.ndarray, tasks: Sequence[str], experts: Sequence[str]) -> Figure:
    """Mean task-gate weight per (task, expert): which task occupies which expert. weights
    (K, E); blank cells are experts the task's gate cannot see (weight exactly 0)."""
    masked = np.ma.masked_equal(np.asarray(weights, dtype=np.float64), 0.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(experts), 1.2 + 0.45 * len(tasks)))
    image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=max(float(masked.max()), 1e-6),
                      aspect="auto")
    ax.set_xticks(range(len(experts)), labels=list(experts), rotation=75, ha="right",
                  fontsize=7)
    ax.set_yticks(range(len(tasks)), labels=list(tasks))
    for k in range(len(tasks)):
        for e in range(len(experts)):
            if weights[k][e] > 0:
                ax.text(e, k, f"{weights[k][e]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if weights[k][e] < 0.6 * masked.max() else "black")
    ax.set_title("mean gate weight per task and expert")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def expert_activity_figure(
    experts: Sequence[str], zero_fraction: np.ndarray, mean: np.ndarray, std: np.ndarray,
    collapse_threshold: float = 0.9,
) -> Figure:
    """Left: fraction of zero activations per expert (dashed: the collapse threshold). Right:
    each expert's output mean ± std (aligned distributions = comparable experts)."""
    y = np.arange(len(experts))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.3 * len(experts)),
                                      sharey=True)
    colors = ["tab:red" if z > collapse_threshold else "tab:blue" for z in zero_fraction]
    left.barh(y, zero_fraction, color=colors)
    left.axvline(collapse_threshold, color="tab:red", linestyle="--", linewidth=1)
    left.set(xlim=(0, 1), xlabel="fraction of zero activations", title="expert collapse")
    left.set_yticks(y, labels=list(experts), fontsize=7)
    left.invert_yaxis()
    right.errorbar(mean, y, xerr=std, fmt="o", color="tab:green", markersize=3)
    right.set(xlabel="output mean ± std", title="expert output distribution")
    fig.tight_layout()
    return fig


def gradient_figure(
    tasks: Sequence[str], groups: Sequence[str], norms: np.ndarray, cosine: np.ndarray
) -> Figure:
    """Left: each task's gradient norm at the shared layers, per group. Right: the cosine
    between tasks' gradients on the shared layers (red = conflicting tasks)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(tasks))
    for j, group in enumerate(groups):
        left.bar(x + j * width, norms[:, j], width, label=group)
    left.set_xticks(x + width * (len(groups) - 1) / 2, labels=list(tasks))
    left.set(ylabel="gradient norm", title="per-task gradient at shared layers")
    left.set_yscale("log")
    left.legend(fontsize=7)
    image = right.imshow(cosine, cmap="RdBu", vmin=-1, vmax=1)
    right.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right")
    right.set_yticks(range(len(tasks)), labels=list(tasks))
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            right.text(j, i, f"{cosine[i][j]:.2f}", ha="center", va="center", fontsize=7)
    right.set_title("cosine between task gradients")
    fig.colorbar(image, ax=right, fraction=0.04)
    fig.tight_layout()
    return fig


def oracle_figure(auc: Mapping[str, float], oracle_auc: Mapping[str, float]) -> Figure:
    """Per task the model's AUC next to the oracle AUC of the true probabilities, labelled
    with the ratio (AUC − 0.5) / (oracle AUC − 0.5)."""
    tasks = [task for task in auc if task in oracle_auc]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(tasks), 3.4))
    ax.bar(x - 0.2, [auc[t] for t in tasks], 0.4, label="model")
    ax.bar(x + 0.2, [oracle_auc[t] for t in tasks], 0.4, label="oracle (true p)")
    for i, task in enumerate(tasks):
        ratio = (auc[task] - 0.5) / (oracle_auc[task] - 0.5)
        ax.text(i, max(auc[task], oracle_auc[task]) + 0.01, f"{ratio:.2f}", ha="center",
                fontsize=8)
    ax.set_xticks(x, labels=tasks)
    ax.set(ylim=(0.5, 1.0), ylabel="test AUC", title="AUC vs oracle (label: share of the "
           "attainable lift)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
