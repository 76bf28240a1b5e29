"""Plain steps for the live-stream allocation policy: train on logged decisions, log the run
to MLflow, measure the true value by simulator rollouts on held-out users, register.

No Prefect here (``flows.nightly`` wraps :func:`train_allocator_step` as a task) and no
argument parsing outside :func:`add_train_allocator_arguments` / :func:`cmd_train_allocator`,
which ``flows.cli`` wires as ``recpipe train-allocator``. Steps take and return paths, URIs
and JSON-able summaries.

``recpipe train-allocator --algo sl_mgac --nproc N`` runs :func:`train_allocator_step` on N
``torchrun`` ranks (``flows.torchrun``; README "Distributed training"; how SL-MGAC trains
sharded: ``models.allocators.sl_mgac``); global rank 0 alone logs, measures the true value,
and registers. The other algorithms are not TorchRec models and refuse ``--nproc`` > 1.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.workspace import Workspace
from models.allocators.data import AllocationLogError
from models.allocators.policy import ALGORITHMS, DISTRIBUTED_ALGORITHMS

if TYPE_CHECKING:
    from models.distributed import Rank, ShardingConfig

ALLOCATOR_EXPERIMENT = "recpipe-allocators"
TRUE_VALUE_METRICS: tuple[str, ...] = ("session_watch_time", "video_watch_time",
                                       "live_watch_time", "retention", "live_share",
                                       "watch_time_per_user", "requests_per_session")
"""Summary fields of ``simulation.simulator.summarize_sessions`` reported as true value."""
HELD_OUT_SEED_OFFSET = 1000
"""Held-out rollout k uses world seed (log seed + offset + k): other users than the log's."""


def latest_simulator_dir(workspace: Workspace) -> Path:
    """The newest ``<home>/raw/simulator-*`` folder holding an ``allocations.parquet``."""
    found = [p for p in workspace.raw.glob("simulator-*") if (p / "allocations.parquet").exists()]
    if not found:
        raise AllocationLogError(
            f"no simulator output with allocations.parquet under {workspace.raw}; run "
            "`recpipe nightly` (or `recpipe simulate --out <home>/raw/simulator-...`) first, "
            "or pass --input DIR")
    return max(found, key=lambda p: (p.stat().st_mtime, p.name))


def simulator_manifest(input_path: Path) -> dict | None:
    """The simulator manifest next to the log (None for canonical logs)."""
    folder = input_path if input_path.is_dir() else input_path.parent
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("source") == "simulator" and "config" in manifest else None


def held_out_configs(manifest: dict, n_seeds: int, n_users: int | None = None) -> list:
    """Simulator configs of the held-out rollouts: the log's world settings with world seeds
    (log seed + HELD_OUT_SEED_OFFSET + k), so none of the log's users (or draws) reappear."""
    from simulation.config import SimulatorConfig

    config = SimulatorConfig.from_dict(manifest["config"])
    users = config.n_users if n_users is None else n_users
    return [replace(config, seed=config.seed + HELD_OUT_SEED_OFFSET + k, n_users=users)
            for k in range(n_seeds)]


def true_value(policy: Any, configs: list) -> dict[str, Any]:
    """On-policy true value of ``policy`` (None: the logging policy) averaged over the
    rollouts of ``configs``; ``per_seed`` keeps each rollout's summary. A trained policy
    scores the held-out users as unseen (no id embeddings of other users)."""
    from simulation.simulator import simulate

    if policy is not None and hasattr(policy, "with_id_features"):
        policy = policy.with_id_features(False)
    per_seed = {}
    for config in configs:
        summary = simulate(config, policy).summary()
        per_seed[str(config.seed)] = {k: float(summary[k]) for k in TRUE_VALUE_METRICS}
    mean = {k: sum(s[k] for s in per_seed.values()) / len(per_seed) for k in TRUE_VALUE_METRICS}
    return {**mean, "per_seed": per_seed}


def cap_met(true_values: dict[str, Any], cap: float) -> bool:
    """Every held-out rollout (``true_value``'s ``per_seed``) under the cap: not their mean,
    one world over the cap is a breach."""
    return all(one["live_share"] <= cap for one in true_values["per_seed"].values())


def train_allocator_step(
    workspace: Workspace,
    algo: str = "sl_mgac",
    input_path: Path | None = None,
    seed: int = 0,
    hyperparameters: dict[str, Any] | None = None,
    live_share_cap: float | None = None,
    register: bool = True,
    eval_seeds: int = 2,
    eval_users: int | None = None,
    progress: bool = True,
    rank: Rank | None = None,
    sharding: ShardingConfig | None = None,
) -> dict:
    """Train ``algo`` on an allocation log, log the run and the model to MLflow, and register
    it as ``recpipe-allocator`` (alias challenger; champion if none).

    Args:
        input_path: a simulator output folder or an allocation log file (default: the latest
            ``<home>/raw/simulator-*`` folder).
        hyperparameters: overrides of the algorithm's config fields.
        live_share_cap: the platform cap (default: the simulator config's, else 0.3).
        register: register the model (skipped when held-out rollouts show the cap broken).
        eval_seeds: held-out rollouts for the true value (simulator logs only; 0: none).
        eval_users: users per held-out rollout (default: the log's).
        rank: one of several torchrun ranks (sl_mgac only; every rank calls this): each
            trains on its share of the sessions with sharded tables (``sharding``); global
            rank 0 alone logs, evaluates and registers, and returns the summary with a
            ``distributed`` entry; the other ranks return {}.

    Returns:
        run id, model URI, algo, log size, final diagnostics, the config, ``true_value``
        (``{"policy": {...}, "logging": {...}, "delta": {...}, "constraint_met": bool}``
        with session_watch_time, retention, live_share, ...) and ``registered``.

    Raises:
        AllocationLogError: no log, or a log that breaks the contract (a ValueError).
        ValueError: unknown algorithm or hyperparameter.
    """
    import mlflow

    from flows.lineage import start_run
    from flows.steps import flatten_params
    from models.allocators.data import (
        RewardConfig,
        allocation_file,
        live_share,
        read_allocation_log,
    )
    from models.allocators.policy import config_for, train_policy
    from models.allocators.registry import ALLOCATOR_MODEL_NAME, log_allocator
    from models.registry import ensure_experiment
    from models.registry import register as register_model

    source = Path(input_path) if input_path is not None else latest_simulator_dir(workspace)
    frame = read_allocation_log(source)
    manifest = simulator_manifest(source)
    sim = manifest["config"] if manifest else {}
    cap = live_share_cap if live_share_cap is not None else sim.get("live_share_cap", 0.3)
    reward = RewardConfig(max_requests_per_session=sim.get(
        "max_requests_per_session", RewardConfig().max_requests_per_session))
    config = config_for(algo, seed, cap, reward, hyperparameters, progress)

    main = rank is None or rank.is_main
    if main:
        mlflow.set_tracking_uri(workspace.tracking_uri)
        experiment_id = ensure_experiment(ALLOCATOR_EXPERIMENT, workspace.artifacts)
    diagnostics: dict[str, float] = {}

    def on_log(step: int, stats: dict[str, float]) -> None:
        diagnostics.update(stats)
        if main:
            mlflow.log_metrics({f"train_{k}": v for k, v in stats.items()}, step=step)

    run_context = (start_run(experiment_id, f"{algo}-seed{seed}", allocation_file(source))
                   if main else nullcontext())
    with run_context as run:
        n_sessions = frame["session_id"].n_unique()
        if main:
            mlflow.log_params(flatten_params({"algo": algo, "input": str(source),
                                              "config": config.to_dict()}))
            mlflow.log_params({"log_requests": frame.height, "log_sessions": n_sessions,
                               "world_size": 1 if rank is None else rank.world_size})
        started = time.perf_counter()
        policy = train_policy(algo, frame, config, on_log, rank=rank, sharding=sharding)
        train_seconds = time.perf_counter() - started
        if not main:
            return {}
        distributed = getattr(policy, "distributed", None) if rank is not None else None
        if distributed is not None:
            from flows.torchrun import log_distributed

            log_distributed(distributed)
        share_on_log = live_share(policy(frame))
        mlflow.log_metrics({"train_seconds": train_seconds, "share_on_log_states": share_on_log})
        model_uri = log_allocator(policy, frame.head(5))
        summary: dict[str, Any] = {
            "run_id": run.info.run_id, "experiment_id": experiment_id, "model_uri": model_uri,
            "algo": algo, "seed": seed, "input": str(source),
            "rows": frame.height, "sessions": n_sessions, "live_share_cap": cap,
            "share_on_log_states": share_on_log, "train_seconds": round(train_seconds, 2),
            "diagnostics": diagnostics, "config": config.to_dict(),
        }
        if distributed is not None:
            summary["distributed"] = distributed
        if manifest and eval_seeds > 0:
            configs = held_out_configs(manifest, eval_seeds, eval_users)
            values = {"policy": true_value(policy, configs), "logging": true_value(None, configs)}
            delta = {k: values["policy"][k] - values["logging"][k] for k in TRUE_VALUE_METRICS}
            met = cap_met(values["policy"], cap)
            summary["true_value"] = {**values, "delta": delta, "constraint_met": met,
                                     "eval_seeds": [c.seed for c in configs],
                                     "eval_users": configs[0].n_users,
                                     "eval_days": configs[0].days}
            for who in ("policy", "logging"):
                mlflow.log_metrics({f"true_{who}_{k}": values[who][k]
                                    for k in TRUE_VALUE_METRICS})
            mlflow.log_metric("true_constraint_met", float(met))
        mlflow.log_dict(summary, "summary.json")
    summary["registered"] = None
    if register and summary.get("true_value", {}).get("constraint_met", True):
        summary["registered"] = register_model(model_uri, ALLOCATOR_MODEL_NAME,
                                               {"run_id": run.info.run_id, "algo": algo})
    elif register:
        summary["registration_skipped"] = "held-out rollouts broke the live-share cap"
    return summary


# --- CLI --------------------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it parses (``n_steps=500``, ``gamma=0.9``),
    else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def share_cap(text: str) -> float:
    """argparse type of ``--live-share-cap``: a share in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
    return value


def add_train_allocator_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``recpipe train-allocator`` (``--home`` / ``--json`` come from the CLI)."""
    from serving.cli import at_least

    parser.add_argument("--algo", choices=ALGORITHMS, default="sl_mgac",
                        help="sl_mgac (default) or a baseline: greedy, dqn, cql, bcq")
    parser.add_argument("--input", type=Path,
                        help="simulator output folder or allocation log (.parquet/.csv); "
                             "default: the latest <home>/raw/simulator-* folder")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--steps", type=at_least(1),
                        help="gradient steps (default: the algorithm's)")
    parser.add_argument("--live-share-cap", type=share_cap,
                        help="max inserted lives per request (default: the simulator's, 0.3)")
    parser.add_argument("--set", dest="hyperparameters", action="append", default=[],
                        type=parse_assignment, metavar="KEY=VALUE",
                        help="override one hyperparameter of the algorithm's config "
                             "(repeatable), e.g. --set gamma=0.9")
    parser.add_argument("--eval-seeds", type=at_least(0), default=2,
                        help="held-out simulator rollouts for the true value (0: none)")
    parser.add_argument("--eval-users", type=at_least(1),
                        help="users per held-out rollout (default: the log's)")
    parser.add_argument("--no-register", action="store_true", help="log the run only")
    from flows.torchrun import add_distributed_arguments

    add_distributed_arguments(parser, "train-allocator")


def cmd_train_allocator(args: argparse.Namespace, workspace: Workspace) -> dict:
    """``recpipe train-allocator``: train (``--nproc N``: on N torchrun ranks, sl_mgac only),
    report, register; returns the JSON summary."""
    from flows.cli import UserError
    from flows.torchrun import (
        default_embedding_optimizer,
        is_distributed,
        launch_from_cli,
        run_rank,
    )

    if args.rank_job is not None:  # one torchrun rank of `--nproc N`
        return run_rank(args.rank_job,
                        lambda job, rank: run_train_allocator_rank(workspace, job, rank))
    hyperparameters = dict(args.hyperparameters)
    if args.steps is not None:
        hyperparameters["n_steps"] = args.steps
    common = {"algo": args.algo, "input_path": args.input, "seed": args.seed,
              "hyperparameters": hyperparameters, "live_share_cap": args.live_share_cap,
              "register": not args.no_register, "eval_seeds": args.eval_seeds,
              "eval_users": args.eval_users}
    if is_distributed(args):
        if args.algo not in DISTRIBUTED_ALGORITHMS:
            raise UserError(f"--nproc {args.nproc}: {args.algo} does not train distributed "
                            f"(not a TorchRec model); only {', '.join(DISTRIBUTED_ALGORITHMS)} "
                            "does. Drop --nproc or use --algo sl_mgac")
        hyperparameters.setdefault("embedding_optimizer", default_embedding_optimizer(True))
        source = args.input or latest_simulator_dir(workspace)  # found once, here
        job = {**common, "input_path": str(Path(source).resolve()),
               "sharding": args.sharding}
        summary = launch_from_cli(workspace, "train-allocator", job, args)
        if summary.get("logged_on_other_node"):
            return summary
    else:
        summary = train_allocator_step(workspace, **common)
    print_allocator_summary(summary)
    return summary


def run_train_allocator_rank(workspace: Workspace, job: dict, rank: Rank) -> dict:
    """One torchrun rank of ``recpipe train-allocator --nproc N``."""
    from models.distributed import ShardingConfig

    step = {k: v for k, v in job.items() if k not in ("sharding", "summary")}
    return train_allocator_step(workspace, **{**step, "input_path": Path(step["input_path"])},
                                rank=rank, sharding=ShardingConfig.from_name(job["sharding"]))


def print_allocator_summary(summary: dict) -> None:
    """The human-readable report of ``train_allocator_step``'s summary."""
    print(f"trained {summary['algo']} on {summary['rows']:,} requests in "
          f"{summary['sessions']:,} sessions ({summary['train_seconds']:.0f} s); "
          f"insert share on logged states {summary['share_on_log_states']:.3f}")
    shown = {k: v for k, v in summary["diagnostics"].items()
             if k in ("value_loss", "entropy", "advantage_mean", "advantage_std",
                      "lagrange_multiplier", "policy_share", "loss", "watch_loss")}
    if shown:
        print("final diagnostics: " + ", ".join(f"{k} {v:.3g}" for k, v in shown.items()))
    if "true_value" in summary:
        tv = summary["true_value"]
        print(f"true value on held-out users (seeds {tv['eval_seeds']}, "
              f"{tv['eval_users']} users x {tv['eval_days']} days):")
        print(f"  {'':8} {'session watch s':>16} {'live watch s':>13} {'retention':>10} "
              f"{'live share':>11}")
        for who in ("policy", "logging"):
            v = tv[who]
            print(f"  {who:8} {v['session_watch_time']:16.1f} {v['live_watch_time']:13.1f} "
                  f"{v['retention']:10.3f} {v['live_share']:11.3f}")
        print(f"  live-share cap {summary['live_share_cap']}: "
              f"{'met' if tv['constraint_met'] else 'BROKEN'}")
    if summary["registered"]:
        reg = summary["registered"]
        print(f"registered {reg['name']} v{reg['version']} as {', '.join(reg['aliases'])}")
    elif "registration_skipped" in summary:
        print(f"not registered: {summary['registration_skipped']}")
