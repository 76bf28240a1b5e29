"""Column names and dtypes of the simulator's side tables (events follow features.contract)."""

from __future__ import annotations

import polars as pl

_UTC_US = pl.Datetime("us", "UTC")

GROUND_TRUTH_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "p_click": pl.Float64(),
    "p_like": pl.Float64(),
    "p_follow": pl.Float64(),
    "p_comment": pl.Float64(),
    "p_share": pl.Float64(),
    "p_hate": pl.Float64(),
    "p_long_view": pl.Float64(),
    "p_gift": pl.Float64(),                 # null for videos
    "expected_watch_time_s": pl.Float64(),
}
"""True marginal label probabilities and expected watch time per event."""

ALLOCATION_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "user_id": pl.Int64(),
    "ts": _UTC_US,                          # request time (impressions add slot ms)
    "date": pl.Date(),
    "session_id": pl.String(),
    "activity_group": pl.Int8(),
    "hour": pl.Int8(),
    "request_index": pl.Int32(),
    "lives_inserted_in_session": pl.Int32(),
    "session_watch_time_s": pl.Float64(),
    "recent_click_rate": pl.Float64(),
    "past_live_impressions": pl.Int64(),
    "past_live_watch_per_impression": pl.Float64(),
    "past_video_watch_per_impression": pl.Float64(),
    "candidate_item_id": pl.Int64(),
    "candidate_author_id": pl.Int64(),
    "candidate_popularity": pl.Float64(),
    "candidate_propensity": pl.Float64(),   # P(this live chosen among those on air)
    "action": pl.Int8(),                    # 1 inserted, 0 not
    "propensity": pl.Float64(),             # P(logged action): p_insert or 1 - p_insert
    "p_insert": pl.Float64(),
    "live_watch_time_s": pl.Float64(),      # 0 when not inserted
    "video_watch_time_s": pl.Float64(),     # of this request
    "live_click": pl.Int8(),                # 0 when not inserted
    "live_follow": pl.Int8(),
    "live_gift": pl.Int8(),
    "session_end": pl.Int8(),               # the session ended after this request
    "next_day_return": pl.Int8(),           # of this user-day, repeated on each row
}
"""One row per request that had an on-air live candidate."""

SESSION_SCHEMA: dict[str, pl.DataType] = {
    "session_id": pl.String(),
    "user_id": pl.Int64(),
    "date": pl.Date(),
    "activity_group": pl.Int8(),
    "n_requests": pl.Int32(),
    "n_impressions": pl.Int32(),
    "video_watch_time_s": pl.Float64(),
    "live_watch_time_s": pl.Float64(),
    "lives_inserted": pl.Int32(),
    "clicks": pl.Int32(),
    "p_return": pl.Float64(),               # true next-day return probability
    "next_day_return": pl.Int8(),
}
"""One row per user-day session."""

USER_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "activity_group": pl.Int8(),
    "age_bucket": pl.Int8(),
    "gender": pl.Int8(),
    "preferred_hour": pl.Int8(),
    "live_affinity": pl.Float64(),
}
"""Hidden user attributes, for evaluating user models and allocation policies."""

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64(),
    "item_type": pl.String(),
    "author_id": pl.Int64(),
    "topic": pl.Int32(),
    "quality": pl.Float64(),
    "duration_s": pl.Float64(),             # null for lives
    "on_air_start_hour": pl.Int32(),        # null for videos
    "on_air_hours": pl.Int32(),             # null for videos
}
"""Videos then lives in one item id space."""
