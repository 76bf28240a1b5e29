"""``score --input PATH --output PATH``: the same rows back with per-task scores, equal to the
offline scores; CSV and Parquet; clear exit-2 errors; the output is written atomically."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import polars as pl
import pytest

from features.schema import RAW_INPUT_COLUMNS
from models.registry import load_ranker
from serving.__main__ import main

TASKS = ["click", "like", "follow", "long_view", "watch_time"]
SCORE_COLUMNS = [f"score_{t}" for t in TASKS] + ["score"]


def run(capsys, store, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["score", "--tracking-uri", store.tracking_uri, *argv, "--json"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1]) if code == 0 else None
    return code, summary, captured.err


def offline(store, frame: pl.DataFrame) -> np.ndarray:
    mlflow.set_tracking_uri(store.tracking_uri)
    return load_ranker("models:/recpipe-ranker@champion").score_encoded(frame)


@pytest.mark.parametrize("chunk_rows", ["65536", "7"])  # one chunk; many, the last short
def test_scores_a_parquet_file_of_examples_like_offline(store, tmp_path, capsys, chunk_rows):
    test = store.splits.test
    source, target = tmp_path / "rows.parquet", tmp_path / "out" / "scored.parquet"
    test.write_parquet(source)
    code, summary, err = run(capsys, store, "--input", str(source), "--output", str(target),
                             "--chunk-rows", chunk_rows)
    assert code == 0, err
    assert summary["rows"] == test.height and summary["model_version"] == 1
    assert summary["columns_added"] == SCORE_COLUMNS
    assert summary["unknown_ids"]["item_id"] == int((test["item_id_idx"] == 1).sum())
    scored = pl.read_parquet(target)
    assert scored.columns == test.columns + SCORE_COLUMNS
    assert scored.select(test.columns).equals(test)  # the same rows, untouched
    expected = offline(store, test)
    np.testing.assert_allclose(scored.select(SCORE_COLUMNS[:-1]).to_numpy(), expected,
                               rtol=1e-5, atol=1e-7)  # batch size may change float rounding
    weights = np.array([1, 1, 1, 1, 0], np.float64)
    np.testing.assert_allclose(scored["score"].to_numpy(), expected.astype(np.float64) @ weights)
    assert [p.name for p in target.parent.iterdir()] == ["scored.parquet"]  # no temp left


def test_scores_a_csv_of_raw_rows_with_json_histories(store, tmp_path, capsys):
    test = store.splits.test.head(40)
    source, target = tmp_path / "rows.csv", tmp_path / "scored.csv"
    test.select(RAW_INPUT_COLUMNS).with_columns(
        pl.format("[{}]", pl.col(c).cast(pl.List(pl.String)).list.join(", ")).alias(c)
        for c in ("hist_item_id", "hist_behavior")
    ).write_csv(source)
    code, summary, err = run(capsys, store, "--input", str(source), "--output", str(target),
                             "--task-weights", "click=1,watch_time=0.1")
    assert code == 0, err
    assert summary["task_weights"]["like"] == 0.0
    scored = pl.read_csv(target)
    assert scored.height == 40
    assert scored["hist_item_id"].to_list() == pl.read_csv(source)["hist_item_id"].to_list()
    got = scored.select(SCORE_COLUMNS[:-1]).to_numpy().astype(np.float32)
    np.testing.assert_allclose(got, offline(store, test), rtol=2e-6)


def test_minimal_file_scores_like_the_minimal_request(store, client, tmp_path, capsys):
    """Only user_id, item_id, ts: the other inputs default exactly as in a /rank request."""
    source, target = tmp_path / "minimal.parquet", tmp_path / "scored.parquet"
    pl.DataFrame({"user_id": [7, 7], "item_id": [12, 40],
                  "ts": ["2026-01-03T09:00:00Z", "2026-01-03T09:00:00Z"]}).write_parquet(source)
    assert run(capsys, store, "--input", str(source), "--output", str(target))[0] == 0
    from_file = pl.read_parquet(target).select(SCORE_COLUMNS[:-1]).to_numpy()
    response = client.post("/rank", json={
        "user_id": 7, "candidates": [{"item_id": 12}, {"item_id": 40}],
        "context": {"ts": "2026-01-03T09:00:00Z"}}).json()
    by_item = {e["item_id"]: list(e["scores"].values()) for e in response["ranked"]}
    np.testing.assert_array_equal(np.array([by_item[12], by_item[40]], np.float32), from_file)


def test_a_null_history_cell_is_an_empty_history(store, tmp_path, capsys):
    base = {"user_id": [7, 7], "item_id": [12, 40],
            "ts": ["2026-01-03T09:00:00Z", "2026-01-03T09:00:00Z"]}
    history = pl.List(pl.Int64)
    nulls = pl.DataFrame({**base, "hist_item_id": [None, [12]], "hist_behavior": [None, [2]]},
                         schema_overrides={"hist_item_id": history, "hist_behavior": history})
    empty = nulls.with_columns(pl.Series("hist_item_id", [[], [12]], history),
                               pl.Series("hist_behavior", [[], [2]], history))
    scores = []
    for name, rows in (("nulls", nulls), ("empty", empty)):
        rows.write_parquet(tmp_path / f"{name}.parquet")
        code, _, err = run(capsys, store, "--input", str(tmp_path / f"{name}.parquet"),
                           "--output", str(tmp_path / f"{name}-scored.parquet"))
        assert code == 0, err
        scores.append(pl.read_parquet(tmp_path / f"{name}-scored.parquet")
                      .select(SCORE_COLUMNS).to_numpy())
    np.testing.assert_array_equal(*scores)


def frame(**columns) -> pl.DataFrame:
    base = {"user_id": [1, 2], "item_id": [3, 4],
            "ts": ["2026-01-03T09:00:00Z", "2026-01-03T10:00:00Z"]}
    return pl.DataFrame({**base, **columns})


@pytest.mark.parametrize(("rows", "fragment"), [
    (pl.DataFrame({"user_id": [1], "item_id": [2]}), "missing column(s) ['ts']"),
    (frame(item_id=[3, None]), "1 row(s) with null item_id; first at row 2"),
    (frame(user_id=["1", "b"]), "1 row(s) with user_id not Int64; first at row 2: user_id='b'"),
    (frame(ts=["2026-01-03T09:00:00Z", "later"]),
     "1 row(s) with ts not an ISO 8601 datetime; first at row 2: ts='later'"),
    (frame(author_id=[[1], [2]]), "column author_id is List(Int64), it must be Int64"),
    (frame(item_type=["video", "story"]), "item_type not one of ['video', 'live']"),
    (frame(duration_s=[1.0, float("nan")]), "duration_s is NaN"),
    (frame(hist_item_id=[[1, 2], []], hist_behavior=[[1], []]), "lengths differ"),
    (frame(hist_item_id=[[1], [2]], hist_behavior=[[9], [1]]), "hist_behavior code outside"),
    (frame(score_click=[0.1, 0.2]), "already has column(s) ['score_click']"),
])
def test_bad_rows_exit_2_naming_the_problem(store, tmp_path, capsys, rows, fragment):
    source, target = tmp_path / "bad.parquet", tmp_path / "scored.parquet"
    rows.write_parquet(source)
    target.write_text("previous output")
    code, _, err = run(capsys, store, "--input", str(source), "--output", str(target))
    assert code == 2
    assert fragment in err and str(source) in err
    assert target.read_text() == "previous output"  # a failed run leaves the old output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "scored.parquet"]


def test_missing_file_bad_suffix_and_missing_model_exit_2(store, tmp_path, capsys):
    rows = tmp_path / "rows.parquet"
    frame().write_parquet(rows)
    code, _, err = run(capsys, store, "--input", str(tmp_path / "nope.parquet"),
                       "--output", str(tmp_path / "o.parquet"))
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, store, "--input", str(rows), "--output", str(tmp_path / "o.txt"))
    assert code == 2 and "use .parquet or .csv" in err
    code, _, err = run(capsys, store, "--input", str(rows), "--output", str(tmp_path / "o.csv"),
                       "--model-uri", "models:/recpipe-ranker@nightly")
    assert code == 2 and "no model version behind models:/recpipe-ranker@nightly" in err
    code, _, err = run(capsys, store, "--input", str(rows), "--output", str(tmp_path / "o.csv"),
                       "--task-weights", "clicks=1")
    assert code == 2 and "unknown task(s) ['clicks']" in err
