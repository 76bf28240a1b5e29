"""The workspace: one folder that every command reads and writes (``RECPIPE_HOME``).

Layout: ``lake/`` (events and examples), ``quarantine/``, ``mlflow.db`` (MLflow tracking,
SQLite), ``mlartifacts/`` (MLflow artifacts), ``prefect/`` (PREFECT_HOME), ``runs/`` (raw
simulator output per night).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "workspace"


@dataclass(frozen=True)
class Workspace:
    """Absolute paths of one workspace."""

    root: Path

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> Workspace:
        """Resolve ``root`` or ``$RECPIPE_HOME`` or ``./workspace`` to an absolute workspace."""
        chosen = root or os.environ.get("RECPIPE_HOME") or DEFAULT_HOME
        return cls(Path(chosen).expanduser().resolve())

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def examples(self) -> Path:
        return self.lake / "examples"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def create(self) -> Workspace:
        """Create the folders (idempotent) and return self."""
        for path in (self.lake, self.quarantine, self.raw, self.artifacts, self.prefect_home):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def configure_environment(self) -> None:
        """Point MLflow and Prefect at this workspace. Call before importing prefect."""
        self.create()
        os.environ["RECPIPE_HOME"] = str(self.root)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        os.environ.setdefault("PREFECT_HOME", str(self.prefect_home))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
