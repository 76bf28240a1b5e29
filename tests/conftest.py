"""Shared fixtures: tiny contract-conformant event logs and their encoded examples."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.contract import EVENT_SCHEMA
from features.schema import DEFAULT_TASKS, SPARSE_FEATURES, ExampleSchema

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def make_events(n_users: int = 40, n_items: int = 60, per_user: int = 30, days: int = 4,
                seed: int = 0) -> pl.DataFrame:
    """A small log in the canonical contract with learnable signal: users prefer items whose
    id parity matches theirs; two impressions of a request share a timestamp."""
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    user = np.repeat(np.arange(n_users), per_user)
    item = rng.integers(0, n_items, n)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seconds = np.sort(rng.integers(0, days * 86400, (n_users, per_user)), axis=1).ravel()
    seconds[1::2] = seconds[0::2]  # pairs of impressions share a request timestamp
    affinity = np.where((user % 2) == (item % 2), 1.5, -1.5)
    click = (rng.random(n) < 1 / (1 + np.exp(-affinity))).astype(np.int8)
    watch = np.where(click == 1, rng.exponential(20.0, n), 0.0)
    frame = pl.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "ts": [start + timedelta(seconds=int(s)) for s in seconds],
        "user_id": user, "request_id": [f"r{u}-{s}" for u, s in zip(user, seconds, strict=False)],
        "item_id": item, "item_type": np.where(item % 10 == 0, "live", "video"),
        "author_id": item // 3, "position": np.arange(n) % 2, "duration_s": 10.0 + item,
        "click": click, "like": (click & (rng.random(n) < 0.3)).astype(np.int8),
        "follow": (click & (rng.random(n) < 0.1)).astype(np.int8),
        "comment": np.zeros(n, np.int8), "share": np.zeros(n, np.int8),
        "hate": np.zeros(n, np.int8), "long_view": (watch > 20).astype(np.int8),
        "gift": [None] * n, "watch_time_s": watch, "propensity": np.full(n, 0.5),
        "policy": ["test"] * n, "source": ["canonical"] * n,
    })
    return frame.with_columns(pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()).select(
        list(EVENT_SCHEMA)
    )


@pytest.fixture
def optimiser_spy(monkeypatch) -> list[tuple[str, list]]:
    """Every torch Adam / Adagrad built during the test, in order: (class name, the
    parameters it updates)."""
    import torch

    built: list[tuple[str, list]] = []
    for cls in (torch.optim.Adam, torch.optim.Adagrad):
        def init(self, params, *args, _original=cls.__init__, _name=cls.__name__, **kwargs):
            params = list(params)
            built.append((_name, [p for group in params
                                  for p in (group["params"] if isinstance(group, dict)
                                            else [group])]))
            _original(self, params, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", init)
    return built


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: the tensors are tiny, and on a loaded machine two
    OpenMP threads spin-waiting on each other make many-small-op models (HoME, PLE) orders of
    magnitude slower. Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_events() -> pl.DataFrame:
    return make_events()


def encode_for_tests(events: pl.DataFrame, history_length: int = 8):
    """(examples frame, ExampleSchema, Vocabulary) built by the production feature code."""
    from features.build import attach_histories, task_targets
    from features.encode import encode_examples
    from features.vocab import Vocabulary

    frame = attach_histories(events, history_length)
    vocab = Vocabulary.fit(frame.with_columns(pl.col("ts").dt.hour().alias("hour")),
                           SPARSE_FEATURES)
    schema = ExampleSchema(history_length=history_length,
                           vocab_sizes={f: vocab.size(f) for f in SPARSE_FEATURES})
    examples = encode_examples(frame, vocab, schema).with_columns(task_targets(DEFAULT_TASKS))
    return examples, schema, vocab


@pytest.fixture
def tiny_examples(tiny_events):
    return encode_for_tests(tiny_events)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_json(capsys, *argv: str) -> dict:
    """Run ``recpipe *argv --json`` in-process; it must exit 0. Its JSON summary, read as
    strictly as other languages' parsers read it (NaN or Infinity fail)."""
    from flows.cli import main

    def not_json(constant: str) -> None:
        raise AssertionError(f"--json printed {constant}, which is not JSON")

    assert main([*argv, *(() if "--json" in argv else ("--json",))]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=not_json)


def assert_reproduces_test_metrics(ranker, examples: Path, expected: dict) -> None:
    """``ranker`` (a loaded ``LoadedRanker``) gives on ``examples/test.parquet`` the test
    metrics ``expected`` (a training summary's ``metrics["test"]``) to float precision."""
    from evaluation.metrics import task_metrics
    from features.build import load_schema
    from models.batch import ExampleArrays

    rows = pl.read_parquet(examples / "test.parquet")
    arrays = ExampleArrays.from_frame(rows, load_schema(examples))
    again = task_metrics(ranker.score_encoded(rows), arrays.labels, arrays.user_ids,
                         ranker.schema.tasks)
    for task, values in expected.items():
        for name, value in values.items():
            assert again[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), \
                (task, name)


def simulated_workspace(root: Path, users: int = 80, days: int = 4, seed: int = 5):
    """A workspace whose lake and examples hold a simulated world (simulate → ingest →
    features), its simulator output in ``raw/simulator-seed<seed>``; 80 users over 4 days
    give ~5k training rows with learnable signal."""
    from flows.steps import SimulateParams, features_step, ingest_step, simulate_step
    from flows.workspace import Workspace

    workspace = Workspace(root / "ws").create()
    raw = workspace.raw / f"simulator-seed{seed}"
    simulate_step(raw, SimulateParams(users=users, days=days, seed=seed))
    ingest_step("simulator", raw, workspace)
    features_step(workspace)
    return workspace
