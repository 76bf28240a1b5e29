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
``past_live_watch_per_impression``, ``past_video_watch_per_impression``,
``candidate_popularity``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

INSERT_THRESHOLD = 0.5


@dataclass(frozen=True)
class LoadedAllocator:
    """A loaded allocator version; ``predict`` is the pyfunc's."""

    name: str
    version: int
    predict: Callable[[pd.DataFrame], Any]
    input_columns: tuple[str, ...] | None = None
    """Columns its signature asks for (None: no signature)."""


def load_allocator(name: str, version: int) -> LoadedAllocator:
    """Load ``models:/<name>/<version>`` as a pyfunc."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    schema = model.metadata.get_input_schema()
    columns = tuple(schema.input_names()) if schema is not None else None
    return LoadedAllocator(name, version, model.predict, columns)


def unavailable(reason: str) -> dict:
    return {"available": False, "insert": None, "probability": None, "item_id": None,
            "model": None, "reason": reason}


def allocation_state(
    user_id: int, ts: datetime, n_candidates: int, candidate: Mapping[str, Any],
    score: float, task_scores: Mapping[str, float], session: Mapping[str, float],
) -> pd.DataFrame:
    """The one-row state frame described in the module docstring."""
    row: dict[str, Any] = {
        **dict(session),  # ints stay ints (an allocator signature may ask for longs)
        "user_id": int(user_id),
        "ts": pd.Timestamp(ts).tz_convert("UTC").tz_localize(None),
        "hour": int(ts.hour),
        "n_candidates": int(n_candidates),
        "candidate_item_id": int(candidate["item_id"]),
        "candidate_author_id": candidate["author_id"],
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
        output = allocator.predict(state)
        probability = _probability(output)
    except Exception as error:  # noqa: BLE001 (a plug-in: any failure is reported, not raised)
        message = " ".join(str(error).split())[:300]
        return {**unavailable(f"the allocator failed on this request: {message}"),
                "model": model}
    return {"available": True, "insert": bool(probability >= INSERT_THRESHOLD),
            "probability": probability, "item_id": int(item_id), "model": model, "reason": None}


def _probability(output: Any) -> float:
    if isinstance(output, pd.DataFrame):
        output = output["probability"] if "probability" in output else output.iloc[:, 0]
    values = np.asarray(output, dtype=np.float64).reshape(-1)
    if values.shape != (1,) or not 0.0 <= values[0] <= 1.0:
        raise ValueError(f"expected one probability in [0, 1], got {values[:5].tolist()}")
    return float(values[0])

