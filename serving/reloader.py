"""Champions from the MLflow registry, kept current while serving.

``ModelWatcher`` resolves ``models:/<ranker>@<alias>`` (and, optionally, the allocator's
alias) to a version, loads that exact version (``models:/<name>/<version>``, so an alias
moving mid-load cannot mix versions), warms it up, and only then swaps in a new immutable
``Snapshot`` with one reference assignment. A request reads ``watcher.current`` once and keeps
that snapshot to the end, so a swap never changes a request in flight, and a version that
fails to load never replaces a working one (the error is reported by ``/health``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow.tracking import MlflowClient

from models.registry import CHAMPION, RANKER_MODEL_NAME, LoadedRanker, alias_version
from serving.allocation import LoadedAllocator, load_allocator
from serving.schemas import Candidate, RankRequest
from serving.scorer import Scorer
from serving.settings import ALLOCATOR_MODEL_NAME

log = logging.getLogger("recpipe.serving")

class ModelNotFoundError(ValueError):
    """The alias the service must serve does not exist (a user error: train/register first)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """Where a loaded model came from."""

    name: str
    alias: str
    version: int
    aliases: tuple[str, ...] = ()
    run_id: str | None = None
    loaded_at: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "alias": self.alias, "version": self.version,
                "aliases": list(self.aliases), "uri": self.uri, "run_id": self.run_id,
                "loaded_at": self.loaded_at}


@dataclass(frozen=True)
class Snapshot:
    """Everything one request uses; never mutated (a new one replaces it)."""

    ranker: ModelVersionInfo
    scorer: Scorer
    allocator: LoadedAllocator | None = None
    allocator_info: ModelVersionInfo | None = None
    allocator_reason: str = "no allocator is configured"
    """Why ``allocator`` is None."""


def load_ranker_version(name: str, version: int) -> LoadedRanker:
    from models.registry import load_ranker

    return load_ranker(f"models:/{name}/{version}")


@dataclass
class WatchStatus:
    """Counters and the latest problem, for ``/health``."""

    polls: int = 0
    swaps: int = 0
    last_poll_at: str | None = None
    last_error: str | None = None
    errors: int = 0
    history: list[dict] = field(default_factory=list)


class ModelWatcher:
    """Loads the ranker (required) and allocator (optional) behind their aliases; ``start``
    polls every ``poll_interval_s`` seconds in a daemon thread and swaps in new versions."""

    def __init__(
        self,
        tracking_uri: str,
        ranker_name: str = RANKER_MODEL_NAME,
        alias: str = CHAMPION,
        allocator_name: str | None = ALLOCATOR_MODEL_NAME,
        task_weights: Mapping[str, float] | None = None,
        poll_interval_s: float = 10.0,
        ranker_loader: Callable[[str, int], LoadedRanker] = load_ranker_version,
        allocator_loader: Callable[[str, int], LoadedAllocator] = load_allocator,
    ) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # pyfunc loading resolves models:/ through it
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.ranker_name, self.alias, self.allocator_name = ranker_name, alias, allocator_name
        self.task_weights = dict(task_weights) if task_weights is not None else None
        self.poll_interval_s = poll_interval_s
        self._load_ranker, self._load_allocator = ranker_loader, allocator_loader
        self._current: Snapshot | None = None
        self._allocator_error: str | None = None
        """Set by ``_build_allocator`` when a registered allocator version failed to load
        (the working one, if any, is kept); reported as ``status.last_error`` (``/health``:
        degraded) until a load succeeds."""
        self._lock = threading.Lock()  # one refresh at a time; readers never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = WatchStatus()

    @property
    def current(self) -> Snapshot:
        """The snapshot to use for one request (read it once per request)."""
        snapshot = self._current
        if snapshot is None:
            raise RuntimeError("ModelWatcher.load() was not called")
        return snapshot

    def load(self) -> Snapshot:
        """First load; raises ModelNotFoundError when the ranker alias does not exist, and
        whatever loading raises otherwise."""
        version = self._resolve(self.ranker_name)
        if version is None:
            raise ModelNotFoundError(
                f"no model version behind models:/{self.ranker_name}@{self.alias} in "
                f"{self.tracking_uri}; train and register one first (`recpipe train-ranker`)"
            )
        with self._lock:
            self._allocator_error = None
            self._current = self._build(None, version)
            self.status.last_error = self._allocator_error
            self._record("loaded", self._current)
        return self._current

    def refresh(self) -> bool:
        """Check the aliases once; swap in whatever moved. True when something was swapped.
        Never raises: problems go to ``status.last_error`` and the old snapshot stays."""
        with self._lock:
            old = self.current
            self.status.polls += 1
            self.status.last_poll_at = _now()
            try:
                version = self._resolve(self.ranker_name)
                if version is None:
                    raise ModelNotFoundError(
                        f"models:/{self.ranker_name}@{self.alias} no longer exists; still "
                        f"serving version {old.ranker.version}"
                    )
                allocator_version = (self._resolve(self.allocator_name)
                                     if self.allocator_name else None)
                loaded_allocator = old.allocator_info.version if old.allocator_info else None
                if version == old.ranker.version and allocator_version == loaded_allocator \
                        and not self._allocator_failed(old, allocator_version):
                    self.status.last_error = None
                    return False
                self._allocator_error = None
                new = self._build(old, version)
            except Exception as error:  # noqa: BLE001 (keep serving the old snapshot)
                self.status.errors += 1
                self.status.last_error = f"{type(error).__name__}: {error}"[:500]
                log.warning("model refresh failed, still serving %s: %s", old.ranker.uri,
                            self.status.last_error)
                return False
            changed = (new.ranker.version != old.ranker.version
                       or new.allocator_info != old.allocator_info)
            self._current = new  # the atomic swap
            self.status.last_error = self._allocator_error
            if self._allocator_error is not None:
                self.status.errors += 1
            if changed:
                self.status.swaps += 1
                self._record("swapped", new)
            return changed

    def start(self) -> None:
        """Poll in a daemon thread until ``stop``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="recpipe-model-watcher",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.refresh()

    def _resolve(self, name: str) -> int | None:
        """Version behind ``name@alias``; None when the model or alias does not exist."""
        return alias_version(name, self.alias, self.client)

    def _info(self, name: str, version: int) -> ModelVersionInfo:
        details = self.client.get_model_version(name, str(version))
        return ModelVersionInfo(name, self.alias, version, tuple(details.aliases or ()),
                                details.run_id, _now())

    def _build(self, old: Snapshot | None, version: int) -> Snapshot:
        """A complete snapshot for ranker ``version`` (reusing what did not change), warmed
        up; raises if the ranker cannot be loaded or scored."""
        if old is not None and old.ranker.version == version:
            ranker_info, scorer = old.ranker, old.scorer
        else:
            ranker_info = self._info(self.ranker_name, version)
            scorer = Scorer(self._load_ranker(self.ranker_name, version), self.task_weights)
            warm_up(scorer)
        allocator, allocator_info, reason = self._build_allocator(old)
        return Snapshot(ranker_info, scorer, allocator, allocator_info, reason)

    def _build_allocator(
        self, old: Snapshot | None
    ) -> tuple[LoadedAllocator | None, ModelVersionInfo | None, str]:
        if not self.allocator_name:
            return None, None, "no allocator is configured (--no-allocator)"
        uri = f"models:/{self.allocator_name}@{self.alias}"
        version = self._resolve(self.allocator_name)
        if version is None:
            return None, None, f"no model version behind {uri} is registered"
        if old is not None and old.allocator_info is not None \
                and old.allocator_info.version == version:
            return old.allocator, old.allocator_info, old.allocator_reason
        try:
            allocator = self._load_allocator(self.allocator_name, version)
        except Exception as error:  # noqa: BLE001 (the ranking must go on without it)
            message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            log.warning("cannot load allocator %s (version %s): %s", uri, version, message)
            failure = f"{uri} (version {version}) failed to load: {message}"
            if old is not None and old.allocator is not None \
                    and old.allocator_info is not None:  # keep the working one
                self._allocator_error = (f"{failure}; still serving version "
                                         f"{old.allocator_info.version}")
                return old.allocator, old.allocator_info, old.allocator_reason
            self._allocator_error = f"{failure}; serving without an allocator"
            return None, None, failure
        return allocator, self._info(self.allocator_name, version), ""

    @staticmethod
    def _allocator_failed(old: Snapshot, version: int | None) -> bool:
        """A registered allocator that is not loaded (a failed load is retried each poll)."""
        return version is not None and old.allocator is None

    def _record(self, event: str, snapshot: Snapshot) -> None:
        entry = {"event": event, "at": _now(), "ranker_version": snapshot.ranker.version,
                 "allocator_version": (snapshot.allocator_info.version
                                       if snapshot.allocator_info else None)}
        self.status.history = [*self.status.history[-19:], entry]
        log.info("%s ranker %s, allocator %s", event, snapshot.ranker.uri,
                 snapshot.allocator_info.uri if snapshot.allocator_info else "none")


def warm_up(scorer: Scorer, candidates: int = 8) -> None:
    """Score a throwaway request once, so the first real request pays no lazy setup."""
    request = RankRequest(user_id=0, candidates=[Candidate(item_id=i) for i in range(candidates)])
    scorer.rank(request)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

