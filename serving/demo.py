"""A small real ranker registered in a throwaway MLflow store: for tests, the serving benchmark
and trying the service without running the nightly pipeline.

Everything goes through the production code: events in the contract
(``features.contract.EVENT_SCHEMA``), histories by ``features.build.attach_histories``, a
vocabulary fitted on the training dates only, ``features.encode.encode_examples``, the one
training loop, and ``models.registry.log_ranker`` / ``register``. The last date is the test
split, so it holds ids the vocabulary never saw (they map to the unknown index, as in serving).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from features.contract import EVENT_SCHEMA
from features.schema import DEFAULT_TASKS, SPARSE_FEATURES, ExampleSchema
from features.vocab import Vocabulary

RANKER_EXPERIMENT = "recpipe-rankers"


@dataclass(frozen=True)
class DemoData:
    """Synthetic log size; the defaults make a model that trains in a few seconds."""

    n_users: int = 60
    """Distinct users."""
    n_items: int = 120
    """Distinct items (every 10th is a live stream)."""
    per_user: int = 24
    """Impressions per user (pairs share a request)."""
    days: int = 3
    """Dates of the log; the last one is the test split."""
    history_length: int = 8
    """N: history items per example."""
    unseen_share: float = 0.1
    """Share of last-date impressions showing items that never appear before (new ids: they
    exercise the unknown-index fallback)."""
    seed: int = 0
    """Log seed."""


@dataclass(frozen=True)
class DemoSplits:
    """Encoded examples (raw columns kept) and the vocabulary/schema fitted on train."""

    train: pl.DataFrame
    test: pl.DataFrame
    schema: ExampleSchema
    vocab: Vocabulary


def synthetic_events(data: DemoData) -> pl.DataFrame:
    """A log in the canonical contract with learnable signal: users prefer items whose id
    parity matches theirs; the two impressions of a request share a timestamp."""
    rng = np.random.default_rng(data.seed)
    n = data.n_users * data.per_user
    user = np.repeat(np.arange(data.n_users), data.per_user)
    item = rng.integers(0, data.n_items, n)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seconds = np.sort(rng.integers(0, data.days * 86400, (data.n_users, data.per_user)), axis=1)
    seconds = seconds.ravel()
    seconds[1::2] = seconds[0::2]
    last_day = seconds // 86400 == data.days - 1
    unseen = last_day & (rng.random(n) < data.unseen_share)
    item = np.where(unseen, data.n_items + rng.integers(0, max(data.n_items // 10, 1), n), item)
    affinity = np.where((user % 2) == (item % 2), 1.5, -1.5)
    click = (rng.random(n) < 1 / (1 + np.exp(-affinity))).astype(np.int8)
    watch = np.where(click == 1, rng.exponential(20.0, n), 0.0)
    frame = pl.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "ts": [start + timedelta(seconds=int(s)) for s in seconds],
        "user_id": user,
        "request_id": [f"r{u}-{s}" for u, s in zip(user, seconds, strict=True)],
        "item_id": item,
        "item_type": np.where(item % 10 == 0, "live", "video"),
        "author_id": item // 3,
        "position": np.arange(n) % 2,
        "duration_s": 10.0 + item,
        "click": click,
        "like": (click & (rng.random(n) < 0.3)).astype(np.int8),
        "follow": (click & (rng.random(n) < 0.1)).astype(np.int8),
        "comment": np.zeros(n, np.int8), "share": np.zeros(n, np.int8),
        "hate": np.zeros(n, np.int8), "long_view": (watch > 20).astype(np.int8),
        "gift": [None] * n, "watch_time_s": watch, "propensity": np.full(n, 0.5),
        "policy": ["demo"] * n, "source": ["canonical"] * n,
    })
    return frame.with_columns(pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()).select(
        list(EVENT_SCHEMA)
    )


def demo_splits(data: DemoData = DemoData()) -> DemoSplits:
    """Train / test examples built like ``features.build.build_examples`` does."""
    from features.build import attach_histories, task_targets
    from features.encode import encode_examples

    events = attach_histories(synthetic_events(data), data.history_length)
    last = events.get_column("ts").dt.date().max()
    is_test = pl.col("ts").dt.date() == last
    train_raw = events.filter(~is_test)
    vocab = Vocabulary.fit(train_raw.with_columns(pl.col("ts").dt.hour().alias("hour")),
                           SPARSE_FEATURES)
    schema = ExampleSchema(history_length=data.history_length,
                           vocab_sizes={f: vocab.size(f) for f in SPARSE_FEATURES})
    examples = encode_examples(events, vocab, schema).with_columns(task_targets(DEFAULT_TASKS))
    examples = examples.sort("ts", "event_id")
    return DemoSplits(examples.filter(~is_test), examples.filter(is_test), schema, vocab)


def train_demo_ranker(splits: DemoSplits, seed: int = 0, epochs: int = 1):
    """A small MMoE trained on the train split; returns a ``models.registry.LoadedRanker``."""
    import torch

    from models.batch import ExampleArrays
    from models.losses import MultiTaskLoss
    from models.rankers import RankerConfig, build_ranker, init_output_bias
    from models.registry import LoadedRanker
    from models.training import TrainConfig, fit

    train = ExampleArrays.from_frame(splits.train, splits.schema)
    config = RankerConfig(n_experts=2, expert_hidden=(32, 16), tower_hidden=(8,))
    torch.manual_seed(seed)
    model = build_ranker(splits.schema, config)
    init_output_bias(model, torch.from_numpy(train.labels))
    fit(model, MultiTaskLoss(splits.schema.tasks), train,
        TrainConfig(epochs=epochs, batch_size=256, seed=seed, progress=False),
        [task.name for task in splits.schema.tasks])
    model.eval()
    return LoadedRanker(model, config, splits.schema, splits.vocab)


def register_demo_ranker(tracking_uri: str, artifact_root: Path, ranker,
                         example_rows: pl.DataFrame, champion: bool = False) -> dict:
    """Log ``ranker`` in a run and register it as ``recpipe-ranker`` (challenger; champion
    when there is none yet, or when ``champion``). Returns ``{name, version, aliases}``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from models.registry import (
        CHAMPION,
        RANKER_MODEL_NAME,
        ensure_experiment,
        log_ranker,
        register,
    )

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(RANKER_EXPERIMENT, artifact_root)
    with mlflow.start_run(experiment_id=experiment_id, run_name="demo") as run:
        model_uri = log_ranker(ranker, example_rows.head(5))
    registered = register(model_uri, RANKER_MODEL_NAME, {"run_id": run.info.run_id})
    if champion and CHAMPION not in registered["aliases"]:
        MlflowClient(tracking_uri).set_registered_model_alias(
            RANKER_MODEL_NAME, CHAMPION, str(registered["version"])
        )
        registered["aliases"].append(CHAMPION)
    return registered


def tracking_uri_for(root: Path) -> str:
    """The workspace convention: ``sqlite:////abs/root/mlflow.db``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def build_demo_registry(root: Path, data: DemoData = DemoData(), seed: int = 0) -> dict:
    """Train a demo ranker and register it as ``recpipe-ranker@champion`` in a fresh store
    under ``root``. Returns ``{tracking_uri, registered, splits, ranker}``."""
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri_for(root)
    splits = demo_splits(data)
    ranker = train_demo_ranker(splits, seed=seed)
    registered = register_demo_ranker(tracking_uri, root / "mlartifacts", ranker, splits.test)
    return {"tracking_uri": tracking_uri, "registered": registered, "splits": splits,
            "ranker": ranker}
