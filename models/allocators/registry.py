"""MLflow glue for allocation policies: log as a pyfunc from code, load back.

The pyfunc's artifacts are the saved policy directory (config, featurizer, weights);
``predict`` takes allocation-state rows (the ``STATE_FIELDS`` columns of
``allocations.parquet``) and returns ``p_insert`` (float) and ``decision`` (1 when
p_insert >= 0.5). Registration reuses ``models.registry.register`` (alias challenger; also
champion when the model has none).
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.models import infer_signature

from models.allocators.data import STATE_FIELDS
from models.allocators.policy import TrainedPolicy, load_policy
from models.registry import load_pyfunc, runtime_requirements

ALLOCATOR_MODEL_NAME = "recpipe-allocator"
PYFUNC_PARAMS = {"id_features": True}
"""Inference params: ``id_features=False`` scores every user and author as unseen."""


def predict_rows(policy: TrainedPolicy, rows: Any, id_features: bool = True) -> pd.DataFrame:
    """``p_insert`` and ``decision`` per state row (pandas or Polars)."""
    p = np.asarray(policy.with_id_features(id_features)(rows), dtype=np.float64)
    return pd.DataFrame({"p_insert": p, "decision": (p >= 0.5).astype(np.int64)})


class AllocatorPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: allocation-state rows in, p_insert / decision out."""

    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's PythonModelContext)
        self.policy = load_policy(Path(context.artifacts["allocator"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        id_features = bool((params or {}).get("id_features", True))
        return predict_rows(self.policy, model_input, id_features)


def allocator_requirements(algo: str) -> list[str]:
    """Exact pins of what a logged allocator needs (d3rlpy only for its baselines)."""
    extra = ["tqdm", "pandas"] + (["d3rlpy"] if algo in ("dqn", "cql", "bcq") else [])
    return runtime_requirements() + [f"{name}=={version(name)}" for name in extra]


def log_allocator(policy: TrainedPolicy, example_rows: pl.DataFrame) -> str:
    """Log ``policy`` into the active run as ``allocator`` with a few state rows as input
    example and an explicit signature (with the ``id_features`` param); returns the URI."""
    example = example_rows.select(STATE_FIELDS).to_pandas()
    signature = infer_signature(example, predict_rows(policy, example), params=PYFUNC_PARAMS)
    with tempfile.TemporaryDirectory() as tmp:
        policy.save(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="allocator",
            python_model=str(Path(__file__).with_name("pyfunc_allocator.py")),
            artifacts={"allocator": tmp},
            pip_requirements=allocator_requirements(policy.algo),
            signature=signature,
            input_example=example,
        )
    return info.model_uri


def load_allocator(model_uri: str) -> TrainedPolicy:
    """The policy behind ``models:/recpipe-allocator@champion`` (or any model URI)."""
    return load_pyfunc(model_uri).unwrap_python_model().policy
