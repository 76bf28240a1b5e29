"""Plots of an offline A/B: the improvement of every metric with its paired interval."""

from __future__ import annotations

import math

from evaluation.ab import Decision, GateConfig, MetricTable


def difference_plot(table: MetricTable, decision: Decision | None = None,
                    gates: GateConfig | None = None, title: str = ""):  # noqa: ANN201 (Figure)
    """Horizontal interval plot, one line per metric: improvement (challenger better to
    the right, whatever the metric's direction) with its interval; the primary metric's
    bar in blue, failed gates in red, guard tolerances as grey ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table.rows)
    failed = {g.metric for g in (decision.gates if decision else ()) if not g.passed}
    tolerance = {g.metric: g.tolerance for g in (gates.guards if gates else ())}
    primary = gates.primary if gates else None
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.4))
    for i, row in enumerate(rows):
        low, high = row.improvement_interval
        color = "tab:red" if row.metric in failed else (
            "tab:blue" if row.metric == primary else "tab:gray")
        if math.isfinite(low) and math.isfinite(high):
            ax.plot([low, high], [i, i], color=color, lw=2.5, solid_capstyle="butt")
        ax.plot([row.improvement], [i], "o", color=color)
        if row.metric in tolerance:
            ax.plot([-tolerance[row.metric]], [i], "|", color="dimgray", ms=14, mew=2)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r.metric} {'↑' if r.higher_is_better else '↓'}" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"challenger's improvement over the champion (right = better)\n"
                  f"{100 * table.level:g}% interval, paired bootstrap over {table.unit}s; "
                  "| = guard tolerance", fontsize=9)
    ax.set_title(title or "challenger vs champion")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
