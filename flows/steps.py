"""Plain step functions: one per nightly stage, composing the packages. No Prefect here,
so each is tested directly; ``flows.nightly`` wraps them as tasks and the CLI calls them.

Steps take and return paths, URIs and JSON-able summaries, never DataFrames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from features.build import FeatureConfig, build_examples
from features.schema import TaskSpec
from flows.workspace import Workspace

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from flows.partitions import PartitionRunner
    from models.distributed import Rank, ShardingConfig

RANKER_EXPERIMENT = "recpipe-rankers"


@dataclass(frozen=True)
class SimulateParams:
    """The simulator knobs the CLI and the nightly flow expose."""

    users: int = 2000
    """Simulated users."""
    days: int = 7
    """Simulated days (the last one is the test split, the one before it valid)."""
    seed: int = 0
    """World and behaviour seed."""


def simulate_step(out_dir: Path, params: SimulateParams) -> dict:
    """Simulate ``params`` and write the simulator export to ``out_dir`` (a previous simulator
    output there is replaced; any other non-empty folder is refused: FileExistsError)."""
    from simulation.config import SimulatorConfig
    from simulation.export import write_simulation
    from simulation.simulator import simulate

    config = replace(SimulatorConfig(), n_users=params.users, days=params.days, seed=params.seed)
    with tqdm(total=config.days, desc=f"simulate {config.n_users:,} users", unit="day",
              leave=False, disable=None) as bar:  # None: shown on a terminal only
        result = simulate(config, on_day=lambda _: bar.update())
    written = write_simulation(result, out_dir, overwrite=True)
    return {"out_dir": str(out_dir), **written, "summary": result.summary()}


def ingest_step(source: str, input_path: Path, workspace: Workspace,
                runner: PartitionRunner | None = None) -> dict:
    """Ingest ``input_path`` into the workspace lake; returns the IngestReport as a dict.
    ``runner``: merge the date partitions as Prefect mapped tasks there (None: in turn, here).
    """
    from features.ingest import ingest

    workspace.create()
    report = ingest(source, input_path, workspace.lake, workspace.quarantine,
                    merge_all=runner.merge_all if runner else None)
    return report.to_dict()


def features_step(workspace: Workspace, config: FeatureConfig | None = None) -> dict:
    """Build train/valid/test examples from the whole lake into ``workspace.examples``."""
    return build_examples(workspace.lake, workspace.examples, config or FeatureConfig()).to_dict()


@dataclass(frozen=True)
class RankerJob:
    """What ``train_ranker_step`` trains; every field is logged as an MLflow param."""

    ranker: dict = field(default_factory=dict)
    """RankerConfig fields (arch, n_experts, …) overriding the defaults."""
    train: dict = field(default_factory=dict)
    """TrainConfig fields (epochs, batch_size, loss_weighting, …) overriding the defaults."""
    tasks: tuple[dict, ...] = ()
    """Tasks to train, as TaskSpec fields ``{"name", "kind", "label"}`` (kind "binary" or
    "regression", label a contract label column of the examples); empty = the tasks the
    examples were built with."""
    ground_truth: str | None = None
    """Simulator output folder (or its ``ground_truth.parquet``) the examples came from: adds
    the oracle metrics. The caller that simulated the logs knows it; nothing is guessed."""
    ground_truth_optional: bool = False
    """True: a ground truth that does not match the examples (another world's, or one whose
    events disagree with them) skips the oracle metrics with a warning instead of
    failing (the nightly, which passes the logs it simulated)."""
    user_encoder: str | None = None
    """Model URI of a pretrained user encoder (e.g. ``models:/recpipe-user-encoder@champion``)
    plugged into the ranker's user-encoder slot; None: no pretrained encoder."""
    fine_tune_user_encoder: bool = False
    """Train the pretrained encoder with the ranker (default: frozen)."""


def train_ranker_step(workspace: Workspace, job: RankerJob = RankerJob(),
                      rank: Rank | None = None, sharding: ShardingConfig | None = None) -> dict:
    """Train a ranker on the workspace examples, evaluate it on valid and test, and log to
    MLflow: params, per-epoch losses / task weights / valid metrics, the final metrics, the
    diagnostics (expert zero activations, gate weights per task, per-task gradient norms at
    the shared layers; with ``job.ground_truth`` the oracle AUC of the true probabilities and
    the ratio (AUC - 0.5) / (oracle AUC - 0.5)), their plots, and the model. Returns run id,
    model URI, ``metrics`` ``{split: {task: {auc, gauc, logloss, ece, …}}}`` and a diagnostics
    summary. Registers nothing.

    Distributed (``rank`` given: every ``torchrun`` rank calls this, see
    ``models.distributed``): each rank reads its own shard of ``train.parquet`` and trains the
    ``DistributedModelParallel`` ranker (tables sharded per ``sharding``); global rank 0 alone
    reads valid/test, evaluates the gathered, unsharded model, logs the MLflow run and the
    model, and returns the summary (with a ``distributed`` entry); the other ranks return {}.

    The ground truth is checked before training: every example it covers must carry the
    same user and item as the simulator's own ``events.parquet``, else ValueError.
    """
    import copy
    from contextlib import nullcontext

    import mlflow
    import polars as pl
    import torch

    from evaluation.metrics import task_metrics
    from features.build import load_schema
    from features.vocab import Vocabulary
    from flows.lineage import start_run
    from models.batch import ExampleArrays
    from models.distributed import (
        ShardingConfig,
        full_state_dict,
        global_label_means,
        per_rank_batch,
        read_shard,
        shard_ranker,
    )
    from models.losses import MultiTaskLoss, task_predictions
    from models.rankers import RankerConfig, build_ranker, init_output_bias
    from models.registry import LoadedRanker, ensure_experiment, log_ranker
    from models.training import TrainConfig, fit, predict_outputs

    main = rank is None or rank.is_main
    examples = workspace.examples
    base_schema = load_schema(examples)
    tasks = resolve_tasks(job.tasks, base_schema.tasks)
    schema = replace(base_schema, tasks=tasks)
    ranker_config = RankerConfig.from_dict({**RankerConfig().to_dict(), **job.ranker})
    train_config = TrainConfig(**job.train)

    def read(name: str) -> pl.DataFrame:
        path = examples / f"{name}.parquet"
        frame = (read_shard(path, rank.rank, rank.world_size)
                 if rank is not None and name == "train" else pl.read_parquet(path))
        return with_task_targets(frame, tasks, base_schema.tasks)

    frames = {name: read(name) for name in (("train", "valid", "test") if main else ("train",))}
    splits = {name: ExampleArrays.from_frame(frame, schema) for name, frame in frames.items()}
    truth = None
    if job.ground_truth and main:
        try:
            truth = {split: load_ground_truth(Path(job.ground_truth), frames[split])
                     for split in ("valid", "test")}
        except ValueError as error:
            if not job.ground_truth_optional:
                raise
            log.warning("oracle metrics skipped: %s", error)
    vocab = Vocabulary.load(examples / "vocab.json")
    torch.manual_seed(train_config.seed)
    adapter = None
    if job.user_encoder:
        from mlflow.exceptions import MlflowException

        from models.user_encoder_registry import load_pretrained_user_encoder

        try:
            adapter = load_pretrained_user_encoder(job.user_encoder, vocab,
                                                   freeze=not job.fine_tune_user_encoder)
        except MlflowException as error:
            raise ValueError(f"user encoder {job.user_encoder}: cannot load it: "
                             f"{error.message.splitlines()[0]}") from error
    model = build_ranker(schema, ranker_config, user_encoder=adapter)
    init_output_bias(model, torch.from_numpy(splits["train"].labels) if rank is None
                     else global_label_means(splits["train"].labels, rank))
    loss_fn = MultiTaskLoss(tasks, train_config.task_weights, train_config.loss_weighting)
    task_names = [task.name for task in tasks]
    predictions: dict[str, np.ndarray] = {}
    trained, plan = model, None  # what fit() trains: the model itself, or its sharded twin
    if rank is not None:
        sharding = sharding or ShardingConfig()
        model = copy.deepcopy(model)  # plain twin: rank 0 evaluates and logs it
        trained, plan = shard_ranker(trained, rank, sharding, train_config.embedding_optimizer,
                                     train_config.learning_rate, train_config.weight_decay)
        loss_fn.to(rank.device)

    def gather_model() -> None:
        """Distributed: load the sharded model's full state into the plain twin on rank 0."""
        if rank is not None:
            state = full_state_dict(trained, rank)
            if main:
                model.load_state_dict(state)

    def evaluate(split: str) -> dict[str, dict[str, float]]:
        data = splits[split]
        outputs = torch.from_numpy(predict_outputs(model, data))
        predictions[split] = task_predictions(outputs, tasks).numpy()
        return task_metrics(predictions[split], data.labels, data.user_ids, tasks)

    def log_epoch(epoch: int, losses: dict[str, float]) -> None:
        gather_model()  # every rank (a collective); the last epoch leaves the twin current
        if main:
            mlflow.log_metrics({f"train_{k}": v for k, v in losses.items()}, step=epoch)
            mlflow.log_metrics(flatten_metrics("valid", evaluate("valid")), step=epoch)

    rows = {k: len(v) for k, v in splits.items()}
    if rank is not None:
        rows["train"] *= rank.world_size  # every rank holds the same number of rows
        distributed = {**rank.to_dict(),
                       "per_rank_batch": per_rank_batch(train_config.batch_size, rank.world_size),
                       "sharding": sharding.to_dict(), "plan": plan}
    if main:
        mlflow.set_tracking_uri(workspace.tracking_uri)
        experiment_id = ensure_experiment(RANKER_EXPERIMENT, workspace.artifacts)
    run_context = (start_run(experiment_id, ranker_config.arch, examples)
                   if main else nullcontext())
    with run_context as run:
        if main:
            mlflow.log_params(flatten_params({"ranker": ranker_config.to_dict(),
                                              "train": train_config.to_dict()}))
            mlflow.log_params({f"rows_{k}": v for k, v in rows.items()})
            mlflow.log_params({"tasks": ",".join(f"{t.name}:{t.kind}" for t in tasks),
                               "ground_truth": job.ground_truth or "none",
                               "user_encoder": job.user_encoder or "none",
                               "user_encoder_fine_tuned": job.fine_tune_user_encoder,
                               "n_parameters": sum(p.numel() for p in model.parameters()),
                               "world_size": 1 if rank is None else rank.world_size})
            mlflow.log_dict(json_file(examples / "schema.json"), "examples_schema.json")
            if rank is not None:
                mlflow.log_params({"distributed.backend": rank.backend,
                                   "distributed.per_rank_batch": distributed["per_rank_batch"],
                                   "distributed.sharding_types":
                                       ",".join(sharding.sharding_types)})
                mlflow.log_params({f"distributed.plan.{table}": spec["sharding_type"]
                                   for table, spec in plan.items()})
                mlflow.log_dict(distributed, "distributed.json")
        fit(trained, loss_fn, splits["train"], train_config, task_names, log_epoch, rank=rank)
        if not main:
            return {}
        metrics = {split: evaluate(split) for split in ("valid", "test")}
        if truth is not None:
            for split, (rows_covered, p_true, coverage) in truth.items():
                add_oracle_metrics(metrics[split], splits[split], predictions[split],
                                   rows_covered, p_true, tasks)
                mlflow.log_metric(f"{split}_oracle_coverage", coverage)
        for split, values in metrics.items():
            mlflow.log_metrics(flatten_metrics(split, values))
        loss_fn.cpu()
        diagnostics = log_diagnostics(model, loss_fn, splits, predictions["test"], metrics,
                                      tasks)
        ranker = LoadedRanker(model, ranker_config, schema, vocab,
                              adapter.spec() if adapter is not None else None)
        model_uri = log_ranker(ranker, pl.read_parquet(examples / "test.parquet", n_rows=5))
    summary = {
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "model_uri": model_uri,
        "arch": ranker_config.arch,
        "user_encoder": job.user_encoder,
        "metrics": metrics,
        "diagnostics": diagnostics,
    }
    if rank is not None:
        summary["distributed"] = distributed
    return summary


def resolve_tasks(requested: tuple[dict, ...], built: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
    """``requested`` as TaskSpecs (the examples' own tasks when empty); ValueError for a bad
    kind or a duplicate name."""
    if not requested:
        return built
    try:
        tasks = tuple(TaskSpec(**spec) for spec in requested)
    except TypeError as error:
        raise ValueError(f"a task is {{'name', 'kind', 'label'}}: {error}") from error
    for task in tasks:
        if task.kind not in ("binary", "regression"):
            raise ValueError(f"task {task.name!r}: kind must be 'binary' or 'regression', "
                             f"got {task.kind!r}")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    return tasks


def with_task_targets(frame, tasks: tuple[TaskSpec, ...], built: tuple[TaskSpec, ...]):
    """The example frame with a ``label_<task>`` target for every task the examples were not
    built with, derived from its contract label column by the feature code's ``task_targets``
    (so binary/regression targets mean the same everywhere). ValueError for a missing label."""
    from features.build import task_targets

    new = tuple(task for task in tasks if task not in built)
    missing = sorted({task.label for task in new} - set(frame.columns))
    if missing:
        raise ValueError(f"task label column(s) {missing} are not in the examples; "
                         f"contract labels present: {sorted(set(frame.columns))}")
    return frame.with_columns(task_targets(new)) if new else frame


def load_ground_truth(path: Path, frame) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The simulator's true probabilities for the examples of one split.

    ``path``: a simulator output folder or its ``ground_truth.parquet``. Returns (rows of the
    split that the ground truth covers (M,), ``{"p_<label>": (M,) float}``, coverage M / N).
    Raises ValueError when the file is missing, covers none of the examples, or (where the
    simulator's ``events.parquet`` sits beside it) disagrees with the examples on the user or
    item of an event (ids are each world's own, but a copied or edited output keeps them).
    """
    import polars as pl

    folder = path if path.is_dir() else path.parent
    truth_file = path / "ground_truth.parquet" if path.is_dir() else path
    if not truth_file.exists():
        raise ValueError(f"no ground truth at {truth_file}")
    ids = frame.select(pl.col("event_id"), pl.col("user_id"), pl.col("item_id"),
                       pl.int_range(pl.len()).alias("_row"))
    joined = ids.join(pl.read_parquet(truth_file), on="event_id", how="inner")
    if joined.height == 0:
        raise ValueError(f"{truth_file} covers none of the {frame.height} examples; "
                         "is it the simulation these examples were built from?")
    events_file = folder / "events.parquet"
    if events_file.exists():
        events = pl.read_parquet(events_file, columns=["event_id", "user_id", "item_id"])
        check = joined.select("event_id", "user_id", "item_id").join(
            events, on="event_id", how="left", suffix="_sim")
        bad = check.filter((pl.col("user_id") != pl.col("user_id_sim"))
                           | (pl.col("item_id") != pl.col("item_id_sim"))
                           | pl.col("user_id_sim").is_null())
        if bad.height:
            raise ValueError(f"{truth_file}: {bad.height} of {joined.height} matched events "
                             f"have another user or item in {events_file}; these examples "
                             "come from a different simulation")
    joined = joined.sort("_row")
    p_true = {name: joined.get_column(name).to_numpy().astype(np.float64)
              for name in joined.columns if name.startswith("p_")}
    return joined.get_column("_row").to_numpy(), p_true, joined.height / frame.height


def add_oracle_metrics(values: dict, data, predictions: np.ndarray, rows: np.ndarray,
                       p_true: dict[str, np.ndarray], tasks: tuple[TaskSpec, ...]) -> None:
    """Add, per binary task with a true probability ``p_<label>``: ``oracle_auc`` /
    ``oracle_gauc`` / ``oracle_logloss`` (of the true probabilities) and ``auc_oracle_ratio``
    / ``gauc_oracle_ratio`` = (model − 0.5) / (oracle − 0.5), all over the covered rows whose
    label is observed (the model's AUC there equals its AUC when coverage is 1)."""
    from evaluation.metrics import auc, gauc, logloss

    for k, task in enumerate(tasks):
        column = f"p_{task.label}"
        if task.kind != "binary" or column not in p_true:
            continue
        y = data.labels[rows, k]
        keep = ~np.isnan(y) & ~np.isnan(p_true[column])
        y, truth, users = y[keep], p_true[column][keep], data.user_ids[rows][keep]
        model = predictions[rows, k][keep]
        oracle = {"oracle_auc": auc(y, truth), "oracle_gauc": gauc(y, truth, users),
                  "oracle_logloss": logloss(y, truth) if len(y) else float("nan")}
        oracle["auc_oracle_ratio"] = (auc(y, model) - 0.5) / (oracle["oracle_auc"] - 0.5)
        oracle["gauc_oracle_ratio"] = (gauc(y, model, users) - 0.5) / (
            oracle["oracle_gauc"] - 0.5)
        values[task.name].update(oracle)


def log_diagnostics(model, loss_fn, splits: dict, test_predictions: np.ndarray,
                    metrics: dict, tasks: tuple[TaskSpec, ...]) -> dict:
    """Measure ``models.diagnostics`` on the trained model and log metrics (``diag/…``),
    plots (``plots/*.png``) and ``diagnostics.json`` into the active run; returns a summary."""
    import matplotlib.pyplot as plt
    import mlflow

    from evaluation import plots
    from models import diagnostics

    names = [task.name for task in tasks]
    test = splits["test"]
    activity = diagnostics.expert_activity(model, test)
    gates = diagnostics.gate_usage(model, test, names)
    gradients = diagnostics.task_gradients(model, loss_fn, splits["train"], names)
    logged: dict[str, float] = {}
    for name, zero, dead in zip(activity.names, activity.zero_fraction,
                                activity.dead_unit_fraction, strict=True):
        logged[f"diag/expert_zero_fraction/{name}"] = float(zero)
        logged[f"diag/expert_dead_units/{name}"] = float(dead)
    if gates is not None:
        for task, row in zip(gates.tasks, gates.weights, strict=True):
            for expert, weight in zip(gates.experts, row, strict=True):
                if weight > 0:
                    logged[f"diag/gate/{task}/{expert}"] = float(weight)
    for k, task in enumerate(gradients.tasks):
        for j, group in enumerate(gradients.groups):
            logged[f"diag/grad_norm/{task}/{group}"] = float(gradients.norms[k, j])
        for j in range(k + 1, len(gradients.tasks)):
            logged[f"diag/grad_cosine/{task}/{gradients.tasks[j]}"] = float(
                gradients.cosine[k, j])
    worst = float(activity.zero_fraction.max()) if len(activity.names) else 0.0
    logged["diag/max_expert_zero_fraction"] = worst
    mlflow.log_metrics(logged)

    binary = [k for k, task in enumerate(tasks) if task.kind == "binary"]
    curves, ece = {}, {}
    for k in binary:
        observed = ~np.isnan(test.labels[:, k])
        curves[names[k]] = (test.labels[observed, k], test_predictions[observed, k])
        ece[names[k]] = metrics["test"][names[k]]["ece"]
    figures = {
        "plots/reliability_test.png": plots.reliability_figure(curves, ece),
        "plots/expert_activity.png": plots.expert_activity_figure(
            activity.names, activity.zero_fraction, activity.mean, activity.std),
        "plots/task_gradients.png": plots.gradient_figure(
            gradients.tasks, gradients.groups, gradients.norms, gradients.cosine),
    }
    if gates is not None:
        figures["plots/gate_weights.png"] = plots.gate_heatmap(gates.weights, gates.tasks,
                                                               gates.experts)
    test_metrics = metrics["test"]
    oracle = {t: v["oracle_auc"] for t, v in test_metrics.items() if "oracle_auc" in v}
    if oracle:
        figures["plots/auc_vs_oracle_test.png"] = plots.oracle_figure(
            {t: test_metrics[t]["auc"] for t in oracle}, oracle)
    for artifact, figure in figures.items():
        mlflow.log_figure(figure, artifact)
        plt.close(figure)
    mlflow.log_dict({"experts": activity.to_dict(),
                     "gates": gates.to_dict() if gates is not None else None,
                     "gradients": gradients.to_dict()}, "diagnostics.json")
    return {
        "max_expert_zero_fraction": worst,
        "collapsed_experts": [name for name, z in zip(activity.names, activity.zero_fraction,
                                                      strict=True) if z > 0.9],
        "plots": sorted(figures),
    }


def register_step(workspace: Workspace, model_uri: str, run_id: str) -> dict:
    """Register a logged ranker as ``recpipe-ranker`` (alias challenger; champion if none)."""
    import mlflow

    from models.registry import RANKER_MODEL_NAME, register

    mlflow.set_tracking_uri(workspace.tracking_uri)
    return register(model_uri, RANKER_MODEL_NAME, {"run_id": run_id})


def flatten_params(nested: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def flatten_metrics(split: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {auc: x}} → {"<split>_<task>_auc": x}, dropping NaNs (MLflow rejects none,
    but a NaN AUC for an unobserved task is noise in the UI)."""
    return {
        f"{split}_{task}_{name}": value
        for task, values in metrics.items()
        for name, value in values.items()
        if value == value
    }


def json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text())

