"""Serving fixtures: a real ranker registered in a temporary MLflow store, apps on it, and real
uvicorn servers on 127.0.0.1 that the tests stop themselves."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from features.schema import BEHAVIOR_CODES
from serving.demo import DemoSplits


@contextmanager
def mlflow_uri_restored() -> Iterator[None]:
    """Undo ``mlflow.set_tracking_uri`` (global, and mirrored into the environment)."""
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        utils._tracking_uri = saved_global
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    with mlflow_uri_restored():
        yield


@dataclass
class Store:
    """A temporary MLflow store with ``recpipe-ranker`` v1 as champion."""

    root: Path
    tracking_uri: str
    splits: DemoSplits
    ranker: object  # models.registry.LoadedRanker (the trained v1, in memory)


def build_store(root: Path, seed: int = 0) -> Store:
    from serving.demo import build_demo_registry

    with mlflow_uri_restored():
        built = build_demo_registry(root, seed=seed)
    assert built["registered"]["version"] == 1
    return Store(root, built["tracking_uri"], built["splits"], built["ranker"])


def add_version(store: Store, seed: int) -> int:
    """Train another ranker on the store's data and register it (challenger only)."""
    from serving.demo import register_demo_ranker, train_demo_ranker

    with mlflow_uri_restored():
        ranker = train_demo_ranker(store.splits, seed=seed)
        return register_demo_ranker(store.tracking_uri, store.root / "mlartifacts", ranker,
                                    store.splits.test)["version"]


@pytest.fixture(scope="session")
def store_tools() -> SimpleNamespace:
    """For module-scoped stores: ``build(root, seed)``, ``add_version(store, seed)``."""
    return SimpleNamespace(build=build_store, add_version=add_version)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    """Read-only for tests: never move its aliases (use ``fresh_store``)."""
    return build_store(tmp_path_factory.mktemp("serving-store"))


@pytest.fixture
def watcher(store):
    from serving.reloader import ModelWatcher

    watcher = ModelWatcher(store.tracking_uri, poll_interval_s=0.1)
    watcher.load()
    return watcher


@pytest.fixture
def client(watcher):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(watcher, poll=False)) as client:
        yield client


@contextmanager
def running_server(app) -> Iterator[str]:
    """A real uvicorn server for ``app`` on 127.0.0.1 (a free port) in a thread; yields its
    base URL and stops it on exit."""
    import uvicorn

    from serving.cli import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 30), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def serve():
    """``serve(app)`` → base URL of a real server (stopped at teardown)."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(running_server(app))


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s``; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


@pytest.fixture
def wait():
    return wait_for


@pytest.fixture
def make_store(tmp_path):
    """``make_store(seed)`` → a fresh Store whose aliases a test may move."""
    return lambda seed=0: build_store(tmp_path / f"store-{seed}", seed)


BEHAVIOR_NAMES = {code: name for name, code in BEHAVIOR_CODES.items()}


def requests_from_examples(examples: pl.DataFrame) -> list[tuple[dict, list[int]]]:
    """``/rank`` bodies carrying exactly the raw inputs of example rows: one request per
    (user, ts) with that user's history at that time, the rows' candidates with their item
    type, author, duration and position. Returns (body, example row index per candidate);
    an item repeated within a group goes to a later request (candidates must be distinct)."""
    frame = examples.with_row_index("_row").with_columns(
        pl.col("item_id").cum_count().over("user_id", "ts", "item_id").alias("_repeat")
    )
    out = []
    for _, group in frame.group_by("user_id", "ts", "_repeat", maintain_order=True):
        first = group.row(0, named=True)
        for row in group.iter_rows(named=True):  # one instant, one history
            assert row["hist_item_id"] == first["hist_item_id"]
            assert row["hist_behavior"] == first["hist_behavior"]
        body = {
            "user_id": first["user_id"],
            "candidates": [
                {"item_id": r["item_id"], "item_type": r["item_type"],
                 "author_id": r["author_id"], "duration_s": r["duration_s"],
                 "position": r["position"]}
                for r in group.iter_rows(named=True)
            ],
            "history": [{"item_id": item, "behavior": BEHAVIOR_NAMES[code]}
                        for item, code in zip(first["hist_item_id"], first["hist_behavior"],
                                              strict=True)],
            "context": {"ts": first["ts"].isoformat()},
        }
        out.append((body, group.get_column("_row").to_list()))
    return out


@pytest.fixture
def example_requests():
    return requests_from_examples
