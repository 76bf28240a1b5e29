"""``recpipe pretrain`` as a plain step and CLI handler on a tiny workspace: it logs curves,
plots and the model, registers (champion first, then challenger), and writes the
user-embedding table atomically."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from features.build import FeatureConfig
from features.schema import RAW_INPUT_COLUMNS
from flows.pretrain_steps import (
    PretrainDataError,
    add_pretrain_arguments,
    cmd_pretrain,
    pretrain_step,
    write_user_embeddings,
)
from flows.steps import features_step, ingest_step
from flows.workspace import Workspace
from tests.conftest import assert_reproduces_test_metrics, make_events


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    previous = mlflow.get_tracking_uri()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = Workspace(tmp_path / "ws").create()
    yield ws
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(previous)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_pretrain_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
@pytest.mark.integration
def test_pretrain_command_registers_logs_and_writes_the_table(workspace, tmp_path):
    events = tmp_path / "events.parquet"
    make_events(n_users=30, per_user=20).write_parquet(events)
    ingest_step("canonical", events, workspace)
    features_step(workspace, FeatureConfig(history_length=8))
    users = pl.DataFrame({"user_id": np.arange(30), "activity_group": np.arange(30) % 3,
                          "age_bucket": np.arange(30) % 5, "gender": np.arange(30) % 2})
    (workspace.raw / "sim").mkdir(parents=True)
    users.write_parquet(workspace.raw / "sim" / "users.parquet")

    small = ("--steps", "4", "--batch-size", "8", "--embedding-dim", "8", "--layers", "1")
    first = cmd_pretrain(parse("--method", "adaptssr", *small), workspace)
    assert first["registered"]["aliases"] == ["challenger", "champion"]
    table = pl.read_parquet(first["embeddings_path"])
    assert table.columns == ["user_id", "embedding", "history_length", "method",
                             "model_version", "run_id"]
    assert table.height == table.get_column("user_id").n_unique() == 30
    assert table.get_column("embedding").list.len().unique().to_list() == [8]
    assert table.get_column("model_version").unique().to_list() == [1]
    client = MlflowClient(workspace.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/embedding_projection.png"}
    run = client.get_run(first["run_id"])
    assert run.data.params["users_table"].endswith("users.parquet")
    assert "embedding_mean_cosine" in run.data.metrics
    assert len(client.get_metric_history(first["run_id"], "pretrain_loss")) >= 1

    second = pretrain_step(workspace, "mip", {"steps": 2, "batch_size": 8,
                                              "encoder": {"embedding_dim": 8, "n_layers": 1}})
    assert second["registered"]["aliases"] == ["challenger"]
    assert pl.read_parquet(second["embeddings_path"]).get_column(
        "model_version").unique().to_list() == [2]
    assert not [p for p in (workspace.lake / "user_embeddings").iterdir()
                if p.name.startswith(".")]


def test_pretrain_without_examples_says_what_to_run(workspace):
    with pytest.raises(PretrainDataError, match="recpipe features"):
        pretrain_step(workspace, "adaptssr")


def test_table_write_leaves_the_old_table_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "user_embeddings" / "part-0.parquet"
    write_user_embeddings(path, np.arange(2), np.ones((2, 3)), np.array([1, 2]), "mip", "r", 1)

    def half_written(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_user_embeddings(path, np.arange(3), np.ones((3, 3)), np.array([1, 2, 3]), "mip",
                              "r", 2)
    monkeypatch.undo()
    assert pl.read_parquet(path).get_column("model_version").to_list() == [1, 1]
    assert [p.name for p in path.parent.iterdir()] == ["part-0.parquet"]


@pytest.mark.integration
def test_a_ranker_trains_on_the_registered_encoder_and_reloads_with_it(workspace, tmp_path):
    """pretrain → train-ranker --user-encoder (frozen) → register → load from the registry:
    the reloaded ranker scores like the trained one and the frozen encoder kept its weights."""
    from flows.steps import RankerJob, register_step, train_ranker_step
    from models.registry import load_ranker
    from models.user_encoder_registry import load_user_encoder

    events = tmp_path / "events.parquet"
    make_events(n_users=30, per_user=20).write_parquet(events)
    ingest_step("canonical", events, workspace)
    features_step(workspace, FeatureConfig(history_length=8))
    pretrain_step(workspace, "mip", {"steps": 3, "batch_size": 8,
                                     "encoder": {"embedding_dim": 8, "n_layers": 1}})
    uri = "models:/recpipe-user-encoder@champion"
    job = RankerJob(ranker={"n_experts": 2}, train={"epochs": 1, "progress": False},
                    user_encoder=uri)
    summary = train_ranker_step(workspace, job)
    assert summary["user_encoder"] == uri
    registered = register_step(workspace, summary["model_uri"], summary["run_id"])
    ranker = load_ranker(f"models:/recpipe-ranker/{registered['version']}")
    assert ranker.user_encoder_spec["freeze"] is True
    pretrained = load_user_encoder(uri).encoder.state_dict()
    adapted = ranker.model.encoder.user_encoder.encoder.state_dict()
    for name, value in pretrained.items():
        torch.testing.assert_close(adapted[name], value)
    rows = pl.read_parquet(workspace.examples / "test.parquet")
    scores = ranker.score_raw(rows.select(RAW_INPUT_COLUMNS))
    assert scores.shape == (rows.height, len(ranker.schema.tasks))
    # the registry's ranker gives the test metrics the run computed in memory
    assert_reproduces_test_metrics(ranker, workspace.examples, summary["metrics"]["test"])
