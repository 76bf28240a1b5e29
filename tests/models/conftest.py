"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: the tensors are tiny, and on a loaded machine two
    OpenMP threads spin-waiting on each other make many-small-op models (HoME, PLE) orders of
    magnitude slower. Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
