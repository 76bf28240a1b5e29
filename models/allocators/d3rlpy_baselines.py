"""Offline-RL baselines from d3rlpy 2.8.1 on the same logs: DQN, DiscreteCQL, DiscreteBCQ.

Each sees the same episodes (sessions), the same anti-greedy reward
(``models.allocators.data.RewardConfig``), the same discount and n-step targets and the same
standardised dense state as SL-MGAC (no id embeddings: d3rlpy's encoders take a flat
vector), with a network of the same width and the same number of gradient steps. The policy
takes d3rlpy's greedy action (for BCQ, after its behaviour-cloning filter). d3rlpy has no
constraint handling, so the share cap is met the way a platform would bolt it on: if the
greedy actions would insert on more than ``live_share_cap`` of the training log's requests,
an insert additionally needs Q(s, 1) - Q(s, 0) above the quantile that meets the cap.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.allocators.data import AllocationFeaturizer, RewardConfig, build_dataset

ALGOS: dict[str, str] = {"dqn": "DQNConfig", "cql": "DiscreteCQLConfig", "bcq": "DiscreteBCQConfig"}
"""recpipe algo name → d3rlpy config class."""


def import_d3rlpy() -> Any:
    """``import d3rlpy`` without gym's deprecation notice on stderr (d3rlpy imports gym)."""
    with contextlib.redirect_stderr(io.StringIO()):
        import d3rlpy
    return d3rlpy


@dataclass(frozen=True)
class D3RLPyConfig:
    """Hyperparameters shared by the three d3rlpy baselines (their own defaults otherwise)."""

    algo: str = "dqn"
    """One of ``ALGOS``."""
    reward: RewardConfig = RewardConfig()
    """The same anti-greedy reward SL-MGAC learns from."""
    gamma: float = 0.95
    """Discount per request (as SL-MGAC)."""
    n_step: int = 5
    """Multi-step TD targets over the logged steps (as SL-MGAC's ``n_step``)."""
    live_share_cap: float = 0.3
    """Platform constraint, enforced post hoc by a Q-gap threshold (see module doc)."""
    hidden: int = 64
    """Width of the two encoder layers (as SL-MGAC's encoder)."""
    n_steps: int = 2500
    """Gradient steps (as SL-MGAC)."""
    batch_size: int = 512
    """Transitions per step (as SL-MGAC)."""
    learning_rate: float = 3e-4
    """Adam learning rate (d3rlpy's 6.25e-5 default is tuned for Atari)."""
    target_update_interval: int = 100
    """Steps between hard target-network updates (SL-MGAC's Polyak 0.01 lags ~100 steps)."""
    reward_scale: float = 0.01
    """Rewards (seconds) are multiplied by this for d3rlpy (Q in hundreds of seconds)."""
    cql_alpha: float = 1.0
    """DiscreteCQL's conservative weight."""
    bcq_action_flexibility: float = 0.3
    """DiscreteBCQ: actions with imitation probability below this times the best are masked."""
    seed: int = 0
    """``d3rlpy.seed``: init and sampling."""
    progress: bool = True
    """Show d3rlpy's progress bar (auto-off when not a terminal)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> D3RLPyConfig:
        values = dict(data)
        if isinstance(values.get("reward"), dict):
            values["reward"] = RewardConfig(**values["reward"])
        return cls(**values)


def make_algo(config: D3RLPyConfig) -> Any:
    """The untrained d3rlpy learner of ``config.algo`` on CPU."""
    d3rlpy = import_d3rlpy()
    if config.algo not in ALGOS:
        raise ValueError(f"unknown d3rlpy baseline {config.algo!r}; expected one of {list(ALGOS)}")
    common = {
        "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "gamma": config.gamma, "target_update_interval": config.target_update_interval,
        "encoder_factory": d3rlpy.models.VectorEncoderFactory(
            hidden_units=[config.hidden, config.hidden]),
        "reward_scaler": d3rlpy.preprocessing.MultiplyRewardScaler(config.reward_scale),
    }
    if config.algo == "cql":
        common["alpha"] = config.cql_alpha
    if config.algo == "bcq":
        common["action_flexibility"] = config.bcq_action_flexibility
    return getattr(d3rlpy.algos, ALGOS[config.algo])(**common).create(device=False)


def train_d3rlpy(frame: pl.DataFrame, config: D3RLPyConfig = D3RLPyConfig(),
                 on_log: Any = None) -> D3RLPyPolicy:
    """Train ``config.algo`` on a validated log; returns the cap-calibrated policy."""
    d3rlpy = import_d3rlpy()
    d3rlpy.seed(config.seed)
    featurizer = AllocationFeaturizer.fit(frame)
    data = build_dataset(frame, featurizer, config.reward)
    # d3rlpy's structlog lines go to stdout; keep stdout for the CLI's JSON summary
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = d3rlpy.dataset.MDPDataset(
            observations=data.inputs.dense, actions=data.action.reshape(-1, 1),
            rewards=data.reward.astype(np.float32).reshape(-1, 1),
            terminals=data.done.astype(np.float32),
            action_space=d3rlpy.ActionSpace.DISCRETE, action_size=2,
            transition_picker=d3rlpy.dataset.MultiStepTransitionPicker(config.n_step,
                                                                       config.gamma),
        )
        algo = make_algo(config)
        epochs = max(1, config.n_steps // 500)
        for epoch, metrics in algo.fitter(
            dataset, n_steps=epochs * (config.n_steps // epochs),
            n_steps_per_epoch=config.n_steps // epochs,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(), show_progress=config.progress,
            save_interval=10**9, experiment_name=f"recpipe-{config.algo}",
        ):
            if on_log is not None:
                on_log(epoch * (config.n_steps // epochs),
                       {k: float(v) for k, v in metrics.items()})
    policy = D3RLPyPolicy(algo, featurizer, config, gap_threshold=None)
    action, gap = policy.greedy(frame)
    if action.mean() > config.live_share_cap:
        threshold = float(np.quantile(np.where(action == 1, gap, -np.inf),
                                      1.0 - config.live_share_cap))
        policy = D3RLPyPolicy(algo, featurizer, config, gap_threshold=threshold)
    return policy


class D3RLPyPolicy:
    """d3rlpy's greedy action as an ``AllocationPolicy`` (P in {0, 1}), cap-calibrated."""

    def __init__(self, algo: Any, featurizer: AllocationFeaturizer, config: D3RLPyConfig,
                 gap_threshold: float | None) -> None:
        self.learner = algo
        self.featurizer = featurizer
        self.config = config
        self.gap_threshold = gap_threshold
        self.algo = config.algo
        self.name = f"{config.algo}-seed{config.seed}"

    def with_id_features(self, enabled: bool) -> D3RLPyPolicy:
        """Ids are not used: the same policy."""
        return self

    def greedy(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        """(B,) d3rlpy's greedy action and (B,) Q(s, 1) - Q(s, 0) (seconds)."""
        x = self.featurizer.transform(state, id_features=False).dense
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        action = np.asarray(self.learner.predict(x)).astype(np.int64).reshape(-1)
        q = [np.asarray(self.learner.predict_value(x, np.full(x.shape[0], a)))
             for a in (0, 1)]
        return action, (q[1] - q[0]).reshape(-1) / self.config.reward_scale

    def __call__(self, state: Any) -> np.ndarray:
        action, gap = self.greedy(state)
        insert = action == 1
        if self.gap_threshold is not None:
            insert &= gap > self.gap_threshold
        return insert.astype(np.float64)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.learner.save(str(directory / "model.d3"))
        (directory / "policy.json").write_text(json.dumps({
            "algo": self.config.algo, "config": self.config.to_dict(),
            "gap_threshold": self.gap_threshold, "featurizer": self.featurizer.to_dict(),
        }))

    @classmethod
    def load(cls, directory: Path) -> D3RLPyPolicy:
        d3rlpy = import_d3rlpy()
        meta = json.loads((directory / "policy.json").read_text())
        config = replace(D3RLPyConfig.from_dict(meta["config"]), progress=False)
        algo = d3rlpy.load_learnable(str(directory / "model.d3"), device=False)
        return cls(algo, AllocationFeaturizer.from_dict(meta["featurizer"]), config,
                   meta["gap_threshold"])
