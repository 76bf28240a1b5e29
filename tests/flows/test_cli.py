"""The `recpipe` CLI in-process: the step commands chained on tiny simulated data, --json,
and clear non-zero exits on bad input."""

from __future__ import annotations

import polars as pl
import pytest

from flows.cli import USER_ERROR_EXIT, main
from tests.conftest import REPO_ROOT, run_json


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in ("RECPIPE_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECPIPE_HOME", str(tmp_path / "ws"))
    return tmp_path / "ws"


def test_steps_chain_from_simulation_to_a_registered_ranker(home, tmp_path, capsys):
    raw = tmp_path / "raw"
    simulated = run_json(capsys, "simulate", "--out", str(raw), "--users", "80", "--days", "4")
    n = simulated["summary"]["n_impressions"]
    first = run_json(capsys, "ingest", "--source", "simulator", "--input", str(raw))
    assert (first["input_rows"], first["accepted"], first["duplicates"]) == (n, n, 0)
    again = run_json(capsys, "ingest", "--source", "simulator", "--input", str(raw))
    assert (again["accepted"], again["duplicates"]) == (0, n)
    built = run_json(capsys, "features", "--history-length", "10")
    assert sum(built["rows"].values()) == n
    assert len(built["dates"]["test"]) == 1 and len(built["dates"]["valid"]) == 1
    train_file = home / "lake" / "examples" / "train.parquet"
    whole = pl.read_parquet(train_file)
    bucketed = run_json(capsys, "features", "--history-length", "10", "--user-buckets", "3",
                        "--max-rows-in-memory", "500")
    assert bucketed["rows"] == built["rows"]
    assert pl.read_parquet(train_file).equals(whole)
    assert main(["features", "--max-rows-in-memory", "0"]) == USER_ERROR_EXIT
    assert "--max-rows-in-memory: must be at least 1" in capsys.readouterr().err
    trained = run_json(capsys, "train-ranker", "--epochs", "1")
    for split in ("valid", "test"):
        for task in ("click", "like", "follow", "long_view"):
            assert set(trained["metrics"][split][task]) >= {"auc", "gauc", "logloss"}
    assert trained["registered"]["version"] == 1
    retrained = run_json(capsys, "train-ranker", "--epochs", "1")
    assert retrained["registered"] == {"name": "recpipe-ranker", "version": 2,
                                       "aliases": ["challenger"]}


def test_simulate_never_replaces_a_folder_that_is_not_a_simulator_output(home, tmp_path,
                                                                          capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("important")
    argv = ["simulate", "--out", str(precious), "--users", "5", "--days", "2"]
    assert main(argv) == USER_ERROR_EXIT
    assert "holds no simulator output" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "important"


def test_json_is_strict_json_and_ingest_notes_reach_stderr(home, tmp_path, capsys):
    from flows.cli import json_line

    line = json_line({"auc": float("nan"), "n": [float("inf"), 1.5], "ok": True})
    assert line == '{"auc": null, "n": [null, 1.5], "ok": true}'
    import numpy as np

    assert json_line({"x": np.float32(0.5), "v": np.arange(2)}) == '{"x": 0.5, "v": [0, 1]}'
    raw, drop = tmp_path / "raw", tmp_path / "drop"
    run_json(capsys, "simulate", "--out", str(raw), "--users", "20", "--days", "2")
    drop.mkdir()
    (raw / "events.parquet").rename(drop / "events.parquet")
    (drop / "README.txt").write_text("not data")
    assert main(["ingest", "--source", "canonical", "--input", str(drop)]) == 0
    assert "note: drop: ignored entries ['README.txt']" in capsys.readouterr().err


def test_ingest_of_a_file_that_is_not_kuairand_exits_2_naming_it(home, tmp_path, capsys):
    bad = tmp_path / "notes.csv"
    bad.write_text("hello,world\n1,2\n")
    assert main(["ingest", "--source", "kuairand", "--input", str(bad)]) == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert str(bad) in error and "missing columns" in error
    assert not any((home / "lake" / "events").glob("date=*"))


def test_training_without_examples_says_what_to_run(home, capsys):
    assert main(["train-ranker"]) == USER_ERROR_EXIT
    assert "recpipe features" in capsys.readouterr().err


def test_ui_prints_commands_for_this_workspace(home, capsys):
    summary = run_json(capsys, "ui")
    assert f"sqlite:///{home}/mlflow.db" in summary["mlflow_command"]
    assert f"PREFECT_HOME={home}/prefect" in summary["prefect_command"]


@pytest.mark.parametrize("command", [
    "simulate", "ingest", "features", "train-ranker", "nightly", "schedule", "ope", "ab",
    "pretrain", "train-allocator", "serve", "score", "ui",
])
def test_every_command_has_help_and_json(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "named"), [
    (["score", "--input", "in.parquet", "--output", "out.parquet", "--chunk-rows", "0"],
     "--chunk-rows"),
    (["train-ranker", "--epochs", "0"], "--epochs"),
    (["train-ranker", "--batch-size", "-5"], "--batch-size"),
    (["train-ranker", "--lr", "nan"], "--lr"),
    (["features", "--history-length", "0"], "--history-length"),
    (["features", "--test-days", "-1"], "--test-days"),
    (["pretrain", "--layers", "-1"], "--layers"),
    (["serve", "--port", "70000"], "--port"),
    (["ui", "--mlflow-port", "70000"], "--mlflow-port"),
    (["train-allocator", "--steps", "-5"], "--steps"),
    (["train-allocator", "--live-share-cap", "-1"], "--live-share-cap"),
    (["ope", "obd", "--n-sim", "0"], "--n-sim"),
    (["nightly", "--pretrain-steps", "0"], "--pretrain-steps"),
    (["ab", "--eval-users", "0"], "--eval-users"),
    (["pretrain", "--users-table", "no-such-users.parquet"], "--users-table"),
    (["schedule", "--cron", "bogus"], "cron"),  # checked before any server starts
    (["schedule", "--timezone", "Mars/Base"], "timezone"),
    (["schedule", "--source", "kuairand"], "--input"),
    (["nightly", "--source", "kuairand"], "--input"),
    (["nightly", "--days", "2"], "--days 2: the time split needs at least 3"),  # before Prefect
    # refused before torchrun starts any rank
    (["train-ranker", "--nproc", "2", "--batch-size", "3"], "--batch-size with --nproc 2"),
    (["pretrain", "--nproc", "4", "--batch-size", "6"], "fewer than 2 users per rank"),
])
def test_an_option_out_of_range_exits_2_naming_it(home, capsys, argv, named):
    assert main(argv) == USER_ERROR_EXIT
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error


def test_a_home_that_is_a_file_exits_2_naming_it(tmp_path, capsys):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    assert main(["ui", "--home", str(not_a_folder)]) == USER_ERROR_EXIT
    assert str(not_a_folder) in capsys.readouterr().err


def test_the_parser_imports_no_prefect_before_the_workspace_configures_it():
    """Prefect reads its settings (home, API URL, timeouts) once, at import: the CLI must
    parse its arguments and point Prefect at the workspace before anything imports it."""
    import subprocess
    import sys

    probe = ("import sys; from flows.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT).stdout
    assert out.strip() == "[]"


def test_the_metrics_table_shows_regression_tasks_too(capsys):
    from flows.cli import print_metrics

    print_metrics({"test": {"click": {"auc": 0.61, "gauc": 0.55, "logloss": 0.42},
                            "watch_time": {"rmse_log": 1.234, "n": 10}}})
    header, click, watch = capsys.readouterr().out.splitlines()
    assert header.split()[-2:] == ["RMSE", "log"]
    assert click.split() == ["test", "click", "0.6100", "0.5500", "0.4200"]
    assert watch.split() == ["test", "watch_time", "1.2340"]
