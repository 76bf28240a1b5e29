"""Plain step functions of the evaluation stage (no Prefect here; ``flows.nightly`` wraps
them as tasks and the CLI calls them): the offline A/B of a registered model's challenger
against its champion, with promotion when the gates pass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evaluation.ab import GateConfig
from flows.workspace import Workspace


@dataclass(frozen=True)
class ABJob:
    """What ``ab_step`` compares and how it decides."""

    model_name: str = "recpipe-ranker"
    """Registered model."""
    challenger: str = "challenger"
    """Alias or version (``3`` / ``v3``) of the challenger."""
    champion: str = "champion"
    """Alias or version of the champion."""
    gates: GateConfig | None = None
    """Promotion gates (None: the model kind's defaults, ``GateConfig()`` for rankers,
    ``evaluation.allocation_ab.allocator_gates`` for allocators)."""
    gate_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields replaced in the gates, e.g. ``{"primary": "click/auc"}``."""
    n_boot: int = 1000
    """Paired user-bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""
    promote: bool = True
    """Move ``champion`` when the gates pass (False: report only)."""
    test_path: str | None = None
    """Held-out data: examples for rankers (default ``<workspace>/lake/examples/
    test.parquet``), an allocation log for allocators (default: a held-out simulator run)."""
    eval_users: int | None = None
    """Allocators: users of the held-out simulator world (default: the training log's)."""
    live_share_cap: float | None = None
    """Allocators: the platform's live-share cap the challenger must stay under (default:
    the held-out simulator world's; with ``test_path``, the cap the champion was trained
    under). Never the challenger's own: a challenger cannot set its own limit."""


def ab_step(workspace: Workspace, job: ABJob = ABJob()) -> dict:
    """Compare challenger and champion on the held-out logs, log an MLflow evaluation run,
    promote on pass. Rankers are compared on the held-out example split, allocators
    (``recpipe-allocator``) on a held-out allocation log (see ``allocator_comparison``).
    Returns a JSON-able summary with ``status`` (promoted | kept-champion | same-version |
    evaluated: the gates passed but nothing moved, because promotion was not requested or
    the champion compared with is no longer the one holding the alias), the decision and a
    markdown report."""
    import mlflow

    from evaluation.ab import decision_markdown, evaluate_gates, same_version_decision
    from evaluation.ab_mlflow import EVALUATION_EXPERIMENT, log_ab_run
    from flows.lineage import new_run_tags
    from models.allocators.registry import ALLOCATOR_MODEL_NAME
    from models.registry import (
        CHAMPION,
        RANKER_MODEL_NAME,
        alias_version,
        ensure_experiment,
        promote,
        record_evaluation,
        registered_model_exists,
        resolve_version,
    )
    from models.user_encoder_registry import USER_ENCODER_MODEL_NAME

    mlflow.set_tracking_uri(workspace.tracking_uri)
    name = job.model_name
    if not registered_model_exists(name):
        raise ValueError(f"no registered model named {name!r} in {workspace.tracking_uri} "
                         f"(recpipe registers {RANKER_MODEL_NAME!r}, "
                         f"{ALLOCATOR_MODEL_NAME!r} and {USER_ENCODER_MODEL_NAME!r})")
    challenger = resolve_version(name, job.challenger)
    champion = resolve_version(name, job.champion)
    for role, ref, version in (("challenger", job.challenger, challenger),
                               ("champion", job.champion, champion)):
        if version is None:
            raise ValueError(f"{name} has no {role} {ref!r} in {workspace.tracking_uri}; "
                             "train and register a model first")
    base = {"model_name": name, "champion_version": champion,
            "challenger_version": challenger}
    title = f"{name}: v{challenger} (challenger) vs v{champion} (champion)"
    if challenger == champion:
        decision = same_version_decision(challenger)
        return {**base, "status": decision.status, "decision": decision.to_dict(),
                "run_id": None, "table": None, "message": decision.summary,
                "markdown": decision_markdown(f"{name} v{challenger}", None, decision)}
    versions = {"champion": champion, "challenger": challenger}
    compare = allocator_comparison if name == ALLOCATOR_MODEL_NAME else ranker_comparison
    table, gates, extra_params, per_model = compare(workspace, job, versions)
    gates = replace(gates, **job.gate_overrides)
    decision = evaluate_gates(table, gates)
    experiment_id = ensure_experiment(EVALUATION_EXPERIMENT, workspace.artifacts)
    held_out = extra_params.get("test_path") or job.test_path  # None: a simulated world
    run_id = log_ab_run(experiment_id, name, champion, challenger, table, decision, gates,
                        extra_params={**extra_params, "seed": job.seed}, per_model=per_model,
                        tags=new_run_tags(experiment_id, held_out))
    record_evaluation(name, challenger, run_id, decision.status)
    promotion, message = None, decision.summary
    current = alias_version(name, CHAMPION)
    if decision.promote and job.promote and current != champion:
        status = "evaluated"  # it beat v{champion}, which is not the champion it would replace
        message = (f"{decision.summary}; not promoted: compared with v{champion}, but the "
                   f"champion is {'none' if current is None else f'v{current}'}")
    elif decision.promote and job.promote:
        promotion = promote(name, challenger, run_id, decision.summary)
        status = "promoted"
    elif decision.promote:
        status = "evaluated"  # gates passed, promotion not requested
    else:
        status = "kept-champion"
    return {**base, "status": status, "decision": decision.to_dict(), "run_id": run_id,
            "experiment_id": experiment_id, "promotion": promotion, "table": table.to_dict(),
            "message": message,
            "markdown": decision_markdown(title, table, decision, run_id)}


Comparison = tuple[Any, Any, dict, dict | None]
"""(MetricTable, GateConfig, extra MLflow params, per-model predictions or None)."""


def ranker_comparison(workspace: Workspace, job: ABJob, versions: dict[str, int]) -> Comparison:
    """Per-task AUC / GAUC / logloss of both rankers on the held-out example split, under a
    paired user bootstrap."""
    import numpy as np
    import polars as pl

    from evaluation.ab import GateConfig, ranker_metric_table
    from features.schema import RAW_INPUT_COLUMNS
    from models.registry import load_ranker

    test_path = Path(job.test_path) if job.test_path else workspace.examples / "test.parquet"
    if not test_path.is_file():
        raise ValueError(f"{test_path}: no held-out examples; run `recpipe features` first")
    rows = pl.read_parquet(test_path)
    if rows.height == 0:
        raise ValueError(f"{test_path}: the held-out split is empty")
    models = {role: load_ranker(f"models:/{job.model_name}/{version}")
              for role, version in versions.items()}
    tasks = [t for t in models["challenger"].schema.tasks
             if t in models["champion"].schema.tasks and t.column in rows.columns]
    raw = rows.select(RAW_INPUT_COLUMNS)
    predictions = {}
    for role, ranker in models.items():
        scores = ranker.score_raw(raw)  # each model encodes with its own vocabulary
        index = [list(ranker.schema.tasks).index(t) for t in tasks]
        predictions[role] = scores[:, index].astype(np.float64)
    labels = np.stack([rows[t.column].cast(pl.Float64).fill_null(np.nan).to_numpy()
                       for t in tasks], axis=1)
    user_ids = rows["user_id"].to_numpy()
    table = ranker_metric_table(labels, predictions["champion"], predictions["challenger"],
                                user_ids, tasks, n_boot=job.n_boot, seed=job.seed,
                                info={"test_path": str(test_path), "rows": rows.height,
                                      "users": int(len(np.unique(user_ids)))})
    params = {"test_path": str(test_path), "test_rows": rows.height,
              "test_users": table.info["users"]}
    per_model = {"labels": labels, "user_ids": user_ids, "tasks": tasks, **predictions}
    return table, job.gates or GateConfig(), params, per_model


def allocator_comparison(workspace: Workspace, job: ABJob,
                         versions: dict[str, int]) -> Comparison:
    """Off-policy session value and live share of both allocators on one held-out
    allocation log, plus their true values when the logs come from the simulator.

    The held-out log is ``job.test_path`` when given; otherwise a fresh logging-policy run
    of the simulator on a held-out world (the training log's settings, world seed + 1000:
    users the policies never saw, scored as unseen), and both policies are also rolled out
    on that same world for their true values."""
    from evaluation.allocation_ab import allocator_gates, allocator_metric_table
    from evaluation.ope import OPEConfig
    from flows.allocation_steps import (
        held_out_configs,
        latest_simulator_dir,
        simulator_manifest,
        true_value,
    )
    from models.allocators.data import read_allocation_log, validate_allocation_frame
    from models.allocators.registry import load_allocator

    policies = {role: load_allocator(f"models:/{job.model_name}/{version}")
                for role, version in versions.items()}
    true_values = None
    if job.test_path:
        source = Path(job.test_path)
        frame = read_allocation_log(source)
        cap = policies["champion"].config.live_share_cap
    else:
        from simulation.simulator import simulate

        manifest = simulator_manifest(latest_simulator_dir(workspace))
        if manifest is None:
            raise ValueError("no simulator manifest next to the latest allocation log: pass "
                             "a held-out allocation log with --test")
        world = held_out_configs(manifest, 1, job.eval_users)[0]
        source = f"simulator held-out world seed {world.seed}, {world.n_users} users"
        frame = validate_allocation_frame(simulate(world).allocations, source)
        true_values = {role: true_value(policy, [world]) for role, policy in policies.items()}
        cap = world.live_share_cap
        policies = {role: p.with_id_features(False) for role, p in policies.items()}
    cap = cap if job.live_share_cap is None else job.live_share_cap
    config = OPEConfig(n_boot=job.n_boot, seed=job.seed)
    table = allocator_metric_table(frame, policies["champion"], policies["challenger"], config,
                                   true_values, info={"log": str(source)})
    params = {"test_log": str(source), "test_decisions": table.info["decisions"],
              "test_sessions": table.info["sessions"], "live_share_cap": cap}
    return table, job.gates or allocator_gates(cap), params, None
