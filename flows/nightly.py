"""The nightly Prefect flow: simulate → ingest → features → train ranker → register →
offline A/B of challenger vs champion, with promotion when the gates pass.

Only orchestration: every task wraps a plain function of ``flows.steps`` and passes paths,
URIs and JSON summaries. I/O tasks retry; training does not (a failure there is not
transient, and a diverged model must not be registered).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import evaluation_steps, steps
from flows.workspace import Workspace

IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5}


@task(name="simulate", **IO_RETRIES)
def simulate_task(out_dir: str, users: int, days: int, seed: int) -> dict:
    return steps.simulate_step(Path(out_dir), steps.SimulateParams(users, days, seed))


@task(name="ingest", **IO_RETRIES)
def ingest_task(source: str, input_path: str, home: str) -> dict:
    return steps.ingest_step(source, Path(input_path), Workspace(Path(home)))


@task(name="features", **IO_RETRIES)
def features_task(home: str, history_length: int) -> dict:
    config = steps.FeatureConfig(history_length=history_length)
    return steps.features_step(Workspace(Path(home)), config)


@task(name="train-ranker")
def train_ranker_task(home: str, arch: str, epochs: int, seed: int) -> dict:
    job = steps.RankerJob(ranker={"arch": arch}, train={"epochs": epochs, "seed": seed})
    return steps.train_ranker_step(Workspace(Path(home)), job)


@task(name="register-ranker", **IO_RETRIES)
def register_task(home: str, model_uri: str, run_id: str) -> dict:
    return steps.register_step(Workspace(Path(home)), model_uri, run_id)


@task(name="ab-promote-ranker")
def ab_task(home: str, model_name: str) -> dict:
    job = evaluation_steps.ABJob(model_name=model_name)
    return evaluation_steps.ab_step(Workspace(Path(home)), job)


@flow(name="recpipe-nightly", log_prints=True)
def nightly(
    home: str | None = None,
    source: str = "simulator",
    input_path: str | None = None,
    users: int = 2000,
    days: int = 7,
    seed: int = 0,
    arch: str = "mmoe",
    epochs: int = 2,
    history_length: int = 20,
) -> dict:
    """One night. With no ``input_path`` the built-in simulator provides the logs."""
    logger = get_run_logger()
    workspace = Workspace.from_env(home).create()
    summary: dict = {"workspace": str(workspace.root)}
    if input_path is None:
        if source != "simulator":
            raise ValueError(f"source {source!r} needs an input_path")
        out_dir = workspace.raw / f"simulator-seed{seed}-users{users}-days{days}"
        summary["simulate"] = simulate_task(str(out_dir), users, days, seed)
        input_path = str(out_dir)
    summary["ingest"] = ingest_task(source, input_path, str(workspace.root))
    logger.info("ingest: %s", {k: summary["ingest"][k] for k in
                               ("input_rows", "accepted", "quarantined", "duplicates")})
    summary["features"] = features_task(str(workspace.root), history_length)
    logger.info("examples: %s", summary["features"]["rows"])
    trained = train_ranker_task(str(workspace.root), arch, epochs, seed)
    summary["train_ranker"] = trained
    summary["register"] = register_task(str(workspace.root), trained["model_uri"],
                                        trained["run_id"])
    create_markdown_artifact(
        key="nightly-ranker", markdown=metrics_markdown(summary), description="Nightly ranker"
    )
    summary["ab"] = ab_task(str(workspace.root), summary["register"]["name"])
    logger.info("offline A/B: %s", summary["ab"]["message"])
    create_markdown_artifact(
        key="nightly-ab", markdown=summary["ab"]["markdown"],
        description="Offline A/B of the ranker challenger vs champion, and the decision",
    )
    return summary


def metrics_markdown(summary: dict) -> str:
    """A per-task metrics table for the Prefect UI."""
    registered = summary["register"]
    lines = [
        f"# {registered['name']} v{registered['version']} ({', '.join(registered['aliases'])})",
        "",
        f"MLflow run `{summary['train_ranker']['run_id']}`, "
        f"arch `{summary['train_ranker']['arch']}`",
        "",
        "| split | task | AUC | GAUC | logloss |",
        "|---|---|---|---|---|",
    ]
    for split, tasks in summary["train_ranker"]["metrics"].items():
        for name, values in tasks.items():
            if "auc" in values:
                lines.append(f"| {split} | {name} | {values['auc']:.4f} | "
                             f"{values['gauc']:.4f} | {values['logloss']:.4f} |")
    return "\n".join(lines)
