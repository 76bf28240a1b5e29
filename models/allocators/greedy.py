"""The supervised greedy baseline: insert when the predicted net watch-time gain of this
request exceeds a threshold.

A two-output MLP on the dense state predicts the request's total watch time (videos + live,
so the live is counted net of the video watch it displaces) under each action, fitted by
squared error on the logged action's output. The policy inserts when
``pred(s, insert) - pred(s, skip) > threshold_s``; when that would insert on more than
``live_share_cap`` of the training log's requests, the threshold is raised to the quantile
that meets the cap. It is myopic by construction: it never sees that an interruption makes
the session end sooner or the user come back less.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.allocators.data import AllocationFeaturizer, RewardConfig, build_dataset

ALGO = "greedy"


@dataclass(frozen=True)
class GreedyConfig:
    """Hyperparameters of the supervised greedy policy."""

    threshold_s: float = 0.0
    """Insert when the predicted watch-time gain of inserting exceeds this (seconds)."""
    live_share_cap: float = 0.3
    """Raise the threshold until at most this share of logged requests would get a live."""
    hidden: int = 64
    """Width of the two hidden layers."""
    n_steps: int = 2500
    """Gradient steps."""
    batch_size: int = 512
    """Rows per step."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seeds init and sampling."""
    progress: bool = True
    """Show a progress bar (auto-off when not a terminal)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WatchModel(nn.Module):
    """(B, F) dense state → (B, 2) predicted request watch (minutes) under skip / insert."""

    def __init__(self, n_dense: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_dense, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.net(dense)  # (B, 2)


def train_greedy(frame: pl.DataFrame, config: GreedyConfig = GreedyConfig(),
                 on_log: Any = None) -> GreedyPolicy:
    """Fit the watch model on a validated log and calibrate the threshold to the cap."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    featurizer = AllocationFeaturizer.fit(frame)
    data = build_dataset(frame, featurizer, RewardConfig())
    dense = torch.from_numpy(data.inputs.dense)
    watch = torch.from_numpy(data.parts["watch"] / 60.0).float()  # (N,) minutes
    action = torch.from_numpy(data.action)
    model = WatchModel(featurizer.n_dense, config.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    for step in tqdm(range(1, config.n_steps + 1), desc="greedy", leave=False,
                     disable=not config.progress or None):
        rows = torch.from_numpy(rng.integers(0, len(data), config.batch_size))
        pred = model(dense[rows])[torch.arange(rows.shape[0]), action[rows]]  # (B,)
        loss = F.mse_loss(pred, watch[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_log is not None and step % 100 == 0:
            on_log(step, {"watch_loss": float(loss)})
    model.eval()
    policy = GreedyPolicy(model, featurizer, config, config.threshold_s)
    gain = policy.gain(frame)
    if np.mean(gain > config.threshold_s) > config.live_share_cap:
        threshold = float(np.quantile(gain, 1.0 - config.live_share_cap))
        policy = GreedyPolicy(model, featurizer, config, threshold)
    return policy


class GreedyPolicy:
    """Insert (P = 1) iff the predicted watch-time gain exceeds the calibrated threshold."""

    algo = ALGO

    def __init__(self, model: WatchModel, featurizer: AllocationFeaturizer,
                 config: GreedyConfig, threshold_s: float) -> None:
        self.model = model.eval()
        self.featurizer = featurizer
        self.config = config
        self.threshold_s = threshold_s
        self.name = f"greedy-seed{config.seed}"

    def with_id_features(self, enabled: bool) -> GreedyPolicy:
        """Ids are not used: the same policy."""
        return self

    @torch.no_grad()
    def gain(self, state: Any) -> np.ndarray:
        """(B,) predicted watch seconds gained by inserting."""
        x = self.featurizer.transform(state, id_features=False)
        pred = self.model(torch.from_numpy(x.dense)).numpy().astype(np.float64)
        return 60.0 * (pred[:, 1] - pred[:, 0])

    def __call__(self, state: Any) -> np.ndarray:
        return (self.gain(state) > self.threshold_s).astype(np.float64)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "state_dict.pt")
        (directory / "policy.json").write_text(json.dumps({
            "algo": ALGO, "config": self.config.to_dict(), "threshold_s": self.threshold_s,
            "featurizer": self.featurizer.to_dict(),
        }))

    @classmethod
    def load(cls, directory: Path) -> GreedyPolicy:
        meta = json.loads((directory / "policy.json").read_text())
        config = replace(GreedyConfig(**meta["config"]), progress=False)
        featurizer = AllocationFeaturizer.from_dict(meta["featurizer"])
        model = WatchModel(featurizer.n_dense, config.hidden)
        model.load_state_dict(torch.load(directory / "state_dict.pt", map_location="cpu",
                                         weights_only=True))
        return cls(model, featurizer, config, float(meta["threshold_s"]))
