"""One nightly run per workspace: a second one started meanwhile stops with a clear message
and touches nothing; a run that was killed leaves no stale lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.cli import USER_ERROR_EXIT, main
from flows.workspace import Workspace, WorkspaceBusyError

HOLD = """
import sys, time
from flows.workspace import Workspace
with Workspace.from_env(sys.argv[1]).exclusive_run("a test holder"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the workspace's run lock."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ws")],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_nightly_run_stops_naming_the_holder_and_writes_nothing(
        holder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def no_flow_run(**_):
        raise AssertionError("a flow run started: the busy workspace was not refused first")

    monkeypatch.setattr("flows.nightly.nightly", no_flow_run)  # refused before any Prefect
    home = tmp_path / "ws"
    code = main(["nightly", "--home", str(home), "--users", "30", "--days", "3"])
    assert code == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert "is busy" in error and "a test holder" in error and f"{holder.pid}" in error
    assert not any(Workspace(home).raw.iterdir())  # nothing simulated
    assert not any(Workspace(home).lake.iterdir())  # nothing ingested


@pytest.mark.parametrize("argv", [["features"], ["train-ranker"], ["ab"],
                                  ["ingest", "--source", "simulator", "--input", "nowhere"]])
def test_commands_that_write_wait_their_turn_too(holder, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([*argv, "--home", str(tmp_path / "ws")]) == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert "is busy" in error and "a test holder" in error


def test_a_killed_run_releases_the_workspace(holder, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(WorkspaceBusyError, match="a test holder"), \
            workspace.exclusive_run("second"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with workspace.exclusive_run("after the kill"):
                break
        except WorkspaceBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.slow
def test_two_real_nightly_runs_started_together(tmp_path, monkeypatch, capsys):
    """Not a stand-in holder: a real `recpipe nightly` in another process holds the
    workspace; a second real one stops at once, naming the first's flow run, and the first
    goes on untouched."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Workspace(tmp_path / "ws")
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "nightly", "--home", str(workspace.root),
         "--users", "150", "--days", "4", "--pretrain-method", "none",
         "--allocator-algo", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (workspace.run_lock_holder_file.exists()
                   and "recpipe-nightly flow run" in workspace.run_lock_holder_file.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "no lock taken"
            time.sleep(0.5)
        assert main(["nightly", "--home", str(workspace.root), "--users", "30",
                     "--days", "3"]) == USER_ERROR_EXIT
        error = capsys.readouterr().err
        assert "is busy" in error and "recpipe-nightly flow run" in error
        assert f"{first.pid}" in error
        assert first.poll() is None  # the first run is still going
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # with the Prefect server it started
        first.wait()
