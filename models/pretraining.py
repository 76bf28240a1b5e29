"""Self-supervised pretraining of the user encoder on behaviour sequences alone.

Data: ``UserSequences`` holds every distinct history window of the example table (one per
request: impressions of one request share their history), padded to (N, T). A batch draws
``batch_size`` *distinct* users and one random window of each, so the in-batch negatives of
the contrastive and ranking objectives are always other users.

Loop: a budget of ``steps`` optimiser steps split into stages (``plan_stages``): AdaptSSR
spends its first ``warm_start_fraction`` on masked item prediction (a fresh Adam per stage,
as the authors run two trainings); CL4SRec and MIP run one stage; ``none`` trains nothing
(the no-pretraining baseline: a freshly initialised encoder). Seeds: ``seed`` fixes the
initialisation, dropout, batch draws and augmentations.

Distributed (``pretrain(..., rank=)``, ``recpipe pretrain --nproc N``; see
``models.distributed``): the encoder's item and behaviour tables are sharded by TorchRec's
planner (fused kernel, ``embedding_optimizer``), the Transformer, positions, pooling and
the objectives' own parameters are replicated and their gradients averaged over the ranks
every step. Each rank holds the windows of its own shard of the users and draws
``batch_size // W`` of them per step (``batch_size`` stays the number of users one optimiser
step averages over). **In-batch negatives are per rank**: the contrastive and ranking
objectives compare an anchor with the other users of its own rank's batch only, so the
effective negatives per anchor are ``batch_size // W - 1`` users, not ``batch_size - 1``
(raise ``batch_size`` with W to keep them). Masked item prediction has no negatives and is
unaffected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE, ExampleSchema
from models.training import TrainingDivergedError
from models.user_encoders.adaptssr import AdaptSSRConfig, AdaptSSRObjective
from models.user_encoders.augment import AugmentConfig
from models.user_encoders.cl4srec import CL4SRecConfig, CL4SRecObjective
from models.user_encoders.encoder import (
    PaddedSequences,
    TransformerUserEncoder,
    UserEncoderConfig,
    build_user_encoder,
)
from models.user_encoders.mip import MIPConfig, MIPObjective

if TYPE_CHECKING:
    from models.distributed import Rank, ShardingConfig

METHODS: tuple[str, ...] = ("adaptssr", "cl4srec", "mip")
"""Pretraining methods the CLI offers."""
BASELINE_METHODS: tuple[str, ...] = ("none", *METHODS)
"""Plus ``none``: no pretraining (a freshly initialised encoder), for benchmarks."""
ITEMS_COLUMN = f"{SEQUENCE_ITEM_FEATURE}_idx"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run reads; logged as MLflow params, saved with the model."""

    method: str = "adaptssr"
    """Objective: adaptssr, cl4srec, mip (or none: no training)."""
    steps: int = 1000
    """Optimiser steps in total (warm-start stages included): the same budget for every
    method."""
    batch_size: int = 128
    """B: distinct users per step."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    min_length: int = 2
    """Windows shorter than this are not used for pretraining."""
    seed: int = 0
    """Seeds initialisation, dropout, batch draws and augmentations."""
    log_every: int = 10
    """Report diagnostics every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    embedding_optimizer: str = "adam"
    """Optimiser of the item / behaviour tables: "adam" (one Adam for everything, fresh per
    stage) or "adagrad", "rowwise_adagrad", "sgd": then the tables have their own optimiser,
    kept across stages, and gradient clipping covers the other parameters only (what a
    distributed run does: its fused table kernel never materialises table gradients; on CPU
    it has no Adam, so ``recpipe pretrain --nproc`` picks "adagrad" there)."""
    encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    """The encoder architecture (sized to the data by ``for_schema``)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Explicit augmentation rates (AdaptSSR and CL4SRec)."""
    adaptssr: AdaptSSRConfig = field(default_factory=AdaptSSRConfig)
    """AdaptSSR hyperparameters."""
    cl4srec: CL4SRecConfig = field(default_factory=CL4SRecConfig)
    """CL4SRec hyperparameters."""
    mip: MIPConfig = field(default_factory=MIPConfig)
    """Masked-item-prediction hyperparameters (also AdaptSSR's warm start)."""

    def __post_init__(self) -> None:
        if self.method not in BASELINE_METHODS:
            raise ValueError(f"unknown pretraining method {self.method!r}; choose one of "
                             f"{list(METHODS)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got "
                             f"{self.batch_size}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def for_schema(self, schema: ExampleSchema) -> PretrainConfig:
        return replace(self, encoder=self.encoder.for_schema(schema))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        """Rebuild from ``to_dict`` output; nested sections may be partial (defaults fill)."""
        fields = dict(data)
        sections = {"encoder": UserEncoderConfig, "augment": AugmentConfig,
                    "adaptssr": AdaptSSRConfig, "cl4srec": CL4SRecConfig, "mip": MIPConfig}
        for name, kind in sections.items():
            if name in fields and isinstance(fields[name], dict):
                values = fields[name]
                fields[name] = (kind.from_dict(values) if hasattr(kind, "from_dict")
                                else kind(**values))
        return cls(**fields)


@dataclass
class UserSequences:
    """History windows as padded arrays, oldest behaviour first."""

    user_ids: np.ndarray  # (N,) raw user ids
    items: np.ndarray  # (N, T) int64 item indices, 0 = padding
    behaviors: np.ndarray  # (N, T) int64 behaviour codes, 0 = padding
    lengths: np.ndarray  # (N,) int64

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, history_length: int,
                   min_length: int = 0, latest_only: bool = False) -> UserSequences:
        """Distinct windows of an example table (``features.build`` output), sorted by user
        then time; ``latest_only`` keeps each user's most recent window."""
        windows = (
            frame.select("user_id", "ts", ITEMS_COLUMN, SEQUENCE_BEHAVIOR_FEATURE)
            .with_columns(pl.col(ITEMS_COLUMN).list.tail(history_length),
                          pl.col(SEQUENCE_BEHAVIOR_FEATURE).list.tail(history_length))
            .filter(pl.col(ITEMS_COLUMN).list.len() >= min_length)
            .sort("user_id", "ts", maintain_order=True)
            .unique(subset=["user_id", ITEMS_COLUMN, SEQUENCE_BEHAVIOR_FEATURE],
                    keep="last", maintain_order=True)
        )
        if latest_only:
            windows = windows.group_by("user_id", maintain_order=True).last()
        lengths = windows.get_column(ITEMS_COLUMN).list.len().to_numpy().astype(np.int64)
        return cls(
            user_ids=windows.get_column("user_id").to_numpy().astype(np.int64),
            items=_pad(windows.get_column(ITEMS_COLUMN), lengths, history_length),
            behaviors=_pad(windows.get_column(SEQUENCE_BEHAVIOR_FEATURE), lengths,
                           history_length),
            lengths=lengths,
        )

    @classmethod
    def from_rows(cls, frame: pl.DataFrame, history_length: int) -> UserSequences:
        """Every row of an encoded history frame as one window, in row order (no dedup)."""
        items = frame.get_column(ITEMS_COLUMN).list.tail(history_length)
        behaviors = frame.get_column(SEQUENCE_BEHAVIOR_FEATURE).list.tail(history_length)
        lengths = items.list.len().to_numpy().astype(np.int64)
        return cls(
            user_ids=frame.get_column("user_id").to_numpy().astype(np.int64),
            items=_pad(items, lengths, history_length),
            behaviors=_pad(behaviors, lengths, history_length),
            lengths=lengths,
        )

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def n_users(self) -> int:
        return int(np.unique(self.user_ids).shape[0])

    def batch(self, rows: np.ndarray) -> PaddedSequences:
        return PaddedSequences(torch.from_numpy(self.items[rows]),
                               torch.from_numpy(self.behaviors[rows]),
                               torch.from_numpy(self.lengths[rows]))

    def sampler(self, batch_size: int, seed: int) -> Callable[[], np.ndarray]:
        """A reproducible draw of rows: ``batch_size`` distinct users (all of them when
        fewer), one uniformly chosen window each."""
        users, first, counts = np.unique(self.user_ids, return_index=True, return_counts=True)
        rng = np.random.default_rng(seed)
        size = min(batch_size, len(users))

        def draw() -> np.ndarray:
            chosen = rng.choice(len(users), size=size, replace=False)
            offsets = (rng.random(size) * counts[chosen]).astype(np.int64)
            return first[chosen] + offsets

        return draw


def _pad(column: pl.Series, lengths: np.ndarray, width: int) -> np.ndarray:
    """List column → (N, width) left-aligned int64 array, 0 after each row's length."""
    out = np.zeros((len(lengths), width), dtype=np.int64)
    values = column.explode().drop_nulls().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    cols = np.arange(len(values)) - starts[rows]
    out[rows, cols] = values
    return out


def plan_stages(config: PretrainConfig) -> list[tuple[str, int]]:
    """(objective, steps) in order; the steps add up to ``config.steps``."""
    if config.method == "none" or config.steps == 0:
        return []
    if config.method == "mip":
        return [("mip", config.steps)]
    fraction = (config.adaptssr.warm_start_fraction if config.method == "adaptssr"
                else config.cl4srec.warm_start_fraction)
    warm = int(round(fraction * config.steps))
    stages = [("mip", warm)] if warm > 0 else []
    return [*stages, (config.method, config.steps - warm)]


def build_objective(name: str, encoder: TransformerUserEncoder,
                    config: PretrainConfig) -> nn.Module:
    if name == "mip":
        return MIPObjective(encoder, config.mip)
    if name == "adaptssr":
        return AdaptSSRObjective(config.adaptssr, config.augment)
    if name == "cl4srec":
        return CL4SRecObjective(config.cl4srec, config.augment)
    raise ValueError(f"unknown objective {name!r}")


StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class PretrainResult:
    """The trained encoder and its diagnostics, one record per ``log_every`` steps.
    Distributed: the gathered, unsharded encoder on rank 0 (None on the other ranks), the
    diagnostics averaged over the ranks, and ``distributed`` describing the run."""

    encoder: TransformerUserEncoder | None
    config: PretrainConfig
    history: list[dict[str, float]]
    distributed: dict | None = None


def pretrain(data: UserSequences, config: PretrainConfig,
             on_log: StepCallback | None = None, rank: Rank | None = None,
             sharding: ShardingConfig | None = None) -> PretrainResult:
    """Pretrain a new encoder on ``data`` with ``config`` (already sized: ``for_schema``).

    ``on_log(step, record)`` receives the mean diagnostics of every ``log_every`` steps
    (``loss``, ``stage`` index, objective-specific ones). Raises TrainingDivergedError at the
    first non-finite loss, ValueError when no window is long enough.

    Distributed (``rank`` given; every ``torchrun`` rank calls this with the windows of its
    own users, see the module docstring): the tables are sharded per ``sharding``, each rank
    draws ``batch_size // W`` users per step with its own seed, the dense gradients are
    averaged, ``on_log`` runs on every rank with the diagnostics averaged over the ranks,
    and at the end the full state is gathered into a plain encoder on rank 0.
    """
    from models.distributed import (
        ShardingConfig,
        dense_parameters,
        full_state_dict,
        shard_model,
    )
    from models.training import make_table_optimiser

    world = 1 if rank is None else rank.world_size
    stages = plan_stages(config)
    if rank is None and config.method != "none" and len(data) == 0:
        raise ValueError(f"no history window has at least {config.min_length} behaviours; "
                         "nothing to pretrain on")
    contrastive = any(name != "mip" for name, _ in stages)
    if rank is None and contrastive and data.n_users < 2:
        raise ValueError(f"{config.method} contrasts users within a batch, and only "
                         f"{data.n_users} user has a history window of at least "
                         f"{config.min_length} behaviours")
    batch_size = config.batch_size // world
    if rank is not None:  # every rank draws the same count: collectives stay in step
        fewest = rank.all_min(data.n_users)
        if stages and fewest == 0:
            raise ValueError("a rank has no user with a history window of at least "
                             f"{config.min_length} behaviours; use fewer processes")
        batch_size = min(batch_size, fewest)
        if stages and batch_size < 2:
            raise ValueError(f"batch_size {config.batch_size} over {world} ranks leaves "
                             f"{batch_size} users per rank; in-batch negatives need >= 2 "
                             "(raise --batch-size)")
    torch.manual_seed(config.seed)
    encoder = build_user_encoder(config.encoder, seed=config.seed)
    offset = 0 if rank is None else 1_000_003 * rank.rank  # own draws, masks and dropout
    torch.manual_seed(config.seed + offset)
    generator = torch.Generator().manual_seed(config.seed + offset)
    draw = data.sampler(batch_size, config.seed + offset) if len(data) else None
    trained, dmp, distributed = encoder, None, None  # what the objectives run
    if rank is not None:
        dmp, _, plan = shard_model(copy.deepcopy(encoder), rank, sharding or ShardingConfig(),
                                   config.embedding_optimizer, config.learning_rate,
                                   config.weight_decay, data_parallel=False)
        trained = dmp.module
        distributed = {**rank.to_dict(), "per_rank_batch": batch_size,
                       "sharding": (sharding or ShardingConfig()).to_dict(), "plan": plan}
    separate_tables = rank is not None or config.embedding_optimizer != "adam"
    tables = (make_table_optimiser(encoder, config.embedding_optimizer, config.learning_rate,
                                   config.weight_decay)
              if separate_tables and rank is None else None)
    history: list[dict[str, float]] = []
    step = 0
    show = config.progress and bool(stages) and (rank is None or rank.is_main)
    bar = tqdm(total=config.steps, desc=f"pretrain {config.method}", leave=False,
               disable=not show or None, mininterval=1.0)
    for stage_index, (name, n_steps) in enumerate(stages):
        objective = build_objective(name, trained, config)
        if rank is not None:
            dense = [*dense_parameters(dmp), *objective.parameters()]
        elif tables is not None:
            in_tables = {id(p) for g in tables.param_groups for p in g["params"]}
            dense = [p for p in [*encoder.parameters(), *objective.parameters()]
                     if id(p) not in in_tables]
        else:
            dense = [*encoder.parameters(), *objective.parameters()]
        optimiser = torch.optim.Adam(dense, lr=config.learning_rate,
                                     weight_decay=config.weight_decay)
        optimisers = [optimiser] if tables is None else [optimiser, tables]
        trained.train()
        window: list[dict[str, float]] = []
        for _ in range(n_steps):
            batch = data.batch(draw())
            loss, diagnostics = objective(trained, batch, generator)
            step += 1
            value = loss.item()
            if rank is not None:  # every rank sees the same means: all stop together
                keys = sorted(diagnostics)
                means = rank.all_mean([value, *(diagnostics[k] for k in keys)])
                value, diagnostics = float(means[0]), dict(zip(keys, means[1:].tolist(),
                                                               strict=True))
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"{name} loss is {value} at step {step}; lower the learning rate")
            for each in optimisers:
                each.zero_grad(set_to_none=True)
            loss.backward()
            if rank is not None:
                rank.average_gradients(dense)
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(dense, config.grad_clip)
            for each in optimisers:
                each.step()
            window.append(diagnostics)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                record = _mean_record(window, stage_index, name)
                bar.set_postfix(stage=name, loss=f"{record['loss']:.4f}")
                history.append({"step": step, **record})
                if on_log is not None:
                    on_log(step, record)
                window = []
    bar.close()
    if rank is not None:
        state = full_state_dict(dmp, rank)  # a collective; the full state on rank 0 only
        if not rank.is_main:
            return PretrainResult(None, config, history, distributed)
        encoder.load_state_dict(state)
    encoder.eval()
    return PretrainResult(encoder, config, history, distributed)


def _mean_record(window: list[dict[str, float]], stage: int, name: str) -> dict[str, float]:
    keys = sorted({key for record in window for key in record})
    record: dict[str, float] = {"stage": float(stage)}
    for key in keys:
        values = [r[key] for r in window if key in r and not math.isnan(r[key])]
        if values:
            record[key] = float(np.mean(values))
    record[f"{name}_loss"] = record.get("loss", float("nan"))
    return record


@torch.no_grad()
def embed(encoder: TransformerUserEncoder, data: UserSequences,
          batch_size: int = 2048) -> np.ndarray:
    """User vectors (N, D) of every window of ``data``, in eval mode (no dropout)."""
    was_training = encoder.training
    encoder.eval()
    chunks = [encoder.encode(data.batch(np.arange(start, min(start + batch_size, len(data)))))
              .numpy() for start in range(0, len(data), batch_size)]
    encoder.train(was_training)
    if not chunks:
        return np.zeros((0, encoder.out_dim), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)
