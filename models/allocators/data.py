"""Logged allocation decisions → validated frame → episodes, rewards and model inputs.

The log is one row per feed request that had a live candidate (the simulator's
``allocations.parquet``, or any canonical Parquet/CSV with the same columns): the observable
state the policy saw, the action (1 = the live was inserted), its propensity, and the
outcomes of that request. An episode is one user session (``session_id``), its steps ordered
by ``request_index``.

Everything every algorithm shares lives here, written once:

- :func:`read_allocation_log` validates a log and names what is wrong (``AllocationLogError``);
- :class:`RewardConfig` / :func:`request_rewards`: the anti-greedy reward;
- :func:`episode_links`: next-step index and terminal flag per row;
- :class:`AllocationFeaturizer`: the one mapping from observable state to model inputs
  (dense features standardised on the training log, id vocabularies with an out-of-vocabulary
  row 0), used alike in training, in simulator rollouts and in the MLflow pyfunc.

No simulator import: a policy takes anything with the ``STATE_FIELDS`` attributes (for
instance ``simulation.AllocationState``) or a frame with those columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

STATE_FIELDS: tuple[str, ...] = (
    "user_id", "activity_group", "hour", "request_index", "lives_inserted_in_session",
    "session_watch_time_s", "recent_click_rate", "past_live_impressions",
    "past_live_watch_per_impression", "past_video_watch_per_impression",
    "candidate_item_id", "candidate_author_id", "candidate_popularity",
)
"""Observable request state, in ``simulation.allocation.AllocationState`` field order."""

OUTCOME_COLUMNS: tuple[str, ...] = (
    "action", "propensity", "p_insert", "live_watch_time_s", "video_watch_time_s",
    "live_click", "live_follow", "live_gift", "session_end", "next_day_return",
)
"""Logged action, its probability, and the request's outcomes."""

REQUIRED_COLUMNS: tuple[str, ...] = ("session_id", *STATE_FIELDS, *OUTCOME_COLUMNS)
"""Columns a log must have (extra columns are ignored)."""

_INT_COLUMNS = ("user_id", "activity_group", "hour", "request_index",
                "lives_inserted_in_session", "past_live_impressions", "candidate_item_id",
                "candidate_author_id", "action", "live_click", "live_follow", "live_gift",
                "session_end", "next_day_return")
_BINARY_COLUMNS = ("action", "live_click", "live_follow", "live_gift", "session_end",
                   "next_day_return")
N_GROUPS = 3
"""Activity groups 0 low / 1 mid / 2 high (the multi-group state decomposition)."""
N_HOURS = 24


class AllocationLogError(ValueError):
    """The allocation log is missing, unreadable or breaks the contract (exit 2 in the CLI)."""


def allocation_file(path: str | Path) -> Path:
    """``path`` itself if it is a .parquet/.csv file, else ``path/allocations.parquet``."""
    path = Path(path)
    if path.is_dir():
        path = path / "allocations.parquet"
    if not path.exists():
        raise AllocationLogError(f"no allocation log at {path}")
    if path.suffix not in (".parquet", ".csv"):
        raise AllocationLogError(f"{path}: expected a .parquet or .csv allocation log")
    return path


def read_allocation_log(path: str | Path) -> pl.DataFrame:
    """Read and validate an allocation log; rows sorted by (session_id, request_index).

    Raises:
        AllocationLogError: naming the file and the missing columns, nulls, values out of
            range, or duplicated (session_id, request_index) steps.
    """
    file = allocation_file(path)
    try:
        frame = pl.read_parquet(file) if file.suffix == ".parquet" else pl.read_csv(file)
    except Exception as error:  # noqa: BLE001 (polars raises several types)
        raise AllocationLogError(f"{file}: unreadable: {error}") from error
    return validate_allocation_frame(frame, str(file))


def validate_allocation_frame(frame: pl.DataFrame, where: str = "allocation log") -> pl.DataFrame:
    """Check and cast a log frame (see :func:`read_allocation_log`). The whole log is refused
    on the first problem (a log with holes in its episodes would train on wrong returns); the
    message names the column, the first offending row (counting from 1) and its value."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise AllocationLogError(f"{where}: missing columns {missing}")
    if frame.height == 0:
        raise AllocationLogError(f"{where}: no rows")
    frame = frame.select(REQUIRED_COLUMNS).with_row_index(_ROW)
    for column in REQUIRED_COLUMNS:
        _refuse_rows(frame, pl.col(column).is_null(), f"null {column}", [column], where)
    targets = {"session_id": pl.String,
               **{c: pl.Int64 if c in _INT_COLUMNS else pl.Float64
                  for c in REQUIRED_COLUMNS if c != "session_id"}}
    for column, dtype in targets.items():  # no nulls left: a null cast is a value that fails
        try:
            _refuse_rows(frame, pl.col(column).cast(dtype, strict=False).is_null(),
                         f"{column} not {dtype}", [column], where)
        except pl.exceptions.PolarsError:  # not even loosely convertible (a list column)
            raise AllocationLogError(f"{where}: column {column} is {frame.schema[column]}, "
                                     f"it must be {dtype}") from None
    frame = frame.with_columns(pl.col(c).cast(t) for c, t in targets.items())
    for reason, bad, shown in _row_checks():
        _refuse_rows(frame, bad, reason, shown, where)
    frame = frame.sort("session_id", "request_index")
    _refuse_rows(frame, pl.struct("session_id", "request_index").is_duplicated(),
                 "a duplicated (session_id, request_index) step", [], where)
    return frame.drop(_ROW)


_ROW = "_row"


def _row_checks() -> list[tuple[str, pl.Expr, list[str]]]:
    """(reason, expression true on a bad row, columns worth showing) of the typed log."""
    checks = [(f"{c} outside {{0, 1}}", ~pl.col(c).is_in([0, 1]), [c]) for c in _BINARY_COLUMNS]
    checks += [(f"negative {c}", pl.col(c) < 0, [c]) for c in (
        "live_watch_time_s", "video_watch_time_s", "request_index", "lives_inserted_in_session",
        "session_watch_time_s", "past_live_impressions")]
    return checks + [
        ("p_insert outside [0, 1]", ~pl.col("p_insert").is_between(0.0, 1.0), ["p_insert"]),
        ("propensity outside (0, 1]", (pl.col("propensity") <= 0) | (pl.col("propensity") > 1),
         ["propensity"]),
        ("activity_group outside 0..2", ~pl.col("activity_group").is_between(0, N_GROUPS - 1),
         ["activity_group"]),
        ("hour outside 0..23", ~pl.col("hour").is_between(0, N_HOURS - 1), ["hour"]),
        ("outcomes of a live that was not inserted", (pl.col("action") == 0) & (
            (pl.col("live_watch_time_s") > 0) | (pl.col("live_click") > 0)
            | (pl.col("live_follow") > 0) | (pl.col("live_gift") > 0)),
         ["action", "live_watch_time_s", "live_click", "live_follow", "live_gift"]),
        ("session_end before the session's last request", (pl.col("session_end") == 1) & (
            pl.col("request_index") < pl.col("request_index").max().over("session_id")),
         ["session_end"]),
    ]


def _refuse_rows(frame: pl.DataFrame, bad: pl.Expr, reason: str, shown: list[str],
                 where: str) -> None:
    """AllocationLogError naming how many rows are ``bad`` and the first of them."""
    flagged = frame.with_columns(bad.fill_null(True).alias("_bad")).filter(pl.col("_bad"))
    if flagged.height == 0:
        return
    first = flagged.sort(_ROW).row(0, named=True)
    keys = [c for c in ("session_id", "request_index") if c not in shown]
    values = ", ".join(f"{c}={first[c]!r}" for c in [*keys, *shown])
    raise AllocationLogError(f"{where}: {flagged.height} row(s) with {reason}; first: row "
                             f"{first[_ROW] + 1} ({values})")


# --- Episodes and the reward ----------------------------------------------------------------


@dataclass(frozen=True)
class RewardConfig:
    """The anti-greedy request reward (seconds), shared by every algorithm.

    r_t = video_watch_t + live_watch_t - exit_penalty_s · early_exit_t
          + retention_bonus_s · next_day_return · last_t

    The live's watch time is credited only net of the video watch it displaced: v_t is what
    the user actually watched of the request's videos with the live in the feed (the videos
    after the live slot were shown one position lower), so inserting pays only when l_t beats
    the loss in v_t. A greedy reward (live watch alone) would insert whenever a live is
    watched at all. Early exits are charged: a session that ends before the request cap after
    this request loses the rest of its watch time, and interruptions raise that hazard.
    """

    exit_penalty_s: float = 60.0
    """Seconds charged when the session ends after this request, before the request cap."""
    retention_bonus_s: float = 100.0
    """Seconds credited at a session's last step when the user came back the next day."""
    max_requests_per_session: int = 30
    """The request cap: ending at the cap is not an early exit (simulator config or log)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def episode_links(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (session_id, request_index): the row index of the next step of the
    same session (-1 at the last one) and the terminal flag (the last logged step), both (N,).
    """
    session = frame["session_id"].to_numpy()
    n = session.shape[0]
    same_next = np.zeros(n, dtype=bool)
    same_next[:-1] = session[1:] == session[:-1]
    next_index = np.where(same_next, np.arange(n) + 1, -1).astype(np.int64)
    return next_index, ~same_next


def at_request_cap(request_index: np.ndarray, max_requests_per_session: int) -> np.ndarray:
    """(N,) bool: the request is the session's last allowed one, where ending is no early
    exit."""
    return np.asarray(request_index) >= max_requests_per_session - 1


def reward_parts(frame: pl.DataFrame, max_requests_per_session: int) -> dict[str, np.ndarray]:
    """Per-row reward ingredients (N,): ``watch`` (v + l seconds), ``early_exit`` (0/1) and
    ``returned_at_end`` (next_day_return on the session's last logged step, else 0)."""
    _, done = episode_links(frame)
    ended = frame["session_end"].to_numpy() == 1
    at_cap = at_request_cap(frame["request_index"].to_numpy(), max_requests_per_session)
    returned = frame["next_day_return"].to_numpy() == 1
    return {
        "watch": (frame["video_watch_time_s"] + frame["live_watch_time_s"]).to_numpy(),
        "early_exit": (ended & ~at_cap).astype(np.float64),
        "returned_at_end": (done & returned).astype(np.float64),
    }


def request_rewards(frame: pl.DataFrame, config: RewardConfig) -> np.ndarray:
    """The reward r_t of every row (N,) in seconds (see :class:`RewardConfig`)."""
    parts = reward_parts(frame, config.max_requests_per_session)
    return (parts["watch"] - config.exit_penalty_s * parts["early_exit"]
            + config.retention_bonus_s * parts["returned_at_end"])


def discounted_returns(rewards: np.ndarray, next_index: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo discounted return from every step to the end of its episode (N,)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for i in range(rewards.shape[0] - 1, -1, -1):
        nxt = next_index[i]
        out[i] = rewards[i] + (gamma * out[nxt] if nxt >= 0 else 0.0)
    return out


def live_share(p_insert: np.ndarray) -> float:
    """The constraint's quantity: expected inserted lives per request, mean of P(insert)."""
    return float(np.mean(p_insert)) if p_insert.size else 0.0


# --- Observable state → model inputs --------------------------------------------------------


def state_columns(state: Any) -> dict[str, np.ndarray]:
    """``STATE_FIELDS`` arrays from an AllocationState-like object, a Polars or pandas frame,
    or a mapping of arrays."""
    if isinstance(state, pl.DataFrame):
        missing = [f for f in STATE_FIELDS if f not in state.columns]
        if missing:
            raise AllocationLogError(f"state rows are missing columns {missing}")
        return {f: state[f].to_numpy() for f in STATE_FIELDS}
    if isinstance(state, Mapping) or hasattr(state, "columns"):
        missing = [f for f in STATE_FIELDS if f not in state]
        if missing:
            raise AllocationLogError(f"state rows are missing columns {missing}")
        return {f: np.asarray(state[f]) for f in STATE_FIELDS}
    return {f: np.asarray(getattr(state, f)) for f in STATE_FIELDS}


DENSE_FEATURES: tuple[str, ...] = (
    "log_request_index", "first_request", "lives_inserted", "log_lives_inserted",
    "log_session_watch", "recent_click_rate", "log_past_live_impressions", "has_live_history",
    "log_past_live_watch", "log_past_live_watch_shrunk", "log_past_video_watch",
    "candidate_popularity", "hour_sin", "hour_cos", "group_low", "group_mid", "group_high",
)
"""Names of the dense features, in column order."""

SPARSE_FEATURES: tuple[str, ...] = ("user_id", "candidate_author_id", "hour")
"""Id features for the TorchRec EmbeddingBagCollection (index 0 = out of vocabulary)."""


def raw_dense_features(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N, F) dense features before standardisation (F = len(DENSE_FEATURES))."""
    f = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    n_live = f["past_live_impressions"]
    hour = 2 * np.pi * f["hour"] / N_HOURS
    group = f["activity_group"].astype(np.int64)
    # live watch per impression shrunk towards 0 by 2 pseudo-impressions: 1 lucky view != taste
    shrunk = f["past_live_watch_per_impression"] * n_live / (n_live + 2.0)
    columns = [
        np.log1p(f["request_index"]), (f["request_index"] == 0).astype(float),
        f["lives_inserted_in_session"], np.log1p(f["lives_inserted_in_session"]),
        np.log1p(f["session_watch_time_s"]), f["recent_click_rate"], np.log1p(n_live),
        (n_live > 0).astype(float), np.log1p(f["past_live_watch_per_impression"]),
        np.log1p(shrunk), np.log1p(f["past_video_watch_per_impression"]),
        f["candidate_popularity"], np.sin(hour), np.cos(hour),
        *((group == g).astype(float) for g in range(N_GROUPS)),
    ]
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class IdVocabulary:
    """Raw id → embedding row: ids seen at least ``min_count`` times get rows 1..n, others 0."""

    ids: np.ndarray
    """(n,) sorted known raw ids."""

    @classmethod
    def fit(cls, values: np.ndarray, min_count: int = 1) -> IdVocabulary:
        unique, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
        return cls(unique[counts >= min_count])

    @property
    def size(self) -> int:
        """Rows of the embedding table, the OOV row included."""
        return int(self.ids.shape[0]) + 1

    def lookup(self, values: np.ndarray) -> np.ndarray:
        """(N,) int64 rows; 0 for ids not in the vocabulary."""
        values = np.asarray(values, dtype=np.int64)
        if self.ids.size == 0:
            return np.zeros(values.shape, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, values), 0, self.ids.size - 1)
        return np.where(self.ids[pos] == values, pos + 1, 0).astype(np.int64)


@dataclass(frozen=True)
class StateInputs:
    """Model inputs of N requests."""

    dense: np.ndarray
    """(N, F) float32 standardised dense features."""
    ids: dict[str, np.ndarray]
    """SPARSE_FEATURES name → (N,) int64 embedding rows."""
    group: np.ndarray
    """(N,) int64 activity group 0..2."""

    def __len__(self) -> int:
        return int(self.group.shape[0])

    def take(self, rows: np.ndarray) -> StateInputs:
        """The subset ``rows``."""
        return StateInputs(self.dense[rows], {k: v[rows] for k, v in self.ids.items()},
                           self.group[rows])


@dataclass(frozen=True)
class AllocationFeaturizer:
    """Fitted on a training log; saved with every policy so serving encodes the same way."""

    mean: np.ndarray
    """(F,) dense feature means on the training log."""
    std: np.ndarray
    """(F,) dense feature standard deviations (floored at 1e-6)."""
    vocabularies: dict[str, IdVocabulary]
    """"user_id" and "candidate_author_id" vocabularies (hours are their own rows 1..24)."""

    @classmethod
    def fit(cls, frame: pl.DataFrame, min_id_count: int = 2) -> AllocationFeaturizer:
        raw = raw_dense_features(state_columns(frame))
        return cls(raw.mean(axis=0), np.maximum(raw.std(axis=0), 1e-6), {
            name: IdVocabulary.fit(frame[name].to_numpy(), min_id_count)
            for name in ("user_id", "candidate_author_id")
        })

    @property
    def n_dense(self) -> int:
        return int(self.mean.shape[0])

    @property
    def vocab_sizes(self) -> dict[str, int]:
        """Embedding rows per sparse feature."""
        return {**{k: v.size for k, v in self.vocabularies.items()}, "hour": N_HOURS + 1}

    def transform(self, state: Any, id_features: bool = True) -> StateInputs:
        """Inputs for any state (see :func:`state_columns`). ``id_features=False`` maps user
        and author ids to the OOV row: use it for users of another world than the training
        log's (e.g. simulator rollouts with a held-out seed), whose ids mean someone else."""
        cols = state_columns(state)
        dense = ((raw_dense_features(cols) - self.mean) / self.std).astype(np.float32)
        n = dense.shape[0]
        ids = {"hour": np.asarray(cols["hour"], dtype=np.int64) + 1}
        for name, vocab in self.vocabularies.items():
            ids[name] = vocab.lookup(cols[name]) if id_features else np.zeros(n, np.int64)
        return StateInputs(dense, ids, np.asarray(cols["activity_group"], dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return {"dense_features": list(DENSE_FEATURES), "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "vocabularies": {k: v.ids.tolist() for k, v in self.vocabularies.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AllocationFeaturizer:
        if list(data["dense_features"]) != list(DENSE_FEATURES):
            raise ValueError("saved dense features differ from this code's DENSE_FEATURES")
        return cls(np.asarray(data["mean"]), np.asarray(data["std"]),
                   {k: IdVocabulary(np.asarray(v, dtype=np.int64))
                    for k, v in data["vocabularies"].items()})


# --- The training set -----------------------------------------------------------------------

HEAD_TARGETS: tuple[str, ...] = ("live_watch", "video_watch", "live_click", "live_follow",
                                 "live_gift", "session_end")
"""Supervised reward-head targets: watch times (minutes) and the click → follow → gift funnel
and the session exit (0/1)."""
WATCH_TARGETS = 2
"""The first HEAD_TARGETS are regressions (minutes), the rest binary."""


@dataclass(frozen=True)
class AllocationDataset:
    """A log as aligned arrays (N rows): inputs, action, reward, links, supervised targets."""

    inputs: StateInputs
    """Model inputs of every row."""
    action: np.ndarray
    """(N,) int64 logged action."""
    p_insert: np.ndarray
    """(N,) logging policy's P(insert)."""
    reward: np.ndarray
    """(N,) float reward r_t (seconds, :func:`request_rewards`)."""
    parts: dict[str, np.ndarray]
    """Reward ingredients (:func:`reward_parts`)."""
    next_index: np.ndarray
    """(N,) next step's row, -1 at an episode's last step."""
    done: np.ndarray
    """(N,) bool terminal flag."""
    targets: np.ndarray
    """(N, len(HEAD_TARGETS)) float32 supervised reward-head targets."""
    at_cap: np.ndarray
    """(N,) bool the request is at the session cap (ending there is no early exit)."""

    def __len__(self) -> int:
        return int(self.action.shape[0])


def build_dataset(frame: pl.DataFrame, featurizer: AllocationFeaturizer,
                  reward: RewardConfig) -> AllocationDataset:
    """Arrays of a validated log (sorted as :func:`read_allocation_log` returns it)."""
    next_index, done = episode_links(frame)
    targets = np.stack([
        frame["live_watch_time_s"].to_numpy() / 60.0, frame["video_watch_time_s"].to_numpy() / 60.0,
        *(frame[c].to_numpy() for c in ("live_click", "live_follow", "live_gift", "session_end")),
    ], axis=1).astype(np.float32)
    return AllocationDataset(
        inputs=featurizer.transform(frame), action=frame["action"].to_numpy().astype(np.int64),
        p_insert=frame["p_insert"].to_numpy(), reward=request_rewards(frame, reward),
        parts=reward_parts(frame, reward.max_requests_per_session),
        next_index=next_index, done=done, targets=targets,
        at_cap=at_request_cap(frame["request_index"].to_numpy(),
                              reward.max_requests_per_session),
    )
