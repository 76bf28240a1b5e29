"""``serving.allocation.conform``: the allocator's state as JSON numbers arrive, cast to its
signature types exactly, or refused naming the request field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serving.allocation import conform

TYPES = {"user_id": "long", "activity_group": "long", "recent_click_rate": "double",
         "candidate_popularity": "float"}


def state(**values) -> pd.DataFrame:
    row = {"user_id": 7, "activity_group": 2, "recent_click_rate": 0.2,
           "candidate_popularity": 0.4, **values}
    return pd.DataFrame([row])


def test_json_numbers_of_either_kind_are_cast_to_the_signature():
    cast = conform(state(activity_group=2.0, recent_click_rate=1), TYPES)
    assert cast.dtypes.to_dict() == {"user_id": np.int64, "activity_group": np.int64,
                                     "recent_click_rate": np.float64,
                                     "candidate_popularity": np.float32}
    assert cast.at[0, "activity_group"] == 2 and cast.at[0, "recent_click_rate"] == 1.0


@pytest.mark.parametrize("user_id", [2**53 + 1, 2**63 - 1])
def test_ids_stay_exact_beyond_float_precision(user_id):
    assert conform(state(user_id=user_id), TYPES).at[0, "user_id"] == user_id


@pytest.mark.parametrize(("values", "message"), [
    ({"activity_group": "2"}, "a finite number for context.session.activity_group, got '2'"),
    ({"activity_group": True}, "a finite number for context.session.activity_group"),
    ({"activity_group": 1.5}, "a whole number for context.session.activity_group, got 1.5"),
    ({"recent_click_rate": float("inf")}, "a finite number for context.session.recent_click"),
    ({"candidate_popularity": None}, "a finite number for candidates[].features.popularity"),
    ({"user_id": 2**63}, "a whole number in int64 range for user_id"),
])
def test_a_value_it_cannot_take_is_refused_naming_the_request_field(values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        conform(state(**values), TYPES)


def test_missing_fields_are_named_where_the_request_carries_them():
    with pytest.raises(ValueError, match=r"needs context.session.activity_group, "
                                         r"candidates\[\].features.popularity \(missing"):
        conform(state().drop(columns=["activity_group", "candidate_popularity"]), TYPES)
