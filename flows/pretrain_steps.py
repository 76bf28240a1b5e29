"""The pretraining stage as plain functions: ``pretrain_step`` (tested without Prefect;
``flows.nightly`` can wrap it as a task) and the CLI pieces ``add_pretrain_arguments`` /
``cmd_pretrain`` for ``recpipe pretrain``.

One run: read the training examples' histories, pretrain the user encoder with the chosen
method, log params / curves / diagnostics / plots and the model to MLflow (experiment
``recpipe-user-encoders``), register it as ``recpipe-user-encoder`` (alias challenger;
champion when there is none), and write the user-embedding table
``<lake>/user_embeddings/part-0.parquet`` atomically. Takes and returns paths and JSON-able
summaries.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from flows.workspace import Workspace

PRETRAIN_EXPERIMENT = "recpipe-user-encoders"
EMBEDDINGS_DIR = "user_embeddings"
EMBEDDINGS_FILE = "part-0.parquet"
USER_ATTRIBUTES: tuple[str, ...] = ("activity_group", "age_bucket", "gender")
"""Hidden simulator attributes the projection plot is coloured by (when known)."""
HISTORY_READ_COLUMNS: tuple[str, ...] = ("user_id", "ts", "hist_item_id_idx", "hist_behavior")
COLLAPSE_COSINE = 0.95
"""Mean cosine between users' vectors above which the run is flagged as (nearly) collapsed."""


class PretrainDataError(ValueError):
    """The workspace has nothing to pretrain on (no examples yet, histories too short)."""


def pretrain_step(
    workspace: Workspace,
    method: str = "adaptssr",
    overrides: dict | None = None,
    users_table: Path | None = None,
    register: bool = True,
) -> dict:
    """Pretrain, log, register and embed; see the module docstring.

    ``overrides``: ``PretrainConfig`` fields (nested sections as dicts, e.g.
    ``{"steps": 300, "encoder": {"embedding_dim": 64}}``). ``users_table``: a simulator
    ``users.parquet`` for the projection colours (default: the newest under
    ``<home>/raw``; none found → coloured by history length). Returns run id, model URI,
    registration, table path and the final diagnostics.
    """
    import mlflow
    import polars as pl

    from features.build import load_schema
    from features.vocab import Vocabulary
    from flows.steps import flatten_params
    from models.pretraining import PretrainConfig, UserSequences, embed, pretrain
    from models.registry import ensure_experiment
    from models.user_encoder_registry import (
        HISTORY_COLUMNS,
        LoadedUserEncoder,
        log_user_encoder,
        register_user_encoder,
    )

    examples = workspace.examples
    if not (examples / "train.parquet").exists():
        raise PretrainDataError(f"no examples in {examples}; run `recpipe features` first")
    schema = load_schema(examples)
    vocab = Vocabulary.load(examples / "vocab.json")
    config = PretrainConfig.from_dict({**(overrides or {}), "method": method}).for_schema(schema)
    columns = list(dict.fromkeys([*HISTORY_READ_COLUMNS, *HISTORY_COLUMNS]))
    train = pl.read_parquet(examples / "train.parquet", columns=columns)
    data = UserSequences.from_frame(train, schema.history_length, config.min_length)
    if len(data) == 0:
        raise PretrainDataError(
            f"{examples / 'train.parquet'}: no history has at least {config.min_length} "
            "behaviours; simulate or ingest more days")
    mlflow.set_tracking_uri(workspace.tracking_uri)
    experiment_id = ensure_experiment(PRETRAIN_EXPERIMENT, workspace.artifacts)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"pretrain-{method}") as run:
        mlflow.log_params(flatten_params(config.to_dict()))
        mlflow.log_params({"train_windows": len(data), "train_users": data.n_users})

        def log_step(step: int, record: dict[str, float]) -> None:
            mlflow.log_metrics({f"pretrain_{k}": v for k, v in record.items()}, step=step)

        result = pretrain(data, config, on_log=log_step)
        loaded = LoadedUserEncoder(result.encoder, config, schema, vocab)
        model_uri = log_user_encoder(loaded, train.filter(pl.col("hist_item_id").list.len() > 0))
        registered = register_user_encoder(model_uri, run.info.run_id) if register else None
        latest = UserSequences.from_frame(read_all_splits(examples), schema.history_length,
                                          latest_only=True)
        vectors = embed(result.encoder, latest)
        table = write_user_embeddings(
            workspace.lake / EMBEDDINGS_DIR / EMBEDDINGS_FILE, latest.user_ids, vectors,
            latest.lengths, method=method, run_id=run.info.run_id,
            model_version=registered["version"] if registered else None,
        )
        mlflow.log_param("embeddings_path", str(table))
        diagnostics = log_diagnostics(result.history, vectors, latest, method,
                                      users_table or find_users_table(workspace))
    final = result.history[-1] if result.history else {}
    warnings = []
    if diagnostics.get("mean_cosine", 0.0) > COLLAPSE_COSINE:
        warnings.append(
            f"user vectors are nearly collapsed (mean cosine between users "
            f"{diagnostics['mean_cosine']:.3f}); train longer (--steps) or use milder "
            "augmentation rates")
    return {
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "method": method,
        "model_uri": model_uri,
        "registered": registered,
        "embeddings_path": str(table),
        "users_embedded": len(latest),
        "train_windows": len(data),
        "steps": config.steps,
        "final": {k: v for k, v in final.items() if v == v},
        "embedding_stats": diagnostics,
        "warnings": warnings,
    }


def read_all_splits(examples: Path):  # noqa: ANN201 (polars DataFrame, imported lazily)
    """History columns of train, valid and test (for each user's most recent window)."""
    import polars as pl

    frames = [pl.read_parquet(examples / f"{split}.parquet", columns=list(HISTORY_READ_COLUMNS))
              for split in ("train", "valid", "test") if (examples / f"{split}.parquet").exists()]
    return pl.concat(frames)


def write_user_embeddings(path: Path, user_ids, vectors, lengths, method: str,  # noqa: ANN001
                          run_id: str, model_version: int | None) -> Path:
    """Write the table (user_id, embedding, history_length, method, model_version, run_id)
    to a temporary file beside ``path``, then rename it into place (never half-written)."""
    import polars as pl

    frame = pl.DataFrame({
        "user_id": pl.Series(user_ids, dtype=pl.Int64),
        "embedding": pl.Series([row.tolist() for row in vectors], dtype=pl.List(pl.Float32)),
        "history_length": pl.Series(lengths, dtype=pl.Int64),
    }).with_columns(
        pl.lit(method).alias("method"),
        pl.lit(model_version, dtype=pl.Int64).alias("model_version"),
        pl.lit(run_id).alias("run_id"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        frame.write_parquet(staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def find_users_table(workspace: Workspace) -> Path | None:
    """The newest simulator ``users.parquet`` under ``<home>/raw`` (None if there is none)."""
    candidates = sorted(workspace.raw.glob("*/users.parquet"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def log_diagnostics(history, vectors, latest, method: str,  # noqa: ANN001
                    users_table: Path | None) -> dict[str, float]:
    """Training curves, embedding statistics and the PCA projection → the active run."""
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np
    import polars as pl

    from models.user_encoders.diagnostics import (
        embedding_stats,
        pca_2d,
        plot_projection,
        plot_training_curves,
    )

    stats = embedding_stats(vectors)
    mlflow.log_metrics({f"embedding_{k}": v for k, v in stats.items()})
    if history:
        figure = plot_training_curves(history, f"{method} pretraining")
        mlflow.log_figure(figure, "plots/training_curves.png")
        plt.close(figure)
    colours: dict[str, np.ndarray] = {}
    if users_table is not None and Path(users_table).exists():
        users = pl.read_parquet(users_table)
        known = pl.DataFrame({"user_id": latest.user_ids}).join(
            users, on="user_id", how="left", maintain_order="left")
        for name in USER_ATTRIBUTES:
            if name in known.columns:
                colours[name] = known.get_column(name).fill_null(-1).to_numpy()
        mlflow.log_param("users_table", str(users_table))
    if not colours:
        colours["history_length"] = np.minimum(latest.lengths // 5 * 5, 20)
    figure = plot_projection(pca_2d(vectors), colours, f"{method}: {len(vectors)} users")
    mlflow.log_figure(figure, "plots/embedding_projection.png")
    plt.close(figure)
    return stats


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``recpipe pretrain`` (the caller adds --home / --json)."""
    from models.pretraining import METHODS, PretrainConfig
    from models.user_encoders.encoder import UserEncoderConfig

    defaults, encoder = PretrainConfig(), UserEncoderConfig()
    parser.add_argument("--method", choices=list(METHODS), default="adaptssr",
                        help="self-supervised objective (default adaptssr)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"optimiser steps, warm start included (default {defaults.steps})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"distinct users per step (default {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate,
                        help=f"learning rate (default {defaults.learning_rate})")
    parser.add_argument("--embedding-dim", type=int, default=encoder.embedding_dim,
                        help=f"user vector width D (default {encoder.embedding_dim})")
    parser.add_argument("--layers", type=int, default=encoder.n_layers,
                        help=f"Transformer layers (default {encoder.n_layers})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed")
    parser.add_argument("--users-table", type=Path,
                        help="simulator users.parquet to colour the projection plot "
                             "(default: newest under <home>/raw)")
    parser.add_argument("--no-register", action="store_true", help="log the run only")


def cmd_pretrain(args: argparse.Namespace, workspace: Workspace) -> dict:
    """``recpipe pretrain``: run ``pretrain_step`` and print a short summary."""
    overrides = {
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
        "seed": args.seed,
        "encoder": {"embedding_dim": args.embedding_dim, "n_layers": args.layers},
    }
    summary = pretrain_step(workspace, args.method, overrides, args.users_table,
                            register=not args.no_register)
    final = summary["final"]
    shown = {k: final[k] for k in ("loss", "acc_pos_semi", "acc_semi_neg", "lambda",
                                   "cl_accuracy", "mip_accuracy") if k in final}
    print(f"pretrained {args.method} for {summary['steps']} steps on "
          f"{summary['train_windows']:,} windows: "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"user embeddings of {summary['users_embedded']:,} users → "
          f"{summary['embeddings_path']}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    if summary["registered"]:
        reg = summary["registered"]
        print(f"registered {reg['name']} v{reg['version']} as {', '.join(reg['aliases'])}")
    return summary
