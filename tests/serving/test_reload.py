"""Alias moves while serving: the new version is loaded completely, then swapped in; requests
keep succeeding during the switch and finish on the version they started with; a version that
cannot load never replaces a working one; an allocator registered later is picked up."""

from __future__ import annotations

import threading
import time

import httpx
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from serving.app import create_app
from serving.reloader import ModelWatcher, load_ranker_version

NAME = "recpipe-ranker"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, store_tools):
    """A store with recpipe-ranker v1 and v2 (another seed); each test starts at v1."""
    store = store_tools.build(tmp_path_factory.mktemp("two-versions"))
    assert store_tools.add_version(store, seed=1) == 2
    return store


@pytest.fixture
def switching(two_versions):
    client = MlflowClient(two_versions.tracking_uri)
    client.set_registered_model_alias(NAME, "champion", "1")
    return two_versions, client


@pytest.fixture
def body(two_versions, example_requests):
    """A request carrying the raw inputs of test examples (several candidates)."""
    return next(b for b, _ in example_requests(two_versions.splits.test)
                if len(b["candidates"]) > 1)


def as_float32(ranked: list[dict]) -> dict[int, tuple]:
    """item → task scores as float32 (JSON carries the shortest float32 repr)."""
    return {e["item_id"]: tuple(np.float32(v) for v in e["scores"].values()) for e in ranked}


def offline_scores(tracking_uri: str, version: int, body: dict) -> dict[int, tuple]:
    from serving.schemas import RankRequest
    from serving.scorer import Scorer

    mlflow.set_tracking_uri(tracking_uri)
    result = Scorer(load_ranker_version(NAME, version)).rank(RankRequest.model_validate(body))
    return as_float32(result.ranked())


def scores_of(response: httpx.Response) -> dict[int, tuple]:
    return as_float32(response.json()["ranked"])


class Hammer:
    """Clients posting ``body`` back to back until stopped; keeps every outcome."""

    def __init__(self, url: str, body: dict, clients: int = 2) -> None:
        self.url, self.body = url, body
        self.outcomes: list[list[tuple[int, int | None, float]]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                response = client.post("/rank", json=self.body)
                version = response.json()["model"]["version"] if response.is_success else None
                self.outcomes[k].append((response.status_code, version, time.monotonic()))

    def versions(self) -> list[int | None]:
        return [v for outcomes in self.outcomes for _, v, _ in outcomes]

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_alias_switch_while_serving(switching, body, serve, wait):
    store, registry = switching
    load_started, load_done = [], []

    def slow_loader(name: str, version: int):  # a heavier model takes a while to load
        load_started.append(time.monotonic())
        ranker = load_ranker_version(name, version)
        time.sleep(1.0)
        load_done.append(time.monotonic())
        return ranker

    watcher = ModelWatcher(store.tracking_uri, poll_interval_s=0.1, ranker_loader=slow_loader)
    watcher.load()
    url = serve(create_app(watcher))
    hammer = Hammer(url, body)
    try:
        assert wait(lambda: len(hammer.versions()) >= 10, 30)
        registry.set_registered_model_alias(NAME, "champion", "2")
        assert wait(lambda: 2 in hammer.versions(), 30), "the new version was never served"
        settled = len(hammer.versions())
        assert wait(lambda: len(hammer.versions()) >= settled + 10, 30)
    finally:
        hammer.finish()

    outcomes = [o for client in hammer.outcomes for o in client]
    assert {status for status, _, _ in outcomes} == {200}, "a request failed during the switch"
    for client in hammer.outcomes:  # each client sees v1 until the swap, then v2 only
        versions = [v for _, v, _ in client]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
    during_load = [v for _, v, t in outcomes if load_started[-1] <= t <= load_done[-1]]
    assert len(during_load) >= 5 and set(during_load) == {1}  # served while v2 was loading
    with httpx.Client(base_url=url) as client:
        after = client.post("/rank", json=body)
        assert after.json()["model"]["version"] == 2
        assert scores_of(after) == offline_scores(store.tracking_uri, 2, body)
        assert scores_of(after) != offline_scores(store.tracking_uri, 1, body)
        models = client.get("/models").json()["models"]
        assert models[0]["version"] == 2 and models[0]["uri"] == f"models:/{NAME}/2"
        health = client.get("/health").json()
        assert health["swaps"] == 1 and health["last_error"] is None


def test_request_in_flight_finishes_on_the_version_it_started_with(switching, body, serve,
                                                                    wait):
    store, registry = switching
    watcher = ModelWatcher(store.tracking_uri, poll_interval_s=0.1)
    watcher.load()
    scorer = watcher.current.scorer
    entered, release = threading.Event(), threading.Event()
    original = scorer.rank

    def held_rank(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    scorer.rank = held_rank  # this request's snapshot blocks mid-scoring
    url = serve(create_app(watcher))
    in_flight: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: in_flight.append(
        httpx.post(f"{url}/rank", json=body, timeout=60)))
    thread.start()
    assert entered.wait(30)
    registry.set_registered_model_alias(NAME, "champion", "2")
    assert wait(lambda: watcher.current.ranker.version == 2, 30)
    fresh = httpx.post(f"{url}/rank", json=body, timeout=30)
    assert fresh.status_code == 200 and fresh.json()["model"]["version"] == 2
    release.set()
    thread.join(timeout=30)
    (response,) = in_flight
    assert response.status_code == 200
    assert response.json()["model"]["version"] == 1
    assert scores_of(response) == offline_scores(store.tracking_uri, 1, body)


def test_a_version_that_fails_to_load_never_replaces_the_working_one(switching, body, tmp_path):
    from fastapi.testclient import TestClient

    store, registry = switching
    broken = registry.create_model_version(NAME, source=str(tmp_path / "no-such-model"))
    watcher = ModelWatcher(store.tracking_uri)
    watcher.load()
    with TestClient(create_app(watcher, poll=False)) as client:
        registry.set_registered_model_alias(NAME, "champion", broken.version)
        assert watcher.refresh() is False
        assert client.post("/rank", json=body).json()["model"]["version"] == 1
        health = client.get("/health").json()
        assert health["ranker"]["version"] == 1 and health["last_error"]
        assert health["status"] == "degraded"
        registry.set_registered_model_alias(NAME, "champion", "2")
        assert watcher.refresh() is True
        assert client.post("/rank", json=body).json()["model"]["version"] == 2
        assert client.get("/health").json()["last_error"] is None
        registry.delete_registered_model_alias(NAME, "champion")
        assert watcher.refresh() is False  # alias gone: keep serving, say so
        assert client.post("/rank", json=body).status_code == 200
        assert "no longer exists" in client.get("/health").json()["last_error"]
    registry.delete_model_version(NAME, broken.version)


SESSION = {"activity_group": 2, "request_index": 3, "lives_inserted_in_session": 0,
           "session_watch_time_s": 240.0, "recent_click_rate": 0.2, "past_live_impressions": 4,
           "past_live_watch_per_impression": 30.0, "past_video_watch_per_impression": 12.0,
           "candidate_popularity": 0.4}
"""The rest of the allocator's state, as a client sends it in ``context.session``."""


def register_trained_allocator(store) -> tuple[int, object]:
    """Train SL-MGAC briefly on a small simulated log, log it as the nightly does, register
    it as recpipe-allocator@champion; returns the version and the trained policy."""
    from dataclasses import replace

    from models.allocators.data import validate_allocation_frame
    from models.allocators.policy import config_for, train_policy
    from models.allocators.registry import log_allocator
    from models.registry import ensure_experiment
    from simulation import SimulatorConfig, simulate

    world = replace(SimulatorConfig(), n_users=100, days=2, n_videos=500, n_lives=30,
                    n_authors=80, candidate_size=60, seed=0)
    log = validate_allocation_frame(simulate(world).allocations)
    policy = train_policy("sl_mgac", log, config_for("sl_mgac", seed=0, progress=False,
                                                     overrides={"n_steps": 20}))
    mlflow.set_tracking_uri(store.tracking_uri)
    experiment = ensure_experiment("recpipe-allocators", store.root / "mlartifacts")
    with mlflow.start_run(experiment_id=experiment):
        uri = log_allocator(policy, log.head(5))
    version = mlflow.register_model(uri, "recpipe-allocator").version
    MlflowClient(store.tracking_uri).set_registered_model_alias(
        "recpipe-allocator", "champion", version)
    return int(version), policy


def test_allocator_registered_later_is_loaded_and_decides(switching, body):
    from fastapi.testclient import TestClient

    from models.allocators.data import STATE_FIELDS

    store, registry = switching
    watcher = ModelWatcher(store.tracking_uri)
    watcher.load()
    live_candidate = {"item_id": 10, "item_type": "live", "author_id": 3}
    live = {**body, "candidates": [*body["candidates"], live_candidate],
            "context": {**body["context"], "ts": "2026-05-01T14:30:00", "session": SESSION}}
    try:
        with TestClient(create_app(watcher, poll=False)) as client:
            before = client.post("/rank", json=live).json()["allocation"]
            assert before["available"] is False
            assert "no model version behind models:/recpipe-allocator@champion" in before["reason"]

            version, policy = register_trained_allocator(store)
            assert watcher.refresh() is True  # picked up without a restart
            decided = client.post("/rank", json=live).json()["allocation"]
            state = {**SESSION, "user_id": body["user_id"], "hour": 14,
                     "candidate_item_id": 10, "candidate_author_id": 3}
            offline = float(policy({f: np.array([state[f]]) for f in STATE_FIELDS})[0])
            assert decided["probability"] == pytest.approx(offline, abs=1e-6)
            assert decided == {"available": True, "insert": offline >= 0.5,
                               "probability": decided["probability"], "item_id": 10,
                               "reason": None,
                               "model": {"name": "recpipe-allocator", "version": version}}
            no_live = client.post("/rank", json=body).json()["allocation"]
            assert no_live["available"] is True and no_live["insert"] is False
            assert no_live["reason"] == "no live candidate in the request"
            # the allocator needs its session state: without it the ranking still succeeds
            missing = client.post("/rank", json={**live, "context": body["context"]})
            assert missing.status_code == 200 and missing.json()["ranked"]
            assert missing.json()["allocation"]["available"] is False
            assert missing.json()["allocation"]["reason"].startswith(
                "the allocator needs context.session.activity_group, "
                "context.session.request_index")
            assert "candidates[].features.popularity" in missing.json()["allocation"]["reason"]
            # a value it cannot take (text) names the field; the ranking still succeeds
            text = client.post("/rank", json={**live, "context": {
                **live["context"], "session": {**SESSION, "activity_group": "high"}}})
            assert text.status_code == 200 and text.json()["ranked"]
            assert text.json()["allocation"]["reason"] == (
                "the allocator needs a finite number for context.session.activity_group, "
                "got 'high'")
            # JSON numbers of either kind, a candidate's own features, an unknown author
            loose = {**SESSION, "session_watch_time_s": 240, "activity_group": 2.0}
            del loose["candidate_popularity"]
            anonymous = {"item_id": 10, "item_type": "live", "features": {"popularity": 0.7}}
            cast = client.post("/rank", json={
                **live, "candidates": [*body["candidates"], anonymous],
                "context": {**live["context"], "session": loose}}).json()["allocation"]
            unknown = {**state, "session_watch_time_s": 240.0, "candidate_popularity": 0.7,
                       "candidate_author_id": -1}
            expected = float(policy({f: np.array([unknown[f]]) for f in STATE_FIELDS})[0])
            assert cast["available"] is True, cast["reason"]
            assert cast["probability"] == pytest.approx(expected, abs=1e-6)
            half = client.post("/rank", json={**live, "context": {
                **live["context"], "session": {**SESSION, "activity_group": 1.5}}}).json()
            assert half["allocation"]["available"] is False and half["ranked"]
            assert half["allocation"]["reason"] == (
                "the allocator needs a whole number for context.session.activity_group, got 1.5")
            allocator = client.get("/models").json()["models"][1]
            assert allocator["loaded"] is True and allocator["version"] == version
            # a new allocator version that cannot load never replaces the working one
            broken = registry.create_model_version("recpipe-allocator",
                                                   source=str(store.root / "no-such-model"))
            registry.set_registered_model_alias("recpipe-allocator", "champion", broken.version)
            assert watcher.refresh() is False
            kept = client.post("/rank", json=live).json()["allocation"]
            assert kept["available"] is True and kept["model"]["version"] == version
            health = client.get("/health").json()
            assert health["status"] == "degraded"
            assert f"still serving version {version}" in health["last_error"]
        restarted = ModelWatcher(store.tracking_uri)  # no working allocator to keep
        restarted.load()
        assert restarted.current.allocator is None
        assert "serving without an allocator" in restarted.status.last_error
        assert restarted.refresh() is False and restarted.status.last_error
    finally:
        MlflowClient(store.tracking_uri).delete_registered_model("recpipe-allocator")


def test_no_allocator_option_says_so(store):
    from fastapi.testclient import TestClient

    watcher = ModelWatcher(store.tracking_uri, allocator_name=None)
    watcher.load()
    with TestClient(create_app(watcher, poll=False)) as client:
        body = {"user_id": 1, "candidates": [{"item_id": 10, "item_type": "live"}]}
        reason = client.post("/rank", json=body).json()["allocation"]["reason"]
    assert "no allocator is configured" in reason
