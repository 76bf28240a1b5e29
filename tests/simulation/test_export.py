"""write_simulation writes every file atomically, refuses to clobber, and is idempotent."""

from __future__ import annotations

import json
from dataclasses import replace

import polars as pl
import pytest

from features.contract import EVENT_SCHEMA
from simulation.export import MANIFEST, TABLES, write_simulation
from simulation.simulator import simulate


def test_writes_every_file_with_the_right_content(logged, tmp_path):
    out = tmp_path / "sim"
    manifest = write_simulation(logged, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*TABLES.values(), MANIFEST])
    events = pl.read_parquet(out / "events.parquet")
    assert list(events.schema.items()) == list(EVENT_SCHEMA.items())
    assert events.equals(logged.events)
    for name, file in TABLES.items():
        frame = pl.read_parquet(out / file)
        assert frame.height == manifest["counts"][name] == getattr(logged, name).height, name
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["summary"] == pytest.approx(logged.summary())
    assert manifest["config"]["seed"] == logged.config.seed
    assert manifest["config"]["start_date"] == logged.config.start_date.isoformat()
    assert manifest["policy"] == logged.policy_name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_leaves_no_output_directory(logged, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pl.DataFrame.write_parquet

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        write_simulation(logged, tmp_path / "sim")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_output(logged, small_config, tmp_path, monkeypatch):
    out = tmp_path / "sim"
    before = write_simulation(logged, out)
    other = simulate(replace(small_config, seed=small_config.seed + 1, days=1))
    monkeypatch.setattr(pl.DataFrame, "write_parquet",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        write_simulation(other, out, overwrite=True)
    assert json.loads((out / MANIFEST).read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sim"]


def test_refuses_a_different_nonempty_dir_unless_overwrite(logged, small_config, tmp_path):
    out = tmp_path / "sim"
    write_simulation(logged, out)
    assert write_simulation(logged, out) == json.loads((out / MANIFEST).read_text())
    other = simulate(replace(small_config, seed=small_config.seed + 1, days=1))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_simulation(other, out)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_simulation(logged, stranger)
    (stranger / MANIFEST).write_text('{"name": "my web app"}')  # a manifest, not ours
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds no simulator output"):
            write_simulation(logged, stranger, overwrite=overwrite)
    assert (stranger / "keep.txt").read_text() == "mine"
    manifest = write_simulation(other, out, overwrite=True)
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["config"]["seed"] == small_config.seed + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "sim"]


def test_an_incomplete_output_with_the_same_manifest_is_written_again(logged, tmp_path):
    out = tmp_path / "sim"
    write_simulation(logged, out)
    (out / TABLES["events"]).unlink()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_simulation(logged, out)
    write_simulation(logged, out, overwrite=True)
    assert pl.read_parquet(out / TABLES["events"]).height == logged.events.height


def test_writes_into_an_existing_empty_dir(logged, tmp_path):
    out = tmp_path / "sim"
    out.mkdir()
    write_simulation(logged, out)
    assert (out / "events.parquet").is_file()
