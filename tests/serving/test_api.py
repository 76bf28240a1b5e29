"""The HTTP contract of the scoring service, against a real ranker registered in a temporary
MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

TASKS = ["click", "like", "follow", "long_view", "watch_time"]
MINIMAL = {"user_id": 7, "candidates": [{"item_id": 12}, {"item_id": 40}]}


def known_ids(store, feature: str, n: int) -> list[int]:
    return list(store.splits.vocab.ids[feature][:n])


def test_minimal_request_ranks_with_per_task_and_blended_scores(client):
    response = client.post("/rank", json=MINIMAL)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "recpipe-ranker", "alias": "champion", "version": 1}
    ranked = body["ranked"]
    assert sorted(entry["item_id"] for entry in ranked) == [12, 40]
    assert [entry["score"] for entry in ranked] == sorted(
        (entry["score"] for entry in ranked), reverse=True)
    weights = body["task_weights"]
    assert weights == {"click": 1.0, "like": 1.0, "follow": 1.0, "long_view": 1.0,
                       "watch_time": 0.0}
    for entry in ranked:
        assert set(entry) == {"item_id", "score", "scores"}
        assert list(entry["scores"]) == TASKS
        assert all(0.0 < entry["scores"][t] < 1.0 for t in TASKS[:4])
        assert entry["scores"]["watch_time"] >= 0.0
        blended = sum(weights[t] * entry["scores"][t] for t in TASKS)
        assert entry["score"] == pytest.approx(blended, rel=1e-6)


def test_response_reports_fallbacks_and_allocation_unavailable(client):
    body = client.post("/rank", json=MINIMAL).json()
    assert set(body["unknown_ids"]) == {"user_id", "item_id", "author_id", "item_type",
                                        "hour", "history"}
    assert body["unknown_ids"]["author_id"] == 2  # not given → the unknown author index
    allocation = body["allocation"]
    assert allocation["available"] is False and allocation["insert"] is None
    assert "recpipe-allocator@champion" in allocation["reason"]


def test_unknown_ids_fall_back_to_the_reserved_index_not_an_error(client, store):
    known = known_ids(store, "item_id", 1)[0]
    response = client.post("/rank", json={
        "user_id": 10**15, "candidates": [{"item_id": -5, "author_id": 10**12},
                                          {"item_id": known}],
        "history": [{"item_id": 987654321, "behavior": "click"}],
    })
    assert response.status_code == 200, response.text
    unknown = response.json()["unknown_ids"]
    assert unknown["user_id"] == 1 and unknown["item_id"] == 1 and unknown["history"] == 1
    # two unknown items with the same side features score the same: same reserved embedding
    twins = client.post("/rank", json={"user_id": 1, "candidates": [
        {"item_id": 10**9, "author_id": 1}, {"item_id": 10**9 + 1, "author_id": 1}],
        "context": {"hour": 5}}).json()["ranked"]
    assert twins[0]["scores"] == twins[1]["scores"]


def test_task_weights_per_request_replace_the_service_weights(client):
    request = {**MINIMAL, "task_weights": {"watch_time": 1.0}}
    body = client.post("/rank", json=request).json()
    assert body["task_weights"] == {"click": 0.0, "like": 0.0, "follow": 0.0, "long_view": 0.0,
                                    "watch_time": 1.0}
    for entry in body["ranked"]:
        assert entry["score"] == pytest.approx(entry["scores"]["watch_time"], rel=1e-6)


def test_service_task_weights_are_configurable(store):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.reloader import ModelWatcher

    watcher = ModelWatcher(store.tracking_uri, task_weights={"click": 2.0, "watch_time": 0.5})
    watcher.load()
    with TestClient(create_app(watcher, poll=False)) as client:
        body = client.post("/rank", json=MINIMAL).json()
    assert body["task_weights"]["click"] == 2.0 and body["task_weights"]["like"] == 0.0
    entry = body["ranked"][0]
    expected = 2.0 * entry["scores"]["click"] + 0.5 * entry["scores"]["watch_time"]
    assert entry["score"] == pytest.approx(expected, rel=1e-6)


def test_ranked_is_best_first_over_many_candidates_and_top_k_cuts_it(client, store):
    items = known_ids(store, "item_id", 60)
    request = {"user_id": known_ids(store, "user_id", 1)[0],
               "candidates": [{"item_id": i, "author_id": i // 3} for i in items]}
    full = client.post("/rank", json=request).json()["ranked"]
    scores = [entry["score"] for entry in full]
    assert len(full) == 60 and scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1
    top = client.post("/rank", json={**request, "top_k": 5}).json()["ranked"]
    assert top == full[:5]


def test_history_and_context_are_model_inputs(client, store):
    items = known_ids(store, "item_id", 10)
    base = {"user_id": known_ids(store, "user_id", 1)[0],
            "candidates": [{"item_id": items[0]}], "context": {"ts": "2026-01-03T08:30:00Z"}}

    def scores(request):
        return client.post("/rank", json=request).json()["ranked"][0]["scores"]

    with_history = {**base, "history": [{"item_id": i, "behavior": "long_view"}
                                        for i in items[1:]]}
    assert scores(with_history) != scores(base)
    assert scores({**base, "context": {"ts": "2026-01-03T20:30:00Z"}}) != scores(base)
    # only the UTC hour is read: hour alone, or the same instant with an offset, agree
    assert scores({**base, "context": {"hour": 8}}) == scores(base)
    assert scores({**base, "context": {"ts": "2026-01-03T10:30:00+02:00"}}) == scores(base)


def test_request_id_is_echoed(client):
    body = client.post("/rank", json={**MINIMAL, "request_id": "abc-1"}).json()
    assert body["request_id"] == "abc-1"


def test_health_and_models_describe_what_is_loaded(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["ranker"] == {"name": "recpipe-ranker", "version": 1}
    models = client.get("/models").json()["models"]
    ranker = next(m for m in models if m["role"] == "ranker")
    assert ranker["name"] == "recpipe-ranker" and ranker["version"] == 1
    assert ranker["alias"] == "champion"
    assert set(ranker["aliases"]) == {"champion", "challenger"}
    assert ranker["uri"] == "models:/recpipe-ranker/1"
    assert ranker["tasks"] == TASKS and ranker["history_length"] == 8
    allocator = next(m for m in models if m["role"] == "allocator")
    assert allocator["loaded"] is False and allocator["name"] == "recpipe-allocator"


def test_scorer_is_usable_without_http(watcher):
    from serving.schemas import RankRequest

    scorer = watcher.current.scorer
    result = scorer.rank(RankRequest.model_validate(MINIMAL))
    ranked = result.ranked()
    assert [entry["item_id"] for entry in ranked] == result.item_ids[result.order].tolist()
    assert np.all(np.diff([entry["score"] for entry in ranked]) <= 0)
