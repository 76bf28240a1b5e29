"""Write a `SimulationResult` to a directory of Parquet files plus a manifest, atomically.

Files are written into a temporary sibling directory which is renamed into place only when
every file is complete, so a failure never leaves a partial output directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from features.contract import EVENT_SCHEMA
from simulation.simulator import SimulationResult

SIMULATOR_VERSION = "1"
"""Bumped whenever the simulated model changes, so old outputs are not mistaken for new."""

TABLES: dict[str, str] = {
    "events": "events.parquet",
    "allocations": "allocations.parquet",
    "users": "users.parquet",
    "items": "items.parquet",
    "ground_truth": "ground_truth.parquet",
    "sessions": "sessions.parquet",
}
"""SimulationResult frame -> file name."""

MANIFEST = "manifest.json"


def build_manifest(result: SimulationResult) -> dict[str, Any]:
    """JSON-ready description of `result`: config, policy, files, row counts, true summary."""
    manifest = {
        "simulator_version": SIMULATOR_VERSION,
        "source": "simulator",
        "policy": result.policy_name,
        "config": result.config.to_dict(),
        "files": dict(TABLES),
        "counts": {name: getattr(result, name).height for name in TABLES},
        "summary": result.summary(),
    }
    return json.loads(json.dumps(manifest))


def _check_events(result: SimulationResult) -> None:
    """Refuse to write events that drifted from the contract."""
    if dict(result.events.schema) != EVENT_SCHEMA:
        raise ValueError(f"events schema {dict(result.events.schema)} != EVENT_SCHEMA")


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of an existing output directory, or None if unreadable/absent."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_simulation(result: SimulationResult, out_dir: str | os.PathLike[str],
                     overwrite: bool = False) -> dict[str, Any]:
    """Write the result's tables and `manifest.json` to `out_dir` atomically.

    An existing non-empty `out_dir` holding the same manifest and all its tables is left as
    is (idempotent retries); one holding another (or an incomplete) simulator output raises
    FileExistsError unless `overwrite=True`; one holding anything else (no `manifest.json`
    of the simulator's: not ours) always raises FileExistsError, so no folder of the user's
    is ever replaced.

    Returns:
        The manifest dict (config, policy, files, counts, summary).
    """
    _check_events(result)
    out = Path(out_dir)
    manifest = build_manifest(result)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        existing = _existing_manifest(out)
        complete = all((out / file).is_file() for file in TABLES.values())
        if existing == manifest and complete:
            return manifest
        if existing is None or existing.get("source") != "simulator":
            raise FileExistsError(f"{out} is not empty and holds no simulator output (no "
                                  f"simulator {MANIFEST}); refusing to replace it: pick another "
                                  "folder")
        if not overwrite:
            raise FileExistsError(f"{out} is not empty and holds a different output; "
                                  "pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, file in TABLES.items():
            getattr(result, name).write_parquet(tmp / file)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`, moving an existing `out` aside first and deleting it after."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
