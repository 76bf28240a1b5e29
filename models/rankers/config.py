"""The one config every ranker architecture reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from models.inputs import InputConfig


@dataclass(frozen=True)
class RankerConfig:
    """Architecture hyperparameters (fields unused by an architecture are ignored by it)."""

    arch: str = "mmoe"
    """Architecture name, see ``models.rankers.ARCHITECTURES``."""
    inputs: InputConfig = field(default_factory=InputConfig)
    """Embedding sizes of the shared input encoder."""
    n_experts: int = 4
    """E: shared experts (MMoE)."""
    expert_hidden: tuple[int, ...] = (64, 32)
    """Hidden widths of every expert MLP; the last is the expert output width H."""
    tower_hidden: tuple[int, ...] = (16,)
    """Hidden widths of every task tower."""
    dropout: float = 0.0
    """Dropout after every hidden layer."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankerConfig:
        fields = dict(data)
        fields["inputs"] = InputConfig(**fields["inputs"])
        fields["expert_hidden"] = tuple(fields["expert_hidden"])
        fields["tower_hidden"] = tuple(fields["tower_hidden"])
        return cls(**fields)
