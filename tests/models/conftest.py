"""Fixtures for the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace whose lake and examples hold ``make_events()`` (once per test module)."""
    from flows.steps import features_step, ingest_step
    from flows.workspace import Workspace
    from tests.conftest import make_events

    root = tmp_path_factory.mktemp("models-workspace")
    workspace = Workspace(root / "ws").create()
    raw = root / "events.parquet"
    make_events().write_parquet(raw)
    ingest_step("canonical", raw, workspace)
    features_step(workspace)
    return workspace
