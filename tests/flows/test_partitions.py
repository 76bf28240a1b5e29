"""Per-date partitions fan out as Prefect mapped tasks: on threads, and on a real Dask
cluster (a 2-worker LocalCluster reached by its address, as `--runner dask --address`);
either way the lake is byte-identical to a plain ingest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flows.partitions import PartitionRunner
from flows.steps import ingest_step
from flows.workspace import Workspace
from tests.conftest import make_events

pytestmark = pytest.mark.integration


def lake_hashes(workspace: Workspace) -> dict[str, str]:
    events = workspace.lake / "events"
    return {str(p.relative_to(events)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(events.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def log_file(tmp_path) -> Path:
    path = tmp_path / "events.parquet"
    make_events(days=4).write_parquet(path)
    return path


def test_runner_names_are_checked():
    with pytest.raises(ValueError, match="runner must be one of"):
        PartitionRunner("spark")
    with pytest.raises(ValueError, match="needs runner 'dask'"):
        PartitionRunner("threads", address="tcp://127.0.0.1:8786")


def test_an_address_without_the_dask_runner_exits_2(log_file, tmp_path, capsys):
    from flows.cli import USER_ERROR_EXIT, main

    argv = ["ingest", "--home", str(tmp_path / "ws"), "--source", "canonical", "--input",
            str(log_file), "--address", "tcp://127.0.0.1:8786"]
    assert main(argv) == USER_ERROR_EXIT
    assert "needs --runner dask" in capsys.readouterr().err


def test_threads_and_a_dask_cluster_give_the_plain_ingest_lake(harness, log_file, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    plain = Workspace(tmp_path / "plain")
    reference = ingest_step("canonical", log_file, plain)
    assert len(reference["partitions"]) >= 4

    threads = Workspace(tmp_path / "threads")
    assert ingest_step("canonical", log_file, threads,
                       PartitionRunner("threads", workers=2)) == {
        **reference, "input_path": str(log_file),
        "quarantine_path": reference["quarantine_path"].replace(str(plain.root),
                                                                str(threads.root))}
    assert lake_hashes(threads) == lake_hashes(plain)
    from flows.cli import main  # the command: one flow run, its merges as mapped tasks

    argv = ["ingest", "--home", str(tmp_path / "cli"), "--source", "canonical", "--input",
            str(log_file), "--runner", "threads"]
    assert main(argv) == 0
    assert lake_hashes(Workspace(tmp_path / "cli")) == lake_hashes(plain)

    on_dask = Workspace(tmp_path / "dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client, \
            get_task_stream(client) as stream:
        report = ingest_step("canonical", log_file, on_dask,
                             PartitionRunner("dask", address=cluster.scheduler_address))
    assert report["accepted"] == reference["accepted"]
    assert lake_hashes(on_dask) == lake_hashes(plain)
    merges = [task for task in stream.data if "merge_partition" in str(task["key"])]
    assert len(merges) == len(reference["partitions"]), stream.data  # one task per date
    assert all(task["worker"].startswith("tcp://") for task in merges)  # in worker processes
