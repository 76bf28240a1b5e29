"""Training/serving skew: the service's scores equal the offline scores of the same rows.

"The same rows" means the same raw inputs: each request carries the example's user, its
timestamp (hence hour), its history at that time (items and behaviour codes), and each
candidate's item type, author, duration and position. Offline is
``LoadedRanker.score_encoded`` on the encoded test examples, with the version the service
loaded from the registry.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import polars as pl

from features.encode import encode_examples
from features.raw_rows import normalize_rows
from features.schema import RAW_INPUT_COLUMNS
from models.registry import load_ranker


def service_scores(client, requests, n_rows: int, n_tasks: int) -> np.ndarray:
    """(n_rows, K) float32 scores from POST /rank, placed at the example rows."""
    scores = np.full((n_rows, n_tasks), np.nan, np.float32)
    for body, rows in requests:
        response = client.post("/rank", json=body)
        assert response.status_code == 200, response.text
        by_item = {entry["item_id"]: entry["scores"] for entry in response.json()["ranked"]}
        for candidate, row in zip(body["candidates"], rows, strict=True):
            scores[row] = list(by_item[candidate["item_id"]].values())
    return scores


def test_service_scores_equal_offline_scores_on_the_test_split(store, client,
                                                               example_requests):
    test = store.splits.test
    mlflow.set_tracking_uri(store.tracking_uri)
    registered = load_ranker("models:/recpipe-ranker@champion")
    offline = registered.score_encoded(test)  # (N, K) float32, batches of 4096
    requests = example_requests(test)
    assert len(requests) > 50 and max(len(b["candidates"]) for b, _ in requests) > 1

    served = service_scores(client, requests, test.height, offline.shape[1])

    assert not np.isnan(served).any()
    # Offline batched the way the service batches (one request's rows per forward pass):
    # bit-identical, float32 survives the JSON.
    per_request = np.full_like(offline, np.nan)
    for _, rows in requests:
        per_request[rows] = registered.score_encoded(test[rows])
    np.testing.assert_array_equal(served, per_request)
    # Offline in one 4096-row batch: float32 matrix products block differently by batch
    # size, so a few scores differ in the last bit or two; nothing more.
    np.testing.assert_allclose(served, offline, rtol=2e-6, atol=0)
    # the test split exercises the unknown-id fallback (ids unseen in training)
    assert (test.get_column("item_id_idx") == 1).any()


def test_rows_built_from_requests_encode_exactly_like_the_examples(store, example_requests):
    """Column by column: the service's raw rows encode to the stored example features."""
    from datetime import UTC, datetime

    from features.schema import DENSE_FEATURES, SEQUENCE_BEHAVIOR_FEATURE, SPARSE_FEATURES
    from serving.app import parse_request
    from serving.rows import request_rows
    from serving.schemas import Limits

    test = store.splits.test
    requests = example_requests(test)
    raw = pl.concat([request_rows(parse_request(json.dumps(body).encode(), Limits()),
                                  datetime.now(UTC)) for body, _ in requests])
    order = [row for _, rows in requests for row in rows]
    expected = test[order]
    assert raw.columns == list(RAW_INPUT_COLUMNS)
    encoded = encode_examples(raw, store.splits.vocab, store.splits.schema)
    columns = [f"{name}_idx" for name in SPARSE_FEATURES] + [
        "hist_item_id_idx", SEQUENCE_BEHAVIOR_FEATURE, *DENSE_FEATURES]
    for name in columns:
        assert encoded.get_column(name).to_list() == expected.get_column(name).to_list(), name


def test_the_registered_pyfunc_takes_plain_pandas_rows_like_a_request(store):
    """What a user hands ``mlflow.pyfunc.load_model(...).predict``: Python ints (int64
    positions, whole-number durations), a null author, a null history, or only the three
    required columns; each scores like the same rows typed by the contract."""
    mlflow.set_tracking_uri(store.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/recpipe-ranker@champion")
    registered = load_ranker("models:/recpipe-ranker@champion")
    history = pl.List(pl.Int64)
    typed = store.splits.test.select(RAW_INPUT_COLUMNS).head(6).with_columns(
        pl.Series("author_id", [None, 3, 4, None, 5, 6], pl.Int64),
        pl.Series("duration_s", [30.0, 12.0, 0.0, 7.0, 5.0, 9.0]),
        pl.Series("hist_item_id", [[], [7], [8, 9], [], [], []], history),
        pl.Series("hist_behavior", [[], [1], [2, 1], [], [], []], history),
    )
    expected = registered.score_raw(typed)
    plain = typed.with_columns(
        pl.col("ts").dt.replace_time_zone(None),  # naive UTC, as the signature says
        pl.col("duration_s").cast(pl.Int64),
        pl.Series("hist_item_id", [None, [7], [8, 9], [], None, []], history),
        pl.Series("hist_behavior", [None, [1], [2, 1], [], None, []], history),
    ).to_pandas()
    np.testing.assert_allclose(model.predict(plain).to_numpy(), expected, rtol=1e-6)
    minimal = typed.select("user_id", "item_id", "ts")
    np.testing.assert_allclose(
        model.predict(minimal.with_columns(pl.col("ts").dt.replace_time_zone(None))
                      .to_pandas()).to_numpy(),
        registered.score_raw(normalize_rows(minimal)), rtol=1e-6)
