"""Lineage tags (``flows.lineage``): code, data and flow run of every MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from prefect import flow

from flows.caching import fingerprint
from flows.lineage import FLOW_RUN_ENV, lineage_tags, start_run

ROOT = Path(__file__).resolve().parents[2]


def test_data_tags_name_the_input_and_change_with_its_bytes(tmp_path):
    data = tmp_path / "examples"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"one")
    before = lineage_tags(data)
    assert before["recpipe.data.path"] == str(data.resolve())
    assert before["recpipe.data.fingerprint"] == fingerprint(data).split(":")[-1]
    (data / "train.parquet").write_bytes(b"two")
    assert lineage_tags(data)["recpipe.data.fingerprint"] != before["recpipe.data.fingerprint"]
    assert "recpipe.data.path" not in lineage_tags()


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="recpipe is not a git checkout here")
def test_code_tags_name_the_checkout_commit():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    tags = lineage_tags()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["recpipe.git.dirty"] in ("true", "false")


def test_no_flow_run_tags_outside_a_flow_run(monkeypatch):
    monkeypatch.delenv(FLOW_RUN_ENV, raising=False)
    assert not any(name.startswith("recpipe.prefect.") for name in lineage_tags())


def test_a_torchrun_rank_gets_the_flow_run_its_launcher_handed_over(monkeypatch):
    handed = {"recpipe.prefect.flow_run_id": "0b1c", "recpipe.prefect.flow_name": "recpipe-nightly"}
    monkeypatch.setenv(FLOW_RUN_ENV, json.dumps(handed))
    assert lineage_tags().items() >= handed.items()


@pytest.mark.integration
def test_inside_a_flow_run_the_tags_name_it(monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.delenv(FLOW_RUN_ENV, raising=False)

    @flow(name="lineage-probe")
    def probe() -> dict[str, str]:
        return lineage_tags()

    with prefect_test_harness(server_startup_timeout=90):
        state = probe(return_state=True)
    tags = state.result()
    assert tags["recpipe.prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert tags["recpipe.prefect.flow_name"] == "lineage-probe"
    assert tags["recpipe.prefect.flow_run_name"]


VICTIM = """
import sys, time, mlflow
from flows.lineage import start_run
mlflow.set_tracking_uri(sys.argv[1])
with start_run(sys.argv[2], "victim") as run:
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""


@pytest.mark.integration
def test_a_run_left_open_by_a_killed_process_is_ended_by_the_next_one(tmp_path, monkeypatch):
    import signal
    import sys

    import mlflow
    from mlflow import MlflowClient

    monkeypatch.delenv(FLOW_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("lineage", (tmp_path / "art").as_uri())
    client = MlflowClient(uri)
    # same host name and a dead pid, but another container's pid namespace: not ours
    elsewhere = client.create_run(experiment, tags={
        "recpipe.host": socket.gethostname(), "recpipe.pid": "999999999",
        "recpipe.process_space": "another-boot/pid:[4026531836]"}).info.run_id
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, uri, experiment], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    killed = victim.stdout.readline().strip()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert client.get_run(killed).info.status == "RUNNING"  # what a killed training leaves

    with start_run(experiment, "next") as run:
        assert client.get_run(killed).info.status == "KILLED"
        assert "ended without closing" in client.get_run(killed).data.tags["recpipe.abandoned"]
        assert client.get_run(elsewhere).info.status == "RUNNING"  # not ours to judge
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).data.tags["recpipe.pid"] == str(os.getpid())
