"""The schedule really fires: `recpipe schedule` with a cron one minute ahead, on a real
Prefect server, produces a completed nightly flow run at that minute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.cli import answers_health, stop_server
from flows.workspace import Workspace
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MIN_LEAD_S = 40
"""The cron minute is at least this far ahead: time for the deployment to be served."""


def next_minute(now: datetime) -> datetime:
    minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return minute if (minute - now).total_seconds() >= MIN_LEAD_S else minute + timedelta(minutes=1)


def nightly_runs(api_url: str) -> list[dict]:
    body = json.dumps({"deployments": {"name": {"any_": ["nightly"]}}}).encode()
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_until(condition, timeout_s: float, what: str, logs: list[Path]) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2.0)
    tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
    pytest.fail(f"{what} within {timeout_s:.0f} s\n{tails}")


def test_the_cron_schedule_fires_a_nightly_run_on_a_real_prefect_server(tmp_path):
    workspace = Workspace(tmp_path / "ws").create()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # as a user runs it: no PREFECT_API_URL, no PREFECT_HOME; `recpipe schedule --port` must
    # find the server (started as it would start it, on the workspace's Prefect home) itself
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("PREFECT_API_URL", "PREFECT_HOME")},
           "HOME": str(tmp_path / "home"),  # a stray ~/.prefect stays in the test's folder
           # the scheduler service looks for due schedules every 5 s instead of every 60 s
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    server_env = {**env, "PREFECT_HOME": str(workspace.prefect_home)}
    (tmp_path / "home").mkdir()
    server_log, schedule_log = tmp_path / "server.log", tmp_path / "schedule.log"
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", str(port)], server_log, server_env)
    schedule = None
    try:
        wait_until(lambda: answers_health(api_url), 120, "the Prefect server did not start",
                   [server_log])
        fire_at = next_minute(datetime.now(UTC))
        schedule = start(
            [sys.executable, "-m", "flows.cli", "schedule", "--home", str(workspace.root),
             "--port", str(port),
             "--cron", f"{fire_at.minute} {fire_at.hour} * * *", "--timezone", "UTC",
             "--users", "80", "--days", "3", "--epochs", "1", "--pretrain-method", "none",
             "--allocator-algo", "none"], schedule_log, env)

        def finished_run() -> dict | None:
            done = [run for run in nightly_runs(api_url)
                    if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED",
                                                                  "CRASHED")]
            return done[0] if done else None

        wait_s = (fire_at - datetime.now(UTC)).total_seconds() + 240
        run = wait_until(finished_run, wait_s, "no scheduled nightly run finished",
                         [schedule_log, server_log])
    finally:
        for process in (schedule, server):
            if process is not None:
                stop_server(process)

    assert run["state"]["type"] == "COMPLETED", (run["state"], schedule_log.read_text()[-3000:])
    served = schedule_log.read_text(errors="replace")
    # served by the server it found, not by a temporary one of its own (which only "worked"
    # when both happened to share one database)
    assert "ephemeral server" not in served and "Starting temporary server" not in served
    assert not (tmp_path / "home" / ".prefect").exists()  # Prefect used the workspace's home
    expected = datetime.fromisoformat(run["expected_start_time"])
    assert expected == fire_at, (expected, fire_at)  # fired by the schedule, at its minute
    assert run["parameters"]["home"] == str(workspace.root)
    mlflow.set_tracking_uri(workspace.tracking_uri)
    versions = MlflowClient().search_model_versions("name='recpipe-ranker'")
    assert [int(v.version) for v in versions] == [1]


@pytest.mark.slow
def test_a_server_the_schedule_started_stops_with_it(tmp_path):
    """No server answering: `recpipe schedule` starts one on the workspace's Prefect home and
    serves on it; stopped (SIGTERM, as a service manager does), it takes that server along."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("PREFECT_API_URL", "PREFECT_HOME")}, "HOME": str(tmp_path)}
    workspace = Workspace(tmp_path / "ws")
    log = tmp_path / "schedule.log"
    schedule = start([sys.executable, "-m", "flows.cli", "schedule", "--home",
                      str(workspace.root), "--port", str(port), "--cron", "0 3 * * *"], log, env)
    try:
        wait_until(lambda: answers_health(api_url) and "being served" in log.read_text(),
                   180, "the schedule did not start its server and serve", [log])
        schedule.send_signal(signal.SIGTERM)
        schedule.wait(timeout=60)
        wait_until(lambda: not answers_health(api_url), 30, "its server still answers", [log])
        assert (workspace.prefect_home / "server.log").exists()
    finally:
        if schedule.poll() is None:
            stop_server(schedule)
