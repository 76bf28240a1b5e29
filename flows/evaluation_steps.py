"""Plain step functions of the evaluation stage (no Prefect here; ``flows.nightly`` wraps
them as tasks and the CLI calls them): the offline A/B of a registered model's challenger
against its champion, with promotion when the gates pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    gates: GateConfig = field(default_factory=GateConfig)
    """Promotion gates."""
    n_boot: int = 1000
    """Paired user-bootstrap resamples."""
    seed: int = 0
    """Bootstrap seed."""
    promote: bool = True
    """Move ``champion`` when the gates pass (False: report only)."""
    test_path: str | None = None
    """Held-out examples (default ``<workspace>/lake/examples/test.parquet``)."""


def ab_step(workspace: Workspace, job: ABJob = ABJob()) -> dict:
    """Compare challenger and champion on the held-out logs, log an MLflow evaluation run,
    promote on pass. Returns a JSON-able summary with ``status`` (promoted |
    kept-champion | same-version | evaluated), the decision and a markdown report."""
    import mlflow
    import numpy as np
    import polars as pl

    from evaluation.ab import (
        decision_markdown,
        evaluate_gates,
        ranker_metric_table,
        same_version_decision,
    )
    from evaluation.ab_mlflow import EVALUATION_EXPERIMENT, log_ab_run
    from features.schema import RAW_INPUT_COLUMNS
    from models.registry import (
        ensure_experiment,
        load_ranker,
        promote,
        record_evaluation,
        resolve_version,
    )

    mlflow.set_tracking_uri(workspace.tracking_uri)
    name = job.model_name
    challenger = resolve_version(name, job.challenger)
    champion = resolve_version(name, job.champion)
    for role, ref, version in (("challenger", job.challenger, challenger),
                               ("champion", job.champion, champion)):
        if version is None:
            raise ValueError(f"{name} has no {role} {ref!r} in {workspace.tracking_uri}; "
                             "train and register a model first (`recpipe train-ranker`)")
    base = {"model_name": name, "champion_version": champion,
            "challenger_version": challenger}
    title = f"{name}: v{challenger} (challenger) vs v{champion} (champion)"
    if challenger == champion:
        decision = same_version_decision(challenger)
        return {**base, "status": decision.status, "decision": decision.to_dict(),
                "run_id": None, "table": None, "message": decision.summary,
                "markdown": decision_markdown(f"{name} v{challenger}", None, decision)}
    test_path = Path(job.test_path) if job.test_path else workspace.examples / "test.parquet"
    if not test_path.is_file():
        raise ValueError(f"{test_path}: no held-out examples; run `recpipe features` first")
    rows = pl.read_parquet(test_path)
    if rows.height == 0:
        raise ValueError(f"{test_path}: the held-out split is empty")
    models = {role: load_ranker(f"models:/{name}/{version}")
              for role, version in (("champion", champion), ("challenger", challenger))}
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
    decision = evaluate_gates(table, job.gates)
    experiment_id = ensure_experiment(EVALUATION_EXPERIMENT, workspace.artifacts)
    run_id = log_ab_run(
        experiment_id, name, champion, challenger, table, decision, job.gates,
        extra_params={"test_path": str(test_path), "test_rows": rows.height,
                      "test_users": table.info["users"], "seed": job.seed},
        per_model={"labels": labels, "user_ids": user_ids, "tasks": tasks, **predictions})
    record_evaluation(name, challenger, run_id, decision.status)
    promotion = None
    if decision.promote and job.promote:
        promotion = promote(name, challenger, run_id, decision.summary)
        status = "promoted"
    elif decision.promote:
        status = "evaluated"  # gates passed, promotion not requested
    else:
        status = "kept-champion"
    return {**base, "status": status, "decision": decision.to_dict(), "run_id": run_id,
            "experiment_id": experiment_id, "promotion": promotion, "table": table.to_dict(),
            "message": decision.summary,
            "markdown": decision_markdown(title, table, decision, run_id)}
