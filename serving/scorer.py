"""The pure scorer: a request (or raw rows) → per-task predictions → blended score → ranking.

No HTTP and no registry here. Features go through ``features.encode.encode_examples`` (the
training path) once per request, on one Polars frame holding every candidate; the model runs
once per request on one batch, under ``torch.inference_mode``. Predictions are those of
``models.registry.LoadedRanker.score_encoded`` (probabilities for binary tasks, seconds for
watch time); the blended score is ``sum_k weight_k * prediction_k``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl
import torch

from features.encode import encode_examples
from features.schema import SEQUENCE_ITEM_FEATURE, SPARSE_FEATURES, TaskSpec
from features.vocab import UNKNOWN_INDEX
from models.batch import ExampleArrays
from models.losses import task_predictions
from models.registry import LoadedRanker
from serving.allocation import LoadedAllocator, allocation_state, decide, unavailable
from serving.rows import request_rows
from serving.schemas import RankRequest

BATCH_ROWS = 4096
"""Rows per forward pass (as ``models.training.predict_outputs``)."""


class UnknownTaskError(ValueError):
    """Task weights name a task the model does not have."""


def default_task_weights(tasks: tuple[TaskSpec, ...]) -> dict[str, float]:
    """1 for every binary task (probabilities add up), 0 for regression tasks (seconds are on
    another scale: weigh them explicitly, e.g. ``watch_time=0.02``)."""
    return {task.name: 1.0 if task.kind == "binary" else 0.0 for task in tasks}


def weight_vector(weights: Mapping[str, float], tasks: tuple[TaskSpec, ...]) -> np.ndarray:
    """(K,) float64 weights in task order; tasks left out weigh 0. Raises UnknownTaskError
    naming any task the model does not have."""
    names = [task.name for task in tasks]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UnknownTaskError(f"weight(s) for unknown task(s) {unknown}; the model's tasks are "
                         f"{names}")
    return np.array([float(weights.get(name, 0.0)) for name in names], dtype=np.float64)


@dataclass(frozen=True)
class RankResult:
    """One ranked request. Arrays are in candidate order; ``order`` lists candidate indices
    best first (cut to ``top_k``)."""

    item_ids: np.ndarray  # (B,) int64
    predictions: np.ndarray  # (B, K) float32
    scores: np.ndarray  # (B,) float64, blended
    order: np.ndarray  # (k,) int64
    task_names: tuple[str, ...]
    task_weights: dict[str, float]
    unknown_ids: dict[str, int]
    allocation: dict

    def ranked_json(self) -> bytes:
        """``[{"item_id", "score", "scores": {task: prediction}}, ...]`` best first, as JSON
        (Polars writes it; no Python loop over candidates)."""
        rows = self.order
        frame = pl.DataFrame({"item_id": self.item_ids[rows], "score": self.scores[rows]})
        frame = frame.with_columns(pl.struct([
            pl.Series(name, self.predictions[rows, k]) for k, name in enumerate(self.task_names)
        ]).alias("scores"))
        return frame.write_json().encode()

    def ranked(self) -> list[dict]:
        """``ranked_json`` as Python objects."""
        return [
            {"item_id": int(self.item_ids[i]), "score": float(self.scores[i]),
             "scores": dict(zip(self.task_names, self.predictions[i].tolist(), strict=True))}
            for i in self.order
        ]


class Scorer:
    """Scores for one loaded ranker; immutable after construction (safe across threads)."""

    def __init__(self, ranker: LoadedRanker, task_weights: Mapping[str, float] | None = None):
        self.ranker = ranker
        self.tasks = ranker.schema.tasks
        self.task_names = tuple(task.name for task in self.tasks)
        weights = default_task_weights(self.tasks) if task_weights is None else task_weights
        self.weights = weight_vector(weights, self.tasks)
        ranker.model.eval()

    @property
    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.weights.tolist(), strict=True))

    def encode(self, raw: pl.DataFrame) -> pl.DataFrame:
        """Raw rows → encoded examples, by the training code."""
        return encode_examples(raw, self.ranker.vocab, self.ranker.schema)

    def predict_encoded(self, encoded: pl.DataFrame) -> np.ndarray:
        """(N, K) float32 predictions; the same numbers as ``LoadedRanker.score_encoded``."""
        arrays = ExampleArrays.from_frame(encoded, self.ranker.schema)
        n = len(arrays)
        if n == 0:
            return np.zeros((0, len(self.tasks)), np.float32)
        with torch.inference_mode():
            outputs = [self.ranker.model(arrays.batch(np.arange(start, min(start + BATCH_ROWS, n))))
                       for start in range(0, n, BATCH_ROWS)]  # (b, K) each
            output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (N, K)
            return task_predictions(output, self.tasks).numpy()

    def predict_raw(self, raw: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        """(encoded rows, (N, K) predictions) for raw rows."""
        encoded = self.encode(raw)
        return encoded, self.predict_encoded(encoded)

    def blend(self, predictions: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(N,) float64 blended scores."""
        return predictions.astype(np.float64) @ (self.weights if weights is None else weights)

    def rank(
        self,
        request: RankRequest,
        now: datetime | None = None,
        allocator: LoadedAllocator | None = None,
        allocator_missing: str = "no allocator is loaded",
    ) -> RankResult:
        """Rank ``request``'s candidates; ask ``allocator`` (when given) about the best live
        candidate, else report ``allocator_missing`` as why no allocation was made."""
        if request.task_weights is None:
            weights, weight_map = self.weights, self.task_weights
        else:
            weights = weight_vector(request.task_weights, self.tasks)
            weight_map = dict(zip(self.task_names, weights.tolist(), strict=True))
        raw = request_rows(request, now or datetime.now(UTC))
        encoded, predictions = self.predict_raw(raw)
        scores = self.blend(predictions, weights)
        order = np.argsort(-scores, kind="stable")[:request.top_k]
        if allocator is None:
            allocation = unavailable(allocator_missing)
        else:
            allocation = self._allocate(request, raw, predictions, scores, allocator)
        return RankResult(
            item_ids=raw.get_column("item_id").to_numpy(),
            predictions=predictions,
            scores=scores,
            order=order,
            task_names=self.task_names,
            task_weights=weight_map,
            unknown_ids=unknown_counts(encoded),
            allocation=allocation,
        )

    def _allocate(self, request: RankRequest, raw: pl.DataFrame, predictions: np.ndarray,
                  scores: np.ndarray, allocator: LoadedAllocator) -> dict:
        live = np.flatnonzero(raw.get_column("item_type").to_numpy() == "live")
        if live.size == 0:
            return {"available": True, "insert": False, "probability": None, "item_id": None,
                    "model": {"name": allocator.name, "version": allocator.version},
                    "reason": "no live candidate in the request"}
        best = int(live[np.argmax(scores[live])])
        candidate = raw.row(best, named=True)
        state = allocation_state(
            request.user_id, candidate["ts"], len(request.candidates), candidate,
            float(scores[best]), dict(zip(self.task_names, predictions[best].tolist(),
                                          strict=True)),
            request.context.session, request.candidates[best].features,
        )
        return decide(allocator, state, candidate["item_id"])


def unknown_counts(encoded: pl.DataFrame) -> dict[str, int]:
    """How many ids of one request fell back to the unknown index (unseen in training, or not
    given): per sparse feature over the candidates (``user_id`` and ``hour`` are 0 or 1), and
    over the history entries the model reads."""
    per_row = encoded.select(
        (pl.col(f"{name}_idx") == UNKNOWN_INDEX).sum().alias(name) for name in SPARSE_FEATURES
    ).row(0, named=True)
    counts = {name: int(value) for name, value in per_row.items()}
    for name in ("user_id", "hour"):
        counts[name] = int(counts[name] > 0)
    history = encoded.get_column(f"{SEQUENCE_ITEM_FEATURE}_idx")[0]
    counts["history"] = int((history == UNKNOWN_INDEX).sum())
    return counts
