"""The nightly Prefect flow: simulate → ingest → features → pretrain the user encoder →
train ranker → register → offline A/B of the ranker; then, when the logs carry allocation
decisions (simulator output), train the live-stream allocator → register → its offline A/B.
Every A/B promotes its challenger only when the gates pass.

Only orchestration: every task wraps a plain function of ``flows.steps`` and passes paths,
URIs and JSON summaries. I/O tasks retry; training does not (a failure there is not
transient, and a diverged model must not be registered).
"""

from __future__ import annotations

from pathlib import Path

from prefect import State, Task, flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from features import lake
from flows import allocation_steps, evaluation_steps, steps
from flows.caching import (
    PathsRead,
    cached,
    outputs_changed,
    reads_nothing,
    record_outputs,
)
from flows.partitions import PartitionRunner
from flows.pretrain_steps import EMBEDDINGS_DIR, pretrain_step
from flows.workspace import Workspace


def retry_unless_bad_input(task: Task, task_run: object, state: State) -> bool:
    """Retry what may pass next time (a file system hiccup), not bad input: a ValueError
    (IngestError, FeatureBuildError, a bad config) fails the same way three times."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 (anything else may be transient)
        return True
    return True


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_bad_input}


@task(name="simulate", **IO_RETRIES)
def simulate_task(out_dir: str, users: int, days: int, seed: int) -> dict:
    return steps.simulate_step(Path(out_dir), steps.SimulateParams(users, days, seed))


@task(name="ingest", **IO_RETRIES)
def ingest_task(source: str, input_path: str, home: str, runner: str = "threads",
                address: str | None = None) -> dict:
    return steps.ingest_step(source, Path(input_path), Workspace(Path(home)),
                             PartitionRunner(runner, address))


@task(name="features", **IO_RETRIES)
def features_task(home: str, history_length: int) -> dict:
    config = steps.FeatureConfig(history_length=history_length)
    return steps.features_step(Workspace(Path(home)), config)


@task(name="pretrain-user-encoder")
def pretrain_task(home: str, method: str, n_steps: int | None, seed: int) -> dict:
    overrides = {"seed": seed, **({"steps": n_steps} if n_steps is not None else {})}
    return pretrain_step(Workspace(Path(home)), method, overrides)


@task(name="train-ranker")
def train_ranker_task(home: str, arch: str, epochs: int, seed: int,
                      user_encoder: str | None = None, ground_truth: str | None = None) -> dict:
    job = steps.RankerJob(ranker={"arch": arch}, train={"epochs": epochs, "seed": seed},
                          user_encoder=user_encoder, ground_truth=ground_truth,
                          ground_truth_optional=True)
    return steps.train_ranker_step(Workspace(Path(home)), job)


@task(name="train-allocator")
def train_allocator_task(home: str, algo: str, input_path: str, seed: int,
                         n_steps: int | None, eval_users: int | None) -> dict:
    overrides = {"n_steps": n_steps} if n_steps is not None else None
    return allocation_steps.train_allocator_step(
        Workspace(Path(home)), algo, Path(input_path), seed, overrides, eval_seeds=1,
        eval_users=eval_users, progress=False)


@task(name="register-ranker", **IO_RETRIES)
def register_task(home: str, model_uri: str, run_id: str) -> dict:
    return steps.register_step(Workspace(Path(home)), model_uri, run_id)


@task(name="offline-ab")
def ab_task(home: str, model_name: str, challenger_version: int,
            eval_users: int | None = None) -> dict:
    job = evaluation_steps.ABJob(model_name=model_name, challenger=str(challenger_version),
                                 eval_users=eval_users)
    return evaluation_steps.ab_step(Workspace(Path(home)), job)


# what each task reads, from its parameters: the content of these paths keys its cache


def reads_input_path(params: dict) -> list[Path]:
    return [Path(params["input_path"])]


def reads_lake_events(params: dict) -> list[Path]:
    return [lake.events_dir(Workspace(Path(params["home"])).lake)]


def reads_examples(params: dict) -> list[Path]:
    return [Workspace(Path(params["home"])).examples]


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
    pretrain_method: str | None = "adaptssr",
    pretrain_steps: int | None = None,
    ranker_user_encoder: bool = False,
    allocator_algo: str | None = "sl_mgac",
    allocator_steps: int | None = None,
    allocator_eval_users: int | None = None,
    fresh: bool = False,
    partition_runner: str = "threads",
    dask_address: str | None = None,
) -> dict:
    """One night. With no ``input_path`` the built-in simulator provides the logs.

    ``pretrain_method`` None skips pretraining; ``ranker_user_encoder`` plugs the night's
    pretrained encoder (frozen) into the ranker. ``allocator_algo`` None skips the allocator;
    it is trained only on logs with allocation decisions (a simulator output folder).
    ``allocator_steps`` / ``allocator_eval_users``: gradient steps (default: the algorithm's)
    and users of the held-out simulator world its true value and A/B use (default: the
    log's).

    Every task is cached on its parameters and the content of what it reads
    (:mod:`flows.caching`): started again after a crash, the run skips the tasks that
    completed. ``fresh`` reruns every task. ``summary["task_states"]`` says which tasks ran
    (``Completed``) and which were reused (``Cached``).

    Ingestion merges its date partitions as mapped ``merge-partition`` tasks on
    ``partition_runner``: "threads", or "dask" on the cluster at ``dask_address`` (a local
    one when None; see :mod:`flows.partitions`)."""
    logger = get_run_logger()
    workspace = Workspace.from_env(home).create()
    # one night at a time per workspace: two runs would interleave writes to the lake and
    # the registry; the second one stops here and says who holds the workspace
    with workspace.exclusive_run(f"recpipe-nightly flow run {runtime.flow_run.name} "
                                 f"({runtime.flow_run.id})"):
        states: dict[str, str] = {}
        summary: dict = {"workspace": str(workspace.root), "task_states": states}

        def run(task: Task, reads: PathsRead, *args: object, writes: tuple[Path, ...] = ()
                ) -> dict:
            """``task`` cached on what it reads; rerun (its record replaced) when ``fresh``
            or when an output a reused record would rely on is gone or changed since."""
            rerun = fresh or outputs_changed(workspace, task.name, writes)
            state = cached(task, workspace, reads, rerun)(*args, return_state=True)
            states[task.name] = state.name
            result = state.result()
            record_outputs(workspace, task.name, writes)
            return result

        root = str(workspace.root)
        if input_path is None:
            if source != "simulator":
                raise ValueError(f"source {source!r} needs an input_path")
            out_dir = workspace.raw / f"simulator-seed{seed}-users{users}-days{days}"
            summary["simulate"] = run(simulate_task, reads_nothing, str(out_dir), users, days,
                                      seed, writes=(out_dir,))
            input_path = str(out_dir)
        summary["ingest"] = run(ingest_task, reads_input_path, source, input_path, root,
                                partition_runner, dask_address,
                                writes=(lake.events_dir(workspace.lake),))
        logger.info("ingest: %s", {k: summary["ingest"][k] for k in
                                   ("input_rows", "accepted", "quarantined", "duplicates")})
        summary["features"] = run(features_task, reads_lake_events, root,
                                  history_length, writes=(workspace.examples,))
        logger.info("examples: %s", summary["features"]["rows"])
        encoder_uri = None
        if pretrain_method:
            summary["pretrain"] = run(pretrain_task, reads_examples, root, pretrain_method,
                                      pretrain_steps, seed,
                                      writes=(workspace.lake / EMBEDDINGS_DIR,))
            encoder_uri = summary["pretrain"]["model_uri"]
            logger.info("pretrained %s: %s", pretrain_method, summary["pretrain"]["registered"])
        truth = Path(input_path) / "ground_truth.parquet"  # simulator logs: oracle metrics
        trained = run(train_ranker_task, reads_examples, root, arch, epochs, seed,
                      encoder_uri if ranker_user_encoder else None,
                      str(truth) if truth.is_file() else None)
        summary["train_ranker"] = trained
        summary["register"] = run(register_task, reads_nothing, root, trained["model_uri"],
                                  trained["run_id"])
        create_markdown_artifact(
            key="nightly-ranker", markdown=metrics_markdown(summary), description="Nightly ranker"
        )
        summary["ab"] = run(ab_task, reads_nothing, root, summary["register"]["name"],
                            summary["register"]["version"])
        logger.info("offline A/B: %s", summary["ab"]["message"])
        create_markdown_artifact(
            key="nightly-ab", markdown=summary["ab"]["markdown"],
            description="Offline A/B of the ranker challenger vs champion, and the decision",
        )
        if allocator_algo and (Path(input_path) / "allocations.parquet").is_file():
            allocator = run(train_allocator_task, reads_input_path, root,
                            allocator_algo, input_path, seed, allocator_steps,
                            allocator_eval_users)
            summary["train_allocator"] = allocator
            if allocator["registered"] is not None:
                summary["allocator_ab"] = run(
                    ab_task.with_options(name="offline-ab-allocator"), reads_nothing, root,
                    "recpipe-allocator", allocator["registered"]["version"],
                    allocator_eval_users)
                logger.info("allocator offline A/B: %s", summary["allocator_ab"]["message"])
                create_markdown_artifact(
                    key="nightly-allocator-ab", markdown=summary["allocator_ab"]["markdown"],
                    description="Offline A/B of the allocator challenger vs champion")
            else:
                logger.warning("allocator not registered: %s",
                               allocator.get("registration_skipped"))
        reused = [name for name, state in states.items() if state == "Cached"]
        if reused:
            logger.info("reused from the task cache (inputs unchanged): %s", ", ".join(reused))
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
