"""Examples from the lake: histories strictly before each impression, labels, a time split.

Written as ``<out>/{train,valid,test}.parquet`` plus ``vocab.json`` and ``schema.json``.
Vocabularies are fitted on the training dates only, so valid/test ids unseen in training map
to the unknown index exactly as they would in serving.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from features.encode import encode_examples
from features.lake import scan_events
from features.schema import (
    BEHAVIOR_CODES,
    DEFAULT_TASKS,
    SEQUENCE_BEHAVIOR_FEATURE,
    SEQUENCE_ITEM_FEATURE,
    SPARSE_FEATURES,
    ExampleSchema,
    TaskSpec,
)
from features.vocab import Vocabulary

SPLITS: tuple[str, ...] = ("train", "valid", "test")
INTERACTION_LABELS: tuple[str, ...] = ("like", "follow", "share", "comment", "gift")


class FeatureBuildError(ValueError):
    """The lake cannot be turned into examples (too few dates, no events)."""


@dataclass(frozen=True)
class FeatureConfig:
    """How examples are built."""

    history_length: int = 20
    """N: how many of the user's most recent impressions (strictly earlier) form the history."""
    valid_days: int = 1
    """Dates just before the test dates that form the validation split."""
    test_days: int = 1
    """Last dates of the lake that form the test split."""


@dataclass(frozen=True)
class BuildReport:
    """What ``build_examples`` wrote."""

    out_dir: str
    rows: dict[str, int]
    dates: dict[str, list[str]]
    vocab_sizes: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def behavior_code() -> pl.Expr:
    """Strongest behaviour on an impression (null labels count as 0)."""

    def flag(name: str) -> pl.Expr:
        return pl.col(name).fill_null(0) > 0

    interaction = pl.any_horizontal(flag(name) for name in INTERACTION_LABELS)
    return (
        pl.when(interaction).then(BEHAVIOR_CODES["interaction"])
        .when(flag("long_view")).then(BEHAVIOR_CODES["long_view"])
        .when(flag("click")).then(BEHAVIOR_CODES["click"])
        .otherwise(BEHAVIOR_CODES["impression"])
        .cast(pl.Int64)
    )


def split_dates(dates: list[date], config: FeatureConfig) -> dict[str, list[date]]:
    """Assign sorted distinct dates to train / valid / test (test last)."""
    needed = config.valid_days + config.test_days + 1
    if len(dates) < needed:
        raise FeatureBuildError(
            f"the lake holds {len(dates)} date(s) {[str(d) for d in dates]}; a time split "
            f"needs at least {needed} (train + {config.valid_days} valid + "
            f"{config.test_days} test)"
        )
    n_train = len(dates) - config.valid_days - config.test_days
    return {
        "train": dates[:n_train],
        "valid": dates[n_train:n_train + config.valid_days],
        "test": dates[n_train + config.valid_days:],
    }


def attach_histories(events: pl.DataFrame, history_length: int) -> pl.DataFrame:
    """Add raw ``hist_item_id`` / ``hist_behavior`` lists: the user's last N impressions with
    a timestamp strictly before this one and from another request, oldest first. Impressions
    of one request (same ``request_id``, or same timestamp) never see each other: the feed
    is ranked before any of them is watched.

    events: one row per impression, any order. Returns the rows sorted by (user_id, ts,
    event_id).
    """
    frame = events.sort("user_id", "ts", "event_id").with_columns(behavior_code().alias("_b"))
    user = frame.get_column("user_id").to_numpy()
    ts = frame.get_column("ts").to_physical().to_numpy()
    n = frame.height
    row = np.arange(n)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    request = frame.get_column("request_id")
    same_request = (request == request.shift(1)).fill_null(False).to_numpy()  # null ≠ null
    new_instant = new_user.copy()
    new_instant[1:] |= (ts[1:] != ts[:-1]) & ~same_request[1:]
    user_start = np.maximum.accumulate(np.where(new_user, row, 0))
    history_end = np.maximum.accumulate(np.where(new_instant, row, 0))  # first row at this ts
    history_start = np.maximum(user_start, history_end - history_length)
    lengths = history_end - history_start  # (n,)
    offsets = np.arange(history_length) - history_length  # (N,) ... -2, -1
    index = history_end[:, None] + offsets[None, :]  # (n, N)
    valid = index >= history_start[:, None]
    index = np.where(valid, index, 0)
    items = np.where(valid, frame.get_column("item_id").to_numpy()[index], 0)  # (n, N)
    behaviors = np.where(valid, frame.get_column("_b").to_numpy()[index], 0)  # (n, N)
    length = pl.Series("_len", lengths)
    return frame.drop("_b").with_columns(
        pl.Series(SEQUENCE_ITEM_FEATURE, items).arr.to_list().list.tail(length),
        pl.Series(SEQUENCE_BEHAVIOR_FEATURE, behaviors).arr.to_list().list.tail(length),
    )


def task_targets(tasks: tuple[TaskSpec, ...]) -> list[pl.Expr]:
    """Float targets per task; null stays null (the loss masks it)."""
    targets = []
    for task in tasks:
        label = pl.col(task.label).cast(pl.Float32)
        if task.kind == "regression":
            label = label.clip(lower_bound=0.0).log1p()
        targets.append(label.alias(task.column))
    return targets


def write_atomically(frames: dict[str, pl.DataFrame], texts: dict[str, str], out: Path) -> None:
    """Write all files to a temp dir beside ``out``, then swap it in (no half-written dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, frame in frames.items():
            frame.write_parquet(staging / f"{name}.parquet")
        for name, text in texts.items():
            (staging / name).write_text(text)
        retired = out.with_name(f".{out.name}-retired")
        shutil.rmtree(retired, ignore_errors=True)
        if out.exists():
            out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_examples(
    lake_dir: Path, out_dir: Path, config: FeatureConfig = FeatureConfig()
) -> BuildReport:
    """Turn every impression in the lake into an example of its split; see module doc."""
    events = scan_events(lake_dir).collect()
    if events.height == 0:
        raise FeatureBuildError(f"{lake_dir}: the lake holds no events; run `recpipe ingest`")
    events = events.with_columns(pl.col("ts").dt.date().alias("date"))
    dates = split_dates(sorted(events.get_column("date").unique().to_list()), config)
    split_of = {d: name for name, ds in dates.items() for d in ds}
    events = attach_histories(events, config.history_length).with_columns(
        pl.col("date").replace_strict(split_of, return_dtype=pl.String).alias("split")
    )
    train_rows = events.filter(pl.col("split") == "train").with_columns(
        pl.col("ts").dt.hour().cast(pl.Int64).alias("hour")
    )
    vocab = Vocabulary.fit(train_rows, SPARSE_FEATURES)
    schema = ExampleSchema(
        history_length=config.history_length,
        vocab_sizes={name: vocab.size(name) for name in SPARSE_FEATURES},
    )
    examples = encode_examples(events, vocab, schema).with_columns(task_targets(DEFAULT_TASKS))
    examples = examples.sort("ts", "event_id")
    frames = {name: examples.filter(pl.col("split") == name) for name in SPLITS}
    report = BuildReport(
        out_dir=str(out_dir),
        rows={name: frame.height for name, frame in frames.items()},
        dates={name: [str(d) for d in ds] for name, ds in dates.items()},
        vocab_sizes=schema.vocab_sizes,
    )
    meta = {"schema": schema.to_dict(), "config": asdict(config), "report": report.to_dict()}
    write_atomically(
        frames,
        {"vocab.json": vocab.to_json(), "schema.json": json.dumps(meta, indent=2, default=str)},
        out_dir,
    )
    return report


def load_schema(examples_dir: Path) -> ExampleSchema:
    """The ExampleSchema written next to the examples."""
    meta = json.loads((examples_dir / "schema.json").read_text())
    return ExampleSchema.from_dict(meta["schema"])

