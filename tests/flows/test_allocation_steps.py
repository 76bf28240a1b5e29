"""`recpipe train-allocator` as a plain step and as a CLI handler: trains on the latest
simulator output, reports true values from held-out rollouts, logs and registers a pyfunc
that scores allocation-state rows."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
import pytest
import torch

from flows.allocation_steps import (
    add_train_allocator_arguments,
    cmd_train_allocator,
    latest_simulator_dir,
    train_allocator_step,
)
from flows.steps import SimulateParams, simulate_step
from flows.workspace import Workspace
from models.allocators.data import STATE_FIELDS, AllocationLogError


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Workspace:
    for name in ("RECPIPE_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    ws = Workspace(tmp_path / "ws").create()
    simulate_step(ws.raw / "simulator-seed0-users150-days3", SimulateParams(150, 3, 0))
    return ws


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_allocator_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_handler_trains_reports_true_values_and_registers(workspace, capsys):
    args = parse("--algo", "greedy", "--steps", "50", "--eval-seeds", "1", "--eval-users", "80")
    summary = cmd_train_allocator(args, workspace)
    assert summary["input"] == str(latest_simulator_dir(workspace))
    tv = summary["true_value"]
    for who in ("policy", "logging"):
        assert {"session_watch_time", "retention", "live_share"} <= set(tv[who])
    assert tv["eval_seeds"] == [1000] and tv["eval_users"] == 80
    assert tv["constraint_met"] == (tv["policy"]["live_share"] <= 0.3)
    assert summary["registered"]["name"] == "recpipe-allocator"
    assert summary["registered"]["aliases"] == ["challenger", "champion"]
    out = capsys.readouterr().out
    assert "true value on held-out users" in out and "registered recpipe-allocator v1" in out

    mlflow.set_tracking_uri(workspace.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/recpipe-allocator@champion")
    rows = pl.read_parquet(latest_simulator_dir(workspace) / "allocations.parquet", n_rows=9)
    scored = model.predict(rows.select(STATE_FIELDS).to_pandas())
    assert isinstance(scored, pd.DataFrame) and list(scored.columns) == ["p_insert", "decision"]
    assert len(scored) == 9 and scored["p_insert"].between(0, 1).all()
    assert set(scored["decision"]) <= {0, 1}
    run = mlflow.get_run(summary["run_id"])
    assert "true_policy_session_watch_time" in run.data.metrics
    assert run.data.params["algo"] == "greedy"


def test_sl_mgac_step_logs_its_diagnostics(workspace):
    summary = train_allocator_step(workspace, "sl_mgac", hyperparameters={"n_steps": 40,
                                   "log_every": 20}, eval_seeds=0, register=False,
                                   progress=False)
    assert summary["registered"] is None and "true_value" not in summary
    mlflow.set_tracking_uri(workspace.tracking_uri)
    client = mlflow.tracking.MlflowClient()
    for name in ("train_value_loss", "train_entropy", "train_advantage_mean",
                 "train_advantage_std", "train_lagrange_multiplier"):
        assert [m.step for m in client.get_metric_history(summary["run_id"], name)] == [20, 40]
    assert summary["config"]["reward"]["max_requests_per_session"] == 30


def test_a_canonical_log_trains_without_true_values(workspace, tmp_path):
    log = pl.read_parquet(latest_simulator_dir(workspace) / "allocations.parquet")
    canonical = tmp_path / "canonical.parquet"
    log.write_parquet(canonical)
    summary = train_allocator_step(workspace, "greedy", canonical,
                                   hyperparameters={"n_steps": 20}, register=False,
                                   progress=False)
    assert "true_value" not in summary and summary["rows"] == log.height


def test_the_cap_must_hold_in_every_held_out_rollout_not_on_average():
    from flows.allocation_steps import cap_met

    one_over = {"live_share": 0.2996, "per_seed": {"1000": {"live_share": 0.3013},
                                                   "1001": {"live_share": 0.298}}}
    assert not cap_met(one_over, 0.3)
    assert cap_met({"per_seed": {"1000": {"live_share": 0.29}}}, 0.3)


def test_a_policy_over_the_cap_in_a_held_out_rollout_is_not_registered(workspace):
    # an SL-MGAC actor of 20 steps, its share not calibrated, under a cap of 2%
    summary = train_allocator_step(workspace, "sl_mgac", hyperparameters={
        "n_steps": 20, "calibrate_share": False, "cap_margin": 0.005}, live_share_cap=0.02,
        eval_seeds=1, eval_users=60, progress=False)
    assert summary["true_value"]["policy"]["live_share"] > 0.02
    assert summary["true_value"]["constraint_met"] is False
    assert summary["registered"] is None
    assert summary["registration_skipped"] == "held-out rollouts broke the live-share cap"
    assert not mlflow.MlflowClient(workspace.tracking_uri).search_registered_models()


def test_missing_or_broken_logs_are_user_errors(tmp_path):
    empty = Workspace(tmp_path / "empty").create()
    with pytest.raises(AllocationLogError, match="recpipe nightly"):
        train_allocator_step(empty)
    broken = tmp_path / "broken.csv"
    broken.write_text("session_id,action\ns1,1\n")
    with pytest.raises(AllocationLogError, match="missing columns"):
        train_allocator_step(empty, "greedy", Path(broken))
    with pytest.raises(SystemExit):
        parse("--algo", "ppo")


def test_allocator_ab_compares_on_a_held_out_world_and_promotes_only_on_pass(workspace):
    """Two registered allocators, the offline A/B on a fresh held-out simulator world:
    off-policy session values with paired intervals, the live share, the true values."""
    from evaluation.ab import GateConfig, Limit
    from flows.evaluation_steps import ABJob, ab_step
    from models.registry import alias_version

    for algo in ("greedy", "sl_mgac"):  # v1 champion + challenger, then v2 challenger
        train_allocator_step(workspace, algo, hyperparameters={"n_steps": 40}, eval_seeds=0,
                             progress=False)
    never = GateConfig(primary="session_watch/dr", min_improvement=1e9, guards=())
    summary = ab_step(workspace, ABJob(model_name="recpipe-allocator", gates=never,
                                       n_boot=50, eval_users=80))
    assert summary["status"] == "kept-champion"
    rows = {row["metric"]: row for row in summary["table"]["rows"]}
    assert set(rows) == {"session_watch/pdis", "session_watch/dr", "session_watch/fqe",
                         "live_share", "true/session_watch_time", "true/retention",
                         "true/watch_time_per_user", "true/live_share"}
    for name in ("session_watch/dr", "live_share"):
        row = rows[name]
        assert row["ci_low"] <= row["diff"] <= row["ci_high"], row
    assert rows["true/live_share"]["challenger"] >= 0.0
    assert summary["table"]["info"]["log"].startswith("simulator held-out world seed 1000")
    assert alias_version("recpipe-allocator", "champion") == 1

    share = rows["live_share"]["challenger"]
    capped = GateConfig(primary="session_watch/dr", min_improvement=-1e9, primary_rule="point",
                        guards=(), limits=(Limit("live_share", share / 2),))
    blocked = ab_step(workspace, ABJob(model_name="recpipe-allocator", gates=capped,
                                       n_boot=50, eval_users=80))
    assert blocked["status"] == "kept-champion" and "exceeds its limit" in blocked["message"]
    lowered = ab_step(workspace, ABJob(model_name="recpipe-allocator", n_boot=50, eval_users=80,
                                       live_share_cap=share / 2))  # the default gates' limit
    assert f"exceeds its limit {share / 2:g}" in lowered["message"]
    allowed = replace(capped, limits=(Limit("live_share", share + 0.01),))
    passed = ab_step(workspace, ABJob(model_name="recpipe-allocator", gates=allowed,
                                      n_boot=50, eval_users=80))
    assert passed["status"] == "promoted"
    assert alias_version("recpipe-allocator", "champion") == 2
    assert alias_version("recpipe-allocator", "previous-champion") == 1

