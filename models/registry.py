"""The MLflow adapter: log a model with everything needed to rebuild it, register, alias.

A ranker is logged as an ``mlflow.pyfunc`` model whose artifacts are its state dict, its
``RankerConfig``, the ``ExampleSchema`` and the ``Vocabulary``; ``predict`` takes raw rows
(``features.schema.RAW_INPUT_COLUMNS``) and encodes them with the same ``features.encode``
code as training, so ``models:/recpipe-ranker@champion`` needs nothing else.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import AnyType, ColSpec, Schema
from torch import nn

from features.encode import encode_examples
from features.raw_rows import normalize_rows
from features.schema import RAW_INPUT_COLUMNS, ExampleSchema
from features.vocab import Vocabulary
from models.batch import ExampleArrays
from models.losses import task_predictions
from models.rankers import RankerConfig, build_ranker
from models.training import predict_outputs

RANKER_MODEL_NAME = "recpipe-ranker"
CHALLENGER = "challenger"
CHAMPION = "champion"
T = TypeVar("T")
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow error codes that mean "no such model, version or alias" (any other error, e.g. a
registry that is briefly unreachable, is raised: it must not read as "no champion yet")."""
RUNTIME_PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "polars", "pyarrow", "mlflow", "numpy")


def ensure_experiment(name: str, artifact_root: Path) -> str:
    """Create (or reuse) an experiment whose artifacts live under ``artifact_root``; on a
    tracking server (an http(s) URI) the server chooses and serves the artifact location."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    on_server = mlflow.get_tracking_uri().startswith(("http://", "https://"))
    location = None if on_server else (artifact_root / name).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def runtime_requirements() -> list[str]:
    """Exact pins of what a logged model needs (skips MLflow's slow inference)."""
    return [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]


@dataclass
class LoadedRanker:
    """A ranker rebuilt from its artifacts, ready to score. A ranker with a pretrained user
    encoder carries the adapter's ``spec()`` (``user_encoder.json``); the encoder's weights
    and item translation table are in the ranker's own state dict."""

    model: nn.Module
    config: RankerConfig
    schema: ExampleSchema
    vocab: Vocabulary
    user_encoder_spec: dict | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> LoadedRanker:
        from models.user_encoders.adapter import PretrainedUserEncoder

        config = RankerConfig.from_dict(json.loads((directory / "ranker_config.json").read_text()))
        schema = ExampleSchema.from_dict(json.loads((directory / "schema.json").read_text()))
        spec_file = directory / "user_encoder.json"
        spec = json.loads(spec_file.read_text()) if spec_file.exists() else None
        user_encoder = PretrainedUserEncoder.from_spec(spec) if spec else None
        model = build_ranker(schema, config, user_encoder=user_encoder)
        state = torch.load(directory / "state_dict.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return cls(model, config, schema, Vocabulary.load(directory / "vocab.json"), spec)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "state_dict.pt")
        (directory / "ranker_config.json").write_text(json.dumps(self.config.to_dict()))
        (directory / "schema.json").write_text(json.dumps(self.schema.to_dict()))
        self.vocab.save(directory / "vocab.json")
        if self.user_encoder_spec is not None:
            (directory / "user_encoder.json").write_text(json.dumps(self.user_encoder_spec))

    def score_encoded(self, examples: pl.DataFrame) -> np.ndarray:
        """Predictions (N, K) for already encoded example rows (probabilities / seconds)."""
        arrays = ExampleArrays.from_frame(examples, self.schema)
        outputs = torch.from_numpy(predict_outputs(self.model, arrays))
        return task_predictions(outputs, self.schema.tasks).numpy()

    def score_raw(self, rows: pl.DataFrame) -> np.ndarray:
        """Predictions (N, K) for raw rows (``features.schema.RAW_INPUT_COLUMNS``)."""
        return self.score_encoded(encode_examples(rows, self.vocab, self.schema))


class RankerPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: raw rows in, one column of predictions per task out."""

    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's PythonModelContext)
        self.ranker = LoadedRanker.from_dir(Path(context.artifacts["ranker"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        predictions = self.ranker.score_raw(raw_rows_from_pandas(model_input))
        return pd.DataFrame(predictions, columns=[t.name for t in self.ranker.schema.tasks])


def raw_rows_from_pandas(frame: pd.DataFrame) -> pl.DataFrame:
    """Pandas rows (MLflow's pyfunc input) → raw Polars rows, checked and cast exactly as
    ``recpipe score`` reads a file (``features.raw_rows.normalize_rows``: naive ``ts`` is
    UTC, optional columns default, nulls allowed where a request allows them).

    Raises:
        RowsError: naming the column and the first bad row.
    """
    return normalize_rows(pl.from_pandas(frame), "pyfunc input").select(RAW_INPUT_COLUMNS)


def ranker_signature(schema: ExampleSchema) -> ModelSignature:
    """The pyfunc's signature: the required raw columns typed, the optional ones ``any``
    (present or not, with nulls or not: ``normalize_rows`` checks and casts them, since
    MLflow's own enforcement refuses a null id or a whole-number ``duration_s``); one float
    output per task."""
    typed = {"user_id": DataType.long, "item_id": DataType.long, "ts": DataType.datetime}
    inputs = [ColSpec(typed[name], name) if name in typed
              else ColSpec(AnyType(), name, required=False) for name in RAW_INPUT_COLUMNS]
    outputs = [ColSpec(DataType.float, task.name) for task in schema.tasks]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pandas_input_example(raw: pl.DataFrame) -> pd.DataFrame:
    """Raw rows as the pyfunc input example, with ``ts`` as naive UTC (MLflow signatures
    accept only naive datetimes)."""
    return raw.select(RAW_INPUT_COLUMNS).with_columns(
        # whole seconds: MLflow's serving-example check parses ISO strings without fractions
        pl.col("ts").dt.convert_time_zone("UTC").dt.replace_time_zone(None).dt.truncate("1s"),
    ).to_pandas()


def log_ranker(ranker: LoadedRanker, example_rows: pl.DataFrame) -> str:
    """Log ``ranker`` into the active run as ``ranker``, with a few raw ``example_rows`` as
    input example and ``ranker_signature``; returns the model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        ranker.save(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(Path(__file__).with_name("pyfunc_ranker.py")),
            artifacts={"ranker": tmp},
            pip_requirements=runtime_requirements(),
            signature=ranker_signature(ranker.schema),
            input_example=pandas_input_example(example_rows),
        )
    return info.model_uri


def register(model_uri: str, name: str, run_tags: dict[str, str] | None = None) -> dict:
    """Register ``model_uri`` as a new version of ``name``; alias it ``challenger``, and also
    ``champion`` when the model has no champion yet. Returns version and aliases.

    Idempotent: a ``model_uri`` already registered under ``name`` (a resumed run registering
    again) keeps its version; only the aliases are set again."""
    client = MlflowClient()
    existing = [v for v in client.search_model_versions(f"name='{name}'")
                if v.source == model_uri]
    registered = existing[0] if existing else mlflow.register_model(model_uri, name,
                                                                    tags=run_tags)
    client.set_registered_model_alias(name, CHALLENGER, registered.version)
    aliases = [CHALLENGER]
    if alias_version(name, CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, registered.version)
        aliases.append(CHAMPION)
    return {"name": name, "version": int(registered.version), "aliases": aliases}


def alias_version(name: str, alias: str, client: MlflowClient | None = None) -> int | None:
    """The version number behind ``name@alias``, or None if the alias does not exist
    (``client``: the default tracking store's when None)."""
    client = client or MlflowClient()
    return _version_or_none(lambda: client.get_model_version_by_alias(name, alias))


def registered_model_exists(name: str) -> bool:
    """Whether the registry holds a model ``name`` (an unreachable registry raises)."""
    return _missing_as_none(lambda: MlflowClient().get_registered_model(name)) is not None


def _version_or_none(fetch: Callable[[], ModelVersion]) -> int | None:
    """``fetch()``'s version number, or None when the model, version or alias is missing."""
    version = _missing_as_none(fetch)
    return None if version is None else int(version.version)


def _missing_as_none(fetch: Callable[[], T]) -> T | None:
    """``fetch()``, or None when MLflow says what it fetches does not exist; any other error
    (an unreachable registry) is raised, never read as "absent"."""
    try:
        return fetch()
    except MlflowException as error:
        if error.error_code in MISSING_CODES:
            return None
        raise


def load_pyfunc(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model`` through a download folder that is removed again: our
    pyfuncs hold everything in memory once loaded, and MLflow's own temporary folder would
    stay behind on every load from a tracking server (a poll retrying a broken version
    would fill the disk)."""
    with tempfile.TemporaryDirectory(prefix="recpipe-model-") as download:
        return mlflow.pyfunc.load_model(model_uri, dst_path=download)


def load_ranker(model_uri: str) -> LoadedRanker:
    """Rebuild a logged ranker from ``models:/name@alias`` (or any model URI)."""
    return load_pyfunc(model_uri).unwrap_python_model().ranker


PREVIOUS_CHAMPION = "previous-champion"
"""Alias of the champion that the last promotion replaced (one step of rollback)."""


def resolve_version(name: str, ref: str | int) -> int | None:
    """A version number from an alias (``champion``) or a version (``3``, ``v3``)."""
    text = str(ref).strip()
    digits = text[1:] if text[:1] in "vV" else text
    if digits.isdigit():
        return _version_or_none(lambda: MlflowClient().get_model_version(name, digits))
    return alias_version(name, text)


def promote(name: str, version: int, evaluation_run_id: str | None = None,
            reason: str = "") -> dict:
    """Make ``version`` the ``champion`` of ``name``. The replaced champion keeps its
    version (nothing is deleted), gets the alias ``previous-champion`` and the version tags
    ``retired_by_version`` / ``retired_by_run``; the new one gets ``promoted_by_run``,
    ``promoted_over`` and ``promotion_reason``. Returns the aliases' new versions."""
    client = MlflowClient()
    old = alias_version(name, CHAMPION)
    if old == version:
        return {"name": name, "champion": version, "previous_champion":
                alias_version(name, PREVIOUS_CHAMPION), "moved": False}
    run = evaluation_run_id or ""
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(old))
        client.set_model_version_tag(name, str(old), "retired_by_version", str(version))
        client.set_model_version_tag(name, str(old), "retired_by_run", run)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promoted_by_run", run)
    client.set_model_version_tag(name, str(version), "promoted_over",
                                 "" if old is None else str(old))
    if reason:
        client.set_model_version_tag(name, str(version), "promotion_reason", reason[:5000])
    return {"name": name, "champion": version, "previous_champion": old, "moved": True}


def rollback(name: str) -> dict:
    """Undo the last promotion: ``champion`` goes back to ``previous-champion``."""
    previous = alias_version(name, PREVIOUS_CHAMPION)
    if previous is None:
        raise ValueError(f"{name} has no {PREVIOUS_CHAMPION} to roll back to")
    current = alias_version(name, CHAMPION)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, str(previous))
    client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    if current is not None:
        client.set_model_version_tag(name, str(current), "rolled_back", "true")
    return {"name": name, "champion": previous, "rolled_back_from": current}


def record_evaluation(name: str, version: int, run_id: str, status: str) -> None:
    """Tag a challenger version with the outcome of its offline A/B."""
    client = MlflowClient()
    client.set_model_version_tag(name, str(version), "ab_run_id", run_id)
    client.set_model_version_tag(name, str(version), "ab_decision", status)
