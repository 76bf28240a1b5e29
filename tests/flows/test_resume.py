"""A nightly run killed mid-way and started again resumes from its completed tasks (Prefect
caching keyed on the content of what each task reads) and ends where an uninterrupted run
ends."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.caching import ReadsFiles, fingerprint
from flows.workspace import Workspace

TINY_NIGHT = {"users": 120, "days": 4, "seed": 3, "epochs": 1, "pretrain_method": None,
              "allocator_algo": None}
TINY_NIGHT_ARGS = ["--users", "120", "--days", "4", "--seed", "3", "--epochs", "1",
                   "--pretrain-method", "none", "--allocator-algo", "none"]


def test_fingerprint_follows_content_not_modification_time(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"one")
    (folder / ".staging-x").mkdir()
    first = fingerprint(folder)
    os.utime(folder / "a.parquet", (0, 0))
    (folder / ".staging-x" / "half.parquet").write_bytes(b"ignored")
    assert fingerprint(folder) == first
    (folder / "a.parquet").write_bytes(b"two")
    assert fingerprint(folder) != first
    assert fingerprint(tmp_path / "absent").endswith(":missing")


def test_cache_key_changes_with_parameters_and_with_what_the_task_reads(tmp_path):
    class Ctx:
        class task:  # noqa: N801 - stands for TaskRunContext.task
            name = "features"

    data = tmp_path / "events.parquet"
    data.write_bytes(b"v1")
    policy = ReadsFiles(reads=lambda params: [Path(params["path"])])

    def key(path: Path, history: int) -> str | None:
        return policy.compute_key(Ctx, {"path": str(path), "history": history}, {})

    base = key(data, 20)
    assert key(data, 20) == base
    assert key(data, 30) != base
    data.write_bytes(b"v2")
    assert key(data, 20) != base


def wait_for_registration(workspace: Workspace, process: subprocess.Popen,
                          timeout_s: float) -> None:
    """Until the run registered its ranker: training's result is persisted by then (the flow
    registers only after the training task returned)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registered_versions(workspace.mlflow_db):
            return
        if process.poll() is not None:
            pytest.fail(f"the nightly ended (status {process.returncode}) before it was killed")
        time.sleep(0.2)
    pytest.fail(f"no ranker registered in {workspace.root} within {timeout_s:.0f} s")


def registered_versions(db: Path) -> int:
    """Versions of recpipe-ranker in the MLflow SQLite file, read-only (an MlflowClient here
    would race the running process creating the tables)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(
                "SELECT count(*) FROM model_versions WHERE name = 'recpipe-ranker'").fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        return 0


@pytest.mark.integration
def test_a_killed_nightly_resumes_from_completed_tasks_and_ends_like_an_uninterrupted_one(
        tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    killed = Workspace(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nightly", "--home", str(killed.root),
         *TINY_NIGHT_ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_registration(killed, process, timeout_s=300)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its ephemeral Prefect server
        process.wait()

    mlflow.set_tracking_uri(killed.tracking_uri)
    ranker_runs_before = len(mlflow.search_runs(experiment_names=["recpipe-rankers"]))
    assert ranker_runs_before == 1
    with prefect_test_harness(server_startup_timeout=90):
        resumed = nightly(home=str(killed.root), **TINY_NIGHT)
        reference = nightly(home=str(tmp_path / "reference"), **TINY_NIGHT)

    states = resumed["task_states"]
    for name in ("simulate", "ingest", "features", "train-ranker"):
        assert states[name] == "Cached", states
    assert reference["task_states"]["train-ranker"] == "Completed"
    mlflow.set_tracking_uri(killed.tracking_uri)
    assert len(mlflow.search_runs(experiment_names=["recpipe-rankers"])) == ranker_runs_before
    versions = MlflowClient().search_model_versions("name='recpipe-ranker'")
    assert [int(v.version) for v in versions] == [1]  # registered once, killed or not
    assert states["register-ranker"] in ("Cached", "Completed")  # killed before or after its record
    assert resumed["register"]["version"] == 1
    assert set(resumed["register"]["aliases"]) == {"challenger", "champion"}
    for key in ("ingest", "features"):
        assert (without_root(resumed[key], killed.root)
                == without_root(reference[key], tmp_path / "reference"))
    assert_same_metrics(resumed["train_ranker"]["metrics"], reference["train_ranker"]["metrics"])


def without_root(summary: dict, root: Path) -> str:
    """The summary as JSON with the workspace root blanked, to compare two workspaces (and
    the quarantine file's input-path hash: the inputs lie in the two workspaces)."""
    text = json.dumps(summary, sort_keys=True).replace(str(root), "<workspace>")
    return re.sub(r"-[0-9a-f]{8}\.parquet", "-<input>.parquet", text)


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for split in want:
        for task, values in want[split].items():
            for name, value in values.items():
                # the two runs may use different torch thread counts: summation order, not training
                assert got[split][task][name] == pytest.approx(value, abs=1e-4, nan_ok=True), \
                    (split, task, name)


@pytest.mark.integration
def test_a_deleted_lake_is_rebuilt_not_taken_from_the_cache(tmp_path):
    """A record must not stand in for outputs deleted since: with the lake gone, ingest and
    features run again (and the examples, rebuilt identical, keep training cached)."""
    import shutil

    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    home = tmp_path / "ws"
    night = {**TINY_NIGHT, "users": 60, "days": 3, "home": str(home)}
    with prefect_test_harness(server_startup_timeout=90):
        nightly(**night)
        shutil.rmtree(home / "lake")
        again = nightly(**night)
    assert again["task_states"]["simulate"] == "Cached"
    assert again["task_states"]["ingest"] == again["task_states"]["features"] == "Completed"
    assert again["task_states"]["train-ranker"] == "Cached"
    assert (home / "lake" / "examples" / "train.parquet").is_file()

    # examples rebuilt by hand with another history length: features runs again, not the
    # ingest, and the night trains on what its own parameters build (cached: same bytes)
    from features.build import FeatureConfig
    from flows.steps import features_step
    from flows.workspace import Workspace

    features_step(Workspace(home), FeatureConfig(history_length=3))
    with prefect_test_harness(server_startup_timeout=90):
        third = nightly(**night)
    assert third["task_states"]["ingest"] == "Cached"
    assert third["task_states"]["features"] == "Completed"
    schema = json.loads((home / "lake" / "examples" / "schema.json").read_text())["schema"]
    assert schema["history_length"] == 20
    assert third["task_states"]["train-ranker"] == "Cached"


def running_ranker_runs(db: Path) -> int:
    """RUNNING runs of recpipe-rankers in the MLflow SQLite file (read-only, as above)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(
                "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) "
                "WHERE experiments.name = 'recpipe-rankers' AND runs.status = 'RUNNING'"
            ).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
@pytest.mark.integration
def test_a_nightly_killed_while_training_resumes_and_closes_the_abandoned_run(tmp_path):
    """Killed inside train-ranker (its MLflow run open): the next night trains again, marks
    the abandoned run KILLED (it would read RUNNING forever) and registers exactly once."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    night = {**TINY_NIGHT, "users": 300, "epochs": 4}
    killed = Workspace(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nightly", "--home", str(killed.root),
         *TINY_NIGHT_ARGS, "--users", "300", "--epochs", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not running_ranker_runs(killed.mlflow_db):
            assert process.poll() is None and time.monotonic() < deadline, "no training seen"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert registered_versions(killed.mlflow_db) == 0  # killed before registration

    with prefect_test_harness(server_startup_timeout=90):
        resumed = nightly(home=str(killed.root), **night)
    assert resumed["task_states"]["train-ranker"] == "Completed"  # not cached: it never ended
    mlflow.set_tracking_uri(killed.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["recpipe-rankers"], output_format="list")
    assert sorted(run.info.status for run in runs) == ["FINISHED", "KILLED"]
    abandoned = next(run for run in runs if run.info.status == "KILLED")
    assert "ended without closing" in abandoned.data.tags["recpipe.abandoned"]
    versions = MlflowClient().search_model_versions("name='recpipe-ranker'")
    assert [int(v.version) for v in versions] == [1]
