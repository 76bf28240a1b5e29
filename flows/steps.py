"""Plain step functions: one per nightly stage, composing the packages. No Prefect here,
so each is tested directly; ``flows.nightly`` wraps them as tasks and the CLI calls them.

Steps take and return paths, URIs and JSON-able summaries, never DataFrames.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from features.build import FeatureConfig, build_examples
from flows.workspace import Workspace

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
    """Simulate ``params`` and write the simulator export to ``out_dir`` (replaced)."""
    from simulation.config import SimulatorConfig
    from simulation.export import write_simulation
    from simulation.simulator import simulate

    config = replace(SimulatorConfig(), n_users=params.users, days=params.days, seed=params.seed)
    result = simulate(config)
    written = write_simulation(result, out_dir, overwrite=True)
    return {"out_dir": str(out_dir), **written, "summary": result.summary()}


def ingest_step(source: str, input_path: Path, workspace: Workspace) -> dict:
    """Ingest ``input_path`` into the workspace lake; returns the IngestReport as a dict."""
    from features.ingest import ingest

    workspace.create()
    report = ingest(source, input_path, workspace.lake, workspace.quarantine)
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
    """TrainConfig fields (epochs, batch_size, …) overriding the defaults."""


def train_ranker_step(workspace: Workspace, job: RankerJob = RankerJob()) -> dict:
    """Train a ranker on the workspace examples, evaluate it on valid and test, log params,
    per-epoch losses and metrics, and the model to MLflow. Returns run id, model URI and the
    metrics ``{split: {task: {auc, gauc, logloss, ...}}}``. Registers nothing."""
    import mlflow
    import polars as pl
    import torch

    from evaluation.metrics import task_metrics
    from features.build import load_schema
    from features.vocab import Vocabulary
    from models.batch import ExampleArrays
    from models.losses import MultiTaskLoss, task_predictions
    from models.rankers import RankerConfig, build_ranker, init_output_bias
    from models.registry import LoadedRanker, ensure_experiment, log_ranker
    from models.training import TrainConfig, fit, predict_outputs

    examples = workspace.examples
    schema = load_schema(examples)
    ranker_config = RankerConfig.from_dict({**RankerConfig().to_dict(), **job.ranker})
    train_config = TrainConfig(**job.train)
    splits = {name: ExampleArrays.from_parquet(examples / f"{name}.parquet", schema)
              for name in ("train", "valid", "test")}
    torch.manual_seed(train_config.seed)
    model = build_ranker(schema, ranker_config)
    init_output_bias(model, torch.from_numpy(splits["train"].labels))
    loss_fn = MultiTaskLoss(schema.tasks, train_config.task_weights)
    task_names = [task.name for task in schema.tasks]

    def evaluate(split: str) -> dict[str, dict[str, float]]:
        data = splits[split]
        outputs = torch.from_numpy(predict_outputs(model, data))
        predictions = task_predictions(outputs, schema.tasks).numpy()
        return task_metrics(predictions, data.labels, data.user_ids, schema.tasks)

    def log_epoch(epoch: int, losses: dict[str, float]) -> None:
        mlflow.log_metrics({f"train_{k}": v for k, v in losses.items()}, step=epoch)
        mlflow.log_metrics(flatten_metrics("valid", evaluate("valid")), step=epoch)

    mlflow.set_tracking_uri(workspace.tracking_uri)
    experiment_id = ensure_experiment(RANKER_EXPERIMENT, workspace.artifacts)
    with mlflow.start_run(experiment_id=experiment_id, run_name=ranker_config.arch) as run:
        mlflow.log_params(flatten_params({"ranker": ranker_config.to_dict(),
                                          "train": train_config.to_dict()}))
        mlflow.log_params({f"rows_{k}": len(v) for k, v in splits.items()})
        mlflow.log_dict(json_file(examples / "schema.json"), "examples_schema.json")
        fit(model, loss_fn, splits["train"], train_config, task_names, log_epoch)
        metrics = {split: evaluate(split) for split in ("valid", "test")}
        for split, values in metrics.items():
            mlflow.log_metrics(flatten_metrics(split, values))
        vocab = Vocabulary.load(examples / "vocab.json")
        ranker = LoadedRanker(model, ranker_config, schema, vocab)
        model_uri = log_ranker(ranker, pl.read_parquet(examples / "test.parquet", n_rows=5))
    return {
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "model_uri": model_uri,
        "arch": ranker_config.arch,
        "metrics": metrics,
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

