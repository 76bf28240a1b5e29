"""The one config every ranker architecture reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from models.inputs import InputConfig

DEFAULT_TASK_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("watch", ("watch_time", "long_view")),
    ("interaction", ("click", "like", "follow")),
)
"""HoME's default task categories: passive watch-time tasks vs active interaction tasks."""


@dataclass(frozen=True)
class RankerConfig:
    """Architecture hyperparameters (fields unused by an architecture are ignored by it)."""

    arch: str = "mmoe"
    """Architecture name, see ``models.rankers.ARCHITECTURES``."""
    inputs: InputConfig = field(default_factory=InputConfig)
    """Embedding sizes of the shared input encoder."""
    n_experts: int = 4
    """E: shared experts (MMoE); shared experts per level (CGC, PLE); global experts per
    level (HoME)."""
    expert_hidden: tuple[int, ...] = (64, 32)
    """Hidden widths of every expert MLP (and of the shared bottom); the last is the expert
    output width H."""
    tower_hidden: tuple[int, ...] = (16,)
    """Hidden widths of every task tower."""
    dropout: float = 0.0
    """Dropout after every hidden layer."""
    n_task_experts: int = 1
    """Task-specific experts per task and level (CGC, PLE, HoME)."""
    n_levels: int = 2
    """Extraction levels of PLE (CGC is PLE with one level; HoME always has two: category
    level, then task level)."""
    n_category_experts: int = 2
    """HoME: experts per task category and level."""
    task_categories: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_TASK_CATEGORIES
    """HoME: (category, task names) pairs. Names absent from the schema are ignored; a task
    listed in no category gets a category of its own."""
    expert_norm: bool = True
    """HoME: expert normalisation (Swish hidden layers, BatchNorm + Swish on the output)."""
    feature_gate_rank: int = 8
    """HoME: rank r of every expert's private feature-gate (0 switches feature-gates off)."""
    self_gate: bool = True
    """HoME: add each node's self-gated own experts to its masked mixture (residual path)."""

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {self.n_experts}")
        if not self.expert_hidden:
            raise ValueError("expert_hidden needs at least one width (the expert output)")
        for name in ("expert_hidden", "tower_hidden"):
            if any(width < 1 for width in getattr(self, name)):
                raise ValueError(f"{name} widths must be positive, got {getattr(self, name)}")
        for name in ("n_task_experts", "feature_gate_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankerConfig:
        """Rebuild from ``to_dict`` output (or its JSON); fields missing from older configs
        take their defaults."""
        fields = dict(data)
        fields["inputs"] = InputConfig(**fields.get("inputs", {}))
        for name in ("expert_hidden", "tower_hidden"):
            if name in fields:
                fields[name] = tuple(fields[name])
        if "task_categories" in fields:
            fields["task_categories"] = tuple(
                (str(category), tuple(tasks)) for category, tasks in fields["task_categories"]
            )
        return cls(**fields)
