"""Offline A/B end to end on tiny data with a real MLflow SQLite store and real (tiny)
rankers: aliases move only when the gates pass, the old champion stays retrievable, the
evaluation run holds the comparison, and `recpipe ab` reports a same-version night."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from evaluation.ab import GateConfig
from flows.evaluation_steps import ABJob, ab_step
from flows.workspace import Workspace
from tests.conftest import encode_for_tests, make_events

pytestmark = pytest.mark.integration

ALWAYS = GateConfig(primary="click/auc", min_improvement=-1.0, primary_rule="point", guards=())
NEVER = replace(ALWAYS, min_improvement=1.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workspace with held-out examples and two logged tiny rankers (model URIs)."""
    from models.rankers import RankerConfig, build_ranker
    from models.registry import LoadedRanker, ensure_experiment, log_ranker

    workspace = Workspace(tmp_path_factory.mktemp("ab") / "ws").create()
    examples, schema, vocab = encode_for_tests(make_events(n_users=30, per_user=20, seed=5))
    workspace.examples.mkdir(parents=True, exist_ok=True)
    examples.write_parquet(workspace.examples / "test.parquet")
    mlflow.set_tracking_uri(workspace.tracking_uri)
    experiment = ensure_experiment("test-rankers", workspace.artifacts)
    uris = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = RankerConfig(n_experts=2)
        ranker = LoadedRanker(build_ranker(schema, config).eval(), config, schema, vocab)
        with mlflow.start_run(experiment_id=experiment):
            uris.append(log_ranker(ranker, examples.head(5)))
    return workspace, uris


def registered(store, name: str) -> Workspace:
    """Fresh registered model ``name``: v1 champion (and first challenger), v2 challenger."""
    from models.registry import register

    workspace, uris = store
    mlflow.set_tracking_uri(workspace.tracking_uri)
    register(uris[0], name)
    register(uris[1], name)
    return workspace


def aliases(name: str) -> dict[str, int]:
    model = MlflowClient().get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


def test_champion_stays_when_the_gates_fail(store):
    workspace = registered(store, "ab-fail")
    summary = ab_step(workspace, ABJob(model_name="ab-fail", gates=NEVER, n_boot=50))
    assert summary["status"] == "kept-champion"
    assert aliases("ab-fail") == {"champion": 1, "challenger": 2}
    version = MlflowClient().get_model_version("ab-fail", "2")
    assert version.tags["ab_decision"] == "keep-champion"
    assert version.tags["ab_run_id"] == summary["run_id"]


def test_champion_moves_on_pass_and_the_old_one_stays_retrievable(store):
    from models.registry import load_ranker, rollback

    workspace = registered(store, "ab-pass")
    summary = ab_step(workspace, ABJob(model_name="ab-pass", gates=ALWAYS, n_boot=50))
    assert summary["status"] == "promoted"
    assert aliases("ab-pass") == {"champion": 2, "challenger": 2, "previous-champion": 1}
    client = MlflowClient()
    assert client.get_model_version("ab-pass", "1").tags["retired_by_version"] == "2"
    assert client.get_model_version("ab-pass", "2").tags["promoted_by_run"] == summary["run_id"]
    previous = load_ranker("models:/ab-pass@previous-champion").model.state_dict()
    for version, same in ((1, True), (2, False)):  # it is version 1's model, not version 2's
        weights = load_ranker(f"models:/ab-pass/{version}").model.state_dict()
        assert all(torch.equal(previous[k], weights[k]) for k in weights) is same
    # the next night: challenger == champion → nothing to do, no run
    again = ab_step(workspace, ABJob(model_name="ab-pass", gates=ALWAYS, n_boot=50))
    assert again["status"] == "same-version" and again["run_id"] is None
    assert "nothing to do" in again["message"]
    rollback("ab-pass")
    assert aliases("ab-pass")["champion"] == 1


def test_dry_run_never_promotes(store):
    workspace = registered(store, "ab-dry")
    summary = ab_step(workspace, ABJob(model_name="ab-dry", gates=ALWAYS, n_boot=50,
                                       promote=False))
    assert summary["status"] == "evaluated" and summary["decision"]["promote"]
    assert aliases("ab-dry")["champion"] == 1


def test_a_win_over_a_version_that_is_not_the_champion_moves_nothing(store):
    workspace = registered(store, "ab-other")
    mlflow.register_model(store[1][0], "ab-other")  # v3: not the champion (v1 is)
    summary = ab_step(workspace, ABJob(model_name="ab-other", challenger="2", champion="3",
                                       gates=ALWAYS, n_boot=50))
    assert summary["status"] == "evaluated" and summary["decision"]["promote"]
    assert summary["promotion"] is None and "the champion is v1" in summary["message"]
    assert aliases("ab-other")["champion"] == 1


def test_recpipe_ab_logs_an_evaluation_run(store, capsys, tmp_path):
    from flows.cli import main

    workspace = registered(store, "ab-cli")
    gates = tmp_path / "gates.json"
    gates.write_text(json.dumps({"primary": "click/gauc", "guards": [
        {"metric": "click/logloss", "tolerance": 0.5}]}))
    code = main(["ab", "--home", str(workspace.root), "--model", "ab-cli", "--gates",
                 str(gates), "--n-boot", "60", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] in {"promoted", "kept-champion"}
    assert "click/gauc" in out and summary["table"]["unit"] == "user"
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.tags["decision"] == summary["decision"]["status"]
    assert "diff_click_gauc" in run.data.metrics
    assert run.data.params["gates.primary"] == "click/gauc"
    artifacts = {a.path for a in MlflowClient().list_artifacts(summary["run_id"])}
    assert {"comparison.json", "decision.json", "report.md",
            "difference_plot.png"} <= artifacts
    children = MlflowClient().search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert {c.data.tags["role"] for c in children} == {"champion", "challenger"}
    assert all("ranking/click_auc" in c.data.metrics for c in children)
    moved = aliases("ab-cli")["champion"] == 2
    assert moved == (summary["status"] == "promoted")


def test_recpipe_ab_user_errors(store, capsys, tmp_path):
    from flows.cli import main

    workspace, _ = store
    registered(store, "ab-errors")
    assert main(["ab", "--home", str(workspace.root), "--model", "ab-error"]) == 2
    error = capsys.readouterr().err
    assert "no registered model named 'ab-error'" in error and "'recpipe-ranker'" in error
    assert main(["ab", "--home", str(workspace.root), "--model", "ab-errors",
                 "--challenger", "7"]) == 2
    assert "ab-errors has no challenger '7'" in capsys.readouterr().err
    assert main(["ab", "--home", str(tmp_path / "empty")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert main(["ab", "--home", str(workspace.root), "--live-share-cap", "0.2"]) == 2
    assert "applies to recpipe-allocator only" in capsys.readouterr().err


def test_a_registry_outage_never_reads_as_no_champion(store, monkeypatch):
    """A registry that fails (not "no such alias") must stop registration, not hand the
    new version the champion alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from models.registry import register

    registered(store, "ab-outage")

    def unreachable(*_args, **_kwargs):
        raise MlflowException("registry unreachable", error_code=TEMPORARILY_UNAVAILABLE)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "get_model_version_by_alias", unreachable)
        with pytest.raises(MlflowException, match="unreachable"):
            register(store[1][1], "ab-outage")
    assert aliases("ab-outage")["champion"] == 1
