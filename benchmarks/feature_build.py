"""Feature building wall time and peak memory: the whole lake at once (K = 1, what
``build_examples`` always did) vs user buckets (the default K, chosen from the row count).

    .venv/bin/python benchmarks/feature_build.py                          # 5M events
    .venv/bin/python benchmarks/feature_build.py --rows 20000000          # 20M events
    .venv/bin/python benchmarks/feature_build.py --rows 1000000 --buckets 1,4   # quick look

The lake is the KuaiRand-shaped canonical input of ``benchmarks/ingest.py`` (1M users, 5M
videos, 17 days, 1% duplicates and 0.2% faulty rows that ingestion drops), written by
``features.ingest.ingest``. Every build runs in its own subprocess, so its peak RSS
(``VmHWM`` of that child, see ``benchmarks/ingest.py``) is its own. Afterwards the
``{train,valid,test}.parquet`` of every build are checked equal, column by column.
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

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # for benchmarks/ingest.py

SPLITS = ("train", "valid", "test")


def prepare_lake(rows: int, root: Path) -> Path:
    """Ingest (once, cached by size) ``rows`` canonical events into ``root/lake-<rows>``."""
    from ingest import canonical_frame

    from features.ingest import ingest

    lake = root / f"lake-{rows}"
    if not (lake / "events").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        source = root / f"canonical-{rows}.parquet"
        if not source.exists():
            canonical_frame(rows, seed=0).write_parquet(source)
        ingest("canonical", source, lake, root / f"quarantine-{rows}")
    return lake


def run_build(lake: str, out: str, buckets: str) -> None:
    """In the child: one ``build_examples`` with K = ``buckets`` ('default': from the row
    count); prints [rows per split, peak RSS bytes] as JSON."""
    from ingest import peak_rss_bytes

    from features.build import FeatureConfig, build_examples

    k = None if buckets == "default" else int(buckets)
    report = build_examples(Path(lake), Path(out), FeatureConfig(user_buckets=k))
    print(json.dumps([report.rows, peak_rss_bytes()]))


def measure(lake: Path, out: Path, buckets: str) -> dict:
    """Run one build in a fresh child; wall seconds, the child's peak RSS and K."""
    command = [sys.executable, __file__, "--child", str(lake), str(out), buckets]
    start = time.perf_counter()
    child = subprocess.run(command, stdout=subprocess.PIPE, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"build with K={buckets} failed (status {child.returncode})")
    rows, peak = json.loads(child.stdout.decode().strip().splitlines()[-1])
    return {"buckets": buckets, "rows": sum(rows.values()), "seconds": seconds,
            "peak_rss_gb": peak / 1024**3}


def same_examples(first: Path, second: Path) -> bool:
    """Whether two examples dirs hold equal split files (compared a column at a time)."""
    for split in SPLITS:
        a, b = first / f"{split}.parquet", second / f"{split}.parquet"
        columns = pl.read_parquet_schema(a)
        if columns != pl.read_parquet_schema(b):
            return False
        for column in columns:
            if not pl.read_parquet(a, columns=[column]).equals(
                    pl.read_parquet(b, columns=[column])):
                return False
    return (first / "vocab.json").read_bytes() == (second / "vocab.json").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--data", type=Path,
                        default=Path(tempfile.gettempdir()) / "recpipe-bench-features")
    parser.add_argument("--buckets", default="1,default",
                        help="comma-separated K values; 'default' picks K from the row count")
    parser.add_argument("--child", nargs=3, metavar=("LAKE", "OUT", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_build(*args.child)
        return
    lake = prepare_lake(args.rows, args.data)
    from ingest import cpu_model

    from features.build import FeatureConfig, plan_build, profile_lake

    events = int(profile_lake(lake).get_column("rows").sum())
    default_k = plan_build(profile_lake(lake), FeatureConfig()).buckets
    load_start = os.getloadavg()[0]
    results, outs = [], []
    for value in args.buckets.split(","):
        out = Path(tempfile.mkdtemp(prefix="recpipe-bench-features-", dir=args.data))
        result = measure(lake, out / "examples", value)
        result["k"] = default_k if value == "default" else int(value)
        result["label"] = "bucketed (default K)" if value == "default" else f"K = {value}"
        results.append(result)
        outs.append(out)
    load_end = os.getloadavg()[0]
    same = all(same_examples(outs[0] / "examples", o / "examples") for o in outs[1:])
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{events:,} events in the lake; {os.cpu_count()} cores ({cpu_model()}), "
          f"Polars {pl.__version__}; load average {load_start:.2f} at the start, "
          f"{load_end:.2f} at the end; examples identical across builds: "
          f"{same if len(outs) > 1 else 'n/a (one build)'}")
    print(f"| {'build':<22} | {'K':>3} | {'seconds':>8} | {'peak RSS':>9} |")
    print(f"|{'-' * 24}|{'-' * 5}|{'-' * 10}|{'-' * 11}|")
    for r in results:
        print(f"| {r['label']:<22} | {r['k']:>3} | {r['seconds']:8.1f} | "
              f"{r['peak_rss_gb']:6.2f} GB |")


if __name__ == "__main__":
    main()
