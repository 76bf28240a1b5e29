"""The ``--nproc N`` launcher shared by ``recpipe train-ranker``, ``recpipe pretrain`` and
``recpipe train-allocator``: the CLI options, torchrun's rendezvous, the launch and one rank.

The launcher writes the job (a JSON-able dict) to a temporary file and starts ``torchrun``
(``python -m torch.distributed.run``) with the same command re-invoked per rank
(``recpipe <command> --home H --rank-job FILE``); each rank joins the process group
(``models.distributed.init_rank``), runs the command's step with its ``Rank``, and global rank
0 writes the step's summary where the launcher reads it back. What a rank trains, and how
its tables are sharded, is in ``models.distributed``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flows.workspace import Workspace

if TYPE_CHECKING:
    from models.distributed import Rank


def add_distributed_arguments(parser: argparse.ArgumentParser, command: str,
                              sharding: bool = True) -> None:
    """``--nproc`` and torchrun's rendezvous options (and ``--sharding``), plus the hidden
    ``--rank-job`` the launcher passes to every rank."""
    group = parser.add_argument_group(
        "distributed training (torchrun + TorchRec DistributedModelParallel; README: "
        "Distributed training)")
    group.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="training processes on this node (>1: launch torchrun; one "
                            "per GPU with CUDA, else CPU processes with gloo)")
    if sharding:
        group.add_argument("--sharding", choices=["auto", "table_wise", "column_wise"],
                           default="auto",
                           help="how the planner may shard embedding tables (auto: it picks "
                                "table-wise or column-wise per table)")
    group.add_argument("--nnodes", default="1",
                       help="torchrun --nnodes: number of nodes (or MIN:MAX)")
    group.add_argument("--node-rank", type=int,
                       help="torchrun --node-rank (static rendezvous only)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                       help="torchrun --rdzv-endpoint: the rendezvous host (multi-node)")
    group.add_argument("--rdzv-backend", default="c10d", help="torchrun --rdzv-backend")
    group.add_argument("--rdzv-id", default=f"recpipe-{command}",
                       help="torchrun --rdzv-id: the same on every node of one job")
    parser.add_argument("--rank-job", type=Path, help=argparse.SUPPRESS)  # set by the launcher


def is_distributed(args: argparse.Namespace) -> bool:
    """``--nproc`` > 1 or more than one node (UserError for ``--nproc`` < 1)."""
    from flows.cli import UserError

    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    return args.nproc > 1 or args.nnodes != "1"


def default_embedding_optimizer(distributed: bool) -> str:
    """Adam, except distributed without CUDA: fbgemm-gpu-cpu's fused kernel (the one TorchRec
    shards tables with) has no Adam on CPU, so Adagrad."""
    if not distributed:
        return "adam"
    import torch

    return "adam" if torch.cuda.is_available() else "adagrad"


def torchrun_rendezvous(args: argparse.Namespace) -> list[str]:
    """torchrun's rendezvous options: ``--standalone`` (a free local port) on one node, else
    ``--nnodes``, ``--rdzv-backend``, ``--rdzv-endpoint``, ``--rdzv-id`` (and ``--node-rank``)
    as given."""
    from flows.cli import UserError

    if args.nnodes == "1" and args.rdzv_endpoint is None:
        return ["--standalone"]
    if args.rdzv_endpoint is None:
        raise UserError("multi-node training needs --rdzv-endpoint HOST:PORT (the same on "
                        "every node)")
    options = ["--nnodes", args.nnodes, "--rdzv-backend", args.rdzv_backend,
               "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
    if args.node_rank is not None:
        options += ["--node-rank", str(args.node_rank)]
    return options


def launch(workspace: Workspace, command: str, job: dict, nproc: int,
           rendezvous: list[str] | None = None) -> dict:
    """Run ``recpipe <command> --rank-job FILE`` on ``nproc`` ranks of this node under
    ``torchrun`` (``rendezvous`` default ``--standalone``); ``job`` (JSON-able) is what every
    rank reads from FILE. Returns global rank 0's summary, or {} when rank 0 ran on another
    node. UserError when a rank fails (its error is printed above)."""
    from flows.cli import UserError
    from flows.lineage import FLOW_RUN_ENV, flow_run_tags

    with tempfile.TemporaryDirectory(prefix=f"recpipe-{command}-") as tmp:
        spec, summary_file = Path(tmp) / "job.json", Path(tmp) / "summary.json"
        spec.write_text(json.dumps({**job, "summary": str(summary_file)}))
        argv = [sys.executable, "-m", "torch.distributed.run",
                *(rendezvous or ["--standalone"]), "--nproc-per-node", str(nproc),
                "-m", "flows.cli", command, "--home", str(workspace.root),
                "--rank-job", str(spec)]
        env = dict(os.environ)  # the cores shared out over the ranks (torchrun's default: 1)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        flow_run = flow_run_tags()  # rank 0's MLflow run names the flow run that launched it
        if flow_run:
            env[FLOW_RUN_ENV] = json.dumps(flow_run)
        status = subprocess.run(argv, check=False, env=env).returncode
        if status != 0:
            raise UserError(f"distributed training failed (torchrun exit status {status}); "
                            "the failing rank's error is printed above")
        return json.loads(summary_file.read_text()) if summary_file.exists() else {}


def run_rank(spec_file: Path, body: Callable[[dict, Rank], dict]) -> dict:
    """One torchrun rank: join the process group, run ``body(job, rank)``, and (global rank
    0) write its summary where the launcher reads it."""
    from models.distributed import init_rank

    spec = json.loads(spec_file.read_text())
    rank = init_rank()
    try:
        summary = body(spec, rank)
        if rank.is_main:
            target = Path(spec["summary"])
            partial = target.with_suffix(".tmp")
            partial.write_text(json.dumps(summary, default=str))
            partial.replace(target)
    finally:
        rank.close()
    return summary


CPU_ONLY_DISTRIBUTED: tuple[str, ...] = ("pretrain", "train-allocator")
"""Commands whose ``--nproc`` path builds its batches on the CPU only (not yet on GPUs)."""


def launch_from_cli(workspace: Workspace, command: str, job: dict,
                    args: argparse.Namespace) -> dict:
    """:func:`launch` with the command line's ``--nproc`` and rendezvous options, then one
    line on how it ran. Returns global rank 0's summary; on a node whose ranks did not include
    global rank 0, ``{"logged_on_other_node": True, ...}`` (the caller returns it as is)."""
    if command in CPU_ONLY_DISTRIBUTED:
        import torch

        if torch.cuda.is_available():
            from flows.cli import UserError

            raise UserError(f"recpipe {command} --nproc does not run on GPUs yet (its batches "
                            "stay on the CPU); hide them (CUDA_VISIBLE_DEVICES=) or drop "
                            "--nproc")
    summary = launch(workspace, command, job, args.nproc, torchrun_rendezvous(args))
    if not summary:  # global rank 0 ran on another node and logged the run there
        print("this node's ranks finished; global rank 0 (node 0) logged the run")
        return {"distributed": {"nproc_per_node": args.nproc, "nnodes": args.nnodes},
                "logged_on_other_node": True}
    info = summary["distributed"]
    tables = ", ".join(f"{table} {spec['sharding_type']}@{spec['ranks']}"
                       for table, spec in info["plan"].items())
    print(f"trained on {info['world_size']} ranks ({info['backend']}, "
          f"{info['per_rank_batch']} per rank per step): {tables}")
    return summary


def log_distributed(info: dict) -> None:
    """The distributed run's description → the active MLflow run (params and JSON)."""
    import mlflow

    mlflow.log_params({"distributed.backend": info["backend"],
                       "distributed.per_rank_batch": info["per_rank_batch"],
                       "distributed.sharding_types":
                           ",".join(info["sharding"]["sharding_types"])})
    mlflow.log_params({f"distributed.plan.{table}": spec["sharding_type"]
                       for table, spec in info["plan"].items()})
    mlflow.log_dict(info, "distributed.json")
