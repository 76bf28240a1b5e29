"""Examples from the lake: histories strictly before each impression, labels, a time split.

Written as ``<out>/{train,valid,test}.parquet`` plus ``vocab.json`` and ``schema.json``.
Vocabularies are fitted on the training dates only, so valid/test ids unseen in training map
to the unknown index exactly as they would in serving.

Memory stays bounded as the lake grows. The dates, the row count and the vocabulary come from
streaming aggregates (only per-hour counts and distinct ids are held). Histories need only a
user's own events, so users are processed in K buckets (``user_id mod K``): one streaming
pass over the lake writes every bucket's events to a file of its own, then each bucket is
read back, turned into examples and written as per-split part files; the parts are then
merged into ``(ts, event_id)`` order one time window at a time.
K is chosen so that a bucket holds about ``FeatureConfig.max_rows_in_memory`` rows (K = 1,
the whole lake at once, for small lakes). The examples written do not depend on K.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from polars.io.plugins import register_io_source
from tqdm import tqdm

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
SORT_KEY: tuple[str, ...] = ("ts", "event_id")
"""Row order of every examples file, a total one: ingestion drops the copies of an event
(same ``event_id`` and ``ts``), so no two lake rows share both."""
RECORDED_CONFIG: tuple[str, ...] = ("history_length", "valid_days", "test_days")
"""The FeatureConfig fields that decide the examples; ``schema.json`` records these only."""
PARTS_DIR = ".parts"
"""Inside the staging dir: ``<split>/bucket-<b>.parquet``, removed before the swap."""
BUCKETS_DIR = ".buckets"
"""Inside the staging dir: ``bucket=<b>/<n>.ipc``, the lake's events by user bucket (one
streaming pass), removed once the parts are written."""
MERGE_WINDOW_DIVISOR = 2
"""A merge window holds ``max_rows_in_memory / 2`` rows: its rows are examples (wider than
events) and are sorted (a second copy), so it then peaks about as high as a bucket does."""
PART_ROW_GROUP = 65_536
"""Rows per row group of a part file, so that a merge window reads little beyond itself."""


class FeatureBuildError(ValueError):
    """The lake cannot be turned into examples (too few dates, no events)."""


@dataclass(frozen=True)
class FeatureConfig:
    """How examples are built. The first three fields decide the examples (and are recorded
    in ``schema.json``); the last two only decide how much is held in memory at once."""

    history_length: int = 20
    """N: how many of the user's most recent impressions (strictly earlier) form the history."""
    valid_days: int = 1
    """Dates just before the test dates that form the validation split."""
    test_days: int = 1
    """Last dates of the lake that form the test split."""
    user_buckets: int | None = None
    """K: users are processed in K buckets (``user_id mod K``), one bucket in memory at a
    time. None: ceil(lake rows / ``max_rows_in_memory``), so K = 1 (the whole lake at once)
    for lakes of up to that many rows. Changes memory and time, never the examples."""
    max_rows_in_memory: int = 2_000_000
    """About how many events are held at once: sizes the buckets when ``user_buckets`` is
    None, and the time windows (whole UTC hours, half this many rows) in which the buckets'
    outputs are merged; an hour bigger than a window is merged on its own. With N = 20 the
    default peaked at 2.0 to 3.4 GB on lakes of 5M to 20M events, where the whole lake at
    once took 1 GB per million (``benchmarks/feature_build.py``). Changes memory, never the
    examples."""

    def __post_init__(self) -> None:
        for name in ("history_length", "valid_days", "test_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.user_buckets is not None and self.user_buckets < 1:
            raise ValueError(f"user_buckets must be at least 1, got {self.user_buckets}")
        if self.max_rows_in_memory < 1:
            raise ValueError(f"max_rows_in_memory must be at least 1, "
                             f"got {self.max_rows_in_memory}")

    def recorded(self) -> dict[str, int]:
        """The fields that decide the examples (``RECORDED_CONFIG``), as ``schema.json`` holds
        them; the memory knobs are left out so the file does not depend on them."""
        return {name: getattr(self, name) for name in RECORDED_CONFIG}


Window = tuple[datetime, datetime]
"""A ``[start, end)`` range of ``ts`` (UTC, whole hours)."""


@dataclass(frozen=True)
class BuildPlan:
    """What the streaming profile of the lake decides before any example is built."""

    dates: dict[str, list[date]]
    """Split name -> its dates, ascending."""
    buckets: int
    """K, the number of user buckets."""
    windows: dict[str, list[Window]]
    """Split name -> ascending, disjoint ts ranges covering its rows, merged one at a time."""

    @property
    def split_of(self) -> dict[date, str]:
        """Date -> name of its split."""
        return {d: name for name, ds in self.dates.items() for d in ds}


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
    a timestamp strictly before this impression's request started, oldest first. A request is
    ranked when it starts (its earliest impression; an impression without ``request_id`` is a
    request of its own), before any of its impressions is watched: so impressions of one
    request never see each other, nor anything that happened after the request started (an
    interleaved request), and impressions at one timestamp never see each other.

    events: one row per impression, any order. Returns the rows sorted by (user_id, ts,
    event_id).
    """
    request_start = (pl.when(pl.col("request_id").is_null()).then(pl.col("ts"))
                     .otherwise(pl.col("ts").min().over("user_id", "request_id")))
    frame = events.sort("user_id", "ts", "event_id").with_columns(behavior_code().alias("_b"))
    user = frame.get_column("user_id").to_numpy()
    ts = frame.get_column("ts").to_physical().to_numpy()
    cutoff = frame.select(request_start.to_physical()).to_series().to_numpy()  # (n,)
    n = frame.height
    row = np.arange(n)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, row, 0))
    history_end = _first_row_at(np.cumsum(new_user) - 1, ts, cutoff)  # first row at cutoff
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


def _first_row_at(user_index: np.ndarray, ts: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """For every row, the first row of its user whose ts is >= its cutoff (each cutoff is a
    ts of that user). Rows sorted by (user, ts); all arrays (n,). One search over the key
    user * T + dense rank of ts, sorted as the rows are (T distinct timestamps, so the key
    stays below n * T)."""
    distinct, ts_rank = np.unique(ts, return_inverse=True)
    key = user_index * len(distinct) + ts_rank
    return np.searchsorted(key, user_index * len(distinct) + np.searchsorted(distinct, cutoff))


def task_targets(tasks: tuple[TaskSpec, ...]) -> list[pl.Expr]:
    """Float targets per task; null stays null (the loss masks it)."""
    targets = []
    for task in tasks:
        label = pl.col(task.label).cast(pl.Float32)
        if task.kind == "regression":
            label = label.clip(lower_bound=0.0).log1p()
        targets.append(label.alias(task.column))
    return targets


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh staging dir beside ``out`` to write into. When the block ends normally the
    staging dir replaces ``out`` whole; when it raises, the staging dir is removed and ``out``
    is left as it was (no half-written dir, ever)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        retired = out.with_name(f".{out.name}-retired")
        shutil.rmtree(retired, ignore_errors=True)
        if out.exists():
            out.rename(retired)
        try:
            staging.rename(out)
        except BaseException:
            if retired.exists() and not out.exists():
                retired.rename(out)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def profile_lake(lake_dir: Path) -> pl.DataFrame:
    """Events per UTC hour, from one streaming pass over ``ts``.

    Returns (H, 2): ``hour`` (Datetime UTC, the hour's start), ``rows`` (UInt32), ascending
    by hour; H = 0 for an empty lake.
    """
    hour = pl.col("ts").dt.truncate("1h").alias("hour")
    counts = scan_events(lake_dir).group_by(hour).agg(pl.len().alias("rows"))
    return counts.sort("hour").collect(engine="streaming")


def lake_origins(lake_dir: Path) -> dict[str, int]:
    """Events per origin: ``kuairand``, ``canonical`` (any other ``source`` value a canonical
    log carries), and for the simulator its world (``SimulatorConfig.world_id``, the prefix
    of its event ids: ``simulator sim3-1a2b3c4d``). One streaming pass over ``source``, and
    one over the simulator's event ids when there are any."""
    sources = (scan_events(lake_dir).group_by("source").agg(pl.len())
               .collect(engine="streaming"))
    origins: dict[str, int] = {}
    for source, rows in sources.iter_rows():
        if source != "simulator":
            name = source if source == "kuairand" else "canonical"
            origins[name] = origins.get(name, 0) + rows
    if "simulator" in sources.get_column("source").to_list():
        world = pl.col("event_id").str.extract(r"^(sim\d+-[0-9a-f]{8})-", 1).fill_null("?")
        worlds = (scan_events(lake_dir).filter(pl.col("source") == "simulator")
                  .group_by(world.alias("world")).agg(pl.len()).collect(engine="streaming"))
        origins |= {f"simulator {name}": rows for name, rows in worlds.iter_rows()}
    return dict(sorted(origins.items()))


def check_one_origin(lake_dir: Path) -> None:
    """FeatureBuildError when the lake holds events of more than one origin (two sources, or
    two simulated worlds): their ids and dates collide (user 7 of one log is not user 7 of
    the other), so examples built from both would mean nothing, silently."""
    origins = lake_origins(lake_dir)
    if len(origins) > 1:
        found = ", ".join(f"{name} ({rows:,} events)" for name, rows in origins.items())
        raise FeatureBuildError(
            f"{lake_dir}: the lake mixes logs that cannot be trained on together: {found}; "
            "their user and item ids collide. Give each log its own workspace (--home), or "
            "remove the other from lake/events")


def merge_windows(hours: pl.DataFrame, limit: int) -> list[Window]:
    """Cut consecutive hours into ts ranges of at most ``limit`` rows each (an hour over the
    limit is a range of its own).

    hours: (H, 2) ``hour``, ``rows`` ascending (see ``profile_lake``). Returns ascending,
    disjoint ``[start, end)`` ranges that hold every row of those hours.
    """
    windows: list[Window] = []
    start: datetime | None = None
    rows = 0
    for hour, count in hours.select("hour", "rows").iter_rows():
        if start is not None and rows + count > limit:
            windows.append((start, hour))
            start, rows = None, 0
        if start is None:
            start = hour
        rows += count
    if start is not None:
        windows.append((start, hours.get_column("hour").max() + timedelta(hours=1)))
    return windows


def plan_build(hours: pl.DataFrame, config: FeatureConfig) -> BuildPlan:
    """Split dates, K and merge windows from the lake's profile.

    hours: (H, 2) events per UTC hour (``profile_lake``), H > 0. K is ``config.user_buckets``,
    or ceil(rows / ``config.max_rows_in_memory``) when that is None; a merge window holds at
    most ``max_rows_in_memory / MERGE_WINDOW_DIVISOR`` rows (or a single hour).
    """
    hours = hours.with_columns(pl.col("hour").dt.date().alias("date"))
    dates = split_dates(hours.get_column("date").unique().sort().to_list(), config)
    total = int(hours.get_column("rows").sum())
    buckets = config.user_buckets
    if buckets is None:
        buckets = max(1, -(-total // config.max_rows_in_memory))
    limit = max(1, config.max_rows_in_memory // MERGE_WINDOW_DIVISOR)
    windows = {
        name: merge_windows(hours.filter(pl.col("date").is_in(ds)), limit)
        for name, ds in dates.items()
    }
    return BuildPlan(dates=dates, buckets=buckets, windows=windows)


def fit_vocabulary(lake_dir: Path, train_dates: list[date]) -> Vocabulary:
    """The vocabulary of the training dates (a prefix of the lake's dates), fitted on a lazy
    projection of the sparse columns: the streaming engine holds only the distinct ids."""
    end = datetime.combine(train_dates[-1] + timedelta(days=1), time(), tzinfo=UTC)
    train = (
        scan_events(lake_dir)
        .filter(pl.col("ts") < end)
        .with_columns(pl.col("ts").dt.hour().cast(pl.Int64).alias("hour"))
        .select(SPARSE_FEATURES)
    )
    return Vocabulary.fit(train, SPARSE_FEATURES)


def user_bucket(buckets: int) -> pl.Expr:
    """Bucket of each row's user, in [0, K): ``user_id mod K`` (stable across runs)."""
    return pl.col("user_id").fill_null(0) % buckets


def partition_by_bucket(lake_dir: Path, target: Path, buckets: int) -> dict[int, list[Path]]:
    """One streaming pass over the lake: every event to ``target/bucket=<b>/<n>.ipc`` by its
    user's bucket (Arrow IPC, lz4: cheap to write and to read back). Returns the files of
    each bucket that has events."""
    written: list[pl.io.partition.SinkedPathsCallbackArgs] = []
    scan_events(lake_dir).sink_ipc(
        pl.PartitionBy(target, key={"bucket": user_bucket(buckets)}, include_key=False),
        compression="lz4", mkdir=True, sinked_paths_callback=written.append,
        engine="streaming",
    )
    files: dict[int, list[Path]] = {}
    for path in sorted(Path(p.path) for args in written for p in args.paths):
        files.setdefault(int(path.parent.name.removeprefix("bucket=")), []).append(path)
    return files


def make_examples(
    events: pl.DataFrame, split_of: dict[date, str], vocab: Vocabulary, schema: ExampleSchema
) -> pl.DataFrame:
    """Examples of ``events`` (n rows holding all events of their users): histories, the
    split, encoded features and targets. Returns (n, C) sorted by ``SORT_KEY``."""
    events = events.with_columns(pl.col("ts").dt.date().alias("date"))
    events = attach_histories(events, schema.history_length).with_columns(
        pl.col("date").replace_strict(split_of, return_dtype=pl.String).alias("split")
    )
    examples = encode_examples(events, vocab, schema).with_columns(task_targets(DEFAULT_TASKS))
    return examples.sort(SORT_KEY)


def split_frames(examples: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Split name -> its rows of ``examples``, in their order."""
    return {name: examples.filter(pl.col("split") == name) for name in SPLITS}


def merge_parts(parts: list[Path], windows: list[Window], target: Path) -> None:
    """Write ``target`` with the rows of all ``parts`` in ``SORT_KEY`` order, holding one
    window at a time: each ``[start, end)`` ts range is read from every part (row groups
    outside it are skipped by their statistics), sorted, and streamed to the file."""
    scan = pl.scan_parquet(parts)

    def batches(
        with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
        batch_size: int | None,
    ) -> Iterator[pl.DataFrame]:
        for start, end in windows:
            rows = scan.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
            frame = rows.collect(engine="streaming").sort(SORT_KEY)
            if predicate is not None:
                frame = frame.filter(predicate)
            yield frame if with_columns is None else frame.select(with_columns)

    merged = register_io_source(batches, schema=scan.collect_schema(), is_pure=True)
    merged.sink_parquet(target, engine="streaming")


def write_parts(examples: pl.DataFrame, parts: Path, bucket: int) -> dict[str, int]:
    """Write one bucket's examples (n_b, C) as ``parts/<split>/bucket-<b>.parquet`` (splits
    it has rows of only); rows per split."""
    rows = {}
    for name, frame in split_frames(examples).items():
        rows[name] = frame.height
        if frame.height:
            (parts / name).mkdir(parents=True, exist_ok=True)
            frame.write_parquet(parts / name / f"bucket-{bucket:05d}.parquet",
                                compression="lz4", row_group_size=PART_ROW_GROUP)
    return rows


def write_bucketed(
    lake_dir: Path, staging: Path, plan: BuildPlan, vocab: Vocabulary, schema: ExampleSchema
) -> dict[str, int]:
    """Write ``staging/<split>.parquet`` one user bucket at a time (K > 1): the lake split by
    bucket in one pass, each bucket's examples to part files, then the parts merged; rows
    per split."""
    parts = staging / PARTS_DIR
    rows = dict.fromkeys(SPLITS, 0)
    by_bucket = partition_by_bucket(lake_dir, staging / BUCKETS_DIR, plan.buckets)
    buckets = tqdm(sorted(by_bucket.items()), desc="features: user buckets", unit="bucket",
                   leave=False, disable=None)  # None: shown on a terminal only
    for bucket, files in buckets:
        examples = make_examples(pl.read_ipc(files), plan.split_of, vocab, schema)
        for name, count in write_parts(examples, parts, bucket).items():
            rows[name] += count
        del examples
        for file in files:  # the disk a bucket's events took is free again
            file.unlink()
    shutil.rmtree(staging / BUCKETS_DIR)
    for name in SPLITS:
        files = sorted((parts / name).glob("*.parquet"))
        merge_parts(files, plan.windows[name], staging / f"{name}.parquet")
    shutil.rmtree(parts)
    return rows


def write_whole(
    lake_dir: Path, staging: Path, plan: BuildPlan, vocab: Vocabulary, schema: ExampleSchema
) -> dict[str, int]:
    """Write ``staging/<split>.parquet`` from the whole lake at once (K = 1); rows per split."""
    examples = make_examples(scan_events(lake_dir).collect(engine="streaming"), plan.split_of,
                             vocab, schema)
    frames = split_frames(examples)
    for name, frame in frames.items():
        frame.write_parquet(staging / f"{name}.parquet")
    return {name: frame.height for name, frame in frames.items()}


def build_examples(
    lake_dir: Path, out_dir: Path, config: FeatureConfig = FeatureConfig()
) -> BuildReport:
    """Turn every impression in the lake into an example of its split; see module doc.

    Holds about ``config.max_rows_in_memory`` rows at a time (plus the vocabulary); a
    failure leaves ``out_dir`` as it was.
    """
    hours = profile_lake(lake_dir)
    if hours.height == 0:
        raise FeatureBuildError(f"{lake_dir}: the lake holds no events; run `recpipe ingest`")
    check_one_origin(lake_dir)
    plan = plan_build(hours, config)
    vocab = fit_vocabulary(lake_dir, plan.dates["train"])
    schema = ExampleSchema(
        history_length=config.history_length,
        vocab_sizes={name: vocab.size(name) for name in SPARSE_FEATURES},
    )
    write = write_whole if plan.buckets == 1 else write_bucketed
    with atomic_dir(out_dir) as staging:
        rows = write(lake_dir, staging, plan, vocab, schema)
        report = BuildReport(
            out_dir=str(out_dir),
            rows=rows,
            dates={name: [str(d) for d in ds] for name, ds in plan.dates.items()},
            vocab_sizes=schema.vocab_sizes,
        )
        meta = {"schema": schema.to_dict(), "config": config.recorded(),
                "report": report.to_dict()}
        (staging / "vocab.json").write_text(vocab.to_json())
        (staging / "schema.json").write_text(json.dumps(meta, indent=2, default=str))
    return report


def load_schema(examples_dir: Path) -> ExampleSchema:
    """The ExampleSchema written next to the examples."""
    meta = json.loads((examples_dir / "schema.json").read_text())
    return ExampleSchema.from_dict(meta["schema"])

