"""Every kind of bad request gets a 4xx whose message names the problem; never a 500."""

from __future__ import annotations

import json

import pytest

OK = {"user_id": 7, "candidates": [{"item_id": 12}, {"item_id": 40}]}


def with_(**changes) -> dict:
    return {**OK, **changes}


BAD = [
    # (case, body, status, fragment of detail)
    ("missing user_id", {"candidates": [{"item_id": 1}]}, 422, "user_id: field required"),
    ("missing candidates", {"user_id": 7}, 422, "candidates: field required"),
    ("empty candidates", with_(candidates=[]), 422, "at least one candidate"),
    ("candidate without item_id", with_(candidates=[{"author_id": 3}]), 422,
     "candidates[0].item_id: field required"),
    ("user_id as string", with_(user_id="7"), 422, "user_id: Input should be a valid integer"),
    ("user_id as float", with_(user_id=7.5), 422, "user_id: Input should be a valid integer"),
    ("user_id as bool", with_(user_id=True), 422, "user_id: Input should be a valid integer"),
    ("item_id beyond int64", with_(candidates=[{"item_id": 2**63}]), 422,
     "candidates[0].item_id: Input should be less than or equal to"),
    ("candidates not a list", with_(candidates={"item_id": 1}), 422,
     "candidates: Input should be a valid array"),
    ("candidate not an object", with_(candidates=[12]), 422, "candidates[0]"),
    ("unknown item_type", with_(candidates=[{"item_id": 1, "item_type": "podcast"}]), 422,
     "candidates[0].item_type: Input should be 'video' or 'live'"),
    ("negative duration", with_(candidates=[{"item_id": 1, "duration_s": -3}]), 422,
     "candidates[0].duration_s: Input should be greater than or equal to 0"),
    ("duration as string", with_(candidates=[{"item_id": 1, "duration_s": "12"}]), 422,
     "candidates[0].duration_s: Input should be a valid number"),
    ("negative position", with_(candidates=[{"item_id": 1, "position": -1}]), 422,
     "candidates[0].position"),
    ("repeated candidate", with_(candidates=[{"item_id": 1}, {"item_id": 1}]), 422,
     "candidates: candidates must be distinct items; repeated item_id(s) [1]"),
    ("typo in a field", with_(candidates=[{"item_id": 1, "autor_id": 3}]), 422,
     "candidates[0].autor_id: unknown field"),
    ("unknown top-level field", with_(users=[1]), 422, "users: unknown field"),
    ("history entry without item_id", with_(history=[{"behavior": "click"}]), 422,
     "history[0].item_id: field required"),
    ("unknown behaviour", with_(history=[{"item_id": 3, "behavior": "purchase"}]), 422,
     "history[0].behavior: Input should be 'impression', 'click', 'long_view' or "
     "'interaction'"),
    ("history not a list", with_(history=5), 422, "history: Input should be a valid array"),
    ("bad timestamp", with_(context={"ts": "yesterday"}), 422, "context.ts"),
    ("hour out of range", with_(context={"hour": 24}), 422,
     "context.hour: Input should be less than or equal to 23"),
    ("hour disagrees with ts", with_(context={"ts": "2026-01-01T10:00:00Z", "hour": 3}), 422,
     "hour 3 disagrees with ts"),
    ("session value an object", with_(context={"session": {"request_index": {"n": 3}}}), 422,
     "context.session.request_index: must be a number, not an object or a list"),
    ("unknown task weight", with_(task_weights={"clicks": 1.0}), 422,
     "task_weights: weight(s) for unknown task(s) ['clicks']"),
    ("weight not a number", with_(task_weights={"click": "high"}), 422,
     "task_weights.click: Input should be a valid number"),
    ("ts before year 1 in UTC", with_(context={"ts": "0001-01-01T00:00:00+01:00"}), 422,
     "context.ts: is out of range once converted to UTC"),
    ("ts after year 9999 in UTC", with_(context={"ts": "9999-12-31T23:00:00-05:00",
                                                  "hour": 23}), 422, "context.ts"),
    ("overflowing weight", with_(task_weights={"watch_time": 1e308}), 422,
     "task_weights.watch_time: Input should be less than or equal to 1000000"),
    ("top_k zero", with_(top_k=0), 422, "top_k: Input should be greater than or equal to 1"),
    ("body is a list", [OK], 422, "body: Input should be an object"),
]


@pytest.mark.parametrize(("case", "body", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_4xx_naming_the_problem(client, case, body, status, fragment):
    response = client.post("/rank", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"], response.json()["detail"]


@pytest.mark.parametrize(("raw", "fragment"), [
    (b'{"user_id": 7, "candidates": [', "not valid JSON"),
    (b"user_id=7", "not valid JSON"),
    (b'{"user_id": 7, "candidates": [{"item_id": 1, "duration_s": NaN}]}', "finite number"),
    (b"", "empty request body"),
])
def test_malformed_json_is_a_client_error(client, raw, fragment):
    response = client.post("/rank", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert fragment in response.json()["detail"]


def test_field_errors_are_listed_one_by_one(client):
    response = client.post("/rank", json={"user_id": "x", "candidates": [{"item_id": "a"},
                                                                         {"item_id": 2.5}]})
    assert response.status_code == 422
    fields = [error["field"] for error in response.json()["errors"]]
    assert fields == ["user_id", "candidates[0].item_id", "candidates[1].item_id"]


@pytest.fixture
def small_client(watcher):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.schemas import Limits

    limits = Limits(max_body_bytes=2_000, max_candidates=5, max_history=3)
    with TestClient(create_app(watcher, limits, poll=False)) as client:
        yield client


def test_oversize_body_is_413_before_parsing(small_client):
    body = json.dumps(with_(request_id="x" * 190, candidates=[{"item_id": i, "author_id": i}
                                                              for i in range(100)]))
    response = small_client.post("/rank", content=body)
    assert response.status_code == 413
    assert "exceeds the limit of 2,000 bytes" in response.json()["detail"]


def test_oversize_body_without_content_length_is_413(small_client):
    def chunks():
        yield b'{"user_id": 7, "candidates": ['
        for i in range(200):
            yield f'{{"item_id": {i}}},'.encode()
        yield b'{"item_id": -1}]}'

    response = small_client.post("/rank", content=chunks())  # chunked transfer encoding
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]


def test_oversize_and_malformed_bodies_over_real_http(watcher, serve):
    """The same limits through uvicorn's own HTTP parsing (chunked transfer encoding, a
    declared Content-Length, broken JSON), not only through the in-process client."""
    import httpx

    from serving.app import create_app
    from serving.schemas import Limits

    url = serve(create_app(watcher, Limits(max_body_bytes=2_000, max_candidates=5,
                                           max_history=3), poll=False)) + "/rank"

    def chunks():
        yield b'{"user_id": 7, "candidates": ['
        for i in range(200):
            yield f'{{"item_id": {i}}},'.encode()
        yield b'{"item_id": -1}]}'

    with httpx.Client(timeout=30) as http:
        chunked = http.post(url, content=chunks())
        assert chunked.status_code == 413 and "exceeds the limit" in chunked.json()["detail"]
        declared = http.post(url, content=b" " * 2_001,
                             headers={"content-type": "application/json"})
        assert declared.status_code == 413
        broken = http.post(url, content=b'{"user_id": 7, "candidates": [',
                           headers={"content-type": "application/json"})
        assert broken.status_code in (400, 422) and "detail" in broken.json()
        assert http.post(url, json=OK).status_code == 200


def test_too_many_candidates_or_history_entries_is_413(small_client):
    many = small_client.post("/rank", json=with_(candidates=[{"item_id": i} for i in range(6)]))
    assert many.status_code == 413
    assert "candidates: 6 entries exceed the limit of 5" in many.json()["detail"]
    history = [{"item_id": i} for i in range(4)]
    long = small_client.post("/rank", json=with_(history=history))
    assert long.status_code == 413 and "history: 4 entries" in long.json()["detail"]
    assert small_client.post("/rank", json=with_(candidates=[{"item_id": i}
                                                             for i in range(5)])).status_code == 200


def test_wrong_method_and_path_are_4xx(client):
    assert client.get("/rank").status_code == 405
    assert client.post("/score", json=OK).status_code == 404
