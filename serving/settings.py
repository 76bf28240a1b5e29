"""Serving constants and limits, importable without torch, MLflow or pydantic (the CLI parser
reads them for its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

RANKER_MODEL_NAME = "recpipe-ranker"
"""= ``models.registry.RANKER_MODEL_NAME`` (a test keeps them equal)."""
ALLOCATOR_MODEL_NAME = "recpipe-allocator"
"""The registered live-stream allocator the service uses when its alias exists."""
CHAMPION = "champion"
"""= ``models.registry.CHAMPION``."""


@dataclass(frozen=True)
class Limits:
    """What makes a request too large (413)."""

    max_body_bytes: int = 1 << 20
    """Request body size (1 MiB holds ~10k fully specified candidates)."""
    max_candidates: int = 2000
    """Candidates per request."""
    max_history: int = 1000
    """History entries per request (the model reads only its last N anyway)."""
