"""Offline A/B: challenger vs champion on the same held-out logs, promotion gates.

The comparison is a ``MetricTable``: one row per metric with both models' values, the
difference (challenger - champion) and a paired bootstrap interval of that difference.
Gates (``GateConfig``) read only the table, so rankers (AUC / GAUC / logloss per task) and
allocators (off-policy value, true value from the simulator) go through the same code.

Resampling unit: the user. Every replicate draws users with replacement and takes all of
their rows, for both models at once (paired). A ranker's tasks are resampled separately,
over the users with observed labels of that task, so each row's interval is paired but the
intervals of different tasks are not one joint draw (read them one at a time). Rows of one
user are correlated (same tastes, same session), and GAUC is itself an average of per-user
AUCs, so resampling rows would understate the uncertainty; resampling users is the cluster
bootstrap that matches how the test logs were generated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from evaluation.metrics import EPS, grouped_auc
from evaluation.ope import BanditData, Clusters, OPEConfig, estimate_bandit, percentile_interval
from features.schema import TaskSpec

# --------------------------------------------------------------------------------------
# The metric table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRow:
    """One metric of the comparison; ``diff`` = challenger - champion."""

    metric: str
    """Name, e.g. ``click/gauc`` or ``value/dr``."""
    champion: float
    challenger: float
    diff: float
    ci_low: float
    """Paired bootstrap interval of ``diff`` (NaN when the metric has no interval)."""
    ci_high: float
    higher_is_better: bool = True
    p_better: float = float("nan")
    """Share of bootstrap replicates in which the challenger is better."""

    @property
    def improvement(self) -> float:
        """``diff`` signed so that positive means the challenger is better."""
        return self.diff if self.higher_is_better else -self.diff

    @property
    def improvement_interval(self) -> tuple[float, float]:
        if self.higher_is_better:
            return self.ci_low, self.ci_high
        return -self.ci_high, -self.ci_low

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MetricTable:
    """The rows of one comparison, plus what was compared."""

    rows: tuple[MetricRow, ...]
    level: float = 0.95
    n_boot: int = 0
    unit: str = "user"
    """What the bootstrap resampled."""
    info: dict = field(default_factory=dict)

    def get(self, metric: str) -> MetricRow | None:
        return next((row for row in self.rows if row.metric == metric), None)

    @property
    def metrics(self) -> list[str]:
        return [row.metric for row in self.rows]

    def to_dict(self) -> dict:
        return {"rows": [row.to_dict() for row in self.rows], "level": self.level,
                "n_boot": self.n_boot, "unit": self.unit, "info": self.info}

    @classmethod
    def from_dict(cls, data: dict) -> MetricTable:
        return cls(rows=tuple(MetricRow(**row) for row in data["rows"]),
                   level=data.get("level", 0.95), n_boot=data.get("n_boot", 0),
                   unit=data.get("unit", "user"), info=data.get("info", {}))

    def to_markdown(self) -> str:
        pct = f"{100 * self.level:g}%"
        lines = [f"| metric | champion | challenger | diff | {pct} interval of diff | "
                 "P(challenger better) |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            arrow = "↑" if r.higher_is_better else "↓"
            interval = (f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
                        if math.isfinite(r.ci_low) else "—")
            p = f"{r.p_better:.2f}" if math.isfinite(r.p_better) else "—"
            lines.append(f"| {r.metric} {arrow} | {r.champion:.4f} | {r.challenger:.4f} | "
                         f"{r.diff:+.4f} | {interval} | {p} |")
        return "\n".join(lines)


def metric_row(metric: str, champion: float, challenger: float, champion_reps: np.ndarray,
               challenger_reps: np.ndarray, level: float, higher_is_better: bool) -> MetricRow:
    """A row from full-sample values and paired bootstrap replicates of both models."""
    diffs = np.asarray(challenger_reps) - np.asarray(champion_reps)
    low, high = percentile_interval(diffs, level)
    finite = diffs[np.isfinite(diffs)]
    better = finite > 0 if higher_is_better else finite < 0
    return MetricRow(metric=metric, champion=float(champion), challenger=float(challenger),
                     diff=float(challenger - champion), ci_low=low, ci_high=high,
                     higher_is_better=higher_is_better,
                     p_better=float(better.mean()) if finite.size else float("nan"))


BINARY_METRICS: tuple[tuple[str, bool], ...] = (("auc", True), ("gauc", True), ("logloss", False))
"""A binary task's comparison metrics and whether higher is better."""


def unmeasured_row(metric: str, higher_is_better: bool) -> MetricRow:
    """A row for a metric neither model can be measured on (e.g. no observed labels)."""
    nan = float("nan")
    return MetricRow(metric, nan, nan, nan, nan, nan, higher_is_better)


# --------------------------------------------------------------------------------------
# Ranker metrics under a user-level bootstrap
# --------------------------------------------------------------------------------------


def user_counts(user_ids: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row → user index (N,), (B, U) multiplicities of users in each resample)."""
    clusters = Clusters.build(len(user_ids), user_ids, n_boot, seed)
    return clusters.index, clusters.counts


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, user_index: np.ndarray,
                  counts: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(B,) AUC (ties count half) of every resample, rows weighted by their user's
    multiplicity; computed on tie groups of the sorted scores with sparse (U, G) counts.
    All NaN when a score is not finite."""
    import scipy.sparse as sp

    if not np.isfinite(scores).all():  # as ``metrics.grouped_auc``: NaN is not a ranking
        return np.full(counts.shape[0], np.nan)
    order = np.argsort(scores, kind="stable")
    s, y, u = scores[order], labels[order] > 0.5, user_index[order]
    tie = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])])  # (N,) tie-group id
    n_users, n_groups = counts.shape[1], int(tie[-1]) + 1
    pos = sp.csr_matrix((y.astype(float), (u, tie)), shape=(n_users, n_groups))
    neg = sp.csr_matrix(((~y).astype(float), (u, tie)), shape=(n_users, n_groups))
    out = np.empty(counts.shape[0])
    for start in range(0, counts.shape[0], chunk):
        c = counts[start:start + chunk]
        p = np.asarray((pos.T @ c.T).T)  # (b, G)
        q = np.asarray((neg.T @ c.T).T)  # (b, G)
        below = np.cumsum(q, axis=1) - q
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + chunk] = ((p * (below + 0.5 * q)).sum(axis=1)
                                        / (p.sum(axis=1) * q.sum(axis=1)))
    return out


def binary_task_replicates(labels: np.ndarray, scores: np.ndarray, user_index: np.ndarray,
                           counts: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Full-sample value and (B,) replicates of auc, gauc and logloss for one model."""
    n_users = counts.shape[1]
    p = np.clip(scores, EPS, 1 - EPS)
    loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    loss_sum = np.bincount(user_index, weights=loss, minlength=n_users)
    rows = np.bincount(user_index, minlength=n_users).astype(float)
    per_user_auc, _ = grouped_auc(labels, scores, user_index)
    per_user = np.full(n_users, np.nan)
    present = np.unique(user_index)
    per_user[present] = per_user_auc  # grouped_auc orders groups by sorted id
    valid = np.isfinite(per_user)
    gauc_num = np.where(valid, per_user * rows, 0.0)
    gauc_den = np.where(valid, rows, 0.0)
    ones = np.ones((1, n_users))
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = {
            "auc": bootstrap_auc(labels, scores, user_index, np.vstack([ones, counts])),
            "gauc": (np.vstack([ones, counts]) @ gauc_num) / (np.vstack([ones, counts])
                                                               @ gauc_den),
            "logloss": (np.vstack([ones, counts]) @ loss_sum) / (np.vstack([ones, counts])
                                                                 @ rows),
        }
    return {name: (float(values[0]), values[1:]) for name, values in reps.items()}


def ranker_metric_table(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray,
                        user_ids: np.ndarray, tasks: Sequence[TaskSpec], n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95, info: dict | None = None,
                        ) -> MetricTable:
    """Per-task AUC / GAUC / logloss (binary) and rmse_log (regression) of both models on
    the same rows, with paired user-bootstrap intervals of the differences.

    labels (N, K) with NaN where unobserved (regression labels are log1p seconds);
    champion / challenger (N, K) predictions (probabilities, predicted seconds);
    user_ids (N,). A task without observed labels gets rows of NaN (its guards skip); a
    model with a NaN or infinite prediction on a task's rows gets NaN there (its guards
    fail when the other model is measurable)."""
    rows: list[MetricRow] = []
    for k, task in enumerate(tasks):
        observed = np.isfinite(labels[:, k])
        if not observed.any():  # NaN rows: its guards skip (not measurable), not fail
            names = BINARY_METRICS if task.kind == "binary" else (("rmse_log", False),)
            rows += [unmeasured_row(f"{task.name}/{name}", higher) for name, higher in names]
            continue
        y = labels[observed, k].astype(np.float64)
        user_index, counts = user_counts(np.asarray(user_ids)[observed], n_boot, seed)
        if task.kind == "binary":
            a = binary_task_replicates(y, champion[observed, k].astype(np.float64),
                                       user_index, counts)
            b = binary_task_replicates(y, challenger[observed, k].astype(np.float64),
                                       user_index, counts)
            for name, higher in BINARY_METRICS:
                rows.append(metric_row(f"{task.name}/{name}", a[name][0], b[name][0],
                                       a[name][1], b[name][1], level, higher))
        else:
            n_users = counts.shape[1]
            rows_per_user = np.bincount(user_index, minlength=n_users).astype(float)
            values = []
            for pred in (champion, challenger):
                err = np.log1p(np.maximum(pred[observed, k], 0.0)) - y
                sse = np.bincount(user_index, weights=err * err, minlength=n_users)
                full = math.sqrt(sse.sum() / rows_per_user.sum())
                with np.errstate(divide="ignore", invalid="ignore"):
                    reps = np.sqrt((counts @ sse) / (counts @ rows_per_user))
                values.append((full, reps))
            rows.append(metric_row(f"{task.name}/rmse_log", values[0][0], values[1][0],
                                   values[0][1], values[1][1], level, False))
    return MetricTable(rows=tuple(rows), level=level, n_boot=n_boot, unit="user",
                       info=info or {})


# --------------------------------------------------------------------------------------
# Allocators: off-policy value (and true value) of two target policies on the same logs
# --------------------------------------------------------------------------------------


def policy_value_table(data: BanditData, champion_dist: np.ndarray,
                       challenger_dist: np.ndarray, q_hat: np.ndarray | None = None,
                       estimators: Sequence[str] = ("snipw", "dr", "default"),
                       config: OPEConfig | None = None,
                       true_values: tuple[float, float] | None = None,
                       info: dict | None = None) -> MetricTable:
    """Rows ``value/<estimator>`` comparing two policies' off-policy values on the same
    logged decisions; both estimates use the same cluster resamples, so the interval of the
    difference is paired. ``true_values`` (champion, challenger), e.g. from simulator
    rollouts, adds a ``value/true`` row without interval."""
    config = config or OPEConfig()
    a = estimate_bandit(data, champion_dist, q_hat, config, warn=False)
    b = estimate_bandit(data, challenger_dist, q_hat, config, warn=False)
    rows = []
    for name in estimators:
        if name not in a.estimates:
            continue
        rows.append(metric_row(f"value/{name}", a.estimates[name].value,
                               b.estimates[name].value, a.replicates[name],
                               b.replicates[name], config.level, True))
    if true_values is not None:
        champion, challenger = true_values
        rows.append(MetricRow("value/true", champion, challenger, challenger - champion,
                              float("nan"), float("nan"), True))
    meta = {"champion_ess": a.weights.ess, "challenger_ess": b.weights.ess,
            "warnings": [*a.weights.warnings, *b.weights.warnings], **(info or {})}
    unit = "decision" if data.groups is None else "cluster"
    return MetricTable(rows=tuple(rows), level=config.level, n_boot=config.n_boot, unit=unit,
                       info=meta)


# --------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------

Rule = Literal["interval", "point"]


@dataclass(frozen=True)
class Guard:
    """A metric that may not get worse than ``tolerance`` (in the metric's own units)."""

    metric: str
    tolerance: float = 0.0


@dataclass(frozen=True)
class Limit:
    """An absolute bound on the challenger's own value of a metric (a platform constraint,
    e.g. the live share cap), whatever the champion does."""

    metric: str
    max_value: float


@dataclass(frozen=True)
class GateConfig:
    """When a challenger replaces the champion. Metric names are rows of the table."""

    primary: str = "click/gauc"
    """The metric that must improve."""
    min_improvement: float = 0.0
    """The improvement (metric units, sign-adjusted) the primary must exceed."""
    primary_rule: Rule = "interval"
    """interval: the whole interval of the difference must exceed min_improvement (a
    significant gain); point: the point estimate must."""
    guards: tuple[Guard, ...] = (
        Guard("click/auc", 0.005),
        Guard("click/logloss", 0.005),
        Guard("long_view/gauc", 0.01),
        Guard("like/gauc", 0.02),
    )
    """Metrics that may not degrade beyond their tolerance."""
    guard_rule: Rule = "point"
    """point: the point estimate may not degrade beyond the tolerance; interval: the whole
    interval must stay within it (non-inferiority, much stricter on small logs)."""
    limits: tuple[Limit, ...] = ()
    """Upper bounds on the challenger's value (a missing metric fails its limit)."""

    def __post_init__(self) -> None:
        for rule in (self.primary_rule, self.guard_rule):
            if rule not in ("interval", "point"):
                raise ValueError(f"gate rules are 'interval' or 'point', got {rule!r}")
        for guard in self.guards:
            if guard.tolerance < 0:
                raise ValueError(f"guard {guard.metric}: tolerance must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GateConfig:
        values = dict(data)
        unknown = set(values) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown gate fields: {sorted(unknown)}")
        if "guards" in values:
            values["guards"] = tuple(Guard(**g) if isinstance(g, dict) else Guard(*g)
                                     for g in values["guards"])
        if "limits" in values:
            values["limits"] = tuple(Limit(**g) if isinstance(g, dict) else Limit(*g)
                                     for g in values["limits"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path | str) -> GateConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}: not a gate config ({error})") from error


@dataclass(frozen=True)
class GateResult:
    gate: str
    """``primary``, ``guard`` or ``limit``."""
    metric: str
    passed: bool
    reason: str
    skipped: bool = False
    """A guard that could not compare (the champion is not measurable on these logs)."""


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why."""

    promote: bool
    status: str
    """promote | keep-champion | same-version."""
    gates: tuple[GateResult, ...] = ()
    summary: str = ""

    def to_dict(self) -> dict:
        return {"promote": self.promote, "status": self.status, "summary": self.summary,
                "gates": [asdict(g) for g in self.gates]}


SAME_VERSION = "same-version"


def same_version_decision(version: int | str) -> Decision:
    return Decision(False, SAME_VERSION, (), f"challenger and champion are the same version "
                    f"(v{version}): nothing to compare, nothing to do")


def evaluate_gates(table: MetricTable, config: GateConfig) -> Decision:
    """Apply the gates to the table: promote iff the primary improves and no guard fails."""
    results = [primary_gate(table, config),
               *(guard_gate(table, g, config.guard_rule) for g in config.guards),
               *(limit_gate(table, limit) for limit in config.limits)]
    promote = all(r.passed for r in results)
    failed = [r for r in results if not r.passed]
    if promote:
        skipped = sum(r.skipped for r in results)
        held = len(config.guards) - skipped
        summary = (f"promote: {results[0].reason}; {held} of {len(config.guards)} guards and "
                   f"all {len(config.limits)} limits hold"
                   + (f", {skipped} guard(s) skipped: not measurable" if skipped else ""))
    else:
        summary = "keep the champion: " + "; ".join(r.reason for r in failed)
    return Decision(promote, "promote" if promote else "keep-champion", tuple(results), summary)


def primary_gate(table: MetricTable, config: GateConfig) -> GateResult:
    row = table.get(config.primary)
    if row is None:
        return GateResult("primary", config.primary, False,
                          f"primary metric {config.primary} is not in the comparison table")
    low, _ = row.improvement_interval
    measured = low if config.primary_rule == "interval" else row.improvement
    if not math.isfinite(measured):
        return GateResult("primary", row.metric, False,
                          f"{row.metric} could not be measured on these logs")
    what = ("the interval's lower end" if config.primary_rule == "interval"
            else "the point estimate")
    if measured > config.min_improvement:
        return GateResult("primary", row.metric, True,
                          f"{row.metric} improves by {row.improvement:+.4f} ({what} "
                          f"{measured:+.4f} > {config.min_improvement:g})")
    return GateResult("primary", row.metric, False,
                      f"{row.metric} does not improve enough: {row.improvement:+.4f}, "
                      f"{what} {measured:+.4f} <= {config.min_improvement:g}")


def guard_gate(table: MetricTable, guard: Guard, rule: Rule) -> GateResult:
    row = table.get(guard.metric)
    if row is None:
        return GateResult("guard", guard.metric, False,
                          f"guard metric {guard.metric} is not in the comparison table")
    if math.isfinite(row.champion) and not math.isfinite(row.challenger):
        return GateResult("guard", row.metric, False,  # the challenger broke it: fail closed
                          f"{row.metric}: the challenger's value is {row.challenger} where the "
                          f"champion's is {row.champion:.4f}")
    low, _ = row.improvement_interval
    use_interval = rule == "interval" and math.isfinite(low)  # else the point estimate
    measured = low if use_interval else row.improvement
    if not math.isfinite(measured):  # the champion is not measurable here (e.g. no positives)
        return GateResult("guard", row.metric, True,
                          f"{row.metric} is not measurable on these logs (skipped)",
                          skipped=True)
    if measured >= -guard.tolerance:
        return GateResult("guard", row.metric, True,
                          f"{row.metric} {row.improvement:+.4f} within tolerance "
                          f"{guard.tolerance:g}")
    what = "interval's worst end" if use_interval else "point estimate"
    return GateResult("guard", row.metric, False,
                      f"{row.metric} degrades beyond tolerance {guard.tolerance:g} "
                      f"({what} {measured:+.4f})")


def limit_gate(table: MetricTable, limit: Limit) -> GateResult:
    row = table.get(limit.metric)
    if row is None or not math.isfinite(row.challenger):
        return GateResult("limit", limit.metric, False,
                          f"limit metric {limit.metric} is not measured in the comparison")
    if row.challenger <= limit.max_value:
        return GateResult("limit", row.metric, True,
                          f"{row.metric} {row.challenger:.4f} <= {limit.max_value:g}")
    return GateResult("limit", row.metric, False,
                      f"{row.metric} {row.challenger:.4f} exceeds its limit {limit.max_value:g}")


def decision_markdown(title: str, table: MetricTable | None, decision: Decision,
                      run_id: str | None = None) -> str:
    """A short report (Prefect artifact, MLflow text): decision, reasons, the table."""
    lines = [f"# {title}", "", f"**Decision: {decision.status}** — {decision.summary}", ""]
    if run_id:
        lines += [f"MLflow evaluation run `{run_id}`", ""]
    if decision.gates:
        lines += ["| gate | metric | passed | why |", "|---|---|---|---|"]
        lines += [f"| {g.gate} | {g.metric} | {'yes' if g.passed else 'no'} | {g.reason} |"
                  for g in decision.gates]
        lines.append("")
    if table is not None and table.rows:
        lines += [f"Paired bootstrap over {table.unit}s, {table.n_boot} resamples:", "",
                  table.to_markdown()]
    return "\n".join(lines)
