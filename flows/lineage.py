"""Lineage tags on every MLflow run recpipe starts: which code, which data, which flow run.

A run found in the MLflow UI (a ranker, a pretrained encoder, an allocator, an offline A/B)
answers from its tags alone:

- ``mlflow.source.git.commit`` / ``mlflow.source.git.branch``: the commit of the recpipe
  checkout that ran (MLflow sets them itself only for scripts, not for the ``recpipe``
  console command), and ``recpipe.git.dirty`` = "true" when that checkout had uncommitted
  changes; absent when recpipe is not run from a git checkout;
- ``recpipe.version``: the installed package version;
- ``recpipe.data.path`` / ``recpipe.data.fingerprint``: the input it read (examples folder,
  allocation log, held-out split) and the SHA-256 of its bytes (``flows.caching.fingerprint``:
  two runs with the same fingerprint saw the same data);
- ``recpipe.prefect.flow_run_id`` (+ ``flow_run_name``, ``flow_name``): the Prefect flow
  run it belongs to, e.g. a nightly; the runs of one nightly are
  ``mlflow.search_runs(filter_string="tags.`recpipe.prefect.flow_run_id` = '<id>'")``.
  ``torchrun`` ranks are separate processes, so the launcher hands the flow run over in
  :data:`FLOW_RUN_ENV`;
- ``recpipe.host`` / ``recpipe.pid`` / ``recpipe.process_space``: the process that holds
  the run open, and the boot and PID namespace its pid is counted in (containers sharing a
  host name each have their own). A run whose process died (killed mid-training) would stay
  RUNNING forever; :func:`start_run` first ends such runs of its experiment as KILLED
  (``recpipe.abandoned`` says why), judging only runs of its own process space.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from flows.caching import fingerprint

FLOW_RUN_ENV = "RECPIPE_FLOW_RUN"
"""JSON of the ``recpipe.prefect.*`` tags, set by ``flows.torchrun.launch`` for its ranks."""
_REPO_ROOT = Path(__file__).resolve().parents[1]


def start_run(experiment_id: str, run_name: str, data: Path | str | None = None):
    """``mlflow.start_run`` with the tags of :func:`new_run_tags`."""
    import mlflow

    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                            tags=new_run_tags(experiment_id, data))


def new_run_tags(experiment_id: str, data: Path | str | None = None) -> dict[str, str]:
    """The :func:`lineage_tags` of a run about to start in ``experiment_id``, after ending
    that experiment's runs abandoned by dead processes (:func:`end_abandoned_runs`); for
    code that starts the run itself (``evaluation.ab_mlflow``)."""
    end_abandoned_runs(experiment_id)
    return lineage_tags(data)


def end_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` whose recpipe process (same host,
    ``recpipe.pid``) no longer exists; returns their ids. Runs of live processes, of other
    hosts, or without the tags are left alone."""
    from mlflow import MlflowClient

    client = MlflowClient()
    here = _process_space()
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if (here is None or tags.get("recpipe.process_space") != here
                or not tags.get("recpipe.pid", "").isdigit()):
            continue  # another machine, container or boot: its pids are not ours to test
        if _process_exists(int(tags["recpipe.pid"])):
            continue
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue  # it ended between the search and now
        client.set_tag(run.info.run_id, "recpipe.abandoned",
                       f"process {tags['recpipe.pid']} on {tags.get('recpipe.host')} ended "
                       "without closing this run (killed); marked KILLED by the next run")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


def _process_space() -> str | None:
    """This machine's boot and this process's PID namespace ("<boot id>/pid:[inode]"), the
    space a pid means something in; None where /proc does not say (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lineage_tags(data: Path | str | None = None) -> dict[str, str]:
    """The tags above for a run that reads ``data`` (a file or folder; None: no data tags)."""
    tags = {"recpipe.version": _package_version(), **_git_tags(), **flow_run_tags(),
            "recpipe.host": socket.gethostname(), "recpipe.pid": str(os.getpid())}
    space = _process_space()
    if space is not None:
        tags["recpipe.process_space"] = space
    if data is not None:
        data = Path(data)
        tags["recpipe.data.path"] = str(data.resolve())
        tags["recpipe.data.fingerprint"] = fingerprint(data).rsplit(":", 1)[-1]
    return tags


def flow_run_tags() -> dict[str, str]:
    """``recpipe.prefect.*`` of the Prefect flow run this code runs in (directly, in one of
    its tasks, or in a ``torchrun`` rank it launched); {} outside any flow run."""
    from prefect.context import FlowRunContext, TaskRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        return {"recpipe.prefect.flow_run_id": str(context.flow_run.id),
                "recpipe.prefect.flow_run_name": context.flow_run.name,
                "recpipe.prefect.flow_name": context.flow.name if context.flow else ""}
    task = TaskRunContext.get()
    if task is not None and task.task_run.flow_run_id is not None:
        return {"recpipe.prefect.flow_run_id": str(task.task_run.flow_run_id)}
    handed_over = os.environ.get(FLOW_RUN_ENV)
    return json.loads(handed_over) if handed_over else {}


def _package_version() -> str:
    try:
        return version("recpipe")
    except PackageNotFoundError:
        return "unknown"


@functools.cache
def _git_tags() -> dict[str, str]:
    """Commit, branch and dirtiness of the checkout holding this code, or {} (no git, no
    checkout, or git too slow to answer)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_REPO_ROOT), *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != _REPO_ROOT:
            return {}  # an installed copy inside some other repository
        tags = {"mlflow.source.git.commit": git("rev-parse", "HEAD"),
                "recpipe.git.dirty": str(bool(git("status", "--porcelain",
                                                  "--untracked-files=no"))).lower()}
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        if branch != "HEAD":  # detached: no branch
            tags["mlflow.source.git.branch"] = branch
        return tags
    except (OSError, subprocess.SubprocessError):
        return {}
