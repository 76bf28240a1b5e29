"""Ingestion throughput and peak memory: recpipe vs a straightforward pandas ingest vs the
parse floor (Polars streaming a plain copy of the same data to Parquet, no validation).

    .venv/bin/python benchmarks/ingest.py                 # 20M events, CSV and Parquet
    .venv/bin/python benchmarks/ingest.py --rows 1000000 --no-readme   # quick look

Every contender runs in its own subprocess: its wall time, its CPU time (user + system, all
threads) and its peak RSS (``VmHWM`` of that child) are its own. A child whose RSS passes
``--rss-cap-gb`` is killed (the machine is shared) and reported as such. The input is
KuaiRand-shaped (the public log's 19 columns) for CSV and the canonical contract for Parquet,
spread over 17 days, with 1% exact duplicate rows and 0.2% faulty rows (non-numeric ids,
labels outside {0,1}, negative watch times) — the work real ingestion does. The table goes to
``benchmarks/README.md`` between the ``ingest-benchmark`` markers.
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- ingest-benchmark:begin -->", "<!-- ingest-benchmark:end -->"
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
        # pandas' own type inference (its fast path); a column holding a faulty value is read
        # as text, and to_numeric below coerces it like the others
        frame = pd.read_csv(input_path)
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


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``), counted from its own ``exec``.

    Not ``ru_maxrss``: Linux carries the parent's peak over a fork and exec into the child's
    ``ru_maxrss``, so a child of this (input-generating) process would report at least the
    parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(name: str, input_path: Path, rss_cap: int) -> dict:
    """Run one contender in a fresh child: wall and CPU seconds, peak RSS; killed past
    ``rss_cap`` bytes of RSS."""
    out = Path(tempfile.mkdtemp(prefix="recpipe-bench-ingest-"))
    result_file = out / "result.json"
    code = (f"import sys, json; sys.path.append({str(Path(__file__).parent)!r}); "
            f"import ingest as b; rows = b.CONTENDERS[{name!r}]"
            f"({str(input_path)!r}, {str(out / 'work')!r}); "
            f"open({str(result_file)!r}, 'w').write(json.dumps([rows, b.peak_rss_bytes()]))")
    (out / "work").mkdir()
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    killed_at = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_bytes(child.pid)
        if rss > rss_cap and not killed_at:
            killed_at = rss
            child.kill()
        time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    record = {"contender": name, "input": input_path.suffix.lstrip("."), "seconds": seconds,
              "cpu_seconds": usage.ru_utime + usage.ru_stime, "killed": bool(killed_at)}
    if killed_at:
        shutil.rmtree(out, ignore_errors=True)
        return record | {"rows": None, "rows_per_s": None, "peak_rss_gb": killed_at / 1024**3}
    if child.returncode != 0 or not result_file.exists():
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"{name} on {input_path} failed (status {child.returncode})")
    rows, peak = json.loads(result_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return record | {"rows": rows, "rows_per_s": rows / seconds, "peak_rss_gb": peak / 1024**3}


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def best_of(runs: list[dict]) -> dict:
    """The fastest finished run of a contender (peak RSS: the highest of all its runs)."""
    finished = [r for r in runs if not r["killed"]]
    best = min(finished or runs, key=lambda r: r["seconds"])
    return best | {"peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "runs": len(runs)}


# --------------------------------------------------------------------------- reporting

TARGET_FLOOR, TARGET_PANDAS, TARGET_RSS_GB = 1.5, 1.5, 1.0
"""Targets: recpipe within 1.5x of the floor's time, >= 1.5x pandas' speed, <= 1 GB RSS."""


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or 'unknown CPU'."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> dict:
    cpu = cpu_model()
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    import pandas as pd

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem / 1024**2,
            "python": sys.version.split()[0], "polars": pl.__version__,
            "pandas": pd.__version__}


def table(results: list[dict]) -> list[str]:
    """One size's results as a Markdown table."""
    lines = ["| input | contender | seconds | rows/s | CPU s | peak RSS | time vs floor | "
             "speed vs pandas |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        same = {x["contender"]: x for x in results if x["input"] == r["input"]}
        floor, pandas = same.get("parse floor"), same.get("pandas")
        if r["killed"]:
            lines.append(f"| {r['input']} | {r['contender']} | killed after {r['seconds']:.0f} "
                         f"| — | {r['cpu_seconds']:.0f} | > {r['peak_rss_gb']:.1f} GB | — | — |")
            continue
        versus = ("—" if pandas is None or pandas["killed"]
                  else f"{pandas['seconds'] / r['seconds']:.2f}x")
        floor_ratio = "—" if floor is None else f"{r['seconds'] / floor['seconds']:.2f}x"
        lines.append(
            f"| {r['input']} | {r['contender']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {r['cpu_seconds']:.1f} | {r['peak_rss_gb']:.2f} GB | {floor_ratio} | {versus} |")
    return lines


def verdicts(by_size: dict[int, list[dict]]) -> list[str]:
    """Which targets recpipe meets: time and memory at the largest size; the speed-up over
    pandas at the largest size pandas finished (a pandas killed at the RSS cap is noted)."""
    largest = max(by_size)
    lines = []
    for fmt in dict.fromkeys(r["input"] for r in by_size[largest]):
        same = {r["contender"]: r for r in by_size[largest] if r["input"] == fmt}
        ours, floor = same["recpipe"], same["parse floor"]
        vs_floor = ours["seconds"] / floor["seconds"]
        cpu = ours["cpu_seconds"] / floor["cpu_seconds"]
        lines.append(
            f"- {fmt}, {largest:,} events: within {TARGET_FLOOR}x of the floor: "
            f"**{vs_floor:.2f}x, {'met' if vs_floor <= TARGET_FLOOR else 'missed'}** (in CPU "
            f"time {cpu:.2f}x); peak RSS "
            f"<= {TARGET_RSS_GB:.0f} GB: **{ours['peak_rss_gb']:.2f} GB, "
            f"{'met' if ours['peak_rss_gb'] <= TARGET_RSS_GB else 'missed'}**.")
        for rows in sorted(by_size, reverse=True):
            same = {r["contender"]: r for r in by_size[rows] if r["input"] == fmt}
            ours, pandas = same["recpipe"], same["pandas"]
            if pandas["killed"]:
                lines.append(
                    f"  - pandas at {rows:,} events: killed at {pandas['peak_rss_gb']:.1f} GB RSS "
                    f"after {pandas['seconds']:.0f} s (it holds the whole input in memory); "
                    f"recpipe finished in {ours['seconds']:.0f} s at {ours['peak_rss_gb']:.2f} "
                    "GB.")
                continue
            speed = pandas["seconds"] / ours["seconds"]
            lines.append(
                f"  - >= {TARGET_PANDAS}x pandas, at {rows:,} events: **{speed:.2f}x, "
                f"{'met' if speed >= TARGET_PANDAS else 'missed'}** (pandas "
                f"{pandas['seconds']:.1f} s, {pandas['peak_rss_gb']:.2f} GB).")
            break
    return lines


def shared_note(load: tuple[tuple[float, ...], tuple[float, ...]], cores: int) -> str:
    """Whether other work shared the machine, from the 1-minute load at both ends."""
    busiest = max(load[0][0], load[1][0])
    if busiest >= 0.5 * cores:
        return f"other work shared these {cores} cores, so wall times are noisy"
    return "the machine was otherwise quiet"


def readme_section(args: argparse.Namespace, by_size: dict[int, list[dict]], info: dict,
                   load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    tables = []
    for rows in sorted(by_size, reverse=True):
        tables += [f"**{rows:,} events**", "", *table(by_size[rows]), ""]
    return "\n".join([
        BEGIN,
        "## Ingestion: rows/s and peak RSS (`benchmarks/ingest.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/ingest.py --rows {args.rows} --repeat "
        f"{args.repeat}`. Machine: {info['cores']} cores ({info['cpu']}), "
        f"{info['memory_gb']:.0f} GB RAM, no GPU; Python {info['python']}, Polars "
        f"{info['polars']}, pandas {info['pandas']}. Load average {load[0][0]:.2f} at the "
        f"start, {load[1][0]:.2f} at the end ({shared_note(load, info['cores'])}; "
        "ratios matter more than seconds: each contender ran "
        f"{args.repeat} time(s), alternating with the others, or once when killed; the "
        "fastest run is shown, with the highest peak RSS of its runs). CPU s = user + system "
        "time of the child, all threads; peak RSS = its `VmHWM`.",
        "",
        "Input: events over 17 days, 1% exact duplicates, 0.2% faulty rows; CSV = "
        "KuaiRand-shaped (19 text columns, `--source kuairand`), Parquet = the canonical "
        "contract, typed (`--source canonical`). recpipe = `features.ingest.ingest` into an "
        "empty lake (validation with reasons, quarantine, deduplication within each date, "
        "sorted zstd date partitions, atomic publish); pandas = read, coerce, mask, dedupe, "
        "group by date, write (`run_pandas`); parse floor = Polars streaming the same file "
        "to one Parquet file, no validation. A child whose RSS passes "
        f"{args.rss_cap_gb:g} GB is killed (shared machine).",
        "",
        *tables,
        "Targets (recpipe):",
        "",
        *verdicts(by_size),
        "",
        "Where recpipe's time goes (20M CSV, profiled by hand on 2026-12-06, not by this "
        "script: stage 22.6 s / 38.8 CPU s, merges 17.8 s / 32.3 CPU s, floor 21.7 s / "
        "39.8 CPU s): the streaming pass "
        "(parse, screen, stage) costs about what the floor does, since the typed parse and "
        "the contract's rules cost about what the floor spends writing text; the per-date "
        "merges are the extra (reading the staged rows back, sorting by (ts, event_id), "
        "deduplicating, and the zstd write, about half of it), done one date at a time so "
        "that memory stays bounded. The floor does no typed parsing, checking, sorting or "
        "second write. Parquet input is further off than CSV because its floor is cheaper "
        "still (no text to parse) while recpipe's work after parsing is the same. At 2M, "
        "about 0.7 s of recpipe's time is importing dataframely (and SQLAlchemy with it; "
        "measured by hand).",
        END,
    ])


def write_readme(section: str) -> None:
    """Replace this benchmark's section between its markers, or append it; leave the rest."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


def run_size(rows: int, args: argparse.Namespace) -> list[dict]:
    """Every contender on both inputs of one size, ``--repeat`` rounds; the best of each."""
    # inputs are made in a child, so that this process stays small while the contenders run
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.append("
                    f"{str(Path(__file__).parent)!r}); import ingest as b; from pathlib "
                    f"import Path; b.prepare_inputs({rows}, Path({str(args.data)!r}))"],
                   check=True, cwd=ROOT)
    inputs = {"csv": args.data / f"kuairand-{rows}.csv",
              "parquet": args.data / f"canonical-{rows}.parquet"}
    names = args.contenders.split(",")
    results = []
    for fmt in args.formats.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                if any(r["killed"] for r in runs[name]):
                    continue   # it would be killed again
                run = measure(name, inputs[fmt], int(args.rss_cap_gb * 1024**3))
                runs[name].append(run)
                state = "killed" if run["killed"] else f"{run['rows_per_s']:,.0f} rows/s"
                print(f"{rows:>10,} {fmt:8} {name:12} {run['seconds']:7.1f} s "
                      f"{run['cpu_seconds']:7.1f} CPU s {run['peak_rss_gb']:5.2f} GB  {state}",
                      flush=True)
        results += [best_of(runs[name]) for name in names]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="20000000,2000000",
                        help="comma-separated input sizes (the largest is the target's)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "recpipe-bench")
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--repeat", type=int, default=2, help="runs per contender (best kept)")
    parser.add_argument("--rss-cap-gb", type=float, default=8.0,
                        help="kill a contender whose RSS passes this (shared machine)")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    args = parser.parse_args()
    load_start = os.getloadavg()
    by_size = {rows: run_size(rows, args) for rows in map(int, args.rows.split(","))}
    load_end = os.getloadavg()
    for rows, results in by_size.items():
        print(f"\n{rows:,} events")
        print("\n".join(table(results)))
    if set(args.contenders.split(",")) == set(CONTENDERS):
        print("\n".join(verdicts(by_size)))
        if not args.no_readme:
            write_readme(readme_section(args, by_size, machine(), (load_start, load_end)))
            print(f"wrote {README}")


if __name__ == "__main__":
    main()
