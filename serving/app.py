"""The thin HTTP app: parse and bound the request, take the current snapshot, call the scorer.

Routes: ``POST /rank`` (see ``serving.schemas.RankRequest``), ``GET /health``, ``GET /models``.
Client mistakes get a 4xx whose ``detail`` names the field: 400 body is not JSON, 413 body or
candidate/history list too large, 422 missing field / wrong type / empty or repeated
candidates / unknown task weight. Ids never seen in training are not mistakes: they score
with the reserved unknown index and are counted in ``unknown_ids``.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from pydantic_core import to_json

from serving.reloader import ModelWatcher, Snapshot
from serving.schemas import RankRequest
from serving.scorer import RankResult, UnknownTaskError
from serving.settings import Limits

log = logging.getLogger("recpipe.serving")
MAX_REPORTED_ERRORS = 10


class RequestRejected(Exception):
    """A client error: status and a one-line message (plus per-field errors)."""

    def __init__(self, status: int, detail: str, errors: list[dict] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors or []


def create_app(watcher: ModelWatcher, limits: Limits | None = None, poll: bool = True,
               scoring_threads: int | None = None) -> FastAPI:
    """The app around an already loaded ``watcher``; with ``poll`` it watches the registry
    for alias moves while the app runs (started and stopped by the app's lifespan).

    At most ``scoring_threads`` requests (default: one per CPU core) are scored at once, in
    worker threads; more wait their turn instead of fighting over the cores and the GIL.
    """
    limits = limits or Limits()
    threads = scoring_threads or os.cpu_count() or 1
    limiter: list[anyio.CapacityLimiter] = []  # created inside the server's event loop

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limiter.append(anyio.CapacityLimiter(threads))
        if poll:
            watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(title="recpipe scoring service", lifespan=lifespan,
                  description="Ranks a user's candidates with the champion ranker.")

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        content = {"detail": error.detail}
        if error.errors:
            content["errors"] = error.errors
        return JSONResponse(content, status_code=error.status)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"},
                            status_code=500)

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        body = await read_body(request, limits.max_body_bytes)
        parsed = parse_request(body, limits)
        snapshot = watcher.current  # held for the whole request, whatever the poller swaps
        try:
            result = await anyio.to_thread.run_sync(
                snapshot.scorer.rank, parsed, None, snapshot.allocator,
                snapshot.allocator_reason, limiter=limiter[0],
            )
        except UnknownTaskError as error:
            raise RequestRejected(422, f"task_weights: {error}") from error
        return Response(response_body(parsed, snapshot, result), media_type="application/json")

    @app.get("/health")
    def health() -> dict:
        snapshot = watcher.current
        status = watcher.status
        return {  # "degraded": still serving, but the latest registry check failed
            "status": "degraded" if status.last_error else "ok",
            "ranker": {"name": snapshot.ranker.name, "version": snapshot.ranker.version},
            "allocator": (None if snapshot.allocator_info is None else
                          {"name": snapshot.allocator_info.name,
                           "version": snapshot.allocator_info.version}),
            "polls": status.polls, "swaps": status.swaps, "last_poll_at": status.last_poll_at,
            "last_error": status.last_error, "poll_interval_s": watcher.poll_interval_s,
        }

    @app.get("/models")
    def models() -> dict:
        snapshot = watcher.current
        ranker = snapshot.scorer.ranker
        allocator = ({"role": "allocator", "loaded": False, "name": watcher.allocator_name,
                      "alias": watcher.alias, "reason": snapshot.allocator_reason}
                     if snapshot.allocator_info is None else
                     {"role": "allocator", "loaded": True, **snapshot.allocator_info.to_dict(),
                      "input_columns": list(snapshot.allocator.input_types or [])})
        return {
            "models": [
                {"role": "ranker", "loaded": True, **snapshot.ranker.to_dict(),
                 "arch": ranker.config.arch, "tasks": list(snapshot.scorer.task_names),
                 "task_weights": snapshot.scorer.task_weights,
                 "history_length": ranker.schema.history_length,
                 "vocab_sizes": ranker.schema.vocab_sizes},
                allocator,
            ],
            "history": watcher.status.history,
        }

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes whether or not it is announced."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, f"request body of {int(declared):,} bytes exceeds the "
                                   f"limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, f"request body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, limits: Limits) -> RankRequest:
    """Validate the JSON body (400 not JSON, 422 invalid, 413 too many entries)."""
    if not body.strip():
        raise RequestRejected(400, "empty request body; send a JSON object like "
                                   '{"user_id": 7, "candidates": [{"item_id": 12}]}')
    try:
        parsed = RankRequest.model_validate_json(body)
    except ValidationError as error:
        raise validation_rejection(error) from None
    for name, count, limit in (("candidates", len(parsed.candidates), limits.max_candidates),
                               ("history", len(parsed.history), limits.max_history)):
        if count > limit:
            raise RequestRejected(413, f"{name}: {count:,} entries exceed the limit of "
                                       f"{limit:,} per request; split the request")
    return parsed


def validation_rejection(error: ValidationError) -> RequestRejected:
    problems = error.errors(include_url=False, include_context=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return RequestRejected(400, f"request body is not valid JSON: {problems[0]['msg']}")
    errors = [{"field": field_name(p["loc"]), "message": message(p)} for p in problems]
    shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:MAX_REPORTED_ERRORS])
    more = len(errors) - MAX_REPORTED_ERRORS
    suffix = f"; and {more} more" if more > 0 else ""
    return RequestRejected(422, f"invalid request: {shown}{suffix}",
                           errors[:MAX_REPORTED_ERRORS * 10])


def field_name(loc: tuple) -> str:
    """('candidates', 3, 'item_id') → 'candidates[3].item_id'; () → 'body'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def message(problem: dict) -> str:
    text = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "missing":
        return "field required"
    if problem["type"] == "extra_forbidden":
        return "unknown field (not part of the request schema)"
    if problem["type"] == "too_short" and problem["loc"] == ("candidates",):
        return "must hold at least one candidate"
    return text


def response_body(request: RankRequest, snapshot: Snapshot, result: RankResult) -> bytes:
    """JSON bytes: everything but ``ranked`` through pydantic-core, ``ranked`` from Polars."""
    head = to_json({
        "request_id": request.request_id,
        "model": {"name": snapshot.ranker.name, "alias": snapshot.ranker.alias,
                  "version": snapshot.ranker.version},
        "task_weights": result.task_weights,
        "unknown_ids": result.unknown_ids,
        "allocation": result.allocation,
    })
    return head[:-1] + b',"ranked":' + result.ranked_json() + b"}"
