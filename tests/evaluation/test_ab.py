"""Offline A/B: paired user-bootstrap metric tables, gate logic on crafted tables, and the
allocator value table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.ab import (
    GateConfig,
    Guard,
    Limit,
    MetricRow,
    MetricTable,
    bootstrap_auc,
    evaluate_gates,
    policy_value_table,
    ranker_metric_table,
    same_version_decision,
    user_counts,
)
from evaluation.metrics import auc, gauc, logloss
from evaluation.ope import BanditData, OPEConfig
from features.schema import TaskSpec

TASKS = (TaskSpec("click", "binary", "click"), TaskSpec("watch_time", "regression",
                                                          "watch_time_s"))


def row(metric: str, diff: float, low: float, high: float, higher: bool = True) -> MetricRow:
    return MetricRow(metric, 0.5, 0.5 + diff, diff, low, high, higher)


def test_bootstrap_auc_weights_rows_by_user_multiplicity():
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 30, n)
    labels = (rng.random(n) < 0.4).astype(float)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # ties on purpose
    index, counts = user_counts(users, n_boot=5, seed=1)
    values = bootstrap_auc(labels, scores, index, np.vstack([np.ones((1, 30)), counts]))
    assert values[0] == pytest.approx(auc(labels, scores))
    for b in range(5):  # a resample equals the AUC of the explicitly replicated rows
        rows = np.concatenate([np.tile(np.flatnonzero(index == u), int(c))
                               for u, c in enumerate(counts[b])])
        assert values[b + 1] == pytest.approx(auc(labels[rows], scores[rows]))


def ranking_data(n_users: int = 80, per_user: int = 25, seed: int = 2):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    signal = rng.normal(size=users.size)
    click = (rng.random(users.size) < 1 / (1 + np.exp(-2 * signal))).astype(float)
    watch = np.where(click == 1, np.log1p(rng.exponential(20, users.size)), np.nan)
    labels = np.stack([click, watch], axis=1)
    return rng, users, signal, labels


def test_identical_models_have_zero_difference():
    rng, users, signal, labels = ranking_data()
    pred = np.stack([1 / (1 + np.exp(-signal)), np.full(signal.size, 20.0)], axis=1)
    table = ranker_metric_table(labels, pred, pred.copy(), users, TASKS, n_boot=100)
    assert table.metrics == ["click/auc", "click/gauc", "click/logloss", "watch_time/rmse_log"]
    for r in table.rows:
        assert r.diff == 0 and r.ci_low == 0 and r.ci_high == 0
    click = table.get("click/auc")
    assert click.champion == pytest.approx(auc(labels[:, 0], pred[:, 0]))
    assert table.get("click/gauc").champion == pytest.approx(gauc(labels[:, 0], pred[:, 0],
                                                                  users))
    assert table.get("click/logloss").champion == pytest.approx(logloss(labels[:, 0],
                                                                        pred[:, 0]))


def test_a_better_challenger_shows_a_significant_paired_improvement():
    rng, users, signal, labels = ranking_data()
    noisy = signal + rng.normal(scale=2.0, size=signal.size)
    champion = np.stack([1 / (1 + np.exp(-noisy)), np.full(signal.size, 5.0)], axis=1)
    challenger = np.stack([1 / (1 + np.exp(-2 * signal)), np.full(signal.size, 20.0)], axis=1)
    table = ranker_metric_table(labels, champion, challenger, users, TASKS, n_boot=300)
    for name in ("click/auc", "click/gauc"):
        r = table.get(name)
        assert r.improvement > 0 and r.ci_low > 0 and r.p_better > 0.97, name
    ll = table.get("click/logloss")
    assert not ll.higher_is_better and ll.improvement > 0 and ll.ci_high < 0
    assert table.unit == "user" and table.n_boot == 300
    assert "click/gauc" in table.to_markdown()


def test_nan_predictions_on_a_guarded_task_never_pass_the_default_gates():
    rng, users, signal, labels = ranking_data()
    tasks = (TaskSpec("click", "binary", "click"), TaskSpec("like", "binary", "like"),
             TaskSpec("long_view", "binary", "long_view"))
    labels = np.stack([labels[:, 0]] * 3, axis=1)
    champion = np.stack([1 / (1 + np.exp(-signal + rng.normal(scale=2.0, size=signal.size)))]
                        * 3, axis=1)
    challenger = np.stack([1 / (1 + np.exp(-2 * signal))] * 3, axis=1)  # better everywhere
    assert evaluate_gates(ranker_metric_table(labels, champion, challenger, users, tasks,
                                              n_boot=100), GateConfig()).promote
    challenger[rng.random(signal.size) < 0.3, 1] = np.nan  # the like head breaks
    table = ranker_metric_table(labels, champion, challenger, users, tasks, n_boot=100)
    assert all(math.isnan(table.get(f"like/{m}").challenger) for m in ("auc", "gauc"))
    decision = evaluate_gates(table, GateConfig())
    assert not decision.promote
    assert [g.metric for g in decision.gates if not g.passed] == ["like/gauc"]


def test_a_task_without_labels_skips_its_guards_and_the_summary_says_so():
    rng, users, signal, labels = ranking_data()
    tasks = (TaskSpec("click", "binary", "click"), TaskSpec("like", "binary", "like"))
    labels = np.stack([labels[:, 0], np.full(signal.size, np.nan)], axis=1)  # like unobserved
    champion = np.stack([1 / (1 + np.exp(-signal + rng.normal(scale=2.0, size=signal.size)))]
                        * 2, axis=1)
    challenger = np.stack([1 / (1 + np.exp(-2 * signal))] * 2, axis=1)
    table = ranker_metric_table(labels, champion, challenger, users, tasks, n_boot=100)
    assert table.metrics == ["click/auc", "click/gauc", "click/logloss", "like/auc",
                             "like/gauc", "like/logloss"]
    gates = GateConfig(primary="click/gauc", guards=(Guard("like/gauc", 0.01),))
    decision = evaluate_gates(table, gates)
    assert decision.promote and decision.gates[1].skipped
    assert "0 of 1 guards" in decision.summary and "1 guard(s) skipped" in decision.summary


def test_gate_primary_must_improve_by_its_interval():
    gates = GateConfig(primary="click/gauc", guards=())
    passing = MetricTable((row("click/gauc", 0.02, 0.005, 0.035),))
    assert evaluate_gates(passing, gates).promote
    straddling = MetricTable((row("click/gauc", 0.02, -0.004, 0.04),))
    decision = evaluate_gates(straddling, gates)
    assert not decision.promote and decision.status == "keep-champion"
    assert "does not improve enough" in decision.summary
    point = GateConfig(primary="click/gauc", guards=(), primary_rule="point")
    assert evaluate_gates(straddling, point).promote
    margin = GateConfig(primary="click/gauc", guards=(), min_improvement=0.01)
    assert not evaluate_gates(passing, margin).promote  # lower end 0.005 < 0.01


def test_gate_lower_is_better_primary_is_sign_adjusted():
    gates = GateConfig(primary="click/logloss", guards=())
    better = MetricTable((row("click/logloss", -0.03, -0.05, -0.01, higher=False),))
    worse = MetricTable((row("click/logloss", 0.03, 0.01, 0.05, higher=False),))
    assert evaluate_gates(better, gates).promote
    assert not evaluate_gates(worse, gates).promote


def test_guards_block_degradation_beyond_tolerance():
    gates = GateConfig(primary="click/gauc", guards=(Guard("click/logloss", 0.01),
                                                     Guard("like/auc", 0.005)))
    base = row("click/gauc", 0.02, 0.01, 0.03)
    ok = MetricTable((base, row("click/logloss", 0.005, -0.01, 0.02, higher=False),
                      row("like/auc", -0.004, -0.02, 0.01)))
    decision = evaluate_gates(ok, gates)
    assert decision.promote and decision.status == "promote"
    bad = MetricTable((base, row("click/logloss", 0.02, 0.0, 0.04, higher=False),
                       row("like/auc", -0.004, -0.02, 0.01)))
    decision = evaluate_gates(bad, gates)
    assert not decision.promote
    assert [g.metric for g in decision.gates if not g.passed] == ["click/logloss"]
    strict = GateConfig(primary="click/gauc", guards=gates.guards, guard_rule="interval")
    assert not evaluate_gates(ok, strict).promote  # like/auc could be down by 0.02


def test_limits_bound_the_challengers_own_value():
    gates = GateConfig(primary="value/dr", guards=(), limits=(Limit("live_share", 0.3),))
    gain = row("value/dr", 5.0, 1.0, 9.0)
    under = MetricTable((gain, MetricRow("live_share", 0.1, 0.29, 0.19, 0.1, 0.2, False)))
    decision = evaluate_gates(under, gates)
    assert decision.promote and "1 limits hold" in decision.summary
    over = MetricTable((gain, MetricRow("live_share", 0.35, 0.31, -0.04, -0.05, -0.03, False)))
    decision = evaluate_gates(over, gates)  # better than the champion, still over the cap
    assert not decision.promote and "exceeds its limit 0.3" in decision.summary
    missing = evaluate_gates(MetricTable((gain,)), gates)
    assert not missing.promote and "not measured" in missing.summary
    assert GateConfig.from_dict(gates.to_dict()) == gates


def test_missing_and_unmeasurable_metrics():
    gates = GateConfig(primary="click/gauc", guards=(Guard("follow/auc", 0.01),))
    nan_guard = MetricTable((row("click/gauc", 0.02, 0.01, 0.03),
                             MetricRow("follow/auc", math.nan, math.nan, math.nan, math.nan,
                                       math.nan)))
    decision = evaluate_gates(nan_guard, gates)  # neither model measurable: the guard skips
    assert decision.promote and "not measurable" in decision.gates[1].reason
    broken_champion = MetricTable((row("click/gauc", 0.02, 0.01, 0.03),
                                   MetricRow("follow/auc", math.nan, 0.7, math.nan, math.nan,
                                             math.nan)))
    decision = evaluate_gates(broken_champion, gates)  # nothing to compare with: skipped
    assert decision.promote and decision.gates[1].skipped and "skipped" in decision.summary
    broken = MetricTable((row("click/gauc", 0.02, 0.01, 0.03),  # NaN predictions, say
                          MetricRow("follow/auc", 0.70, math.nan, math.nan, math.nan, math.nan)))
    decision = evaluate_gates(broken, gates)
    assert not decision.promote and "challenger's value is nan" in decision.gates[1].reason
    no_primary = MetricTable((row("click/auc", 0.02, 0.01, 0.03),))
    decision = evaluate_gates(no_primary, gates)
    assert not decision.promote and "not in the comparison table" in decision.summary
    same = same_version_decision(3)
    assert same.status == "same-version" and not same.promote and "v3" in same.summary


def test_gate_config_round_trips_and_rejects_unknown_fields(tmp_path):
    gates = GateConfig(primary="value/dr", guards=(Guard("value/true", 0.0),),
                       primary_rule="point")
    path = tmp_path / "gates.json"
    path.write_text(json.dumps(gates.to_dict()))
    assert GateConfig.from_json(path) == gates
    with pytest.raises(ValueError, match="unknown gate fields"):
        GateConfig.from_dict({"primry": "x"})
    with pytest.raises(ValueError, match="rules"):
        GateConfig(primary_rule="maybe")
    table = MetricTable((row("a", 0.1, 0.0, 0.2),), n_boot=10)
    assert MetricTable.from_dict(table.to_dict()) == table


def test_allocator_tables_go_through_the_same_gates():
    rng = np.random.default_rng(3)
    n = 4000
    p_log = np.full(n, 0.3)
    action = (rng.random(n) < p_log).astype(int)
    reward = np.where(action == 1, rng.exponential(10.0, n), rng.exponential(2.0, n))
    data = BanditData(reward, action, np.where(action == 1, p_log, 1 - p_log),
                      groups=np.arange(n) // 4)
    champion = np.tile([0.9, 0.1], (n, 1))
    challenger = np.tile([0.2, 0.8], (n, 1))  # inserting pays: 10 vs 2
    same = policy_value_table(data, champion, champion, config=OPEConfig(n_boot=200),
                              estimators=("snipw", "ipw"))
    assert all(r.diff == 0 and r.ci_low == 0 for r in same.rows)
    table = policy_value_table(data, champion, challenger, config=OPEConfig(n_boot=200),
                               estimators=("snipw", "ipw"), true_values=(2.8, 8.4))
    assert table.metrics == ["value/snipw", "value/ipw", "value/true"]
    assert table.get("value/snipw").ci_low > 0
    gates = GateConfig(primary="value/snipw", guards=(Guard("value/true", 0.0),))
    assert evaluate_gates(table, gates).promote
