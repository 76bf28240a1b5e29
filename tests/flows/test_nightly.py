"""The whole nightly flow end to end on tiny simulated data, as a real Prefect flow run."""

from __future__ import annotations

import asyncio

import mlflow
import polars as pl
import pytest

from features.schema import RAW_INPUT_COLUMNS
from flows.caching import fingerprint
from flows.workspace import Workspace

pytestmark = pytest.mark.integration


def test_nightly_flow_registers_a_ranker_that_loads_and_scores(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    workspace = Workspace(tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=90):
        state = nightly(home=str(workspace.root), users=120, days=4, seed=3, epochs=1,
                        pretrain_steps=6, allocator_steps=300,
                        allocator_eval_users=60, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    ingest = summary["ingest"]
    assert ingest["input_rows"] == ingest["accepted"] + ingest["quarantined"] + ingest["duplicates"]
    assert summary["features"]["rows"]["test"] > 0
    assert summary["register"]["version"] == 1
    assert set(summary["register"]["aliases"]) == {"challenger", "champion"}
    metrics = summary["train_ranker"]["metrics"]["test"]
    assert 0.5 < metrics["click"]["auc"] <= 1.0
    # the night simulated its logs, so the ranker run has the oracle of the true probabilities
    assert 0.5 < metrics["click"]["oracle_auc"] <= 1.0
    assert metrics["click"]["auc_oracle_ratio"] == pytest.approx(
        (metrics["click"]["auc"] - 0.5) / (metrics["click"]["oracle_auc"] - 0.5))

    mlflow.set_tracking_uri(workspace.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/recpipe-ranker@challenger")
    rows = pl.read_parquet(workspace.examples / "test.parquet").head(50)
    naive_utc = pl.col("ts").dt.replace_time_zone(None)  # the signature's datetime is naive UTC
    scores = model.predict(rows.select(RAW_INPUT_COLUMNS).with_columns(naive_utc).to_pandas())
    assert list(scores.columns) == ["click", "like", "follow", "long_view", "watch_time"]
    assert len(scores) == 50
    assert scores["click"].between(0, 1).all()
    assert (scores["watch_time"] >= 0).all()

    # the night pretrained an encoder (the ranker-with-encoder path: test_pretrain_step),
    # and trained and A/B'd an allocator
    assert summary["pretrain"]["registered"]["name"] == "recpipe-user-encoder"
    assert summary["train_ranker"]["user_encoder"] is None
    assert pl.read_parquet(summary["pretrain"]["embeddings_path"]).height > 0
    allocator = summary["train_allocator"]
    assert allocator["algo"] == "sl_mgac" and allocator["true_value"]["eval_users"] == 60
    assert allocator["registered"]["name"] == "recpipe-allocator"
    assert summary["allocator_ab"]["status"] == "same-version"  # the first night's only one
    allocation = mlflow.pyfunc.load_model("models:/recpipe-allocator@champion")
    log = pl.read_parquet(workspace.raw / "simulator-seed3-users120-days4" / "allocations.parquet")
    decided = allocation.predict(log.head(5).to_pandas())
    assert decided["p_insert"].between(0, 1).all()

    # every MLflow run the night started names the flow run, and the data it trained on
    night = str(state.state_details.flow_run_id)
    runs = {run_id: mlflow.get_run(run_id).data.tags for run_id in (
        summary["train_ranker"]["run_id"], summary["pretrain"]["run_id"], allocator["run_id"])}
    for tags in runs.values():
        assert tags["recpipe.prefect.flow_run_id"] == night
        assert tags["recpipe.prefect.flow_name"] == "recpipe-nightly"
    ranker_tags = runs[summary["train_ranker"]["run_id"]]
    assert ranker_tags["recpipe.data.path"] == str(workspace.examples.resolve())
    assert ranker_tags["recpipe.data.fingerprint"] == fingerprint(workspace.examples).split(":")[-1]
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`recpipe.prefect.flow_run_id` = '{night}'")
    assert {run.info.run_id for run in found} >= set(runs)


def test_bad_input_fails_at_once_and_io_errors_are_retried():
    from prefect.states import Failed

    from features.ingest import IngestError
    from flows.nightly import IO_RETRIES, retry_unless_bad_input

    assert IO_RETRIES["retries"] > 0
    assert not retry_unless_bad_input(None, None, Failed(data=IngestError("semicolons")))
    assert retry_unless_bad_input(None, None, Failed(data=OSError("disk full")))


def test_a_nightly_on_bad_input_fails_naming_the_file_after_one_attempt(tmp_path):
    """In a real flow run: an input that is not what its source says fails the ingest task
    on its first attempt (bad input is not retried) and the night stops, naming the file."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    bad = tmp_path / "events.csv"
    bad.write_text("user_id;video_id\n1;2\n")  # semicolons: not the KuaiRand columns
    workspace = Workspace(tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=90):
        state = nightly(home=str(workspace.root), source="kuairand", input_path=str(bad),
                        return_state=True)
        assert state.is_failed()
        with pytest.raises(ValueError, match=str(bad)):
            state.result()

        async def ingest_runs():
            async with get_client() as client:
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return [run for run in runs if run.name.startswith("ingest")]

        runs = asyncio.run(ingest_runs())
    assert len(runs) == 1 and runs[0].run_count == 1, [(r.name, r.run_count) for r in runs]
    assert runs[0].state.is_failed()
    assert not (workspace.lake / "events").exists()  # nothing half-written
