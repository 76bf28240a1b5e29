"""Measure the simulator's throughput: `python -m simulation.speed [--impressions N]`."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

from simulation.config import SimulatorConfig
from simulation.simulator import simulate

IMPRESSIONS_PER_USER_DAY = 24.0
"""Rough impressions per user per simulated day under the default model (sizes the run)."""


def measure_speed(config: SimulatorConfig) -> dict[str, Any]:
    """Simulate `config` once (logging policy) and report impressions per second."""
    start = time.perf_counter()
    result = simulate(config)
    seconds = time.perf_counter() - start
    n = result.events.height
    return {"n_users": config.n_users, "days": config.days, "impressions": n,
            "requests": result.summary()["n_requests"], "seconds": round(seconds, 3),
            "impressions_per_s": round(n / seconds)}


def config_for(impressions: int, days: int = 7, seed: int = 0) -> SimulatorConfig:
    """A default config whose user count should yield about `impressions` impressions."""
    n_users = max(1, round(impressions / (IMPRESSIONS_PER_USER_DAY * days)))
    return replace(SimulatorConfig(), n_users=n_users, days=days, seed=seed)


def main() -> None:
    """CLI: print one JSON line with the measured rate."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impressions", type=int, default=1_000_000,
                        help="target impression count (sets n_users)")
    parser.add_argument("--days", type=int, default=7, help="simulated days")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    args = parser.parse_args()
    print(json.dumps(measure_speed(config_for(args.impressions, args.days, args.seed))))


if __name__ == "__main__":
    main()
