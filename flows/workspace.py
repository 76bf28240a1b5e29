"""The workspace: one folder that every command reads and writes (``RECPIPE_HOME``).

Layout: ``lake/`` (events and examples), ``quarantine/``, ``mlflow.db`` (MLflow tracking,
SQLite), ``mlartifacts/`` (MLflow artifacts), ``prefect/`` (PREFECT_HOME; ``prefect/cache``
holds the nightly's task cache), ``raw/`` (raw simulator output per night).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "workspace"
TRACKING_URI_ENV = "RECPIPE_TRACKING_URI"
"""Set it (e.g. ``http://mlflow.internal:5000``) to use a shared MLflow tracking server and
registry instead of the workspace's SQLite file."""


class WorkspaceBusyError(RuntimeError):
    """Another process holds the workspace's run lock (say, a nightly run already going)."""


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
        """``$RECPIPE_TRACKING_URI`` when set (a shared server), else the workspace's SQLite."""
        return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def cache(self) -> Path:
        """Prefect task results and cache records of the nightly flow (flows.caching)."""
        return self.prefect_home / "cache"

    def create(self) -> Workspace:
        """Create the folders (idempotent) and return self."""
        for path in (self.lake, self.quarantine, self.raw, self.artifacts, self.prefect_home):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def configure_environment(self) -> None:
        """Point MLflow and Prefect at this workspace (environment only; nothing is created).
        Call before anything imports prefect: Prefect reads its settings once, at import."""
        os.environ["RECPIPE_HOME"] = str(self.root)
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        # MLflow's artifact bars would redraw into log files, as ours do not
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                              str(sys.stderr.isatty()).lower())
        os.environ.setdefault("PREFECT_HOME", str(self.prefect_home))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
        # `recpipe ingest --runner ...` runs mapped tasks without a flow run around them
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

    @property
    def run_lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def run_lock_holder_file(self) -> Path:
        """Who took the run lock last, written whole by ``exclusive_run``."""
        return self.root / "run.holder"

    def run_lock_holder(self) -> str:
        """Who took the run lock last, as "<what> (pid P, since T)", or "unknown"."""
        try:
            holder = json.loads(self.run_lock_holder_file.read_text())
            return f"{holder['what']} (pid {holder['pid']}, since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown"

    @contextmanager
    def exclusive_run(self, what: str) -> Iterator[None]:
        """Hold the workspace's run lock while ``what`` runs, or raise WorkspaceBusyError
        naming the holder. An OS lock (``flock``) on ``run.lock``: the kernel releases it
        when its process ends, so a killed run leaves no stale lock behind."""
        self.create()
        handle = self.run_lock.open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.run_lock_holder()
                raise WorkspaceBusyError(
                    f"workspace {self.root} is busy: {holder} holds {self.run_lock}; wait for it "
                    "to finish (or stop it) and start again") from None
            details = self.run_lock.with_name(f".{self.run_lock.name}.{os.getpid()}.tmp")
            details.write_text(json.dumps({"what": what, "pid": os.getpid(),
                                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            details.replace(self.run_lock_holder_file)  # whole, never half-written
            yield
        finally:
            handle.close()  # closing the file releases the lock
