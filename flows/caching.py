"""Resuming a nightly run: Prefect task caching keyed on what each task reads.

A task's cache key hashes its name, its parameters and the content (SHA-256) of every file
under the paths it reads (:class:`ReadsFiles`). A run killed mid-way and started again with
the same parameters finds the records of the tasks that completed and skips them (their
state is ``Cached``: no second training, no second registered version); a task whose inputs
changed (new logs, a rebuilt lake) runs again, and so does everything downstream of it,
because its outputs are the next task's inputs. A task's record is not reused either when
what it wrote is gone or changed since its last run (:func:`outputs_changed`; its outputs'
fingerprints are kept in ``prefect/outputs``): it runs again and rebuilds them.

Records and results live in the workspace (``prefect/cache``), so deleting a workspace
deletes its cache. Content, not modification times, is hashed: a deterministic step rerun
(e.g. the simulator with the same seed) rewrites identical bytes and keeps the keys below
it valid. ``fresh=True`` ignores the records and overwrites them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy

from flows.workspace import Workspace

PathsRead = Callable[[dict[str, Any]], Iterable[Path]]
"""Task parameters -> the files or folders the task reads."""

_CHUNK = 1 << 20


def reads_nothing(_: dict[str, Any]) -> Iterable[Path]:
    return ()


@dataclass
class ReadsFiles(CachePolicy):
    """Cache key = task name + parameters + content of the files under ``reads(parameters)``."""

    reads: PathsRead = reads_nothing

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        digest = hashlib.sha256(task_ctx.task.name.encode())
        digest.update(json.dumps(inputs, sort_keys=True, default=str).encode())
        for root in self.reads(inputs):
            digest.update(fingerprint(Path(root)).encode())
        return digest.hexdigest()


def fingerprint(root: Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``root`` (or of the file
    ``root``); names starting with "." (staging folders, locks) are skipped. "missing" when
    ``root`` does not exist."""
    if not root.exists():
        return f"{root}:missing"
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if path != root else path.name).encode())
        stat = path.stat()
        digest.update(_file_digest(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return f"{root}:{digest.hexdigest()}"


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, inode: int, size: int, mtime_ns: int) -> bytes:
    """SHA-256 of one file's bytes, remembered per (inode, size, mtime) within the process:
    two tasks of one run that read the same examples hash them once (a rewritten file has a
    new mtime, a replaced one a new inode, so neither is mistaken for the old bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def outputs_changed(workspace: Workspace, task_name: str, writes: Sequence[Path]) -> bool:
    """True when a record of ``task_name`` must not be reused: an output in ``writes`` is
    missing, or is not what the task's last run left there (the fingerprints
    :func:`record_outputs` wrote), e.g. a lake partition deleted or the examples rebuilt by
    hand with other settings since. No record of the outputs: True."""
    if not writes:
        return False
    if not all(path.exists() for path in writes):
        return True
    try:
        recorded = json.loads(_outputs_record(workspace, task_name).read_text())
    except (OSError, ValueError):
        return True
    return recorded != [fingerprint(path) for path in writes]


def record_outputs(workspace: Workspace, task_name: str, writes: Sequence[Path]) -> None:
    """Remember the fingerprints of what ``task_name`` left in ``writes`` (atomically)."""
    if not writes:
        return
    record = _outputs_record(workspace, task_name)
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.partial")
    partial.write_text(json.dumps([fingerprint(path) for path in writes]))
    os.replace(partial, record)


def _outputs_record(workspace: Workspace, task_name: str) -> Path:
    return workspace.prefect_home / "outputs" / f"{task_name}.json"


def cached(task: Task, workspace: Workspace, reads: PathsRead = reads_nothing,
           fresh: bool = False) -> Task:
    """``task`` with its results persisted in ``workspace`` and cached by :class:`ReadsFiles`;
    ``fresh`` runs it regardless of a record (and replaces the record)."""
    return task.with_options(
        cache_policy=ReadsFiles(reads=reads),
        result_storage=workspace.cache,
        persist_result=True,
        refresh_cache=fresh,
    )
