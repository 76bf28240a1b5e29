"""The ``recpipe`` command line. Thin: parse, call a step or a flow, print a summary.

Every command takes ``--home`` (workspace; default ``$RECPIPE_HOME`` or ``./workspace``) and
``--json`` (print one JSON summary object as the last line). Bad input exits with status 2
and a message naming what is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flows.allocation_steps import (
    ALGORITHMS as ALLOCATOR_ALGORITHMS,
)
from flows.allocation_steps import (
    add_train_allocator_arguments,
    cmd_train_allocator,
    print_allocator_summary,
    share_cap,
)
from flows.pretrain_steps import add_pretrain_arguments, cmd_pretrain
from flows.torchrun import (
    add_distributed_arguments,
    default_embedding_optimizer,
    is_distributed,
    launch_from_cli,
    run_rank,
)
from flows.workspace import Workspace, WorkspaceBusyError
from serving.cli import (
    add_score_arguments,
    add_serve_arguments,
    at_least,
    cmd_score,
    cmd_serve,
    parse_task_weights,
    port_number,
    positive_float,
)

if TYPE_CHECKING:
    from flows.partitions import PartitionRunner

USER_ERROR_EXIT = 2
TRAINING_FAILED_EXIT = 3
"""Exit status when training diverged (loss NaN or infinite): nothing was registered."""


LOCKED_COMMANDS = frozenset({"ingest", "features", "train-ranker", "pretrain",
                             "train-allocator", "ab"})
"""Commands that write the workspace's lake or registry: they hold its run lock for their
whole run, so none of them interleaves with a nightly run or with each other (``nightly``
and ``schedule`` take the lock inside each flow run; torchrun ranks run under their
launcher's)."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing prerequisite): exit 2, no traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()  # imports no Prefect (a test checks): it is configured below
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0), or a bad option (2; argparse printed which)
        return int(done.code or 0)
    try:
        workspace = Workspace.from_env(args.home).create()
        workspace.configure_environment()
        summary = run_command(args, workspace)
    except (UserError, WorkspaceBusyError, ValueError, OSError) as error:
        # ValueError: IngestError, FeatureBuildError, bad configs; OSError: a path given
        # that cannot be used (its message names it)
        print(f"recpipe {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except FloatingPointError as error:  # models.training.TrainingDivergedError, SL-MGAC
        print(f"recpipe {args.command}: error: training diverged, nothing registered: "
              f"{error}", file=sys.stderr)
        return TRAINING_FAILED_EXIT
    if args.json:
        print(json_line(summary))
    return 0


def json_line(summary: dict) -> str:
    """The ``--json`` line: strict JSON that every parser reads (NaN and infinities, e.g. the
    AUC of a task without positives, become null; numpy numbers become numbers)."""
    return json.dumps(_json_safe(summary), allow_nan=False, default=str)


def _json_safe(value: object) -> object:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if type(value).__module__ == "numpy":  # scalars and arrays
        return _json_safe(value.tolist())  # type: ignore[attr-defined]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_command(args: argparse.Namespace, workspace: Workspace) -> dict:
    """The command's handler, under the workspace's run lock for ``LOCKED_COMMANDS`` (not
    for a multi-node launch: every node's launcher would contend for the one lock of the
    shared workspace, and the second node would stop while the first waits for it)."""
    multi_node = getattr(args, "nnodes", "1") != "1"
    if (args.command in LOCKED_COMMANDS and getattr(args, "rank_job", None) is None
            and not multi_node):
        with workspace.exclusive_run(f"recpipe {args.command}"):
            return args.handler(args, workspace)
    return args.handler(args, workspace)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="workspace folder (default $RECPIPE_HOME or ./workspace)")
    common.add_argument("--json", action="store_true",
                        help="print one JSON summary object as the last line")
    parser = argparse.ArgumentParser(prog="recpipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    sim = command("simulate", cmd_simulate, "simulate feed logs with ground truth")
    sim.add_argument("--out", type=Path, required=True, help="output folder")
    add_simulation_options(sim)

    ing = command("ingest", cmd_ingest, "validate raw logs into the Parquet lake")
    ing.add_argument("--source", choices=["canonical", "simulator", "kuairand"], required=True)
    ing.add_argument("--input", type=Path, required=True, help="file or folder to ingest")
    ing.add_argument("--lake", type=Path, help="lake folder (default <home>/lake)")
    ing.add_argument("--quarantine", type=Path,
                     help="quarantine folder (default <home>/quarantine)")
    add_partition_options(ing, default=None)

    feat = command("features", cmd_features, "build train/valid/test examples from the lake")
    add_feature_options(feat)
    feat.add_argument("--valid-days", type=at_least(1), default=1)
    feat.add_argument("--test-days", type=at_least(1), default=1)
    feat.add_argument("--user-buckets", type=at_least(1), metavar="K",
                      help="build users in K buckets, one in memory at a time (default: "
                           "ceil(lake events / --max-rows-in-memory)); never changes the "
                           "examples")
    feat.add_argument("--max-rows-in-memory", type=at_least(1), default=2_000_000, metavar="N",
                      help="about how many events are held at once (sizes the default K "
                           "and the merge windows)")

    train = command("train-ranker", cmd_train_ranker,
                    "train a multi-task ranker on the examples, log and register it in MLflow")
    add_ranker_options(train, with_seed=True)
    train.add_argument("--batch-size", type=at_least(2), default=512)
    train.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate")
    train.add_argument("--no-register", action="store_true", help="log the run only")
    train.add_argument("--ground-truth", type=Path, metavar="DIR",
                       help="simulator output the examples came from: also log the oracle "
                            "AUC of its true probabilities and each task's share of it")
    train.add_argument("--history-pooling", choices=["attention", "mean"], default="attention",
                       help="behaviour history by target attention (default) or its mean")
    train.add_argument("--loss-weighting", choices=["fixed", "uncertainty"], default="fixed",
                       help="combine task losses with fixed weights or learned uncertainty")
    train.add_argument("--task-weights", type=parse_task_weights,
                       help='fixed loss weights, e.g. "click=1,watch_time=0.5" (default 1 each)')
    train.add_argument("--user-encoder", metavar="MODEL_URI",
                       help="pretrained user encoder for the ranker's user slot, e.g. "
                            "models:/recpipe-user-encoder@champion (`recpipe pretrain`)")
    train.add_argument("--fine-tune-user-encoder", action="store_true",
                       help="train the pretrained encoder with the ranker (default: frozen)")
    train.add_argument("--embedding-optimizer",
                       choices=["adam", "adagrad", "rowwise_adagrad", "sgd"],
                       help="optimiser of the embedding tables (default adam; adagrad when "
                            "distributed on CPU, where fbgemm's fused kernel has no Adam)")
    add_distributed_arguments(train, "train-ranker")

    night = command("nightly", cmd_nightly,
                    "one nightly Prefect flow run: simulate, ingest, features, pretrain, "
                    "train and A/B the ranker and the allocator, register, promote")
    add_nightly_options(night)

    sched = command("schedule", cmd_schedule,
                    "serve the nightly deployment on a real Prefect server, on a cron schedule")
    sched.add_argument("--cron", default="0 2 * * *", help='cron expression (default "0 2 * * *")')
    sched.add_argument("--timezone", default="UTC", help="IANA timezone of the cron")
    sched.add_argument("--port", type=port_number, default=4200, help="Prefect server port")
    add_nightly_options(sched)

    ope = command("ope", cmd_ope,
                  "off-policy estimates of a policy's value from logged bandit feedback")
    ope.add_argument("dataset", choices=["obd"], help="obd: the Open Bandit Dataset benchmark")
    ope.add_argument("--data", type=Path,
                     help="Open Bandit folder with random/ and bts/ (default ../shared/data/obd)")
    ope.add_argument("--campaign", choices=["all", "men", "women"], default="all")
    ope.add_argument("--behavior", choices=["random", "bts"], default="random",
                     help="policy whose logs are used")
    ope.add_argument("--evaluation", choices=["bts", "random"], default="bts",
                     help="policy whose value is estimated (truth: its own logs' mean click)")
    ope.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples")
    ope.add_argument("--n-sim", type=at_least(1), default=100_000,
                     help="Monte-Carlo draws for the Bernoulli TS action probabilities")
    ope.add_argument("--no-refit", action="store_true",
                     help="hold the reward model fixed in the bootstrap (faster, DM too sure)")
    ope.add_argument("--seed", type=int, default=0, help="seed (Monte Carlo, folds, bootstrap)")

    ab = command("ab", cmd_ab, "offline A/B of a registered model's challenger vs champion; "
                 "promote when the gates pass")
    ab.add_argument("--model", default="recpipe-ranker",
                    help="registered model name (recpipe-ranker or recpipe-allocator)")
    ab.add_argument("--challenger", default="challenger", help="alias or version (e.g. 3)")
    ab.add_argument("--champion", default="champion", help="alias or version")
    ab.add_argument("--gates", type=Path, help="JSON gate config (evaluation.ab.GateConfig)")
    ab.add_argument("--primary", help="override the primary metric, e.g. click/gauc")
    ab.add_argument("--min-improvement", type=float, help="override the primary's margin")
    ab.add_argument("--test", type=Path,
                    help="held-out data: examples for a ranker (default <home>/lake/examples/"
                    "test.parquet), an allocation log for an allocator (default: a held-out "
                    "simulator world, with true values)")
    ab.add_argument("--eval-users", type=at_least(1),
                    help="allocator: users of the held-out simulator world (default: the log's)")
    ab.add_argument("--live-share-cap", type=share_cap,
                    help="allocator: the platform cap the challenger's live share must stay "
                    "under (default: the held-out world's; with --test, the champion's)")
    ab.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    ab.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ab.add_argument("--dry-run", action="store_true", help="decide and log, never promote")

    pretrain = command("pretrain", cmd_pretrain,
                       "pretrain the self-supervised user encoder on behaviour histories")
    add_pretrain_arguments(pretrain)
    allocator = command("train-allocator", cmd_train_allocator,
                        "train the live-stream allocation policy offline from logged decisions")
    add_train_allocator_arguments(allocator)
    serve = command("serve", cmd_serve,
                    "serve the champion ranker over HTTP: POST /rank, GET /health, GET /models")
    add_serve_arguments(serve)
    score = command("score", cmd_score,
                    "score a Parquet/CSV file of raw rows with a registered ranker")
    add_score_arguments(score)

    ui = command("ui", cmd_ui, "print (or --open) the MLflow and Prefect UIs of the workspace")
    ui.add_argument("--open", action="store_true", help="start both UI servers and wait")
    ui.add_argument("--mlflow-port", type=port_number, default=5000)
    ui.add_argument("--prefect-port", type=port_number, default=4200)
    return parser


def add_nightly_options(parser: argparse.ArgumentParser) -> None:
    """The nightly flow's parameters (``recpipe nightly`` and the scheduled deployment)."""
    add_simulation_options(parser)
    parser.add_argument("--source", choices=["canonical", "simulator", "kuairand"],
                        default="simulator")
    parser.add_argument("--input", type=Path, help="raw logs to ingest (default: simulate)")
    add_ranker_options(parser)
    add_feature_options(parser)
    parser.add_argument("--pretrain-method", choices=["adaptssr", "cl4srec", "mip", "none"],
                        default="adaptssr", help="user-encoder pretraining (none: skip)")
    parser.add_argument("--pretrain-steps", type=at_least(1),
                        help="pretraining steps (default 1000)")
    parser.add_argument("--ranker-user-encoder", action="store_true",
                        help="give the ranker the night's pretrained encoder (frozen)")
    parser.add_argument("--allocator-algo", choices=[*ALLOCATOR_ALGORITHMS, "none"],
                        default="sl_mgac",
                        help="live-stream allocator (simulator logs only; none: skip)")
    parser.add_argument("--allocator-steps", type=at_least(1), help="allocator gradient steps")
    parser.add_argument("--allocator-eval-users", type=at_least(1),
                        help="users of the held-out simulator world for true values and A/B")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun every task (default: reuse the tasks whose parameters and "
                             "inputs are unchanged, e.g. to resume a killed run)")
    add_partition_options(parser, default="threads")


def add_partition_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """Where the per-date partition tasks run (flows.partitions)."""
    from flows.runners import RUNNERS

    parser.add_argument("--runner", choices=RUNNERS, default=default,
                        help="run the per-date partition work as Prefect mapped tasks on "
                             "threads or on Dask (prefect-dask)"
                             + ("" if default else "; default: in this process, no Prefect"))
    parser.add_argument("--address", metavar="tcp://HOST:8786",
                        help="scheduler of an existing Dask cluster (with --runner dask; "
                             "default: a local cluster for the run)")


def partition_runner(args: argparse.Namespace) -> PartitionRunner | None:
    """The ``--runner`` / ``--address`` arguments as a PartitionRunner (None: plain)."""
    from flows.partitions import PartitionRunner

    if args.address and args.runner != "dask":
        raise UserError(f"--address {args.address} needs --runner dask")
    return PartitionRunner(args.runner, args.address) if args.runner else None


def nightly_parameters(args: argparse.Namespace, workspace: Workspace) -> dict:
    """``add_nightly_options`` arguments as the nightly flow's parameters."""
    from features.build import FeatureConfig

    if args.input is None and args.source != "simulator":
        raise UserError(f"--source {args.source} needs --input (only the simulator makes its "
                        "own logs)")
    split = FeatureConfig()
    needed = split.valid_days + split.test_days + 1
    if args.input is None and args.days < needed:
        raise UserError(f"--days {args.days}: the time split needs at least {needed} simulated "
                        f"days ({split.valid_days} valid and {split.test_days} test after "
                        "training days)")
    return {
        "home": str(workspace.root), "source": args.source,
        "input_path": str(args.input.resolve()) if args.input else None,
        "users": args.users, "days": args.days, "seed": args.seed, "arch": args.arch,
        "epochs": args.epochs, "history_length": args.history_length,
        "pretrain_method": None if args.pretrain_method == "none" else args.pretrain_method,
        "pretrain_steps": args.pretrain_steps, "ranker_user_encoder": args.ranker_user_encoder,
        "allocator_algo": None if args.allocator_algo == "none" else args.allocator_algo,
        "allocator_steps": args.allocator_steps,
        "allocator_eval_users": args.allocator_eval_users, "fresh": args.fresh,
        "partition_runner": partition_runner(args).kind, "dask_address": args.address,
    }


def add_simulation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=2000, help="simulated users")
    parser.add_argument("--days", type=int, default=7, help="simulated days")
    parser.add_argument("--seed", type=int, default=0, help="seed")


def add_ranker_options(parser: argparse.ArgumentParser, with_seed: bool = False) -> None:
    from models.rankers import ARCHITECTURES

    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mmoe")
    parser.add_argument("--epochs", type=at_least(1), default=2)
    if with_seed:  # commands that also simulate take --seed from the simulation options
        parser.add_argument("--seed", type=int, default=0, help="seed")


def add_feature_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history-length", type=at_least(1), default=20,
                        help="N most recent impressions before each example")


def cmd_simulate(args: argparse.Namespace, workspace: Workspace) -> dict:
    from flows.steps import SimulateParams, simulate_step

    summary = simulate_step(args.out, SimulateParams(args.users, args.days, args.seed))
    print(f"simulated {summary['summary']['n_impressions']:,} impressions of {args.users} users "
          f"over {args.days} days → {args.out}")
    return summary


def cmd_ingest(args: argparse.Namespace, workspace: Workspace) -> dict:
    from features.ingest import ingest

    lake = args.lake or workspace.lake
    quarantine = args.quarantine or workspace.quarantine
    runner = partition_runner(args)
    if runner is None:
        report = ingest(args.source, args.input, lake, quarantine).to_dict()
    else:
        from flows.partitions import ingest_flow

        report = ingest_flow(args.source, str(args.input), str(lake), str(quarantine),
                             runner.kind, runner.address)
    print(f"{report['input_rows']:,} rows: {report['accepted']:,} accepted, "
          f"{report['quarantined']:,} quarantined, {report['duplicates']:,} duplicates")
    for note in report["notes"]:
        print(f"recpipe ingest: note: {note}", file=sys.stderr)
    for reason, count in sorted(report["quarantine_reasons"].items()):
        print(f"  quarantined {count:,} × {reason}")
    if report["quarantined"]:
        print(f"  quarantined rows: {report['quarantine_path']}")
    return report


def cmd_features(args: argparse.Namespace, workspace: Workspace) -> dict:
    from features.build import FeatureConfig
    from flows.steps import features_step

    config = FeatureConfig(args.history_length, args.valid_days, args.test_days,
                           user_buckets=args.user_buckets,
                           max_rows_in_memory=args.max_rows_in_memory)
    report = features_step(workspace, config)
    print(f"examples {report['rows']} → {report['out_dir']}")
    return report


def cmd_train_ranker(args: argparse.Namespace, workspace: Workspace) -> dict:
    from flows.steps import RankerJob, register_step, train_ranker_step
    from models.distributed import per_rank_batch

    if args.rank_job is not None:  # one torchrun rank of `--nproc N`
        return run_train_ranker_rank(args.rank_job, workspace)
    distributed = is_distributed(args)
    if distributed and args.nnodes == "1":  # refused here, not after starting the ranks
        try:
            per_rank_batch(args.batch_size, args.nproc)
        except ValueError as error:
            raise UserError(f"--batch-size with --nproc {args.nproc}: {error}") from None
    if not (workspace.examples / "train.parquet").exists():
        raise UserError(f"no examples in {workspace.examples}; run `recpipe features` first")
    embedding_optimizer = args.embedding_optimizer or default_embedding_optimizer(distributed)
    job = RankerJob(
        ranker={"arch": args.arch, "inputs": {"history_pooling": args.history_pooling}},
        train={"epochs": args.epochs, "batch_size": args.batch_size,
               "learning_rate": args.lr, "seed": args.seed,
               "loss_weighting": args.loss_weighting, "task_weights": args.task_weights or {},
               "embedding_optimizer": embedding_optimizer},
        user_encoder=args.user_encoder, fine_tune_user_encoder=args.fine_tune_user_encoder,
        ground_truth=str(args.ground_truth) if args.ground_truth else None,
    )
    if distributed:
        if embedding_optimizer != (args.embedding_optimizer or "adam"):
            print(f"embedding tables train with {embedding_optimizer} (fbgemm's fused CPU "
                  "kernel has no Adam), dense parts with Adam", file=sys.stderr)
        summary = launch_from_cli(workspace, "train-ranker",
                                  ranker_rank_job(job, args.sharding), args)
        if summary.get("logged_on_other_node"):
            return summary
    else:
        summary = train_ranker_step(workspace, job)
    if not args.no_register:
        summary["registered"] = register_step(workspace, summary["model_uri"], summary["run_id"])
    print_metrics(summary["metrics"])
    if "registered" in summary:
        reg = summary["registered"]
        print(f"registered {reg['name']} v{reg['version']} as {', '.join(reg['aliases'])}")
    return summary


def ranker_rank_job(job, sharding: str = "auto") -> dict:
    """What every rank of ``recpipe train-ranker --nproc N`` reads (``flows.torchrun.launch``):
    the ``RankerJob`` and how the planner may shard the tables."""
    import dataclasses

    return {"job": dataclasses.asdict(job), "sharding": sharding}


def run_train_ranker_rank(spec_file: Path, workspace: Workspace) -> dict:
    """One torchrun rank of ``recpipe train-ranker --nproc N``."""
    from flows.steps import RankerJob, train_ranker_step
    from models.distributed import ShardingConfig

    def body(spec: dict, rank) -> dict:  # noqa: ANN001 (a models.distributed.Rank)
        job = RankerJob(**{**spec["job"], "tasks": tuple(spec["job"]["tasks"])})
        return train_ranker_step(workspace, job, rank=rank,
                                 sharding=ShardingConfig.from_name(spec["sharding"]))

    return run_rank(spec_file, body)


def cmd_nightly(args: argparse.Namespace, workspace: Workspace) -> dict:
    parameters = nightly_parameters(args, workspace)
    with workspace.exclusive_run("recpipe nightly, checking the workspace is free"):
        pass  # busy: stop at once, before a Prefect server or a flow run (the flow locks too)
    from flows.nightly import nightly

    summary = nightly(**parameters)
    reused = [name for name, state in summary["task_states"].items() if state == "Cached"]
    if reused:
        print(f"reused (parameters and inputs unchanged; --fresh reruns): {', '.join(reused)}")

    def then(task: str) -> str:  # a reused task's report is that earlier run's, not news
        return " [reused: reported by the earlier run]" if task in reused else ""

    if "pretrain" in summary:
        pre = summary["pretrain"]
        reg = pre["registered"]
        print(f"pretrained {pre['method']}: {pre['users_embedded']} users embedded; "
              f"registered {reg['name']} v{reg['version']} as {', '.join(reg['aliases'])}"
              + then("pretrain-user-encoder"))
    print_metrics(summary["train_ranker"]["metrics"])
    reg = summary["register"]
    print(f"registered {reg['name']} v{reg['version']} as {', '.join(reg['aliases'])}"
          + then("register-ranker"))
    for key, what in (("ab", "ranker"), ("allocator_ab", "allocator")):
        if key in summary:
            print(f"{what} offline A/B ({summary[key]['status']}): {summary[key]['message']}")
            summary[key] = {k: v for k, v in summary[key].items() if k != "markdown"}
    if "train_allocator" in summary:
        print_allocator_summary(summary["train_allocator"])
        if "train-allocator" in reused:
            print(f"train-allocator{then('train-allocator')}")
    print("review: `recpipe ui` prints how to open MLflow and Prefect on this workspace")
    return summary


def default_obd_dir() -> Path:
    """``../shared/data/obd`` from the working directory, else beside the repository."""
    here = Path("../shared/data/obd")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "obd"


def cmd_ope(args: argparse.Namespace, workspace: Workspace) -> dict:
    from evaluation.obd import run_obd
    from evaluation.ope import OPEConfig

    data = args.data or default_obd_dir()
    if not data.is_dir():
        raise UserError(f"{data}: no Open Bandit data there; pass --data DIR (the folder with "
                        "random/, bts/ and prior_bts.yaml)")
    if args.n_boot < 20:
        raise UserError(f"--n-boot must be >= 20, got {args.n_boot}")
    config = OPEConfig(n_boot=args.n_boot, seed=args.seed)
    summary = run_obd(data, args.campaign, args.behavior, args.evaluation, config,
                      n_sim=args.n_sim, refit=not args.no_refit, warn=False,
                      progress=not args.json)
    print(f"Open Bandit {args.campaign}: value of {args.evaluation} from {summary['n']:,} "
          f"{args.behavior} logs ({summary['clicks']} clicks); truth (mean click of its own "
          f"logs) {summary['truth']:.5f} ± {summary['truth_std_error']:.5f}")
    print(f"{'estimator':<10} {'value':>8} {'95% interval':>20} {'rel.err':>8} {'ESS':>8}")
    for name, e in summary["estimates"].items():
        print(f"{name:<10} {e['value']:8.5f} [{e['ci_low']:8.5f}, {e['ci_high']:8.5f}] "
              f"{e['relative_error']:8.3f} {e['ess']:8.0f}")
    for message in summary["weights"]["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    return summary


def cmd_ab(args: argparse.Namespace, workspace: Workspace) -> dict:
    from evaluation.ab import GateConfig
    from flows.evaluation_steps import ABJob, ab_step
    from models.allocators.registry import ALLOCATOR_MODEL_NAME

    gates = GateConfig.from_json(args.gates) if args.gates else None
    overrides = {k: v for k, v in (("primary", args.primary),
                                   ("min_improvement", args.min_improvement)) if v is not None}
    if args.n_boot < 20:
        raise UserError(f"--n-boot must be >= 20, got {args.n_boot}")
    if args.live_share_cap is not None and args.model != ALLOCATOR_MODEL_NAME:
        raise UserError(f"--live-share-cap applies to {ALLOCATOR_MODEL_NAME} only, not "
                        f"{args.model}")
    if workspace.tracking_uri.startswith("sqlite:") and not workspace.mlflow_db.exists():
        raise UserError(f"no MLflow store at {workspace.mlflow_db}; train a model first")
    job = ABJob(model_name=args.model, challenger=args.challenger, champion=args.champion,
                gates=gates, gate_overrides=overrides, n_boot=args.n_boot, seed=args.seed,
                promote=not args.dry_run, test_path=str(args.test) if args.test else None,
                eval_users=args.eval_users, live_share_cap=args.live_share_cap)
    summary = ab_step(workspace, job)
    if summary["table"] is not None:
        from evaluation.ab import MetricTable

        print(MetricTable.from_dict(summary["table"]).to_markdown())
    print(f"{summary['status']}: {summary['message']}")
    if summary.get("run_id"):
        print(f"MLflow evaluation run {summary['run_id']} (`recpipe ui` to open it)")
    return {k: v for k, v in summary.items() if k != "markdown"}


def cmd_schedule(args: argparse.Namespace, workspace: Workspace) -> dict:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:  # before a server is started
        CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValidationError as error:
        raise UserError("; ".join(f"--{problem['loc'][0]} {getattr(args, problem['loc'][0])!r}: "
                                  f"{problem['msg'].removeprefix('Value error, ')}"
                                  for problem in error.errors())) from None
    parameters = nightly_parameters(args, workspace)
    # SIGTERM (a service manager stopping it) ends it like Ctrl-C, through the finally below;
    # once serving, Prefect's runner installs a handler of its own that exits the same way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = None
    try:
        api_url, started = ensure_prefect_server(workspace, args.port)
        os.environ["PREFECT_API_URL"] = api_url  # for the flow-run processes serve starts
        from prefect.schedules import Cron
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.nightly import nightly

        print(f"serving deployment recpipe-nightly/nightly on {api_url} "
              f"with cron {args.cron!r} ({args.timezone}); Ctrl-C stops")
        # this process imported prefect already: its settings must be told, not os.environ
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            nightly.serve(name="nightly", schedules=[Cron(args.cron, timezone=args.timezone)],
                          parameters=parameters)
    finally:
        if started is not None:  # a server this command started ends with it
            stop_server(started)
    return {"api_url": api_url, "cron": args.cron, "timezone": args.timezone}


def ensure_prefect_server(workspace: Workspace, port: int, timeout_s: float = 120.0
                          ) -> tuple[str, subprocess.Popen | None]:
    """The API URL of a healthy Prefect server, and the server process when this started one
    in the background (its own process group; logs in ``<home>/prefect/server.log``) because
    none answered at ``$PREFECT_API_URL`` or the port, else None."""
    api_url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    if answers_health(api_url):
        return api_url, None
    log = (workspace.prefect_home / "server.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PREFECT_HOME": str(workspace.prefect_home)},
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if answers_health(api_url):
                return api_url, server
            time.sleep(1.0)
    except BaseException:  # interrupted while waiting: the server must not outlive us
        stop_server(server)
        raise
    stop_server(server)
    raise UserError(f"the Prefect server did not answer at {api_url} within {timeout_s:.0f} s; "
                    f"see {workspace.prefect_home / 'server.log'}")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def answers_health(base_url: str) -> bool:
    """``GET <base_url>/health`` answers 200 (a Prefect API or an MLflow server is up)."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def cmd_ui(args: argparse.Namespace, workspace: Workspace) -> dict:
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                  workspace.tracking_uri, "--default-artifact-root",
                  workspace.artifacts.as_uri(), "--port", str(args.mlflow_port)]
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--port",
                   str(args.prefect_port)]
    summary = {
        "mlflow_url": f"http://127.0.0.1:{args.mlflow_port}",
        "mlflow_command": " ".join(mlflow_cmd),
        "prefect_url": f"http://127.0.0.1:{args.prefect_port}",
        "prefect_command": (f"PREFECT_HOME={workspace.prefect_home} "
                            "PREFECT_SERVER_ANALYTICS_ENABLED=false " + " ".join(prefect_cmd)),
    }
    print(f"MLflow UI:  {summary['mlflow_command']}\n            then open {summary['mlflow_url']}")
    print(f"Prefect UI: {summary['prefect_command']}\n            then open "
          f"{summary['prefect_url']}")
    if args.open:
        processes = [subprocess.Popen(mlflow_cmd), subprocess.Popen(prefect_cmd)]
        try:
            for process in processes:
                process.wait()
        except KeyboardInterrupt:
            for process in processes:
                process.terminate()
    return summary


def print_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> None:
    """Binary tasks: AUC, GAUC, logloss; regression tasks (watch time): RMSE of log1p."""
    print(f"{'split':<6} {'task':<11} {'AUC':>7} {'GAUC':>7} {'logloss':>8} {'RMSE log':>8}")
    for split, tasks in metrics.items():
        for task, values in tasks.items():
            if "auc" in values:
                print(f"{split:<6} {task:<11} {values['auc']:7.4f} {values['gauc']:7.4f} "
                      f"{values['logloss']:8.4f}")
            elif "rmse_log" in values:
                print(f"{split:<6} {task:<11} {'':>7} {'':>7} {'':>8} {values['rmse_log']:8.4f}")


if __name__ == "__main__":
    sys.exit(main())
