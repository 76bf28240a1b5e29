"""Explicit augmentations of behaviour sequences: crop, mask, reorder (CL4SRec's three).

Every function takes ``PaddedSequences`` (B, T) and a ``torch.Generator`` and returns new
``PaddedSequences`` of the same (B, T) shape. Contracts (tested):
- crop keeps a contiguous part of ``ceil(crop_keep * L)`` behaviours (at least 1 when L > 0);
  mask and reorder keep the length L;
- slots at or after the new length hold padding (0) in both items and behaviours, and no
  slot before it ever holds padding: nothing leaks either way;
- mask replaces ``ceil(mask_ratio * L)`` behaviours (``floor`` when that would mask all of
  them, as the AdaptSSR authors do) by the mask tokens of the item and behaviour tables;
- reorder shuffles a contiguous span of ``ceil(reorder_ratio * L)`` behaviours in place.
``augment`` draws one of the configured operations per row, like CL4SRec and AdaptSSR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from models.user_encoders.encoder import PaddedSequences

OPERATIONS: tuple[str, ...] = ("crop", "mask", "reorder")


@dataclass(frozen=True)
class AugmentConfig:
    """Rates of the explicit augmentations.

    Defaults were chosen on a separate development world (simulator seed 7) for histories of
    N = 20: the AdaptSSR authors' rates for 150-long histories (crop 0.4, mask 0.6, reorder
    0.6) leave two views of a 20-long history with almost nothing in common, and AdaptSSR
    then sat in a collapsed plateau for the whole budget.
    """

    crop_keep: float = 0.6
    """Share of the sequence a crop keeps (a contiguous part)."""
    mask_ratio: float = 0.3
    """Share of behaviours a mask replaces by the mask token."""
    reorder_ratio: float = 0.3
    """Share of the sequence (a contiguous span) a reorder shuffles."""
    operations: tuple[str, ...] = OPERATIONS
    """Operations ``augment`` draws from, uniformly per row."""

    def __post_init__(self) -> None:
        for name in ("crop_keep", "mask_ratio", "reorder_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"AugmentConfig.operations must be a non-empty subset of "
                             f"{OPERATIONS}, got {self.operations}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AugmentConfig:
        fields = dict(data)
        if "operations" in fields:
            fields["operations"] = tuple(fields["operations"])
        return cls(**fields)


def _uniform_start(span: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer in [0, span] per row (span (B,) ≥ 0)."""
    u = torch.rand(span.shape, generator=generator)
    return torch.minimum((u * (span + 1).float()).long(), span)


def _ceil_share(ratio: float, lengths: torch.Tensor) -> torch.Tensor:
    return torch.ceil(ratio * lengths.double()).long()


def _clear_padding(items: torch.Tensor, behaviors: torch.Tensor,
                   lengths: torch.Tensor) -> PaddedSequences:
    valid = PaddedSequences(items, behaviors, lengths).valid()  # (B, T)
    return PaddedSequences(items.masked_fill(~valid, 0), behaviors.masked_fill(~valid, 0),
                           lengths)


def crop(seqs: PaddedSequences, keep: float, generator: torch.Generator) -> PaddedSequences:
    """Keep a random contiguous part of ``ceil(keep * L)`` behaviours, moved to the front."""
    lengths = seqs.lengths
    kept = torch.minimum(_ceil_share(keep, lengths).clamp(min=1), lengths)  # (B,)
    start = _uniform_start(lengths - kept, generator)  # (B,)
    width = seqs.items.shape[1]
    index = (start.unsqueeze(1) + torch.arange(width).unsqueeze(0)).clamp(max=width - 1)
    items = torch.gather(seqs.items, 1, index)  # (B, T)
    behaviors = torch.gather(seqs.behaviors, 1, index)  # (B, T)
    return _clear_padding(items, behaviors, kept)


def mask(seqs: PaddedSequences, ratio: float, mask_item: int, mask_behavior: int,
         generator: torch.Generator) -> PaddedSequences:
    """Replace ``ceil(ratio * L)`` random behaviours (never all of them) by mask tokens."""
    lengths = seqs.lengths
    n_masked = _ceil_share(ratio, lengths)
    all_masked = n_masked >= lengths
    n_masked = torch.where(all_masked, torch.floor(ratio * lengths.double()).long(), n_masked)
    n_masked = torch.minimum(n_masked, (lengths - 1).clamp(min=0))  # (B,)
    masked = random_subset(seqs.valid(), n_masked, generator)  # (B, T)
    return PaddedSequences(seqs.items.masked_fill(masked, mask_item),
                           seqs.behaviors.masked_fill(masked, mask_behavior), lengths)


def random_subset(valid: torch.Tensor, counts: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool choosing ``counts[b]`` of row b's valid slots uniformly at random."""
    scores = torch.rand(valid.shape, generator=generator).masked_fill(~valid, 2.0)  # (B, T)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each slot in its row
    return (ranks < counts.unsqueeze(1)) & valid


def reorder(seqs: PaddedSequences, ratio: float, generator: torch.Generator) -> PaddedSequences:
    """Shuffle a random contiguous span of ``ceil(ratio * L)`` behaviours in place."""
    lengths = seqs.lengths
    span = torch.minimum(_ceil_share(ratio, lengths), lengths)  # (B,)
    start = _uniform_start(lengths - span, generator)  # (B,)
    positions = torch.arange(seqs.items.shape[1]).unsqueeze(0)  # (1, T)
    inside = (positions >= start.unsqueeze(1)) & (positions < (start + span).unsqueeze(1))
    # in-span slots get keys in [start, start + span - 1], all others keep their position,
    # so sorting the keys shuffles the span and leaves everything else where it was
    noise = torch.rand(seqs.items.shape, generator=generator)  # (B, T)
    spread = (span - 1).clamp(min=0).unsqueeze(1).float()
    keys = torch.where(inside, start.unsqueeze(1).float() + noise * spread, positions.float())
    order = keys.argsort(dim=1)  # (B, T)
    return PaddedSequences(torch.gather(seqs.items, 1, order),
                           torch.gather(seqs.behaviors, 1, order), lengths)


def augment(seqs: PaddedSequences, config: AugmentConfig, mask_item: int, mask_behavior: int,
            generator: torch.Generator) -> PaddedSequences:
    """One explicitly augmented view: every row gets one operation drawn uniformly from
    ``config.operations``."""
    choice = torch.randint(len(config.operations), (seqs.size,), generator=generator)  # (B,)
    views = {
        "crop": lambda: crop(seqs, config.crop_keep, generator),
        "mask": lambda: mask(seqs, config.mask_ratio, mask_item, mask_behavior, generator),
        "reorder": lambda: reorder(seqs, config.reorder_ratio, generator),
    }
    items, behaviors, lengths = seqs.items.clone(), seqs.behaviors.clone(), seqs.lengths.clone()
    for index, name in enumerate(config.operations):
        view = views[name]()
        rows = choice == index  # (B,)
        items[rows], behaviors[rows], lengths[rows] = (view.items[rows], view.behaviors[rows],
                                                      view.lengths[rows])
    return PaddedSequences(items, behaviors, lengths)
