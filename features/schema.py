"""The example schema shared by feature building, models and serving.

An *example* is one impression with its encoded features and labels. The same
``encode_examples`` turns raw rows into examples for training and for serving, so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SPARSE_FEATURES: tuple[str, ...] = ("user_id", "item_id", "author_id", "item_type", "hour")
"""Single-valued categorical features; each becomes ``<name>_idx`` (Int64)."""

SEQUENCE_ITEM_FEATURE = "hist_item_id"
"""The user's last N items strictly before the impression; encoded with the item vocabulary."""

SEQUENCE_BEHAVIOR_FEATURE = "hist_behavior"
"""Behaviour code per history item (see ``BEHAVIOR_CODES``)."""

BEHAVIOR_CODES: dict[str, int] = {"padding": 0, "impression": 1, "click": 2, "long_view": 3,
                                  "interaction": 4}
"""Strongest behaviour the user showed on a history item: like/follow/share/comment/gift
count as interaction."""

DENSE_FEATURES: tuple[str, ...] = ("duration_log", "position_frac", "hist_length_frac")
"""Float features: log1p(duration_s), position / 10 (0 if unknown), history length / N."""

RAW_INPUT_COLUMNS: tuple[str, ...] = (
    "user_id", "item_id", "author_id", "item_type", "ts", "duration_s", "position",
    "hist_item_id", "hist_behavior",
)
"""What a caller (the feature builder or the scoring service) provides per row."""


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task of a multi-task ranker."""

    name: str
    kind: str  # "binary" (BCE on logits) or "regression" (MSE)
    label: str  # contract label column it comes from

    @property
    def column(self) -> str:
        """Column of the example table holding the (nullable, float) target."""
        return f"label_{self.name}"


DEFAULT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("click", "binary", "click"),
    TaskSpec("like", "binary", "like"),
    TaskSpec("follow", "binary", "follow"),
    TaskSpec("long_view", "binary", "long_view"),
    TaskSpec("watch_time", "regression", "watch_time_s"),
)
"""Watch time is regressed as log1p(seconds)."""


@dataclass(frozen=True)
class ExampleSchema:
    """Everything a model needs to know about its input; saved with every model."""

    history_length: int
    vocab_sizes: dict[str, int]
    tasks: tuple[TaskSpec, ...] = DEFAULT_TASKS
    sparse_features: tuple[str, ...] = SPARSE_FEATURES
    dense_features: tuple[str, ...] = DENSE_FEATURES
    n_behaviors: int = len(BEHAVIOR_CODES)
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExampleSchema:
        fields = dict(data)
        fields["tasks"] = tuple(TaskSpec(**task) for task in fields["tasks"])
        fields["sparse_features"] = tuple(fields["sparse_features"])
        fields["dense_features"] = tuple(fields["dense_features"])
        return cls(**fields)
