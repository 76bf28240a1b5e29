"""Allocation policies: reward and constraint bookkeeping on hand-made episodes, group heads'
gradient isolation, the bucketed critic's round trip, the log contract, save/load, and a
policy trained on a tiny log beating the logging policy in a tiny simulator run."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import polars as pl
import pytest
import torch

from models.allocators.data import (
    REQUIRED_COLUMNS,
    STATE_FIELDS,
    AllocationFeaturizer,
    AllocationLogError,
    IdVocabulary,
    RewardConfig,
    build_dataset,
    discounted_returns,
    episode_links,
    live_share,
    read_allocation_log,
    request_rewards,
    validate_allocation_frame,
)
from models.allocators.policy import config_for, load_policy, train_policy
from models.allocators.sl_mgac import GroupHeads, LagrangeMultiplier, NStepTargets, ValueBuckets
from simulation import AllocationState, SimulatorConfig, simulate
from simulation.allocation import STATE_COLUMNS


def episode_rows(rows: list[dict]) -> pl.DataFrame:
    """A log of hand-made steps: every required column, defaults for what a row omits."""
    default = {name: 0 for name in REQUIRED_COLUMNS}
    default.update(session_id="s0", propensity=0.5, p_insert=0.5, activity_group=1, hour=12)
    return pl.DataFrame([{**default, **row} for row in rows])


@pytest.fixture
def two_sessions() -> pl.DataFrame:
    """Session a: a live inserted at step 1 (100 s watched, the videos next to it 20 s), then
    the user left (before the cap of 3 requests) and came back the next day.
    Session b: 3 steps, ended at the cap (not an early exit), did not come back.
    Rows are shuffled: the reader must order them by (session_id, request_index)."""
    return episode_rows([
        dict(session_id="b", request_index=1, video_watch_time_s=5.0),
        dict(session_id="a", request_index=1, action=1, live_watch_time_s=100.0,
             video_watch_time_s=20.0, live_click=1, session_end=1, next_day_return=1),
        dict(session_id="a", request_index=0, video_watch_time_s=30.0, next_day_return=1),
        dict(session_id="b", request_index=0, video_watch_time_s=7.0),
        dict(session_id="b", request_index=2, video_watch_time_s=4.0, session_end=1),
    ])


def test_reward_credits_net_watch_charges_early_exits_and_pays_retention(two_sessions):
    log = validate_allocation_frame(two_sessions)
    assert log["session_id"].to_list() == ["a", "a", "b", "b", "b"]
    assert log["request_index"].to_list() == [0, 1, 0, 1, 2]
    next_index, done = episode_links(log)
    assert next_index.tolist() == [1, -1, 3, 4, -1]
    assert done.tolist() == [False, True, False, False, True]
    config = RewardConfig(exit_penalty_s=50.0, retention_bonus_s=200.0,
                          max_requests_per_session=3)
    rewards = request_rewards(log, config)
    # a: 30 | 100 live + 20 video (the live counted with the video watch it left)
    #        - 50 (left before the cap) + 200 (came back);   b: 7 | 5 | 4 (ended at the cap)
    np.testing.assert_allclose(rewards, [30.0, 120.0 - 50.0 + 200.0, 7.0, 5.0, 4.0])
    returns = discounted_returns(rewards, next_index, gamma=0.5)
    np.testing.assert_allclose(returns, [30 + 0.5 * 270, 270, 7 + 0.5 * (5 + 0.5 * 4),
                                         5 + 0.5 * 4, 4])


def test_n_step_targets_sum_logged_rewards_then_bootstrap_inside_the_episode(two_sessions):
    log = validate_allocation_frame(two_sessions)
    config = RewardConfig(exit_penalty_s=50.0, retention_bonus_s=200.0,
                          max_requests_per_session=3)
    data = build_dataset(log, AllocationFeaturizer.fit(log), config)  # rewards 30 270 | 7 5 4
    two = NStepTargets.build(data, n=2, gamma=0.5)
    np.testing.assert_allclose(two.later_rewards, [0.5 * 270, 0, 0.5 * 5, 0.5 * 4, 0])
    np.testing.assert_allclose(two.bootstrap_discount, [0, 0, 0.25, 0, 0])
    assert two.bootstrap_row[2] == 4  # b0 bootstraps from b2; the others have no t+2
    one = NStepTargets.build(data, n=1, gamma=0.5)  # plain one-step TD
    np.testing.assert_allclose(one.later_rewards, 0.0)
    np.testing.assert_allclose(one.bootstrap_discount, [0.5, 0, 0.5, 0.5, 0])
    assert one.bootstrap_row.tolist()[:4] == [1, 1, 3, 4]
    full = NStepTargets.build(data, n=30, gamma=0.5)  # Monte-Carlo: never bootstraps
    np.testing.assert_allclose(data.reward + full.later_rewards,
                               discounted_returns(data.reward, data.next_index, 0.5))
    np.testing.assert_allclose(full.bootstrap_discount, 0.0)


def test_greedy_reward_would_differ_only_by_the_anti_greedy_terms(two_sessions):
    log = validate_allocation_frame(two_sessions)
    plain = request_rewards(log, RewardConfig(exit_penalty_s=0.0, retention_bonus_s=0.0))
    np.testing.assert_allclose(plain, (log["video_watch_time_s"]
                                       + log["live_watch_time_s"]).to_numpy())


def test_lagrange_multiplier_does_projected_dual_ascent_on_the_live_share():
    assert live_share(np.array([1.0, 0.0, 0.5, 0.5])) == 0.5
    mu = LagrangeMultiplier(cap=0.3, lr=10.0, max_value=4.0)
    assert mu.update(0.5) == pytest.approx(2.0)  # share over the cap: the price of a live rises
    assert mu.update(0.5) == pytest.approx(4.0)
    assert mu.update(0.9) == pytest.approx(4.0)  # clipped at max_value
    assert mu.update(0.1) == pytest.approx(2.0)  # under the cap: it falls again
    assert mu.update(0.0) == 0.0  # and never below zero
    assert mu.update(0.3) == 0.0


def test_group_heads_receive_only_their_groups_gradient():
    torch.manual_seed(0)
    heads = GroupHeads(in_dim=4, hidden=8, out_dim=3, n_groups=3)
    h = torch.randn(6, 4)
    group = torch.tensor([1, 1, 2, 1, 2, 2])
    out = heads(h, group)  # (6, 3)
    out[group == 1].sum().backward()  # a loss on group-1 rows only
    for name, param in heads.named_parameters():
        grad = param.grad
        assert grad[1].abs().sum() > 0, name
        assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0), name
    # and a row's output does not depend on another group's weights
    with torch.no_grad():
        heads.w1[0].add_(1.0)
        heads.w2[2].add_(1.0)
    assert torch.equal(heads(h, group)[group == 1], out[group == 1].detach())


def test_bucketed_critic_target_mapping_round_trips():
    buckets = ValueBuckets(-50.0, 250.0, 31)
    y = torch.cat([torch.linspace(-50.0, 250.0, 97), torch.tensor([-50.0, 0.0, 123.4, 250.0])])
    probs = buckets.encode(y)
    assert probs.shape == (y.shape[0], 31)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(y.shape[0]))
    assert torch.all((probs > 0).sum(dim=1) <= 2)  # two-hot
    torch.testing.assert_close(buckets.decode(probs), y, atol=1e-4, rtol=0)
    atoms = buckets.atoms  # an atom maps to itself, one-hot
    torch.testing.assert_close(buckets.encode(atoms), torch.eye(31))
    clipped = buckets.decode(buckets.encode(torch.tensor([-1e4, 1e4])))
    torch.testing.assert_close(clipped, torch.tensor([-50.0, 250.0]))
    # a diverged critic's NaN target: a NaN row (the loss turns NaN), not an index error
    probs = buckets.encode(torch.tensor([float("nan"), 10.0]))
    assert probs[0].isnan().any() and not probs[1].isnan().any()


def test_log_contract_names_what_is_wrong(tmp_path, two_sessions):
    with pytest.raises(AllocationLogError, match="no allocation log"):
        read_allocation_log(tmp_path)
    two_sessions.drop("p_insert", "session_end").write_parquet(tmp_path / "allocations.parquet")
    with pytest.raises(AllocationLogError, match=r"missing columns \['p_insert', 'session_end'\]"):
        read_allocation_log(tmp_path)
    bad = two_sessions.with_columns(
        action=pl.when(pl.col("request_index") == 1).then(2).otherwise(pl.col("action")))
    first = bad.with_row_index().filter(pl.col("action") == 2).row(0, named=True)
    with pytest.raises(AllocationLogError, match=(
            rf"2 row\(s\) with action outside \{{0, 1\}}; first: row {first['index'] + 1} "
            rf"\(session_id='{first['session_id']}', request_index=1, action=2\)")):
        validate_allocation_frame(bad)
    holes = two_sessions.with_columns(hour=pl.when(pl.col("request_index") == 0).then(None)
                                      .otherwise(pl.col("hour")))
    row = holes.with_row_index().filter(pl.col("hour").is_null()).row(0)[0] + 1
    with pytest.raises(AllocationLogError, match=rf"with null hour; first: row {row} \("):
        validate_allocation_frame(holes)
    text = two_sessions.with_columns(pl.col("video_watch_time_s").cast(pl.String))
    text = text.with_columns(video_watch_time_s=pl.when(pl.col("request_index") == 1)
                             .then(pl.lit("12s")).otherwise(pl.col("video_watch_time_s")))
    with pytest.raises(AllocationLogError, match=r"video_watch_time_s not Float64.*'12s'"):
        validate_allocation_frame(text)
    listed = two_sessions.with_columns(pl.concat_list("hour").alias("hour"))
    with pytest.raises(AllocationLogError, match=r"column hour is List\(Int64\), it must be"):
        validate_allocation_frame(listed)
    dup = pl.concat([two_sessions, two_sessions.head(1)])
    with pytest.raises(AllocationLogError, match="duplicated"):
        validate_allocation_frame(dup)
    ghost = two_sessions.with_columns(live_watch_time_s=pl.lit(3.0))
    with pytest.raises(AllocationLogError, match="not inserted"):
        validate_allocation_frame(ghost)
    for column in ("live_follow", "live_gift"):  # reward-head targets of a live never shown
        with pytest.raises(AllocationLogError, match="not inserted"):
            validate_allocation_frame(two_sessions.with_columns(pl.lit(1).alias(column)))
    early_end = two_sessions.with_columns(  # b ends at step 0 yet goes on
        session_end=pl.when((pl.col("session_id") == "b") & (pl.col("request_index") == 0))
        .then(1).otherwise(pl.col("session_end")))
    with pytest.raises(AllocationLogError, match="session_end before the session's last"):
        validate_allocation_frame(early_end)
    two_sessions.write_csv(tmp_path / "canonical.csv")  # a canonical CSV log reads the same
    assert read_allocation_log(tmp_path / "canonical.csv").height == 5


def test_state_fields_are_the_simulators_observable_state():
    assert STATE_FIELDS == STATE_COLUMNS == tuple(f.name for f in fields(AllocationState))


def test_featurizer_maps_unseen_and_other_world_ids_to_the_oov_row(two_sessions):
    vocab = IdVocabulary.fit(np.array([5, 5, 9, 7, 7]), min_count=2)
    assert vocab.lookup(np.array([5, 7, 9, 11])).tolist() == [1, 2, 0, 0]
    log = validate_allocation_frame(two_sessions.with_columns(
        user_id=pl.Series([3, 3, 3, 4, 4]), candidate_author_id=pl.lit(8)))
    featurizer = AllocationFeaturizer.fit(log)
    x = featurizer.transform(log)
    assert x.dense.shape == (5, featurizer.n_dense) and x.dense.dtype == np.float32
    assert (x.ids["user_id"] > 0).all() and (x.ids["hour"] == 13).all()
    cold = featurizer.transform(log, id_features=False)
    assert (cold.ids["user_id"] == 0).all() and (cold.ids["candidate_author_id"] == 0).all()
    np.testing.assert_array_equal(cold.dense, x.dense)
    again = AllocationFeaturizer.from_dict(featurizer.to_dict()).transform(log)
    np.testing.assert_array_equal(again.dense, x.dense)


TINY = replace(SimulatorConfig(), n_users=300, days=5, n_videos=1500, n_lives=80,
               n_authors=200, candidate_size=100, live_lover_share=0.4)
"""A world small enough to train on in seconds, with enough live lovers to learn about."""


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models train faster (and reproducibly) on one thread, on a shared machine too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_log() -> pl.DataFrame:
    return validate_allocation_frame(simulate(replace(TINY, seed=0)).allocations)


def test_sl_mgac_trained_on_a_tiny_log_beats_the_logging_policy(tiny_log):
    """Every training seed, not one lucky seed, must beat the logging policy on other users
    and other draws than the log's, and hold the live-share cap there (its own states)."""
    held_out = replace(TINY, seed=1000)
    logging = simulate(held_out).summary()
    gains = []
    for seed in (0, 1, 2):
        config = config_for("sl_mgac", seed=seed, progress=False,
                            overrides={"n_steps": 600, "batch_size": 256})
        diagnostics: list[dict] = []
        policy = train_policy("sl_mgac", tiny_log, config,
                              lambda _s, d, into=diagnostics: into.append(d))
        assert {"value_loss", "entropy", "advantage_mean", "advantage_std",
                "lagrange_multiplier", "policy_share"} <= set(diagnostics[-1])
        trained = simulate(held_out, policy.with_id_features(False)).summary()
        assert trained["live_share"] <= held_out.live_share_cap, seed
        gains.append(trained["session_watch_time"] - logging["session_watch_time"])
    assert min(gains) > 0.0, gains
    assert np.mean(gains) > 20.0, gains


def test_served_sl_mgac_share_is_the_bound_or_the_critics_smaller_share(tiny_log):
    config = config_for("sl_mgac", seed=3, progress=False, overrides={"n_steps": 40})
    policy = train_policy("sl_mgac", tiny_log, config)
    scores = policy.scores(tiny_log)
    worth = float(np.mean(scores["q_insert"] > scores["q_skip"]))
    bound = config.live_share_cap - config.cap_margin
    assert np.mean(scores["p_insert"]) == pytest.approx(min(bound, worth), abs=1e-4)


@pytest.mark.parametrize("algo", ["sl_mgac", "greedy", "dqn"])
def test_a_saved_policy_scores_like_the_trained_one(tiny_log, tmp_path, algo):
    config = config_for(algo, seed=1, progress=False, overrides={"n_steps": 60})
    policy = train_policy(algo, tiny_log, config)
    p = policy(tiny_log)
    assert p.shape == (tiny_log.height,) and np.all((p >= 0) & (p <= 1))
    policy.save(tmp_path / algo)
    again = load_policy(tmp_path / algo)
    assert again.algo == algo
    np.testing.assert_allclose(again(tiny_log), p, atol=1e-6)
    state = AllocationState(**{f: tiny_log[f].to_numpy()[:7] for f in STATE_FIELDS})
    np.testing.assert_allclose(again(state), p[:7], atol=1e-6)


def test_unknown_algorithms_and_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="unknown allocation algorithm"):
        config_for("ppo")
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        config_for("sl_mgac", overrides={"gamma_typo": 0.9})
    with pytest.raises(ValueError, match="live_share_cap is set by --live-share-cap, not"):
        config_for("greedy", overrides={"live_share_cap": 1.0})  # was a bare TypeError


def test_sl_mgac_refuses_a_cap_its_margin_leaves_nothing_under():
    with pytest.raises(ValueError, match="cap_margin 0.1 leaves no share"):
        config_for("sl_mgac", live_share_cap=0.08)
    assert config_for("sl_mgac", live_share_cap=0.08,
                      overrides={"cap_margin": 0.02}).live_share_cap == 0.08


@pytest.mark.parametrize(("overrides", "cap", "message"), [
    ({"n_steps": 0}, 0.3, "n_steps"), ({}, 0.0, "live_share_cap"), ({}, 1.5, "live_share_cap")])
@pytest.mark.parametrize("algo", ["sl_mgac", "greedy", "dqn"])
def test_allocator_config_rejects_no_steps_or_a_cap_outside_0_1(algo, overrides, cap, message):
    with pytest.raises(ValueError, match=message):
        config_for(algo, live_share_cap=cap, overrides=overrides)
