"""Off-policy estimators on closed-form cases, interval coverage on repeated synthetic
draws, weight diagnostics, reward-model helpers and session estimators."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from evaluation.ope import (
    BanditData,
    Clusters,
    OPEConfig,
    OPEWarning,
    SessionData,
    cross_fit,
    cross_fitted_lstdq,
    cross_fitted_q,
    dr_terms,
    dros_terms,
    estimate_bandit,
    estimate_sessions,
    fit_logistic,
    kish_ess,
    lstdq_model,
    ncis_terms,
    simplex_min_quadratic,
    snipw_terms,
    switch_dr_terms,
    weight_diagnostics,
)

FAST = OPEConfig(n_boot=200, seed=0)


def balanced_uniform_log(n_actions: int = 4, per_action: int = 50):
    """Uniform logging with every action exactly equally often; deterministic rewards
    r(a) = a + 1 (so every estimator has a closed-form value)."""
    action = np.repeat(np.arange(n_actions), per_action)
    reward = (action + 1).astype(float)
    pscore = np.full(action.size, 1.0 / n_actions)
    return BanditData(reward=reward, action=action, pscore=pscore), n_actions


def test_deterministic_target_under_uniform_logging_is_exact():
    data, k = balanced_uniform_log()
    target = np.zeros((data.n, k))
    target[:, 2] = 1.0  # always action 2: true value r(2) = 3
    exact_q = np.tile(np.arange(1.0, k + 1), (data.n, 1))
    result = estimate_bandit(data, target, exact_q, FAST, warn=False)
    for name in ("ipw", "snipw", "ncis", "dm", "dr", "sndr", "switch_dr", "dros", "default"):
        assert result.estimates[name].value == pytest.approx(3.0), name
    wrong_q = exact_q + 0.7  # DR and SNDR stay exact with a wrong model here
    wrong = estimate_bandit(data, target, wrong_q, FAST, warn=False)
    assert wrong.estimates["dm"].value == pytest.approx(3.7)
    assert wrong.estimates["dr"].value == pytest.approx(3.0)
    assert wrong.estimates["sndr"].value == pytest.approx(3.0)
    assert result.estimates["ipw"].ess == pytest.approx(data.n / k)  # only a=2 rows count


def test_uniform_target_under_uniform_logging_is_the_sample_mean():
    rng = np.random.default_rng(1)
    n, k = 500, 5
    action = rng.integers(0, k, n)
    reward = rng.random(n) + action
    data = BanditData(reward, action, np.full(n, 1.0 / k))
    target = np.full((n, k), 1.0 / k)
    result = estimate_bandit(data, target, config=FAST, warn=False)
    for name in ("ipw", "snipw", "ncis", "default"):
        assert result.estimates[name].value == pytest.approx(reward.mean()), name
    assert result.estimates["ipw"].ess == pytest.approx(n)
    e = result.estimates["ipw"]
    assert e.ci_low < reward.mean() < e.ci_high
    assert e.std_error == pytest.approx(reward.std(ddof=1) / math.sqrt(n), rel=0.2)


def test_hyperparameter_endpoints_reduce_to_named_estimators():
    rng = np.random.default_rng(2)
    n = 300
    r, w = rng.random(n), rng.exponential(1.0, n)
    q, qp = rng.random(n), rng.random(n)
    dr = dr_terms(r, w, q, qp).value()
    assert switch_dr_terms(r, w, q, qp, math.inf).value() == pytest.approx(dr)
    assert switch_dr_terms(r, w, q, qp, 0.0).value() == pytest.approx(qp.mean())
    assert dros_terms(r, w, q, qp, math.inf).value() == pytest.approx(dr)
    assert dros_terms(r, w, q, qp, 1e-12).value() == pytest.approx(qp.mean(), abs=1e-6)
    assert ncis_terms(r, w, math.inf).value() == pytest.approx(snipw_terms(r, w).value())
    capped = ncis_terms(r, w, 0.5).value()
    wc = np.minimum(w, 0.5)
    assert capped == pytest.approx(np.sum(wc * r) / np.sum(wc))


def test_ipw_clipping_caps_the_weights():
    data, k = balanced_uniform_log()
    target = np.zeros((data.n, k))
    target[:, 0] = 1.0  # w = 4 on a=0 rows
    clipped = estimate_bandit(data, target, config=OPEConfig(n_boot=50, ipw_clip=2.0),
                              warn=False)
    assert clipped.estimates["ipw"].value == pytest.approx(0.5 * 1.0)  # clip halves it
    assert clipped.estimates["ipw"].params == {"clip": 2.0}


def test_effective_sample_size_and_extreme_weight_warning():
    assert kish_ess(np.ones(10)) == pytest.approx(10)
    assert kish_ess(np.array([0, 0, 5.0])) == pytest.approx(1)
    calm = weight_diagnostics(np.ones(1000))
    assert calm.warnings == ()
    spiky = np.full(1000, 0.5)
    spiky[0] = 500.0
    diag = weight_diagnostics(spiky)
    assert any("extreme importance weights" in m for m in diag.warnings)
    n = 1000
    action = np.zeros(n, dtype=int)
    action[0] = 1
    pscore = np.where(action == 1, 0.001, 0.999)
    data = BanditData(np.ones(n), action, pscore)
    target = np.tile([0.5, 0.5], (n, 1))
    with pytest.warns(OPEWarning, match="extreme importance weights"):
        estimate_bandit(data, target, config=OPEConfig(n_boot=50))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="pscore"):
        BanditData(np.ones(3), np.zeros(3, int), np.array([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="rows"):
        BanditData(np.ones(3), np.zeros(2, int), np.ones(3))
    data = BanditData(np.ones(3), np.zeros(3, int), np.ones(3))
    with pytest.raises(ValueError, match="probability"):
        estimate_bandit(data, np.full((3, 2), 0.7), config=FAST)
    with pytest.raises(ValueError, match="contiguous"):
        SessionData(np.array([1, 2, 1]), np.ones(3), np.zeros(3, int), np.ones(3))


def synthetic_bandit(n: int, rng: np.random.Generator, k: int = 3):
    """Contexts x ~ N(0, 1); logging softmax(x * b); Bernoulli rewards with mean
    sigmoid(x * c_a + d_a); returns data, target dist, true (n, k) means and the truth."""
    x = rng.normal(size=n)
    b, c, d = np.array([0.0, 0.5, -0.5]), np.array([0.8, -0.4, 0.2]), np.array([-1, 0, -.5])
    logits = x[:, None] * b[None, :]
    mu = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    action = (rng.random(n)[:, None] > np.cumsum(mu, axis=1)).sum(axis=1)
    means = 1 / (1 + np.exp(-(x[:, None] * c[None, :] + d[None, :])))
    reward = (rng.random(n) < means[np.arange(n), action]).astype(float)
    t_logits = x[:, None] * np.array([1.0, 0.0, -1.0])[None, :]
    target = np.exp(t_logits) / np.exp(t_logits).sum(axis=1, keepdims=True)
    data = BanditData(reward, action, mu[np.arange(n), action])
    return data, target, means


def coverage_of(draws: int, n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Per estimator: the share of draws whose interval holds the truth, and the mean
    interval width over the width the estimates' own spread across draws asks for
    (2 * 1.96 * their standard deviation): about 1 for honest intervals, >> 1 for ones
    that cover by being wide."""
    rng = np.random.default_rng(seed)
    # population truth: sigmoid means averaged over a huge context sample
    _, target_big, means_big = synthetic_bandit(400_000, np.random.default_rng(99))
    truth = float(np.sum(target_big * means_big, axis=1).mean())
    hits: dict[str, int] = {}
    values: dict[str, list[float]] = {}
    widths: dict[str, list[float]] = {}
    for i in range(draws):
        data, target, means = synthetic_bandit(n, rng)
        q_hat = means + 0.05  # a biased reward model: DR must still cover
        result = estimate_bandit(data, target, q_hat, OPEConfig(n_boot=400, seed=i),
                                 warn=False)
        for name in ("ipw", "snipw", "dr", "sndr"):
            e = result.estimates[name]
            hits[name] = hits.get(name, 0) + int(e.ci_low <= truth <= e.ci_high)
            values.setdefault(name, []).append(e.value)
            widths.setdefault(name, []).append(e.ci_high - e.ci_low)
    return {name: (h / draws, np.mean(widths[name]) / (2 * 1.96 * np.std(values[name])))
            for name, h in hits.items()}


def test_intervals_cover_on_repeated_synthetic_draws():
    coverage = coverage_of(draws=60, n=3000, seed=3)
    for name, (share, width) in coverage.items():
        assert 0.85 <= share <= 1.0, (name, share)
        assert 0.7 <= width <= 1.4, (name, width)  # covering by being the right width


@pytest.mark.slow
def test_intervals_cover_about_95_percent_on_many_draws():
    coverage = coverage_of(draws=300, n=3000, seed=4)
    for name, (share, width) in coverage.items():
        assert 0.91 <= share <= 0.985, (name, share)
        assert 0.8 <= width <= 1.25, (name, width)


def test_cluster_bootstrap_resamples_whole_groups():
    groups = np.array([5, 5, 7, 7, 7, 9])
    clusters = Clusters.build(6, groups, n_boot=40, seed=0)
    assert clusters.counts.shape == (40, 3)
    assert np.all(clusters.counts.sum(axis=1) == 3)
    np.testing.assert_array_equal(clusters.size, [2, 3, 1])


def test_default_blend_weights_are_on_the_simplex():
    omega = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 4.0]])
    x = simplex_min_quadratic(omega)
    assert x.sum() == pytest.approx(1.0) and np.all(x >= 0)
    # the minimiser beats every vertex and the uniform blend
    for candidate in [np.eye(3)[i] for i in range(3)] + [np.full(3, 1 / 3)]:
        assert x @ omega @ x <= candidate @ omega @ candidate + 1e-12


def test_fit_logistic_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 6))
    y = (rng.random(400) < 1 / (1 + np.exp(-(x @ np.arange(6) * 0.3 - 1)))).astype(float)
    weights = rng.poisson(1.0, 400).astype(float)
    beta, b = fit_logistic(x, y, weights, c=0.5)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y,
                                                                         sample_weight=weights)
    np.testing.assert_allclose(beta, ref.coef_[0], atol=1e-5)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_cross_fit_never_predicts_a_row_with_a_model_that_saw_it():
    seen: list[tuple[set, set]] = []

    def fit_predict(train, test, weights):
        seen.append((set(train.tolist()), set(test.tolist())))
        return np.zeros((test.size, 1))

    groups = np.repeat(np.arange(10), 3)
    cross_fit(fit_predict, 30, n_folds=3, seed=0, groups=groups)
    assert len(seen) == 3
    for train, test in seen:
        assert not train & test
        for g in range(10):  # a group never straddles train and test
            rows = set(range(3 * g, 3 * g + 3))
            assert rows <= train or rows <= test or not rows & (train | test)


def chain_sessions(n_episodes: int, horizon: int, p_log: float, rng: np.random.Generator):
    """Fixed-length episodes; reward = action (1 = insert); state = step index."""
    episode = np.repeat(np.arange(n_episodes), horizon)
    step = np.tile(np.arange(horizon), n_episodes).astype(float)
    action = (rng.random(episode.size) < p_log).astype(int)
    pscore = np.where(action == 1, p_log, 1 - p_log)
    data = SessionData(episode, action.astype(float), action, pscore)
    return data, step[:, None]


def test_session_estimators_closed_form():
    rng = np.random.default_rng(6)
    horizon, p_target = 3, 0.8
    data, states = chain_sessions(4000, horizon, 0.5, rng)
    target = np.tile([1 - p_target, p_target], (data.n, 1))
    truth = horizon * p_target  # sum over steps of P(insert)
    q_lin = cross_fitted_lstdq(states, data, target, ridge=1e-8)
    result = estimate_sessions(data, target, q_lin, OPEConfig(n_boot=200), warn=False)
    assert result.estimates["fqe"].value == pytest.approx(truth, rel=1e-3)
    for name in ("pdis", "dr"):
        e = result.estimates[name]
        assert e.ci_low < truth < e.ci_high, name
    assert result.estimates["dr"].std_error < result.estimates["pdis"].std_error
    # with reward noise, FQE's value depends on the sample: only a refit bootstrap sees it
    noisy = SessionData(data.episode, data.reward + rng.normal(0.0, 1.0, data.n), data.action,
                        data.pscore)
    model = lstdq_model(states, noisy, target, ridge=1e-8)
    q_noisy = model(None)
    fixed = estimate_sessions(noisy, target, q_noisy, OPEConfig(n_boot=100), warn=False)
    refitted = estimate_sessions(noisy, target, q_noisy, OPEConfig(n_boot=100), warn=False,
                                 refit=model)
    assert refitted.estimates["fqe"].value == fixed.estimates["fqe"].value
    # V(s_0) takes one value per fold's model: the fixed-model bootstrap barely moves
    assert refitted.estimates["fqe"].std_error > 5 * fixed.estimates["fqe"].std_error
    assert refitted.estimates["fqe"].ci_low < truth < refitted.estimates["fqe"].ci_high
    on_policy = estimate_sessions(data, np.tile([0.5, 0.5], (data.n, 1)), warn=False,
                                  config=OPEConfig(n_boot=50))
    returns = np.bincount(data.episode, weights=data.reward).mean()
    assert on_policy.estimates["pdis"].value == pytest.approx(returns)


def test_iterative_fqe_matches_the_closed_form():
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(7)
    data, step = chain_sessions(1000, 3, 0.5, rng)
    states = np.eye(3)[step[:, 0].astype(int)]  # one-hot step: closed under the Bellman map
    target = np.tile([0.3, 0.7], (data.n, 1))
    q_iter = cross_fitted_q(states, data, target, LinearRegression)
    value = estimate_sessions(data, target, q_iter, OPEConfig(n_boot=50),
                              warn=False).estimates["fqe"].value
    assert value == pytest.approx(3 * 0.7, rel=1e-6)


def test_cumulative_weights_restart_at_each_episode():
    episode = np.array([0, 0, 0, 1, 1])
    action = np.array([1, 1, 0, 1, 0])
    data = SessionData(episode, np.zeros(5), action, np.full(5, 0.5))
    target = np.tile([0.25, 0.75], (5, 1))  # w = 1.5 for a=1, 0.5 for a=0
    np.testing.assert_allclose(data.cumulative_weights(target),
                               [1.5, 2.25, 1.125, 1.5, 0.75])
    zero = np.tile([0.0, 1.0], (5, 1))
    np.testing.assert_allclose(data.cumulative_weights(zero), [2, 4, 0, 2, 0])


def test_no_warning_for_calm_weights():
    data, k = balanced_uniform_log()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPEWarning)
        estimate_bandit(data, np.full((data.n, k), 1 / k), config=FAST)
