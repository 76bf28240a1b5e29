"""The pretraining stage as plain functions: ``pretrain_step`` (tested without Prefect;
``flows.nightly`` can wrap it as a task) and the CLI pieces ``add_pretrain_arguments`` /
``cmd_pretrain`` for ``recpipe pretrain``.

One run: read the training examples' histories, pretrain the user encoder with the chosen
method, log params / curves / diagnostics / plots and the model to MLflow (experiment
``recpipe-user-encoders``), register it as ``recpipe-user-encoder`` (alias challenger;
champion when there is none), and write the user-embedding table
``<lake>/user_embeddings/part-0.parquet`` atomically. Takes and returns paths and JSON-able
summaries.

``recpipe pretrain --nproc N`` runs ``pretrain_step`` on N ``torchrun`` ranks
(``flows.torchrun``; README "Distributed training"): each rank reads the windows of its own
share of the users, the encoder's tables are sharded (``models.pretraining``), and global
rank 0 alone logs, registers and writes the user-embedding table from the gathered encoder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from flows.workspace import Workspace

if TYPE_CHECKING:
    from models.distributed import Rank, ShardingConfig

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
    rank: Rank | None = None,
    sharding: ShardingConfig | None = None,
) -> dict:
    """Pretrain, log, register and embed; see the module docstring.

    Distributed (``rank`` given: every ``torchrun`` rank calls this): each rank reads the
    training windows of its share of the users (``models.distributed.shard_keys``) and
    trains the sharded encoder (``sharding``); global rank 0 alone logs the MLflow run, logs
    and registers the gathered (unsharded) encoder, writes the embedding table and returns
    the summary, with a ``distributed`` entry; the other ranks return {}.

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
    from flows.lineage import start_run
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
    main = rank is None or rank.is_main
    schema = load_schema(examples)
    vocab = Vocabulary.load(examples / "vocab.json")
    config = PretrainConfig.from_dict({**(overrides or {}), "method": method}).for_schema(schema)
    columns = list(dict.fromkeys([*HISTORY_READ_COLUMNS, *HISTORY_COLUMNS]))
    scan = pl.scan_parquet(examples / "train.parquet").select(columns)
    if rank is not None:  # this rank's users only (a lazy scan: only their rows are read)
        from models.distributed import shard_keys

        users = scan.select("user_id").unique().collect().get_column("user_id").to_numpy()
        scan = scan.filter(pl.col("user_id").is_in(
            shard_keys(users, rank.rank, rank.world_size).tolist()))
    train = scan.collect()
    data = UserSequences.from_frame(train, schema.history_length, config.min_length)
    n_windows, n_users = len(data), data.n_users
    if rank is not None:
        n_windows, n_users = (int(v) for v in rank.all_sum([n_windows, n_users]))
    if n_windows == 0:
        raise PretrainDataError(
            f"{examples / 'train.parquet'}: no history has at least {config.min_length} "
            "behaviours; simulate or ingest more days")
    if main:
        mlflow.set_tracking_uri(workspace.tracking_uri)
        experiment_id = ensure_experiment(PRETRAIN_EXPERIMENT, workspace.artifacts)
    run_context = (start_run(experiment_id, f"pretrain-{method}", examples)
                   if main else nullcontext())
    with run_context as run:
        if main:
            mlflow.log_params(flatten_params(config.to_dict()))
            mlflow.log_params({"train_windows": n_windows, "train_users": n_users,
                               "world_size": 1 if rank is None else rank.world_size})

        def log_step(step: int, record: dict[str, float]) -> None:
            if main:
                mlflow.log_metrics({f"pretrain_{k}": v for k, v in record.items()}, step=step)

        result = pretrain(data, config, on_log=log_step, rank=rank, sharding=sharding)
        if not main:
            return {}
        if result.distributed is not None:
            from flows.torchrun import log_distributed

            log_distributed(result.distributed)
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
    if result.distributed is not None:
        per_rank = result.distributed["per_rank_batch"]
        if per_rank < config.batch_size // result.distributed["world_size"]:
            warnings.append(f"a rank has only {per_rank} users: each rank drew {per_rank} "
                            f"per step instead of {config.batch_size} // world size")
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
        "train_windows": n_windows,
        "steps": config.steps,
        "final": {k: v for k, v in final.items() if v == v},
        "embedding_stats": diagnostics,
        "warnings": warnings,
    } | ({} if result.distributed is None else {"distributed": result.distributed})


def read_all_splits(examples: Path):  # noqa: ANN201 (polars DataFrame, imported lazily)
    """History columns of train, valid and test (for each user's most recent window)."""
    import polars as pl

    frames = [pl.read_parquet(examples / f"{split}.parquet", columns=list(HISTORY_READ_COLUMNS))
              for split in ("train", "valid", "test") if (examples / f"{split}.parquet").exists()]
    return pl.concat(frames)


def write_user_embeddings(path: Path, user_ids, vectors, lengths, method: str,  # noqa: ANN001
                          run_id: str, model_version: int | None) -> Path:
    """Write the table (user_id, embedding, history_length, method, model_version, run_id)
    to a temporary file beside ``path``, then rename it into place (never half-written).
    A current table: each user's most recent window of any split, test days included, so
    not a feature to join to training examples."""
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
    from serving.cli import at_least, positive_float

    defaults, encoder = PretrainConfig(), UserEncoderConfig()
    parser.add_argument("--method", choices=list(METHODS), default="adaptssr",
                        help="self-supervised objective (default adaptssr)")
    parser.add_argument("--steps", type=at_least(1), default=defaults.steps,
                        help=f"optimiser steps, warm start included (default {defaults.steps})")
    parser.add_argument("--batch-size", type=at_least(2), default=defaults.batch_size,
                        help=f"distinct users per step (default {defaults.batch_size})")
    parser.add_argument("--lr", type=positive_float, default=defaults.learning_rate,
                        help=f"learning rate (default {defaults.learning_rate})")
    parser.add_argument("--embedding-dim", type=at_least(1), default=encoder.embedding_dim,
                        help=f"user vector width D (default {encoder.embedding_dim})")
    parser.add_argument("--layers", type=at_least(1), default=encoder.n_layers,
                        help=f"Transformer layers (default {encoder.n_layers})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed")
    parser.add_argument("--users-table", type=Path,
                        help="simulator users.parquet to colour the projection plot "
                             "(default: newest under <home>/raw)")
    parser.add_argument("--no-register", action="store_true", help="log the run only")
    parser.add_argument("--embedding-optimizer",
                        choices=["adam", "adagrad", "rowwise_adagrad", "sgd"],
                        help="optimiser of the item / behaviour tables (default adam; adagrad "
                             "when distributed on CPU, where fbgemm's fused kernel has no Adam)")
    from flows.torchrun import add_distributed_arguments

    add_distributed_arguments(parser, "pretrain")


def cmd_pretrain(args: argparse.Namespace, workspace: Workspace) -> dict:
    """``recpipe pretrain``: run ``pretrain_step`` (``--nproc N``: on N torchrun ranks) and
    print a short summary."""
    from flows.cli import UserError
    from flows.torchrun import (
        default_embedding_optimizer,
        is_distributed,
        launch_from_cli,
        run_rank,
    )

    if args.rank_job is not None:  # one torchrun rank of `--nproc N`
        return run_rank(args.rank_job, lambda job, rank: run_pretrain_rank(workspace, job, rank))
    if args.users_table is not None and not args.users_table.is_file():
        raise UserError(f"--users-table {args.users_table}: no such file (a simulator "
                        "users.parquet)")
    distributed = is_distributed(args)
    if distributed and args.nnodes == "1" and args.batch_size // args.nproc < 2:
        raise UserError(f"--batch-size {args.batch_size} over --nproc {args.nproc} leaves "
                        "fewer than 2 users per rank; in-batch negatives need 2 (raise "
                        "--batch-size)")
    overrides = {
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
        "seed": args.seed,
        "embedding_optimizer": (args.embedding_optimizer
                                or default_embedding_optimizer(distributed)),
        "encoder": {"embedding_dim": args.embedding_dim, "n_layers": args.layers},
    }
    users_table = str(args.users_table) if args.users_table else None
    if distributed:
        if not (workspace.examples / "train.parquet").exists():
            raise PretrainDataError(f"no examples in {workspace.examples}; run "
                                    "`recpipe features` first")
        job = {"method": args.method, "overrides": overrides, "users_table": users_table,
               "register": not args.no_register, "sharding": args.sharding}
        summary = launch_from_cli(workspace, "pretrain", job, args)
        if summary.get("logged_on_other_node"):
            return summary
    else:
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


def run_pretrain_rank(workspace: Workspace, job: dict, rank: Rank) -> dict:
    """One torchrun rank of ``recpipe pretrain --nproc N``: ``pretrain_step`` with ``rank``."""
    from models.distributed import ShardingConfig

    return pretrain_step(workspace, job["method"], job["overrides"],
                         Path(job["users_table"]) if job["users_table"] else None,
                         register=job["register"], rank=rank,
                         sharding=ShardingConfig.from_name(job["sharding"]))
