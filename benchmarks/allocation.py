"""Live-stream allocation benchmark: SL-MGAC against the logging policy, a supervised greedy
policy and d3rlpy DQN / DiscreteCQL / DiscreteBCQ, judged by true on-policy value.

    .venv/bin/python benchmarks/allocation.py           # the full benchmark (README section)
    .venv/bin/python benchmarks/allocation.py --quick   # a small smoke run (README untouched)

Protocol (deterministic: fixed seeds, one torch thread):
- One training log: the simulator's logging policy on world seed 0.
- Every algorithm trained on it with training seeds 0, 1, 2 (the logging policy needs none).
- Every trained policy rolled out on the same held-out worlds (seeds 1000, 1001, ...: other
  users, other lives, other draws than the log's; ids of held-out users are scored as unseen).
  All policies meet the same worlds and, until their paths diverge, the same random draws.
- Reported: session watch time, live watch time, retention (mean true P(return)), live share
  (inserted lives / requests; the cap is `SimulatorConfig.live_share_cap`), watch time per
  user. 95% intervals by a bootstrap over held-out users, paired across policies (the same
  resampled users for every policy), so the delta to SL-MGAC has its own interval.
- Hyperparameters were chosen in development runs on other worlds (seeds 500-502), never on
  the evaluation worlds; that sweep was done by hand and is not part of this script.

Writes (full mode): the section between the allocation markers of benchmarks/README.md (other
sections are left alone), benchmarks/allocation_pareto.png, benchmarks/allocation_results.json;
both modes log an MLflow run (experiment ``recpipe-benchmarks``, workspace ``$RECPIPE_HOME``
or ./workspace) unless ``--no-mlflow``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.allocators.data import validate_allocation_frame  # noqa: E402
from models.allocators.policy import config_for, train_policy  # noqa: E402
from simulation import SimulatorConfig, simulate  # noqa: E402

ALGOS = ("logging", "greedy", "dqn", "cql", "bcq", "sl_mgac")
LABELS = {"logging": "logging policy", "greedy": "supervised greedy", "dqn": "d3rlpy DQN",
          "cql": "d3rlpy DiscreteCQL", "bcq": "d3rlpy DiscreteBCQ", "sl_mgac": "SL-MGAC"}
BEGIN = "<!-- allocation-benchmark:begin -->"
END = "<!-- allocation-benchmark:end -->"
README = ROOT / "benchmarks" / "README.md"


@dataclass(frozen=True)
class Protocol:
    """Sizes and seeds of one benchmark run."""

    log_world: SimulatorConfig
    """World and logging run of the training log."""
    eval_seeds: tuple[int, ...]
    """Held-out world seeds of the evaluation rollouts."""
    train_seeds: tuple[int, ...]
    """Training seeds per algorithm."""
    n_steps: int | None
    """Gradient steps for every learner (None: each config's default)."""
    n_bootstrap: int
    """Bootstrap resamples of the held-out users."""


def protocol(quick: bool) -> Protocol:
    world = replace(SimulatorConfig(), n_users=2000, days=7, seed=0)
    if quick:
        return Protocol(replace(world, n_users=600, days=5), (1000,), (0, 1, 2), 400, 200)
    return Protocol(world, (1000, 1001, 1002), (0, 1, 2), None, 1000)


def user_clusters(sessions: pl.DataFrame, n_users: int) -> dict[str, np.ndarray]:
    """Per-user sums (U,) of what the summary metrics are ratios of."""
    per_user = sessions.group_by("user_id").agg(
        watch=(pl.col("video_watch_time_s") + pl.col("live_watch_time_s")).sum(),
        live=pl.col("live_watch_time_s").sum(), sessions=pl.len(),
        p_return=pl.col("p_return").sum(), lives=pl.col("lives_inserted").sum(),
        requests=pl.col("n_requests").sum(),
    )
    out = {name: np.zeros(n_users) for name in per_user.columns if name != "user_id"}
    users = per_user["user_id"].to_numpy()
    for name in out:
        out[name][users] = per_user[name].to_numpy()
    return out


def metrics_from(sums: dict[str, np.ndarray], weights: np.ndarray, n_users: int) -> dict:
    """Metrics under bootstrap ``weights`` (R, C) of the clusters, each (R,)."""
    s = {k: weights @ v for k, v in sums.items()}
    return {
        "session_watch_time": s["watch"] / s["sessions"],
        "live_watch_time": s["live"] / s["sessions"],
        "retention": s["p_return"] / s["sessions"],
        "live_share": s["lives"] / s["requests"],
        "watch_time_per_user": s["watch"] / weights.sum(axis=1),
    }


def run(proto: Protocol, progress: bool) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    log = validate_allocation_frame(simulate(proto.log_world).allocations)
    cap = proto.log_world.live_share_cap
    print(f"training log: {log.height:,} requests, {log['session_id'].n_unique():,} sessions "
          f"(world seed {proto.log_world.seed})", flush=True)
    eval_worlds = [replace(proto.log_world, seed=s) for s in proto.eval_seeds]
    n_users = proto.log_world.n_users
    rollouts: dict[tuple[str, int], dict] = {}
    for algo in ALGOS:
        for seed in (proto.train_seeds if algo != "logging" else (0,)):
            t0 = time.perf_counter()
            if algo == "logging":
                policy, train_s = None, 0.0
            else:
                overrides = {"n_steps": proto.n_steps} if proto.n_steps else {}
                config = config_for(algo, seed=seed, live_share_cap=cap, overrides=overrides,
                                    progress=progress)
                policy = train_policy(algo, log, config).with_id_features(False)
                train_s = time.perf_counter() - t0
            sums = [user_clusters(simulate(world, policy).sessions, n_users)
                    for world in eval_worlds]
            clusters = {k: np.concatenate([s[k] for s in sums]) for k in sums[0]}
            point = {k: float(v[0]) for k, v in metrics_from(
                clusters, np.ones((1, clusters["watch"].shape[0])), n_users).items()}
            rollouts[(algo, seed)] = {"clusters": clusters, "point": point, "train_s": train_s}
            print(f"  {algo:8} seed {seed}: session watch {point['session_watch_time']:7.1f} s, "
                  f"live share {point['live_share']:.3f}, retention {point['retention']:.3f} "
                  f"(train {train_s:5.1f} s)", flush=True)
    results = summarise(rollouts, proto, cap)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["log_requests"] = log.height
    return results


def summarise(rollouts: dict, proto: Protocol, cap: float) -> dict:
    """Per algorithm: seed means, seed spread, bootstrap CIs (paired across policies)."""
    n_clusters = next(iter(rollouts.values()))["clusters"]["watch"].shape[0]
    rng = np.random.default_rng(12345)
    picks = rng.integers(0, n_clusters, size=(proto.n_bootstrap, n_clusters))
    weights = np.stack([np.bincount(row, minlength=n_clusters) for row in picks]).astype(float)
    boot: dict[str, dict[str, np.ndarray]] = {}
    table: dict[str, dict] = {}
    for algo in ALGOS:
        seeds = [key for key in rollouts if key[0] == algo]
        per_seed = [metrics_from(rollouts[k]["clusters"], weights, n_clusters) for k in seeds]
        boot[algo] = {m: np.mean([p[m] for p in per_seed], axis=0) for m in per_seed[0]}
        points = [rollouts[k]["point"] for k in seeds]
        row = {m: float(np.mean([p[m] for p in points])) for m in points[0]}
        row["ci"] = {m: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
                     for m, v in boot[algo].items()}
        row["seed_sd"] = {m: float(np.std([p[m] for p in points], ddof=1)) if len(points) > 1
                          else 0.0 for m in points[0]}
        row["per_seed"] = {str(k[1]): rollouts[k]["point"] for k in seeds}
        row["max_live_share"] = float(max(p["live_share"] for p in points))
        row["constraint_met"] = row["max_live_share"] <= cap
        row["train_seconds"] = float(np.mean([rollouts[k]["train_s"] for k in seeds]))
        table[algo] = row
    for algo in ALGOS:
        diff = boot["sl_mgac"]["session_watch_time"] - boot[algo]["session_watch_time"]
        table[algo]["sl_mgac_minus_this"] = {
            "mean": table["sl_mgac"]["session_watch_time"] - table[algo]["session_watch_time"],
            "ci": [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]}
    baselines = [a for a in ALGOS if a != "sl_mgac"]
    best = table["sl_mgac"]
    verdict = {
        "beats_every_baseline": all(table[a]["sl_mgac_minus_this"]["ci"][0] > 0
                                    for a in baselines),
        "beats_every_baseline_point": all(best["session_watch_time"]
                                          > table[a]["session_watch_time"] for a in baselines),
        "constraint_met": best["constraint_met"],
        "smallest_seed_spread": all(best["seed_sd"]["session_watch_time"]
                                    <= table[a]["seed_sd"]["session_watch_time"]
                                    for a in baselines if a != "logging"),
    }
    return {"protocol": {"log_world": proto.log_world.to_dict(),
                         "eval_seeds": list(proto.eval_seeds),
                         "train_seeds": list(proto.train_seeds), "n_steps": proto.n_steps,
                         "n_bootstrap": proto.n_bootstrap, "live_share_cap": cap},
            "table": table, "verdict": verdict}


def markdown_table(results: dict) -> str:
    cap = results["protocol"]["live_share_cap"]
    lines = [
        "| policy | session watch s [95% CI] | seed sd | live watch s | retention | "
        f"live share (max, cap {cap}) | watch s / user | SL-MGAC − this [95% CI] | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in ALGOS:
        r = results["table"][algo]
        lo, hi = r["ci"]["session_watch_time"]
        d = r["sl_mgac_minus_this"]
        delta = ("—" if algo == "sl_mgac"
                 else f"{d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]")
        broken = "" if r["constraint_met"] else " ✗"
        share = f"{r['live_share']:.3f} ({r['max_live_share']:.3f}{broken})"
        sd = "—" if algo == "logging" else f"{r['seed_sd']['session_watch_time']:.1f}"
        lines.append(
            f"| {LABELS[algo]} | {r['session_watch_time']:.1f} [{lo:.1f}, {hi:.1f}] | {sd} | "
            f"{r['live_watch_time']:.1f} | {r['retention']:.3f} | {share} | "
            f"{r['watch_time_per_user']:.0f} | {delta} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def pareto_plot(results: dict, path: Path) -> None:
    """Session watch time against live share: one dot per training seed, the seed mean with
    its 95% interval, the cap, and the frontier of the means (more watch, less share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = dict(zip(ALGOS, plt.get_cmap("tab10").colors, strict=False))
    means = []
    for algo in ALGOS:
        r = results["table"][algo]
        for p in r["per_seed"].values():
            ax.scatter(p["live_share"], p["session_watch_time"], color=colors[algo], alpha=0.35,
                       s=18)
        lo, hi = r["ci"]["session_watch_time"]
        x, y = r["live_share"], r["session_watch_time"]
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="o", color=colors[algo], ms=8,
                    capsize=3, label=LABELS[algo])
        means.append((x, y))
    frontier = sorted(means)
    best, line = -np.inf, []
    for x, y in frontier:
        if y > best:
            line.append((x, y))
            best = y
    ax.plot(*zip(*line, strict=True), "--", color="grey", lw=1, label="Pareto frontier")
    cap = results["protocol"]["live_share_cap"]
    ax.axvline(cap, color="red", ls=":", lw=1.5, label=f"live-share cap {cap}")
    ax.set_xlabel("live share (inserted lives / requests)")
    ax.set_ylabel("true session watch time (s)")
    ax.set_title("Allocation policies on held-out simulated users")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme_section(results: dict) -> str:
    p, v = results["protocol"], results["verdict"]
    w = p["log_world"]
    ok = "yes" if v["beats_every_baseline"] else "no"
    return "\n".join([
        BEGIN,
        "## Live-stream allocation (SL-MGAC vs offline-RL baselines)",
        "",
        f"`.venv/bin/python benchmarks/allocation.py` ({results['wall_seconds']:.0f} s on "
        f"{os.cpu_count()} cores; `--quick` for a smoke run). One training log: the "
        "simulator's logging policy, "
        f"{w['n_users']} users × {w['days']} days, world seed {w['seed']} "
        f"({results['log_requests']:,} requests). Every learner trained with seeds "
        f"{', '.join(map(str, p['train_seeds']))} on it and the same step budget; the "
        "learners share the anti-greedy reward, discount and dense state (greedy fits a "
        "request's watch time, undiscounted, without the exit penalty or the retention bonus; "
        "only SL-MGAC adds user, author and hour embeddings); every policy rolled out on "
        "held-out worlds "
        f"{', '.join(map(str, p['eval_seeds']))} (other users; {w['n_users']} users × "
        f"{w['days']} days each). True values from those rollouts; 95% intervals from "
        f"{p['n_bootstrap']} bootstrap resamples of held-out users, paired across policies. "
        "Hyperparameters were chosen in development runs on other worlds (seeds 500-502, by "
        "hand, not scripted here), never on these.",
        "",
        markdown_table(results),
        "",
        "![session watch time vs live share](allocation_pareto.png)",
        "",
        f"SL-MGAC beats every baseline on session watch time (paired CI above 0): **{ok}**; "
        f"live-share cap met on every seed: **{'yes' if v['constraint_met'] else 'no'}**; "
        "smallest seed-to-seed spread among the learners: "
        f"**{'yes' if v['smallest_seed_spread'] else 'no'}**.",
        END,
    ])


def write_readme(section: str) -> None:
    """Replace this benchmark's section between its markers, or append it; leave the rest."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)


def log_mlflow(results: dict, files: list[Path], quick: bool) -> str:
    import mlflow

    from models.registry import ensure_experiment

    home = Path(os.environ.get("RECPIPE_HOME", ROOT / "workspace")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    experiment = ensure_experiment("recpipe-benchmarks", home / "mlartifacts")
    with mlflow.start_run(experiment_id=experiment,
                          run_name="allocation-quick" if quick else "allocation") as run:
        p = results["protocol"]
        mlflow.log_params({"eval_seeds": p["eval_seeds"], "train_seeds": p["train_seeds"],
                           "n_steps": p["n_steps"], "log_users": p["log_world"]["n_users"],
                           "log_days": p["log_world"]["days"],
                           "live_share_cap": p["live_share_cap"]})
        for algo, r in results["table"].items():
            mlflow.log_metrics({
                f"{algo}_session_watch_time": r["session_watch_time"],
                f"{algo}_session_watch_time_seed_sd": r["seed_sd"]["session_watch_time"],
                f"{algo}_live_watch_time": r["live_watch_time"],
                f"{algo}_retention": r["retention"], f"{algo}_live_share": r["live_share"],
                f"{algo}_watch_time_per_user": r["watch_time_per_user"],
            })
        mlflow.log_metrics({f"verdict_{k}": float(v) for k, v in results["verdict"].items()})
        mlflow.log_text(markdown_table(results), "allocation_table.md")
        for file in files:
            mlflow.log_artifact(str(file))
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small log, 400 steps, one held-out world; README untouched")
    parser.add_argument("--out", type=Path,
                        help="folder for allocation_results.json and allocation_pareto.png "
                             "(default: benchmarks/; --quick: workspace/benchmarks/)")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--progress", action="store_true", help="progress bars per learner")
    args = parser.parse_args(argv)
    results = run(protocol(args.quick), args.progress)
    out = args.out or (ROOT / "workspace" / "benchmarks" if args.quick else ROOT / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "allocation_results.json"
    plot_path = out / "allocation_pareto.png"
    json_path.write_text(json.dumps(results, indent=2))
    pareto_plot(results, plot_path)
    print(markdown_table(results))
    print(json.dumps(results["verdict"]))
    if not args.quick and not args.no_readme:
        write_readme(readme_section(results))
        print(f"updated {README}")
    if not args.no_mlflow:
        print(f"MLflow run {log_mlflow(results, [json_path, plot_path], args.quick)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
