"""Off-policy estimators against the simulator's ground truth.

    python benchmarks/ope.py            # full run (~30 min on 2 cores), prints the tables
    python benchmarks/ope.py --quick    # a smoke-sized run (~1 min)
    python benchmarks/ope.py --readme   # also rewrite our section of benchmarks/README.md
    python benchmarks/ope.py --obd --readme   # the Open Bandit table (six settings) only

Part 1, single-step: one large logging-policy rollout (20,000 users x 7 days, ~540k
allocation decisions) is the population. Each replicate draws users with replacement until
about n decisions are logged (every draw its own bootstrap cluster), fits the cross-fitted
reward model, and estimates five target allocation policies' per-request value for two
rewards (live watch seconds, live click). Truth is exact: the simulator's expected reward
of inserting the live candidate, evaluated on its world, times the target's insertion
probability, averaged over the logged requests (``sample``, obp's convention) or over the
whole population (``population``: the quantity the cluster bootstrap intervals are for).

Part 2, sessions: a one-day logging rollout (sessions = episodes); truth is the on-policy
rollout (``simulation.rollout_value``) of each target on the same world and users: mean
session watch time (videos + lives). Replicates draw sessions with replacement; PDIS,
per-decision DR and linear FQE (LSTDQ, refitted in every bootstrap resample) estimate each
target's value.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation import allocation_ope as ao  # noqa: E402
from evaluation.ope import (  # noqa: E402
    BANDIT_ESTIMATORS,
    OPEConfig,
    estimate_bandit,
    estimate_sessions,
    lstdq_model,
)
from simulation import (  # noqa: E402
    ALWAYS_INSERT,
    ConstantAllocationPolicy,
    LoggingAllocationPolicy,
    SimulatorConfig,
    simulate,
)

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- ope:begin -->", "<!-- ope:end -->"
OBD_BEGIN, OBD_END = "<!-- ope-obd:begin -->", "<!-- ope-obd:end -->"
OBD_DIR = ROOT.parent / "shared" / "data" / "obd"


@dataclass(frozen=True)
class ThresholdPolicy:
    """Deterministic: insert iff a state column exceeds a threshold."""

    column: str
    threshold: float
    name: str

    def __call__(self, state) -> np.ndarray:  # noqa: ANN001 (AllocationState)
        return (np.asarray(getattr(state, self.column)) > self.threshold).astype(np.float64)


TARGETS = {
    "insert-30%": ConstantAllocationPolicy(0.3, name="insert-30%"),
    "always-insert": ALWAYS_INSERT,
    "bolder-logging": LoggingAllocationPolicy(name="bolder", bias=-0.3, live_watch=1.2,
                                              p_min=0.0, p_max=1.0),
    "live-lovers": ThresholdPolicy("past_live_watch_per_impression", 20.0, "live-lovers"),
    "popular-lives": ThresholdPolicy("candidate_popularity", 0.5, "popular-lives"),
}
"""Single-step targets: stochastic and deterministic, near and far from the logging policy."""

SESSION_TARGETS = {
    "logging+0.5": LoggingAllocationPolicy(name="logging+0.5", bias=-0.5),
    "logging-0.5": LoggingAllocationPolicy(name="logging-0.5", bias=-1.5),
    "insert-15%": ConstantAllocationPolicy(0.15, name="insert-15%"),
}
"""Session targets: stochastic, so that per-decision weights stay usable over ~10 steps."""


def user_sampler(frame: pl.DataFrame):  # noqa: ANN201
    """Rows of each user, to draw users with replacement."""
    user = frame["user_id"].to_numpy()
    _, inverse = np.unique(user, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def draw_clusters(rows_of: list[np.ndarray], n_rows: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw clusters with replacement until about ``n_rows`` rows: (row index, cluster id)."""
    per = np.mean([len(r) for r in rows_of])
    draws = rng.integers(0, len(rows_of), max(1, int(round(n_rows / per))))
    index = np.concatenate([rows_of[d] for d in draws])
    cluster = np.repeat(np.arange(len(draws)), [len(rows_of[d]) for d in draws])
    return index, cluster


def bandit_part(sizes: dict[int, int], n_users: int, n_boot: int, seed: int) -> dict:
    """Part 1: per (reward, size, estimator) error and coverage over replicates."""
    cfg = SimulatorConfig(n_users=n_users, days=7, seed=seed)
    started = time.perf_counter()
    frame = simulate(cfg).allocations
    features = ao.state_features(frame)
    expectations = ao.insert_expectations(cfg, frame)
    dists = {name: ao.action_dist(policy, frame) for name, policy in TARGETS.items()}
    rows_of = user_sampler(frame)
    users = frame["user_id"].to_numpy()
    names = [*BANDIT_ESTIMATORS, "default"]
    records = []
    rng = np.random.default_rng(seed)
    for reward in ao.LIVE_REWARDS:
        population = {t: ao.true_value(d, expectations[reward]) for t, d in dists.items()}
        for size, n_rep in sizes.items():
            for rep in range(n_rep):
                index, cluster = draw_clusters(rows_of, size, rng)
                sub = frame[index]
                data = ao.bandit_data(sub, reward, groups=cluster)
                model = ao.reward_model(features[index], data.action, data.reward,
                                        seed=rep, groups=users[index])
                q_hat = model(None)
                for target, dist in dists.items():
                    sample_truth = ao.true_value(dist[index], expectations[reward][index])
                    result = estimate_bandit(data, dist[index], q_hat,
                                             OPEConfig(n_boot=n_boot, seed=rep), warn=False)
                    for name in names:
                        e = result.estimates[name]
                        records.append({
                            "reward": reward, "size": size, "target": target, "estimator": name,
                            "rep": rep, "n": data.n, "value": e.value,
                            "sample_truth": sample_truth, "population_truth": population[target],
                            "ci_low": e.ci_low, "ci_high": e.ci_high, "ess": e.ess,
                        })
            print(f"  {reward} n={size:,}: {n_rep} replicates done "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = pl.DataFrame(records).with_columns(
        rel_err_sample=((pl.col("value") - pl.col("sample_truth")) / pl.col("sample_truth")).abs(),
        rel_err_population=((pl.col("value") - pl.col("population_truth"))
                            / pl.col("population_truth")).abs(),
        covers_population=(pl.col("ci_low") <= pl.col("population_truth"))
        & (pl.col("population_truth") <= pl.col("ci_high")),
        covers_sample=(pl.col("ci_low") <= pl.col("sample_truth"))
        & (pl.col("sample_truth") <= pl.col("ci_high")),
        rel_width=(pl.col("ci_high") - pl.col("ci_low")) / pl.col("population_truth"),
    )
    return {"table": table, "population_rows": frame.height, "n_users": n_users,
            "population_truth": {r: {t: ao.true_value(d, expectations[r])
                                     for t, d in dists.items()} for r in ao.LIVE_REWARDS},
            "seconds": time.perf_counter() - started}


def session_part(sizes: dict[int, int], n_users: int, n_boot: int, seed: int) -> dict:
    """Part 2: PDIS, DR and FQE of session watch time against on-policy rollouts."""
    cfg = SimulatorConfig(n_users=n_users, days=1, seed=seed)
    started = time.perf_counter()
    frame = simulate(cfg).allocations.sort("session_id", "request_index")
    reward = (frame["video_watch_time_s"] + frame["live_watch_time_s"]).to_numpy()
    features = ao.state_features(frame)
    truths, truth_se = {}, {}
    for name, policy in SESSION_TARGETS.items():
        rolled = simulate(cfg, policy)  # rollout_value(cfg, policy) is its summary()
        truths[name] = rolled.summary()["session_watch_time"]
        watch = rolled.sessions["video_watch_time_s"] + rolled.sessions["live_watch_time_s"]
        truth_se[name] = float(watch.std() / np.sqrt(rolled.sessions.height))
    dists = {name: ao.action_dist(policy, frame) for name, policy in SESSION_TARGETS.items()}
    session = frame["session_id"].to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], session[1:] != session[:-1]]))
    rows_of = np.split(np.arange(frame.height), starts[1:])
    rng = np.random.default_rng(seed)
    records = []
    for size, n_rep in sizes.items():
        for rep in range(n_rep):
            draws = rng.integers(0, len(rows_of), size)
            index = np.concatenate([rows_of[d] for d in draws])
            episode = np.repeat(np.arange(size), [len(rows_of[d]) for d in draws])
            sub = frame[index].with_columns(session_id=pl.Series(episode))
            data = ao.session_data(sub, reward[index])
            for target, dist in dists.items():
                model = lstdq_model(features[index], data, dist[index], seed=rep)
                result = estimate_sessions(data, dist[index], model(None),
                                           OPEConfig(n_boot=n_boot, seed=rep), warn=False,
                                           refit=model)
                for name, e in result.estimates.items():
                    records.append({"size": size, "target": target, "estimator": name,
                                    "rep": rep, "value": e.value, "truth": truths[target],
                                    "ci_low": e.ci_low, "ci_high": e.ci_high, "ess": e.ess})
        print(f"  sessions n={size:,}: {n_rep} replicates done "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = pl.DataFrame(records).with_columns(
        rel_err=((pl.col("value") - pl.col("truth")) / pl.col("truth")).abs(),
        covers=(pl.col("ci_low") <= pl.col("truth")) & (pl.col("truth") <= pl.col("ci_high")),
        rel_width=(pl.col("ci_high") - pl.col("ci_low")) / pl.col("truth"),
    )
    return {"table": table, "truth": truths, "truth_se": truth_se,
            "logging_sessions": int(frame["session_id"].n_unique()),
            "seconds": time.perf_counter() - started}


def bandit_markdown(part: dict) -> str:
    table = part["table"]
    summary = (table.group_by("reward", "size", "estimator")
               .agg(pl.col("rel_err_sample").mean().alias("err_s"),
                    pl.col("rel_err_population").mean().alias("err_p"),
                    pl.col("covers_population").mean().alias("cov_p"),
                    pl.col("covers_sample").mean().alias("cov_s"),
                    pl.col("rel_width").median().alias("width"),
                    pl.col("rep").n_unique().alias("reps"))
               .sort("reward", "size"))
    lines = []
    for reward in ao.LIVE_REWARDS:
        part_r = summary.filter(pl.col("reward") == reward)
        sizes = sorted(part_r["size"].unique().to_list())
        reps = {s: int(part_r.filter(pl.col("size") == s)["reps"].max()) for s in sizes}
        head = " | ".join(f"n={s // 1000}k ({reps[s]} reps)" for s in sizes)
        lines += [f"**{reward}** — mean relative error vs sample truth / vs population "
                  "truth · coverage of the population truth by the 95% interval "
                  "(averaged over the five targets)", "",
                  f"| estimator | {head} |", "|---|" + "---|" * len(sizes)]
        for name in [*BANDIT_ESTIMATORS, "default"]:
            cells = []
            for s in sizes:
                row = part_r.filter((pl.col("size") == s) & (pl.col("estimator") == name))
                r = row.row(0, named=True)
                cells.append(f"{100 * r['err_s']:.1f}% / {100 * r['err_p']:.1f}% · "
                             f"{100 * r['cov_p']:.0f}%")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    best = (summary.filter(pl.col("size") == summary["size"].max())
            .sort("err_s").group_by("reward", maintain_order=True).first())
    lines.append("Best at the largest size: " + "; ".join(
        f"{r['reward']}: {r['estimator']} {100 * r['err_s']:.1f}% (sample truth), "
        f"{100 * r['err_p']:.1f}% (population), coverage {100 * r['cov_p']:.0f}%"
        for r in best.iter_rows(named=True)) + ".")
    per_target = (part["table"].filter(pl.col("size") == part["table"]["size"].max())
                  .group_by("reward", "target", "estimator")
                  .agg(pl.col("rel_err_sample").mean().alias("err"),
                       pl.col("covers_population").mean().alias("cov"))
                  .sort("reward", "target"))
    lines += ["", f"Per target at n={part['table']['size'].max():,} (relative error vs "
              "sample truth · coverage):", "",
              "| reward | target | " + " | ".join([*BANDIT_ESTIMATORS, "default"]) + " |",
              "|---|---|" + "---|" * (len(BANDIT_ESTIMATORS) + 1)]
    for (reward, target), group in per_target.group_by("reward", "target", maintain_order=True):
        cells = []
        for name in [*BANDIT_ESTIMATORS, "default"]:
            r = group.filter(pl.col("estimator") == name).row(0, named=True)
            cells.append(f"{100 * r['err']:.1f}% · {100 * r['cov']:.0f}%")
        lines.append(f"| {reward} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def session_markdown(part: dict) -> str:
    table = part["table"]
    summary = (table.group_by("size", "estimator")
               .agg(pl.col("rel_err").mean().alias("err"), pl.col("covers").mean().alias("cov"),
                    pl.col("rel_width").median().alias("width"), pl.col("ess").median(),
                    pl.col("rep").n_unique().alias("reps"))
               .sort("size"))
    sizes = sorted(summary["size"].unique().to_list())
    lines = ["| estimator | " + " | ".join(
        f"{s:,} sessions ({int(summary.filter(pl.col('size') == s)['reps'].max())} reps)"
        for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name in ("pdis", "dr", "fqe"):
        cells = []
        for s in sizes:
            r = summary.filter((pl.col("size") == s) & (pl.col("estimator") == name)).row(
                0, named=True)
            cells.append(f"{100 * r['err']:.1f}% · {100 * r['cov']:.0f}% "
                         f"(width {100 * r['width']:.0f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    truths = ", ".join(f"{k} {v:.0f} s (± {part['truth_se'][k]:.1f})"
                       for k, v in part["truth"].items())
    lines += ["", f"True session watch time (rollouts): {truths}."]
    return "\n".join(lines)


def obd_markdown(n_boot: int, seed: int) -> str:
    """The Open Bandit benchmark: six campaign x direction settings, every estimator."""
    from evaluation.obd import run_obd

    names = [*BANDIT_ESTIMATORS, "default"]
    started = time.perf_counter()
    rows, errors, truth_noise = [], {k: [] for k in names}, []
    for campaign in ("all", "men", "women"):
        for behavior, evaluation in (("random", "bts"), ("bts", "random")):
            out = run_obd(OBD_DIR, campaign, behavior, evaluation,
                          OPEConfig(n_boot=n_boot, seed=seed), warn=False)
            truth_noise.append(out["truth_std_error"] / out["truth"])
            cells = []
            for name in names:
                e = out["estimates"][name]
                errors[name].append(e["relative_error"])
                cells.append(f"{100 * e['relative_error']:.1f}%"
                             + ("" if e["covers_truth"] else "†"))
            rows.append(f"| {campaign} | {behavior} → {evaluation} | {out['truth']:.5f} | "
                        f"{out['weights']['ess']:.0f} | " + " | ".join(cells) + " |")
            print(f"  obd {campaign} {behavior}->{evaluation} done", flush=True)
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    best = min(BANDIT_ESTIMATORS, key=lambda k: mean[k])
    return "\n".join([
        "## Open Bandit Dataset (`recpipe ope obd`, `benchmarks/ope.py --obd`)", "",
        f"Relative error |estimate - truth| / truth per setting (truth: the evaluation "
        f"policy's own mean click, 10,000 rows); † = the 95% interval misses the truth; "
        f"ESS of the importance weights; {n_boot} bootstrap resamples with the reward model "
        f"refitted in each; seed {seed}; {(time.perf_counter() - started) / 60:.0f} min on "
        f"{os.cpu_count()} cores.", "",
        "| campaign | logs → target | truth | ESS | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names), *rows,
        "| **mean** | | | | " + " | ".join(f"**{100 * mean[k]:.1f}%**" for k in names) + " |",
        "", f"Default {100 * mean['default']:.1f}% vs the best single estimator "
        f"({best}) {100 * mean[best]:.1f}%. Each truth is itself a mean of 10,000 clicks or "
        f"not, with a relative standard error of {100 * min(truth_noise):.0f}-"
        f"{100 * max(truth_noise):.0f}%: errors a few points apart are within that noise."])


def write_readme(section: str, begin: str = BEGIN, end: str = END) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--readme", action="store_true", help="rewrite benchmarks/README.md")
    parser.add_argument("--json", type=Path, help="write raw per-replicate records here")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--obd", action="store_true", help="only the Open Bandit table")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.obd:
        if not (OBD_DIR / "random" / "all" / "all.csv").is_file():
            print(f"skipped: the Open Bandit sample is not at {OBD_DIR} (it ships in "
                  "../shared/data/obd; nothing is downloaded)")
            return
        section = obd_markdown(n_boot=20 if args.quick else 200, seed=0)
        print(section)
        if args.readme:
            write_readme(section, OBD_BEGIN, OBD_END)
            print(f"wrote {README}")
        return
    if args.quick:
        sizes, users, s_sizes, s_users, n_boot = {1000: 4, 10000: 2}, 3000, {500: 2}, 3000, 200
    else:
        sizes = {1000: 100, 10000: 60, 100000: 40}
        users, s_sizes, s_users, n_boot = 20000, {1000: 60, 5000: 20}, 30000, 500
    print("single-step part", flush=True)
    bandit = bandit_part(sizes, users, n_boot, args.seed)
    print("session part", flush=True)
    sessions = session_part(s_sizes, s_users, n_boot, args.seed + 1)
    header = (f"Population: {bandit['population_rows']:,} logged decisions of "
              f"{bandit['n_users']:,} users (7 days, seed {args.seed}); "
              f"{n_boot} bootstrap resamples per interval; machine: {os.cpu_count()} CPU "
              "cores, no GPU; "
              f"single-step part {bandit['seconds'] / 60:.0f} min, session part "
              f"{sessions['seconds'] / 60:.0f} min.")
    section = "\n".join([
        "## Off-policy estimators vs simulator ground truth (`benchmarks/ope.py`)", "",
        header, "", "### Single-step (per-request value of five allocation policies)", "",
        bandit_markdown(bandit), "",
        "### Sessions (mean session watch time; logging rollout of "
        f"{sessions['logging_sessions']:,} one-day sessions)", "",
        session_markdown(sessions),
    ])
    print(section)
    if args.json:
        args.json.write_text(json.dumps({"bandit": bandit["table"].to_dicts(),
                                         "sessions": sessions["table"].to_dicts()}))
    if args.readme:
        write_readme(section)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
