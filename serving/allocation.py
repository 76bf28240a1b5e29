"""The live-stream allocation plug point (the allocator itself is trained elsewhere).

When ``recpipe-allocator@champion`` exists, the service loads it like the ranker and asks it,
for every request with a live candidate, whether to insert the best-ranked live stream. The
contract is the MLflow pyfunc one: ``predict`` receives a pandas frame with one row per
request (the columns below) and returns P(insert) per row (array, Series, or a one-column
frame). The service inserts when P >= ``INSERT_THRESHOLD`` and returns P, so a caller that
wants a stochastic policy (with a logged propensity) can sample instead.

State columns: ``user_id``, ``ts`` (naive UTC), ``hour``, ``n_candidates``,
``candidate_item_id``, ``candidate_author_id``, ``candidate_duration_s``, ``candidate_score``
(the ranker's blended score), ``candidate_score_<task>`` per ranker task, and every
``context.session`` field of the request by its own name (the fields above win over a
session field of the same name). Session fields carry the rest of the allocator's state by
its names (``simulation.allocation.AllocationState``, ``models.allocators.data.STATE_FIELDS``):
``activity_group``, ``request_index``, ``lives_inserted_in_session``,
``session_watch_time_s``, ``recent_click_rate``, ``past_live_impressions``,
``past_live_watch_per_impression``, ``past_video_watch_per_impression``. What describes one
candidate (``candidate_popularity``) comes with that candidate, in its ``features``, as
``candidate_<name>`` (the server picks which live candidate to ask about, so the client
cannot put it in the session); a session field of the same name is the fallback.

Before ``predict``, every column is cast to the type the allocator's signature asks for
(JSON has one number type: ``240`` and ``2.0`` are both fine), and an unknown author (null)
becomes ``UNKNOWN_ID``, which the allocators map to their unseen-id row; a value that is not
a number of that kind makes the allocation unavailable with a reason naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

INSERT_THRESHOLD = 0.5
UNKNOWN_ID = -1
"""The id sent for a candidate without an author: no allocator has seen it."""
_NUMPY_TYPES = {"long": np.int64, "integer": np.int32, "double": np.float64,
                "float": np.float32}
"""MLflow signature type → what a state column is cast to (others are left as they are)."""


@dataclass(frozen=True)
class LoadedAllocator:
    """A loaded allocator version; ``predict`` is the pyfunc's."""

    name: str
    version: int
    predict: Callable[[pd.DataFrame], Any]
    input_types: Mapping[str, str] | None = None
    """Column → MLflow type name its signature asks for (None: no signature)."""


def load_allocator(name: str, version: int) -> LoadedAllocator:
    """Load ``models:/<name>/<version>`` as a pyfunc."""
    from models.registry import load_pyfunc

    model = load_pyfunc(f"models:/{name}/{version}")
    schema = model.metadata.get_input_schema()
    types = None
    if schema is not None:
        types = {column: kind.name for column, kind in
                 zip(schema.input_names(), schema.input_types(), strict=True)}
    return LoadedAllocator(name, version, model.predict, types)


def unavailable(reason: str) -> dict:
    return {"available": False, "insert": None, "probability": None, "item_id": None,
            "model": None, "reason": reason}


def allocation_state(
    user_id: int, ts: datetime, n_candidates: int, candidate: Mapping[str, Any],
    score: float, task_scores: Mapping[str, float], session: Mapping[str, float],
    candidate_features: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """The one-row state frame described in the module docstring."""
    author = candidate["author_id"]
    row: dict[str, Any] = {
        **dict(session),
        **{f"candidate_{name}": value for name, value in (candidate_features or {}).items()},
        "user_id": int(user_id),
        "ts": pd.Timestamp(ts).tz_convert("UTC").tz_localize(None),
        "hour": int(ts.hour),
        "n_candidates": int(n_candidates),
        "candidate_item_id": int(candidate["item_id"]),
        "candidate_author_id": UNKNOWN_ID if author is None else int(author),
        "candidate_duration_s": candidate["duration_s"],
        "candidate_score": float(score),
        **{f"candidate_score_{task}": float(value) for task, value in task_scores.items()},
    }
    return pd.DataFrame([row])


def decide(allocator: LoadedAllocator, state: pd.DataFrame, item_id: int) -> dict:
    """Ask the allocator about the live candidate ``item_id``. Never raises: an allocator
    that fails or answers nonsense makes the allocation unavailable, not the ranking."""
    model = {"name": allocator.name, "version": allocator.version}
    try:
        state = conform(state, allocator.input_types or {})
    except ValueError as error:
        return {**unavailable(str(error)), "model": model}
    try:
        output = allocator.predict(state)
        probability = _probability(output)
    except Exception as error:  # noqa: BLE001 (a plug-in: any failure is reported, not raised)
        message = " ".join(str(error).split())[:300]
        return {**unavailable(f"the allocator failed on this request: {message}"),
                "model": model}
    return {"available": True, "insert": bool(probability >= INSERT_THRESHOLD),
            "probability": probability, "item_id": int(item_id), "model": model, "reason": None}


def conform(state: pd.DataFrame, types: Mapping[str, str]) -> pd.DataFrame:
    """The one-row ``state`` with each column the allocator's signature types cast to that
    type.

    Raises:
        ValueError: naming the request fields the allocator needs and did not get, or the
            field whose value is not a number of its kind.
    """
    missing = [request_field(column) for column in types if column not in state.columns]
    if missing:
        raise ValueError(f"the allocator needs {', '.join(missing)} (missing from the request)")
    out = state.copy()
    for column, kind in types.items():
        if kind not in _NUMPY_TYPES:
            continue
        value = out.at[0, column]
        value = value.item() if isinstance(value, np.generic) else value  # as it was sent
        number = _typed_number(value, _NUMPY_TYPES[kind], request_field(column))
        out[column] = np.asarray([number], dtype=_NUMPY_TYPES[kind])
    return out


def _typed_number(value: Any, dtype: type, field: str) -> int | float:
    """``value`` (a JSON number: ``2`` and ``2.0`` alike) as a number of ``dtype``; integers
    stay exact (ids beyond 2**53 too). ValueError naming ``field`` for text, booleans, null,
    NaN/inf, a fraction where a whole number is needed, or one out of ``dtype``'s range."""
    finite = isinstance(value, int | float) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))
    if not finite:
        raise ValueError(f"the allocator needs a finite number for {field}, got {value!r}")
    if not np.issubdtype(dtype, np.integer):
        return float(value)
    if isinstance(value, float) and value != math.floor(value):
        raise ValueError(f"the allocator needs a whole number for {field}, got {value!r}")
    bounds = np.iinfo(dtype)
    whole = int(value)
    if not bounds.min <= whole <= bounds.max:
        raise ValueError(f"the allocator needs a whole number in {dtype.__name__} range for "
                         f"{field}, got {value!r}")
    return whole


def request_field(column: str) -> str:
    """Where a state column comes from in a ``/rank`` request (for messages)."""
    if column in _FROM_THE_SERVER or column.startswith("candidate_score_"):
        return column
    if column.startswith("candidate_"):
        return f"candidates[].features.{column.removeprefix('candidate_')}"
    return f"context.session.{column}"


_FROM_THE_SERVER = frozenset({
    "user_id", "ts", "hour", "n_candidates", "candidate_item_id", "candidate_author_id",
    "candidate_duration_s", "candidate_score"})
"""State columns the server fills from the request itself (``allocation_state``)."""


def _probability(output: Any) -> float:
    if isinstance(output, pd.DataFrame):
        output = output["probability"] if "probability" in output else output.iloc[:, 0]
    values = np.asarray(output, dtype=np.float64).reshape(-1)
    if values.shape != (1,) or not 0.0 <= values[0] <= 1.0:
        raise ValueError(f"expected one probability in [0, 1], got {values[:5].tolist()}")
    return float(values[0])

