"""``flows.steps.train_ranker_step`` end to end on a tiny simulation with its ground truth:
metrics, oracle metrics, diagnostics and plots land in the MLflow run.

The two MLflow runs are marked slow (~20 s, most of it creating the MLflow store); the default
suite still runs the step without ground truth inside the nightly flow test."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from flows.steps import (
    RankerJob,
    SimulateParams,
    load_ground_truth,
    simulate_step,
    train_ranker_step,
)
from tests.conftest import assert_reproduces_test_metrics, simulated_workspace

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"n_experts": 2, "n_category_experts": 1, "expert_hidden": (16, 8),
         "tower_hidden": (4,)}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    workspace = simulated_workspace(tmp_path_factory.mktemp("ws"))
    return workspace, workspace.raw / "simulator-seed5"


@pytest.mark.slow
@pytest.mark.integration
def test_home_run_logs_oracle_metrics_diagnostics_and_plots(simulated):
    workspace, raw = simulated
    job = RankerJob(ranker={"arch": "home", **SMALL},
                    train={"epochs": 1, "batch_size": 256, "progress": False,
                           "loss_weighting": "uncertainty"},
                    ground_truth=str(raw))
    summary = train_ranker_step(workspace, job)
    click = summary["metrics"]["test"]["click"]
    assert 0.5 < click["oracle_auc"] <= 1.0
    ratio = (click["auc"] - 0.5) / (click["oracle_auc"] - 0.5)
    assert click["auc_oracle_ratio"] == pytest.approx(ratio)
    assert "oracle_auc" not in summary["metrics"]["test"]["watch_time"]
    assert summary["diagnostics"]["max_expert_zero_fraction"] < 0.9

    mlflow.set_tracking_uri(workspace.tracking_uri)
    run = MlflowClient().get_run(summary["run_id"])
    metrics = run.data.metrics
    assert metrics["test_oracle_coverage"] == 1.0
    assert "test_click_oracle_auc" in metrics and "test_like_auc_oracle_ratio" in metrics
    assert any(key.startswith("diag/expert_zero_fraction/meta_global.") for key in metrics)
    assert any(key.startswith("diag/gate/click/task_own.click.") for key in metrics)
    assert not any(key.startswith("diag/gate/click/task_own.like.") for key in metrics)
    assert "diag/grad_norm/like/encoder" in metrics
    assert "train_weight_click" in metrics
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/reliability_test.png", "plots/gate_weights.png",
            "plots/expert_activity.png", "plots/task_gradients.png",
            "plots/auc_vs_oracle_test.png"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                artifact_path="diagnostics.json")
    assert set(json.loads(Path(local).read_text())) == {"experts", "gates", "gradients"}


@pytest.mark.slow
@pytest.mark.integration
def test_configured_tasks_train_and_register_their_own_schema(simulated):
    workspace, _ = simulated
    tasks = ({"name": "click", "kind": "binary", "label": "click"},
             {"name": "comment", "kind": "binary", "label": "comment"},
             {"name": "watch_time", "kind": "regression", "label": "watch_time_s"})
    job = RankerJob(ranker={"arch": "shared_bottom", **SMALL},
                    train={"epochs": 1, "batch_size": 256, "progress": False}, tasks=tasks)
    summary = train_ranker_step(workspace, job)
    assert list(summary["metrics"]["test"]) == ["click", "comment", "watch_time"]
    with pytest.raises(ValueError, match="not in the examples"):
        train_ranker_step(workspace, RankerJob(
            tasks=({"name": "x", "kind": "binary", "label": "no_such_label"},)))
    with pytest.raises(ValueError, match="kind must be"):
        train_ranker_step(workspace, RankerJob(
            tasks=({"name": "x", "kind": "ordinal", "label": "click"},)))


def test_ground_truth_from_another_simulation_is_refused(simulated, tmp_path):
    import shutil

    workspace, raw = simulated
    other = tmp_path / "other"
    simulate_step(other, SimulateParams(users=90, days=4, seed=5))  # another world, same seed
    test = pl.read_parquet(workspace.examples / "test.parquet")
    with pytest.raises(ValueError, match="covers none of the"):
        load_ground_truth(other, test)
    # ids that match but events that do not (a tampered or foreign output) are caught too
    forged = tmp_path / "forged"
    shutil.copytree(raw, forged)
    events = pl.read_parquet(forged / "events.parquet")
    events.with_columns(pl.col("user_id") + 1).write_parquet(forged / "events.parquet")
    with pytest.raises(ValueError, match="different simulation"):
        load_ground_truth(forged, test)
    with pytest.raises(ValueError, match="no ground truth"):
        load_ground_truth(tmp_path / "missing", test)
    # the nightly's optional ground truth: the run trains, without oracle metrics
    job = RankerJob(ranker={"arch": "mmoe", **SMALL},
                    train={"epochs": 1, "batch_size": 256, "progress": False},
                    ground_truth=str(other), ground_truth_optional=True)
    summary = train_ranker_step(workspace, job)
    assert "oracle_auc" not in summary["metrics"]["test"]["click"]
    with pytest.raises(ValueError, match="covers none of the"):
        train_ranker_step(workspace, replace(job, ground_truth_optional=False))


@pytest.mark.integration
def test_the_logged_ranker_scores_what_the_trained_one_scored(simulated):
    """HoME (BatchNorm: running statistics, eval mode) reloaded from its MLflow model gives
    the test metrics the run computed with the model in memory, to float precision."""
    from models.registry import load_ranker

    workspace, _ = simulated
    job = RankerJob(ranker={"arch": "home", **SMALL},
                    train={"epochs": 1, "batch_size": 256, "progress": False})
    summary = train_ranker_step(workspace, job)
    mlflow.set_tracking_uri(workspace.tracking_uri)
    loaded = load_ranker(summary["model_uri"])
    assert not loaded.model.training
    assert_reproduces_test_metrics(loaded, workspace.examples, summary["metrics"]["test"])


@pytest.mark.integration
def test_a_diverging_training_stops_clearly_and_logs_no_model(simulated):
    """A loss that turns non-finite stops the step with TrainingDivergedError; the MLflow run
    is marked FAILED and carries no model, so nothing can be registered from it."""
    from models.training import TrainingDivergedError

    workspace, _ = simulated
    job = RankerJob(ranker={"arch": "mmoe", **SMALL},
                    train={"epochs": 1, "batch_size": 256, "learning_rate": 1e30,
                           "progress": False})
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        train_ranker_step(workspace, job)
    client = MlflowClient(workspace.tracking_uri)
    experiment = client.get_experiment_by_name("recpipe-rankers")
    last = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"],
                              max_results=1)[0]
    assert last.info.status == "FAILED"
    assert not client.search_logged_models([experiment.experiment_id],
                                           filter_string=f"source_run_id = '{last.info.run_id}'")
    assert not client.search_registered_models()
