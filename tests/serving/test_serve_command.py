"""``serve``: a real uvicorn process on 127.0.0.1, stopped by the test; user errors exit 2."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serving.__main__ import main
from serving.cli import bind, parse_task_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_runs_a_real_server_and_stops_cleanly(store, stop):
    command = [sys.executable, "-m", "serving", "serve", "--tracking-uri", store.tracking_uri,
               "--port", "0", "--poll-interval", "0.5", "--log-level", "warning", "--json"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+);", banner)
        assert match, banner + process.stderr.read()
        url = match.group(1)
        assert "recpipe-ranker v1 (@champion)" in banner and "no allocator" in banner
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        ranked = httpx.post(f"{url}/rank", timeout=30, json={
            "user_id": 7, "candidates": [{"item_id": 12}, {"item_id": 40}]}).json()["ranked"]
        assert len(ranked) == 2
    finally:
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["url"] == url and summary["ranker"]["version"] == 1


def test_serve_without_a_champion_exits_2_saying_what_to_do(tmp_path, capsys):
    empty = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["serve", "--tracking-uri", empty, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no model version behind models:/recpipe-ranker@champion" in err
    assert "recpipe train-ranker" in err


def test_serve_on_a_busy_port_exits_2(store, capsys):
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        argv = ["serve", "--tracking-uri", store.tracking_uri, "--port", str(port)]
        assert main(argv) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()


def test_serve_with_weights_for_an_unknown_task_exits_2(store, capsys):
    argv = ["serve", "--tracking-uri", store.tracking_uri, "--port", "0",
            "--task-weights", "watchtime=1"]
    assert main(argv) == 2
    assert "unknown task(s) ['watchtime']" in capsys.readouterr().err


def test_task_weights_option_parses_and_rejects_clearly():
    assert parse_task_weights("click=1, watch_time=0.02") == {"click": 1.0, "watch_time": 0.02}
    for bad in ("click", "click=abc", "=1", "click=nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_task_weights(bad)


def test_light_constants_match_the_registry_adapter():
    from models import registry
    from serving import settings

    assert settings.RANKER_MODEL_NAME == registry.RANKER_MODEL_NAME
    assert settings.CHAMPION == registry.CHAMPION


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    """asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is IPPROTO_TCP;
    a proto-0 socket made every small response wait ~40 ms for a delayed ACK."""
    import socket

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_python_m_serving_reads_the_tracking_uri_as_recpipe_does(monkeypatch, tmp_path):
    from serving.__main__ import Store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-fallback:5000")
    monkeypatch.setenv("RECPIPE_TRACKING_URI", "http://mlflow.internal:5000")
    assert Store.from_env().tracking_uri == "http://mlflow.internal:5000"
    monkeypatch.delenv("RECPIPE_TRACKING_URI")
    assert Store.from_env().tracking_uri == "http://mlflow-fallback:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("RECPIPE_HOME", str(tmp_path / "ws"))
    assert Store.from_env().tracking_uri == f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}"
