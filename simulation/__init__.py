"""Feed simulator: users, videos, live streams, a logging policy with propensities, and truth.

    from simulation import SimulatorConfig, simulate, rollout_value, write_simulation
    result = simulate(SimulatorConfig(n_users=2000, days=7, seed=0))   # logging policy
    write_simulation(result, "raw/sim-seed0")      # events/allocations/... .parquet + manifest
    rollout_value(SimulatorConfig(seed=0), my_policy)  # true on-policy value of any policy

Imports only numpy, polars and `features.contract`. Throughput: `python -m simulation.speed`.
"""

from simulation.allocation import (
    ALWAYS_INSERT,
    NEVER_INSERT,
    AllocationPolicy,
    AllocationState,
    ConstantAllocationPolicy,
    LoggingAllocationPolicy,
)
from simulation.config import BehaviourConfig, LabelLogit, SimulatorConfig
from simulation.export import write_simulation
from simulation.simulator import SimulationResult, rollout_value, simulate

__all__ = [
    "ALWAYS_INSERT",
    "NEVER_INSERT",
    "AllocationPolicy",
    "AllocationState",
    "BehaviourConfig",
    "ConstantAllocationPolicy",
    "LabelLogit",
    "LoggingAllocationPolicy",
    "SimulationResult",
    "SimulatorConfig",
    "rollout_value",
    "simulate",
    "write_simulation",
]
