"""Ingestion throughput and peak memory: recpipe vs a straightforward pandas ingest vs the
parse floor (Polars streaming a plain copy of the same data to Parquet, no validation).

    .venv/bin/python benchmarks/ingest.py                 # 20M events, CSV and Parquet
    .venv/bin/python benchmarks/ingest.py --rows 1000000  # quick look

Every contender runs in its own subprocess, so its peak RSS (``ru_maxrss`` of that child) is
its own. The input is KuaiRand-shaped (the public log's 19 columns) for CSV and the canonical
contract for Parquet, spread over 17 days, with 1% exact duplicate rows and 0.2% faulty rows
(non-numeric ids, labels outside {0,1}, negative watch times) — the work real ingestion does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

KUAIRAND_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)
START_MS = 1_650_556_800_000  # 2022-04-22 00:00 UTC
DAYS = 17


def kuairand_frame(rows: int, seed: int) -> pl.DataFrame:
    """``rows`` KuaiRand-shaped rows (all columns as strings, a few faulty), 1% duplicated."""
    rng = np.random.default_rng(seed)
    unique = rows - rows // 100
    time_ms = START_MS + rng.integers(0, DAYS * 86_400_000, unique)
    click = (rng.random(unique) < 0.17).astype(np.int64)
    frame = pl.DataFrame({
        "user_id": rng.integers(0, 1_000_000, unique),
        "video_id": rng.integers(0, 5_000_000, unique),
        "date": np.full(unique, 20220422), "hourmin": rng.integers(0, 2400, unique),
        "time_ms": time_ms, "is_click": click,
        "is_like": click * (rng.random(unique) < 0.03), "is_follow": np.zeros(unique, np.int64),
        "is_comment": np.zeros(unique, np.int64), "is_forward": np.zeros(unique, np.int64),
        "is_hate": np.zeros(unique, np.int64),
        "long_view": click * (rng.random(unique) < 0.5),
        "play_time_ms": click * rng.integers(0, 60_000, unique),
        "duration_ms": rng.integers(1_000, 300_000, unique),
        "profile_stay_time": np.zeros(unique, np.int64),
        "comment_stay_time": np.zeros(unique, np.int64),
        "is_profile_enter": np.zeros(unique, np.int64), "is_rand": np.ones(unique, np.int64),
        "tab": rng.integers(0, 5, unique),
    }).with_columns(pl.all().cast(pl.String))
    faulty = rng.choice(unique, unique // 500, replace=False)
    kinds = rng.integers(0, 3, len(faulty))
    frame = frame.with_row_index("_i").with_columns(
        pl.when(pl.col("_i").is_in(faulty[kinds == 0])).then(pl.lit("u?"))
        .otherwise(pl.col("user_id")).alias("user_id"),
        pl.when(pl.col("_i").is_in(faulty[kinds == 1])).then(pl.lit("2"))
        .otherwise(pl.col("is_click")).alias("is_click"),
        pl.when(pl.col("_i").is_in(faulty[kinds == 2])).then(pl.lit("-5"))
        .otherwise(pl.col("play_time_ms")).alias("play_time_ms"),
    ).drop("_i")
    duplicates = frame.sample(rows - unique, seed=seed)
    return pl.concat([frame, duplicates]).sample(fraction=1.0, shuffle=True, seed=seed + 1)


def canonical_frame(rows: int, seed: int) -> pl.DataFrame:
    """The same events in the canonical contract (typed), for the Parquet input."""
    from features.contract import EVENT_SCHEMA

    raw = kuairand_frame(rows, seed).with_columns(
        pl.col(c).cast(pl.Int64, strict=False) for c in KUAIRAND_COLUMNS
    )
    return raw.select(
        pl.format("kr-{}-{}-{}", "user_id", "video_id", "time_ms").alias("event_id"),
        pl.from_epoch("time_ms", time_unit="ms").dt.replace_time_zone("UTC").alias("ts"),
        "user_id", pl.lit(None, pl.String).alias("request_id"),
        pl.col("video_id").alias("item_id"), pl.lit("video").alias("item_type"),
        pl.lit(None, pl.Int64).alias("author_id"), pl.lit(None, pl.Int32).alias("position"),
        (pl.col("duration_ms") / 1000).alias("duration_s"),
        pl.col("is_click").alias("click"), pl.col("is_like").alias("like"),
        pl.col("is_follow").alias("follow"), pl.col("is_comment").alias("comment"),
        pl.col("is_forward").alias("share"), pl.col("is_hate").alias("hate"),
        "long_view", pl.lit(None, pl.Int8).alias("gift"),
        (pl.col("play_time_ms") / 1000).alias("watch_time_s"),
        pl.lit(None, pl.Float64).alias("propensity"), pl.lit("kuairand-random").alias("policy"),
        pl.lit("canonical").alias("source"),
    ).with_columns(pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items())


def prepare_inputs(rows: int, root: Path) -> dict[str, Path]:
    """Write (once, cached by size) the CSV and Parquet inputs."""
    root.mkdir(parents=True, exist_ok=True)
    csv, parquet = root / f"kuairand-{rows}.csv", root / f"canonical-{rows}.parquet"
    if not csv.exists():
        kuairand_frame(rows, seed=0).write_csv(csv)
    if not parquet.exists():
        canonical_frame(rows, seed=0).write_parquet(parquet)
    return {"csv": csv, "parquet": parquet}


# ---------------------------------------------------------------- contenders (in a child)


def run_recpipe(input_path: str, out: str) -> int:
    from features.ingest import ingest

    source = "kuairand" if input_path.endswith(".csv") else "canonical"
    report = ingest(source, Path(input_path), Path(out) / "lake", Path(out) / "quarantine")
    return report.input_rows


def run_pandas(input_path: str, out: str) -> int:
    """What one writes without a framework: read, coerce, mask, dedupe, partition, write."""
    import pandas as pd

    if input_path.endswith(".csv"):
        frame = pd.read_csv(input_path, dtype=str)
        numeric = {c: pd.to_numeric(frame[c], errors="coerce") for c in KUAIRAND_COLUMNS}
        bad = pd.concat([v.isna() for v in numeric.values()], axis=1).any(axis=1)
        for label in ("is_click", "is_like", "long_view"):
            bad |= ~numeric[label].isin([0, 1])
        bad |= numeric["play_time_ms"] < 0
        clean = pd.DataFrame({c: v[~bad] for c, v in numeric.items()})
        clean["event_id"] = ("kr-" + clean["user_id"].astype("int64").astype(str) + "-"
                             + clean["video_id"].astype("int64").astype(str) + "-"
                             + clean["time_ms"].astype("int64").astype(str))
        clean["ts"] = pd.to_datetime(clean["time_ms"], unit="ms", utc=True)
    else:
        frame = pd.read_parquet(input_path)
        bad = frame["user_id"].isna() | ~frame["click"].isin([0, 1]) | (frame["watch_time_s"] < 0)
        clean = frame[~bad]
    frame[bad].to_parquet(Path(out) / "quarantine.parquet")
    clean = clean.drop_duplicates("event_id")
    clean = clean.assign(date=clean["ts"].dt.date.astype(str))
    for day, rows in clean.groupby("date"):
        target = Path(out) / f"date={day}"
        target.mkdir(parents=True, exist_ok=True)
        rows.sort_values(["ts", "event_id"]).to_parquet(target / "part-0.parquet")
    return len(frame)


def run_floor(input_path: str, out: str) -> int:
    # strings: the faulty cells would stop a typed parse, and a floor does no checking
    scan = (pl.scan_csv(input_path, infer_schema=False) if input_path.endswith(".csv")
            else pl.scan_parquet(input_path))
    scan.sink_parquet(Path(out) / "copy.parquet")
    return pl.scan_parquet(Path(out) / "copy.parquet").select(pl.len()).collect().item()


CONTENDERS = {"recpipe": run_recpipe, "pandas": run_pandas, "parse floor": run_floor}


def measure(name: str, input_path: Path) -> dict:
    """Run one contender in a fresh child; wall seconds and the child's peak RSS."""
    out = Path(tempfile.mkdtemp(prefix="recpipe-bench-ingest-"))
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import ingest as b; print(json.dumps(b.CONTENDERS[{name!r}]"
            f"({str(input_path)!r}, {str(out)!r})))")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    output = child.stdout.read().decode().strip() if child.stdout else ""
    shutil.rmtree(out, ignore_errors=True)
    if status != 0:
        raise RuntimeError(f"{name} on {input_path} failed (status {status})")
    rows = json.loads(output.splitlines()[-1])
    return {"contender": name, "input": input_path.suffix.lstrip("."), "rows": rows,
            "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_gb": usage.ru_maxrss / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "recpipe-bench")
    parser.add_argument("--formats", default="csv,parquet")
    args = parser.parse_args()
    inputs = prepare_inputs(args.rows, args.data)
    results = [measure(name, inputs[fmt]) for fmt in args.formats.split(",")
               for name in CONTENDERS]
    print(f"\n{args.rows:,} events, {os.cpu_count()} cores")
    print(f"{'input':<8} {'contender':<12} {'seconds':>8} {'rows/s':>12} {'peak RSS':>9} "
          f"{'vs floor':>9} {'vs pandas':>10}")
    for result in results:
        same = {r["contender"]: r for r in results if r["input"] == result["input"]}
        print(f"{result['input']:<8} {result['contender']:<12} {result['seconds']:8.1f} "
              f"{result['rows_per_s']:12,.0f} {result['peak_rss_gb']:7.2f} GB "
              f"{result['seconds'] / same['parse floor']['seconds']:8.2f}x "
              f"{same['pandas']['seconds'] / result['seconds']:9.2f}x")


if __name__ == "__main__":
    main()
