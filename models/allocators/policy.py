"""One entry point per verb for every allocation algorithm: train, save/load, describe.

Every trained policy is an ``AllocationPolicy`` in the simulator's sense (observable state
of B requests → P(insert), shape (B,)) with, in addition, ``algo``, ``name``, ``save(dir)``
and ``with_id_features(enabled)``. A saved policy is a directory with ``policy.json`` (the
algorithm, its config and the fitted featurizer) and its weights, so ``load_policy`` needs
nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from models.allocators.data import RewardConfig

ALGORITHMS: tuple[str, ...] = ("sl_mgac", "greedy", "dqn", "cql", "bcq")
"""Algorithms ``recpipe train-allocator --algo`` accepts."""


class TrainedPolicy(Protocol):
    """What every trained allocation policy offers on top of ``AllocationPolicy``."""

    algo: str
    name: str

    def __call__(self, state: Any) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...

    def with_id_features(self, enabled: bool) -> TrainedPolicy: ...


def config_for(algo: str, seed: int = 0, live_share_cap: float = 0.3,
               reward: RewardConfig | None = None, overrides: Mapping[str, Any] | None = None,
               progress: bool = True) -> Any:
    """The frozen config of ``algo`` with the common knobs set and ``overrides`` applied.

    Raises:
        ValueError: for an unknown algorithm, an override that is not a config field, fewer
            than one step, a live-share cap outside (0, 1], or (SL-MGAC) a cap margin that
            leaves no share under the cap.
    """
    if algo == "sl_mgac":
        from models.allocators.sl_mgac import SLMGACConfig as cls
    elif algo == "greedy":
        from models.allocators.greedy import GreedyConfig as cls
    elif algo in ("dqn", "cql", "bcq"):
        from models.allocators.d3rlpy_baselines import D3RLPyConfig as cls
    else:
        raise ValueError(f"unknown allocation algorithm {algo!r}; expected one of "
                         f"{list(ALGORITHMS)}")
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {"seed": seed, "live_share_cap": live_share_cap,
                              "progress": progress}
    if "algo" in names:
        values["algo"] = algo
    if "reward" in names and reward is not None:
        values["reward"] = reward
    unknown = set(overrides or {}) - names
    if unknown:
        raise ValueError(f"{algo}: unknown hyperparameters {sorted(unknown)}; "
                         f"known: {sorted(names)}")
    set_elsewhere = {"seed": "--seed", "live_share_cap": "--live-share-cap",
                     "progress": "the terminal", "algo": "--algo",
                     "reward": "the log's simulator settings"}
    clash = sorted(set(overrides or {}) & set(values))
    if clash:  # the step judges the policy by the same cap, seeds the same way
        where = ", ".join(f"{name} is set by {set_elsewhere[name]}" for name in clash)
        raise ValueError(f"{algo}: {where}, not as a hyperparameter")
    config = replace(cls(), **values, **dict(overrides or {}))
    if config.n_steps < 1:
        raise ValueError(f"{algo}: n_steps must be at least 1, got {config.n_steps}")
    if not 0.0 < config.live_share_cap <= 1.0:
        raise ValueError(f"{algo}: live_share_cap must be in (0, 1], got "
                         f"{config.live_share_cap}")
    if getattr(config, "cap_margin", 0.0) >= config.live_share_cap:  # SL-MGAC's target share
        raise ValueError(f"{algo}: cap_margin {config.cap_margin} leaves no share under the "
                         f"live_share_cap {config.live_share_cap}; lower cap_margin")
    return config


DISTRIBUTED_ALGORITHMS: tuple[str, ...] = ("sl_mgac",)
"""Algorithms that train on several ranks (``--nproc``): the TorchRec ones. greedy is a
closed-form fit and dqn / cql / bcq are d3rlpy's own (plain torch) learners."""


def train_policy(algo: str, frame: pl.DataFrame, config: Any,
                 on_log: Callable[[int, dict[str, float]], None] | None = None,
                 rank: Any = None, sharding: Any = None) -> TrainedPolicy | None:
    """Train ``algo`` with ``config`` (see :func:`config_for`) on a validated log.

    ``rank`` (a ``models.distributed.Rank``; sl_mgac only, else ValueError): one of several
    torchrun ranks; returns the policy on rank 0 and None on the others."""
    if rank is not None and algo not in DISTRIBUTED_ALGORITHMS:
        raise ValueError(f"{algo} does not train distributed; only {list(DISTRIBUTED_ALGORITHMS)}")
    if algo == "sl_mgac":
        from models.allocators.sl_mgac import train_sl_mgac
        return train_sl_mgac(frame, config, on_log, rank=rank, sharding=sharding)
    if algo == "greedy":
        from models.allocators.greedy import train_greedy
        return train_greedy(frame, config, on_log)
    from models.allocators.d3rlpy_baselines import train_d3rlpy
    return train_d3rlpy(frame, config, on_log)


def load_policy(directory: str | Path) -> TrainedPolicy:
    """Rebuild a policy saved by its ``save(directory)``."""
    directory = Path(directory)
    algo = json.loads((directory / "policy.json").read_text())["algo"]
    if algo == "sl_mgac":
        from models.allocators.sl_mgac import SLMGACPolicy
        return SLMGACPolicy.load(directory)
    if algo == "greedy":
        from models.allocators.greedy import GreedyPolicy
        return GreedyPolicy.load(directory)
    if algo in ("dqn", "cql", "bcq"):
        from models.allocators.d3rlpy_baselines import D3RLPyPolicy
        return D3RLPyPolicy.load(directory)
    raise ValueError(f"{directory}: unknown allocation algorithm {algo!r}")
