"""The HTTP contract of ``POST /rank``: request models (validated by pydantic, strictly) and
the limits that make a request too large.

Ids are strict JSON integers in the int64 range (``"7"``, ``7.5`` or ``true`` are rejected);
ids the model's vocabulary never saw are *not* errors: they map to the reserved unknown index,
exactly as in training (``features.vocab.UNKNOWN_INDEX``). Unknown fields are rejected, so a
typo never silently drops an input.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    field_validator,
    model_validator,
)

from features.contract import ITEM_TYPES
from features.raw_rows import DEFAULT_ITEM_TYPE
from features.schema import BEHAVIOR_CODES
from serving.settings import Limits

__all__ = ["Candidate", "Context", "HistoryEntry", "Limits", "RankRequest"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

MAX_TASK_WEIGHT = 1e6
"""Bound of a request's blend weight: beyond it the blended score can overflow to inf/NaN
(watch time is in seconds, so 1e6 already dwarfs every probability)."""

Id = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False, strict=True)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]


def _number(value: object) -> int | float:
    """A JSON number: ints stay ints (int64 range), floats must be finite; no booleans."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("must fit in int64")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Number = Annotated[int | float, PlainValidator(_number)]


def _allocator_value(value: object) -> object:
    """A JSON scalar for the allocator's state: checked by the allocator path, which makes
    the allocation (never the ranking) unavailable for a value it cannot take."""
    if isinstance(value, dict | list):
        raise ValueError("must be a number, not an object or a list")
    return value


AllocatorValue = Annotated[Any, PlainValidator(_allocator_value)]
ItemType = Literal[ITEM_TYPES]  # type: ignore[valid-type]  # ("video", "live")
BehaviorName = Literal[tuple(name for name in BEHAVIOR_CODES if name != "padding")]  # type: ignore[valid-type]


def utc(ts: datetime) -> datetime:
    """Naive datetimes are UTC; aware ones are converted to UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Candidate(_Strict):
    """One item to rank."""

    item_id: Id
    item_type: ItemType = DEFAULT_ITEM_TYPE
    author_id: Id | None = None
    """Unknown (null) maps to the unknown author index."""
    duration_s: NonNegativeFloat | None = None
    """Item length; null counts as 0 (as in training)."""
    position: Annotated[StrictInt, Field(ge=0, le=1_000_000)] | None = None
    """Feed slot the item would be shown at; null counts as 0 (as in training). Leave it out
    to score every candidate position-neutrally."""
    features: dict[str, AllocatorValue] = Field(default_factory=dict, max_length=64)
    """Numeric state of this candidate for the live-stream allocator, sent to it as
    ``candidate_<name>`` (e.g. ``{"popularity": 0.4}``); ignored by the ranker."""


class HistoryEntry(_Strict):
    """One item the user saw before this request, with the strongest behaviour on it."""

    item_id: Id
    behavior: BehaviorName = "impression"
    """impression < click < long_view < interaction (like/follow/share/comment/gift)."""


class Context(_Strict):
    """When the request happens, and the session state an allocator may read."""

    ts: datetime | None = None
    """Request time, ISO 8601 (no offset = UTC); default: now. The model reads its UTC hour."""
    hour: Annotated[StrictInt, Field(ge=0, le=23)] | None = None
    """UTC hour of day, when ``ts`` is not given (must agree with ``ts`` when both are)."""
    session: dict[str, AllocatorValue] = Field(default_factory=dict, max_length=64)
    """Numeric session state for the live-stream allocator (e.g. ``request_index``,
    ``session_watch_time_s``, ``activity_group``); the ranker does not read it."""

    @field_validator("ts")
    @classmethod
    def _ts_has_a_utc_time(cls, ts: datetime | None) -> datetime | None:
        if ts is not None:
            try:
                utc(ts)
            except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
                raise ValueError("is out of range once converted to UTC") from None
        return ts

    @model_validator(mode="after")
    def _hour_agrees_with_ts(self) -> Context:
        if self.ts is not None and self.hour is not None and utc(self.ts).hour != self.hour:
            raise ValueError(f"hour {self.hour} disagrees with ts {self.ts.isoformat()} "
                             f"(UTC hour {utc(self.ts).hour}); give one of them")
        return self


class RankRequest(_Strict):
    """``POST /rank`` body. Minimal: ``{"user_id": 7, "candidates": [{"item_id": 12}]}``."""

    user_id: Id
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    history: list[HistoryEntry] = Field(default_factory=list)
    """The user's recent items, oldest first (the model reads the last N)."""
    context: Context = Field(default_factory=Context)
    task_weights: dict[str, Annotated[FiniteFloat, Field(ge=-MAX_TASK_WEIGHT,
                                                          le=MAX_TASK_WEIGHT)]] | None = None
    """Blend weights per task for this request, replacing the service's (tasks left out
    weigh 0); each within ±``MAX_TASK_WEIGHT``."""
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    """Return only the best ``top_k`` candidates."""
    request_id: Annotated[str, Field(max_length=200)] | None = None
    """Echoed back."""

    @field_validator("candidates")
    @classmethod
    def _distinct_candidates(cls, candidates: list[Candidate]) -> list[Candidate]:
        ids = [candidate.item_id for candidate in candidates]
        if len(set(ids)) != len(ids):
            counts = Counter(ids)
            repeated = sorted(i for i, n in counts.items() if n > 1)
            raise ValueError(f"candidates must be distinct items; repeated item_id(s) "
                             f"{repeated[:10]}")
        return candidates
