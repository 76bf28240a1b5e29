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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

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
    """The trained encoder and its diagnostics, one record per ``log_every`` steps."""

    encoder: TransformerUserEncoder
    config: PretrainConfig
    history: list[dict[str, float]]


def pretrain(data: UserSequences, config: PretrainConfig,
             on_log: StepCallback | None = None) -> PretrainResult:
    """Pretrain a new encoder on ``data`` with ``config`` (already sized: ``for_schema``).

    ``on_log(step, record)`` receives the mean diagnostics of every ``log_every`` steps
    (``loss``, ``stage`` index, objective-specific ones). Raises TrainingDivergedError at the
    first non-finite loss, ValueError when no window is long enough.
    """
    if config.method != "none" and len(data) == 0:
        raise ValueError(f"no history window has at least {config.min_length} behaviours; "
                         "nothing to pretrain on")
    torch.manual_seed(config.seed)
    encoder = build_user_encoder(config.encoder, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    draw = data.sampler(config.batch_size, config.seed) if len(data) else None
    history: list[dict[str, float]] = []
    step = 0
    stages = plan_stages(config)
    bar = tqdm(total=config.steps, desc=f"pretrain {config.method}", leave=False,
               disable=not config.progress or not stages, mininterval=1.0)
    for stage_index, (name, n_steps) in enumerate(stages):
        objective = build_objective(name, encoder, config)
        parameters = [*encoder.parameters(), *objective.parameters()]
        optimiser = torch.optim.Adam(parameters, lr=config.learning_rate,
                                     weight_decay=config.weight_decay)
        encoder.train()
        window: list[dict[str, float]] = []
        for _ in range(n_steps):
            batch = data.batch(draw())
            loss, diagnostics = objective(encoder, batch, generator)
            step += 1
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"{name} loss is {loss.item()} at step {step}; lower the learning rate")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimiser.step()
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
    encoder.eval()
    return PretrainResult(encoder, config, history)


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
