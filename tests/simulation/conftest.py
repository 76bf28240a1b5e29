"""Fixtures for the simulator tests: one small world, simulated once per test session."""

from __future__ import annotations

import pytest

from simulation.allocation import ALWAYS_INSERT
from simulation.config import SimulatorConfig
from simulation.simulator import SimulationResult, simulate

SMALL = SimulatorConfig(n_users=300, days=3, seed=7, n_videos=1000, n_lives=60, n_authors=100)
"""A world small enough to simulate in well under a second (~27k impressions)."""


@pytest.fixture(scope="session")
def small_config() -> SimulatorConfig:
    return SMALL


@pytest.fixture(scope="session")
def logged(small_config: SimulatorConfig) -> SimulationResult:
    """The small world under the logging policy."""
    return simulate(small_config)


@pytest.fixture(scope="session")
def greedy(small_config: SimulatorConfig) -> SimulationResult:
    """The small world under the always-insert policy (many live impressions)."""
    return simulate(small_config, ALWAYS_INSERT)


@pytest.fixture(scope="session", params=["logged", "greedy"])
def result(request: pytest.FixtureRequest) -> SimulationResult:
    """Each of the two rollouts in turn."""
    return request.getfixturevalue(request.param)
