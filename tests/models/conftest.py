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
