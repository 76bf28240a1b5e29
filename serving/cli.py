"""``recpipe serve`` and ``recpipe score``: argument definitions and handlers.

Handlers take ``(args, workspace)`` (anything with a ``tracking_uri``; the CLI passes
``flows.workspace.Workspace``) and return a JSON-able summary. User errors raise
``ServingError`` (a ValueError: the CLI prints it and exits 2).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Protocol

from serving.settings import ALLOCATOR_MODEL_NAME, CHAMPION, RANKER_MODEL_NAME, Limits

DEFAULT_PORT = 8000
DEFAULT_MODEL_URI = f"models:/{RANKER_MODEL_NAME}@{CHAMPION}"


class ServingError(ValueError):
    """A problem the user can fix: no champion, port in use, bad weights, bad input file."""


class HasTrackingUri(Protocol):
    tracking_uri: str


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (argparse names the option when it is not)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse says when int() fails
    return parse


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (a free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--model", default=RANKER_MODEL_NAME,
                        help=f"registered ranker (default {RANKER_MODEL_NAME})")
    parser.add_argument("--alias", default=CHAMPION,
                        help=f"alias to serve and follow (default {CHAMPION})")
    parser.add_argument("--allocator", default=ALLOCATOR_MODEL_NAME,
                        help="registered live-stream allocator, used when its alias exists "
                             f"(default {ALLOCATOR_MODEL_NAME})")
    parser.add_argument("--no-allocator", action="store_true",
                        help="never load an allocator")
    parser.add_argument("--poll-interval", type=float, default=10.0,
                        help="seconds between registry checks for a moved alias (default 10)")
    add_common_scoring_arguments(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per forward pass (default 1: measured fastest "
                             "for one request at a time; concurrency comes from requests)")
    parser.add_argument("--scoring-threads", type=int, default=None,
                        help="requests scored at once (default: one per CPU core); more "
                             "wait in line")
    parser.add_argument("--max-candidates", type=int, default=Limits.max_candidates,
                        help=f"candidates per request (default {Limits.max_candidates})")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                        help=f"request body limit (default {Limits.max_body_bytes})")
    parser.add_argument("--max-history", type=int, default=Limits.max_history,
                        help=f"history entries per request (default {Limits.max_history})")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True,
                        help="raw rows (.parquet or .csv): user_id, item_id, ts and optionally "
                             "author_id, item_type, duration_s, position, hist_item_id, "
                             "hist_behavior")
    parser.add_argument("--output", type=Path, required=True,
                        help="the same rows plus score_<task> and score (.parquet or .csv)")
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI,
                        help=f"ranker to score with (default {DEFAULT_MODEL_URI})")
    add_common_scoring_arguments(parser)
    parser.add_argument("--chunk-rows", type=at_least(1), default=65_536,
                        help="rows encoded and scored at a time (default 65536)")


def add_common_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: the workspace's mlflow.db)")
    parser.add_argument("--task-weights", type=parse_task_weights,
                        help='blend weights, e.g. "click=1,long_view=1,watch_time=0.02" '
                             "(default: 1 per binary task, 0 for watch_time; tasks left out "
                             "weigh 0)")


def parse_task_weights(text: str) -> dict[str, float]:
    """``"click=1,like=0.5"`` → ``{"click": 1.0, "like": 0.5}``."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([A-Za-z_][\w]*)\s*=\s*([-+0-9.eE]+)", part)
        if match is None:
            raise argparse.ArgumentTypeError(f"{part!r} is not TASK=WEIGHT")
        value = float(match.group(2))
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{part!r}: the weight must be finite")
        weights[match.group(1)] = value
    if not weights:
        raise argparse.ArgumentTypeError("give at least one TASK=WEIGHT")
    return weights


def cmd_serve(args: argparse.Namespace, workspace: HasTrackingUri) -> dict:
    """Load the champion, serve it until Ctrl-C (or SIGTERM), return what was served."""
    import torch
    import uvicorn

    from serving.app import create_app
    from serving.reloader import ModelNotFoundError, ModelWatcher
    from serving.scorer import UnknownTaskError

    for flag in ("threads", "max_candidates", "max_body_bytes", "max_history"):
        if getattr(args, flag) < 1:
            raise ServingError(f"--{flag.replace('_', '-')} must be at least 1, "
                               f"got {getattr(args, flag)}")
    if args.scoring_threads is not None and args.scoring_threads < 1:
        raise ServingError(f"--scoring-threads must be at least 1, got {args.scoring_threads}")
    if args.poll_interval <= 0:
        raise ServingError(f"--poll-interval must be positive, got {args.poll_interval}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet reloads
    configure_logging(args.log_level)
    tracking_uri = args.tracking_uri or workspace.tracking_uri
    watcher = ModelWatcher(
        tracking_uri, args.model, args.alias,
        None if args.no_allocator else args.allocator, args.task_weights, args.poll_interval,
    )
    try:
        snapshot = watcher.load()
    except (ModelNotFoundError, UnknownTaskError) as error:
        raise ServingError(str(error)) from error
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    limits = Limits(args.max_body_bytes, args.max_candidates, args.max_history)
    app = create_app(watcher, limits, scoring_threads=args.scoring_threads)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{port}"
    allocator = (f"allocator v{snapshot.allocator_info.version}" if snapshot.allocator_info
                 else f"no allocator ({snapshot.allocator_reason})")
    print(f"serving {args.model} v{snapshot.ranker.version} (@{args.alias}), {allocator}, on "
          f"{url}; checking the registry every {args.poll_interval:g} s; Ctrl-C stops",
          flush=True)
    started = time.monotonic()
    with stop_signals_as_exceptions(), suppress(KeyboardInterrupt, Stopped):
        server.run(sockets=[sock])  # shuts down gracefully, then re-raises the signal
    final = watcher.current
    return {
        "url": url, "tracking_uri": tracking_uri,
        "ranker": final.ranker.to_dict(),
        "allocator": final.allocator_info.to_dict() if final.allocator_info else None,
        "swaps": watcher.status.swaps, "served_s": round(time.monotonic() - started, 1),
    }


def cmd_score(args: argparse.Namespace, workspace: HasTrackingUri) -> dict:
    """Score a file of raw rows with a registered ranker; atomic output."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from models.registry import load_ranker
    from serving.batch import score_file
    from serving.scorer import Scorer, UnknownTaskError

    tracking_uri = args.tracking_uri or workspace.tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    uri, version = pin_model_uri(args.model_uri, tracking_uri)
    try:
        ranker = load_ranker(uri)
    except (MlflowException, OSError) as error:
        raise ServingError(f"cannot load {args.model_uri} from {tracking_uri}: "
                           f"{' '.join(str(error).split())[:300]}") from error
    try:
        scorer = Scorer(ranker, args.task_weights)
    except UnknownTaskError as error:
        raise ServingError(f"--task-weights: {error}") from error
    started = time.monotonic()
    summary = score_file(args.input, args.output, scorer, args.chunk_rows)
    summary.update(model_uri=args.model_uri, model_version=version,
                   seconds=round(time.monotonic() - started, 2))
    print(f"scored {summary['rows']:,} rows with {args.model_uri}"
          f"{f' (v{version})' if version else ''} → {args.output}")
    return summary


def pin_model_uri(model_uri: str, tracking_uri: str) -> tuple[str, int | None]:
    """``models:/name@alias`` → (``models:/name/<version>``, version), so the version that
    scored is known and reported; other URIs are returned as they are."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", model_uri)
    if match is None:
        return model_uri, None
    name, alias = match.groups()
    try:
        version = int(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        raise ServingError(f"no model version behind {model_uri} in {tracking_uri}; train and "
                           "register one first (`recpipe train-ranker`)") from error
    return f"models:/{name}/{version}", version


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a ServingError saying why not (port in use, bad host)."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       proto=socket.IPPROTO_TCP)[0]
        # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections
        # only then, and without it Nagle + delayed ACK add ~40 ms to small responses.
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise ServingError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Stopped(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


@contextmanager
def stop_signals_as_exceptions() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` (SIGINT already raises KeyboardInterrupt), so the handler
    can return its summary however the server was stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
