"""Per-date partition work fanned out as Prefect mapped tasks, on threads or on Dask.

Ingestion stages the input once, then merges every date partition independently
(:func:`features.ingest.merge_partition`), then publishes all of them at once. The merges are
Prefect task runs (``merge-partition``, one per date, visible in the UI) submitted to a task
runner: a thread pool in this process (default), or a Dask cluster through prefect-dask —
an existing one (``address="tcp://scheduler:8786"``) or a local one started for the run.
Dask workers on other machines must see the workspace at the same path (shared filesystem)
and have recpipe installed; arguments and results are paths and counts only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from features.ingest import PartitionMerge, StagedIngest, ingest, merge_partition
from flows.runners import RUNNERS


@task(name="merge-partition", retries=1, retry_delay_seconds=2)
def merge_partition_task(staged: StagedIngest, day: date) -> PartitionMerge:
    return merge_partition(staged, day)


@dataclass(frozen=True)
class PartitionRunner:
    """Where the per-partition tasks run.

    Attributes:
        kind: ``"threads"`` (this process) or ``"dask"``.
        address: Dask scheduler address; None with ``"dask"`` starts a local cluster.
        workers: threads, or worker processes of a local Dask cluster (an existing cluster
            has its own). Each merge in flight holds one date partition, old and new rows
            (about 0.5 GB for 1.2M events), so memory grows with this, not with the input.
    """

    kind: str = "threads"
    address: str | None = None
    workers: int = 2

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.kind!r}")
        if self.address and self.kind != "dask":
            raise ValueError(f"an address ({self.address}) needs runner 'dask'")
        if self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")

    def task_runner(self) -> TaskRunner:
        if self.kind == "threads":
            return ThreadPoolTaskRunner(max_workers=self.workers)
        from prefect_dask import DaskTaskRunner

        if self.address:
            return DaskTaskRunner(address=self.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": self.workers, "processes": True,
                                              "threads_per_worker": 1})

    def merge_all(self, staged: StagedIngest, days: Sequence[date]) -> list[PartitionMerge]:
        """``merge_partition(staged, day)`` for every day, as mapped tasks; in ``days`` order."""
        if not days:
            return []
        with self.task_runner() as runner:
            futures = runner.map(merge_partition_task,
                                 {"staged": unmapped(staged), "day": list(days)})
            return [future.result() for future in futures]


@flow(name="recpipe-ingest")
def ingest_flow(source: str, input_path: str, lake_dir: str, quarantine_dir: str,
                runner: str = "threads", address: str | None = None) -> dict:
    """``recpipe ingest --runner``: one flow run whose ``merge-partition`` tasks are mapped on
    ``runner``. Outside a flow, every worker thread would start its own temporary Prefect
    server against the same database; the flow starts one before any of them."""
    merges = PartitionRunner(runner, address).merge_all
    return ingest(source, Path(input_path), Path(lake_dir), Path(quarantine_dir),
                  merge_all=merges).to_dict()
