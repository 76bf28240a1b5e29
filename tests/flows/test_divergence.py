"""A training whose loss turns non-finite stops with a clear error, exit status 3, and
registers nothing: ranker, user-encoder pretraining and SL-MGAC, through the CLI."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import TRAINING_FAILED_EXIT, main
from flows.workspace import Workspace
from tests.conftest import simulated_workspace

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Workspace:
    return simulated_workspace(tmp_path_factory.mktemp("diverge"))


@pytest.mark.parametrize("argv", [
    ["train-ranker", "--arch", "mmoe", "--epochs", "1", "--lr", "1e30"],
    ["pretrain", "--method", "mip", "--steps", "20", "--batch-size", "16", "--lr", "1e30"],
    ["train-allocator", "--algo", "sl_mgac", "--steps", "40", "--eval-seeds", "0",
     "--set", "batch_size=64", "--set", "learning_rate=1e30"],
], ids=["ranker", "pretrain", "sl_mgac"])
def test_a_diverging_training_exits_3_and_registers_nothing(simulated, capsys, argv):
    code = main([argv[0], "--home", str(simulated.root), *argv[1:]])
    error = capsys.readouterr().err
    assert code == TRAINING_FAILED_EXIT, error
    assert "training diverged, nothing registered" in error
    assert not MlflowClient(simulated.tracking_uri).search_registered_models()
    assert not (simulated.lake / "user_embeddings").exists()
