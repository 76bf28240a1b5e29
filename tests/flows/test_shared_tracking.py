"""RECPIPE_TRACKING_URI points every command at a shared MLflow tracking server (here a real
`mlflow server` with a SQLite database backend and proxied artifacts): runs, models and the
registry live there, not in the workspace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from flows.cli import answers_health
from flows.workspace import TRACKING_URI_ENV, Workspace
from tests.conftest import free_port, run_json

pytestmark = pytest.mark.integration


@pytest.fixture
def tracking_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "mlflow-server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not answers_health(url):
        if time.monotonic() > deadline or server.poll() is not None:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"no mlflow server: {(tmp_path / 'mlflow-server.log').read_text()}")
        time.sleep(1)
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def test_training_registers_on_the_shared_tracking_server(tracking_server, tmp_path, monkeypatch,
                                                          capsys):
    workspace = Workspace(tmp_path / "ws")
    monkeypatch.setenv("RECPIPE_HOME", str(workspace.root))
    monkeypatch.setenv(TRACKING_URI_ENV, tracking_server)
    raw = tmp_path / "raw"
    run_json(capsys, "simulate", "--out", str(raw), "--users", "60", "--days", "3")
    run_json(capsys, "ingest", "--source", "simulator", "--input", str(raw))
    run_json(capsys, "features", "--history-length", "8")
    trained = run_json(capsys, "train-ranker", "--epochs", "1")

    assert trained["registered"]["version"] == 1
    assert not workspace.mlflow_db.exists()  # nothing tracked locally
    client = MlflowClient(tracking_uri=tracking_server)
    assert client.get_run(trained["run_id"]).info.status == "FINISHED"
    assert client.get_model_version_by_alias("recpipe-ranker", "champion").version == "1"
    assert client.get_experiment_by_name("recpipe-rankers").artifact_location.startswith(
        "mlflow-artifacts:")  # served by the tracking server, not a workspace path
    mlflow.set_tracking_uri(tracking_server)
    model = mlflow.pyfunc.load_model("models:/recpipe-ranker@champion")
    assert model.metadata.run_id == trained["run_id"]
