"""Offline A/B of two live-stream allocation policies on the same held-out allocation log.

The comparison is the ``evaluation.ab.MetricTable`` the gates read, with rows

- ``session_watch/{pdis,dr,fqe}``: off-policy estimates of the watch seconds per session
  (summed over the logged decisions of a session) under each policy, with the paired
  cluster-bootstrap interval of the difference: both policies are estimated on the same
  resamples of users (a user's sessions share tastes and fatigue, so the user is the unit);
  FQE's linear Q model is refitted in every resample, so its interval carries the model's
  uncertainty;
- ``live_share``: the mean P(insert) of each policy over the logged states (the platform's
  cap applies to it; lower is better), on the same resamples;
- ``true/<metric>`` (only when the log came from the simulator): each policy's true
  on-policy value from rollouts on the held-out world (no interval: it is the truth up to
  the rollout's own noise, shown next to the estimates so a reader sees whether OPE agrees).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from evaluation.ab import GateConfig, Limit, MetricRow, MetricTable, metric_row
from evaluation.allocation_ope import action_dist, session_data, state_features
from evaluation.ope import Clusters, OPEConfig, Terms, estimate_sessions, lstdq_model
from simulation.allocation import AllocationPolicy

SESSION_ESTIMATORS: tuple[str, ...] = ("pdis", "dr", "fqe")
TRUE_METRICS: dict[str, bool] = {"session_watch_time": True, "retention": True,
                                 "watch_time_per_user": True, "live_share": False}
"""Simulator summary fields reported as ``true/<name>`` rows, and whether higher is better."""


def allocator_gates(live_share_cap: float) -> GateConfig:
    """Default allocator gates: the doubly robust session watch time must improve (whole
    interval above 0), and the challenger's share on the logged states may not exceed the
    platform cap."""
    return GateConfig(primary="session_watch/dr", primary_rule="interval", guards=(),
                      limits=(Limit("live_share", live_share_cap),))


def allocator_metric_table(frame: pl.DataFrame, champion: AllocationPolicy,
                           challenger: AllocationPolicy, config: OPEConfig | None = None,
                           true_values: dict[str, dict[str, float]] | None = None,
                           info: dict | None = None) -> MetricTable:
    """Compare two policies on a validated allocation log (``read_allocation_log``).

    Args:
        frame: logged decisions (state, action, propensity, outcomes), any row order.
        champion, challenger: callables from an ``AllocationState`` to P(insert) (B,).
        true_values: {"champion": summary, "challenger": summary} of simulator rollouts.
    """
    config = config or OPEConfig()
    frame = frame.sort("session_id", "request_index")
    reward = (frame["video_watch_time_s"] + frame["live_watch_time_s"]).to_numpy()
    users = frame["user_id"].to_numpy()
    data = session_data(frame, reward, groups=users)
    states = state_features(frame)
    results, shares = {}, {}
    clusters = Clusters.build(data.n, users, config.n_boot, config.seed)
    for role, policy in (("champion", champion), ("challenger", challenger)):
        dist = action_dist(policy, frame)  # (n, 2)
        model = lstdq_model(states, data, dist, seed=config.seed)
        results[role] = estimate_sessions(data, dist, model(None), config, warn=False,
                                          refit=model)
        share = Terms.mean(dist[:, 1])
        shares[role] = (share.value(), clusters.replicates(share))
    a, b = results["champion"], results["challenger"]
    rows = [metric_row(f"session_watch/{name}", a.estimates[name].value,
                       b.estimates[name].value, a.replicates[name], b.replicates[name],
                       config.level, True)
            for name in SESSION_ESTIMATORS]
    rows.append(metric_row("live_share", shares["champion"][0], shares["challenger"][0],
                           shares["champion"][1], shares["challenger"][1], config.level, False))
    for name, higher in TRUE_METRICS.items():
        if true_values is not None:
            old, new = true_values["champion"][name], true_values["challenger"][name]
            rows.append(MetricRow(f"true/{name}", old, new, new - old, float("nan"),
                                  float("nan"), higher))
    meta = {"decisions": data.n, "sessions": data.n_episodes,
            "users": int(len(np.unique(users))),
            "champion_ess": a.weights.ess, "challenger_ess": b.weights.ess,
            "warnings": [*a.weights.warnings, *b.weights.warnings], **(info or {})}
    return MetricTable(rows=tuple(rows), level=config.level, n_boot=config.n_boot,
                       unit="user", info=meta)
