"""The serving handler: one request runner for every task endpoint. `Serving.start` reads, checks and submits a
request; `Run.events` follows its task to the end -- queue position, steps with previews, then the reply or an error
-- and handles the client that disconnects, the deadline and the failed task in one place. The app renders those
events as one JSON reply (`as_json`) or as a stream of server-sent events (`as_sse`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from muse.server.schema import TASKS, RequestError, build_task, encode_png, parse_body, reply_of, request_model

if TYPE_CHECKING:
    from starlette.requests import Request

    from muse.server.connections import ConnectionStats
    from muse.server.settings import ServerSettings

log = logging.getLogger("muse.server")

CLOSE = {"Connection": "close"}  # on a refusal sent before the body was read: the rest of it is never waited for


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self, engine, connections: ConnectionStats) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("muse_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.rejections = Counter("muse_rejections", "refused requests by reason", ["reason"],
                                  registry=self.registry)
        self.latency = Histogram("muse_request_seconds", "request latency, arrival to reply", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)

        class Collector:
            def collect(self):
                stats = engine.stats
                yield GaugeMetricFamily("muse_queue_depth", "tasks and jobs waiting for the engine", engine.queued)
                yield GaugeMetricFamily("muse_jobs_in_flight", "tasks started and not finished", engine.active)
                yield GaugeMetricFamily("muse_rows_in_flight", "forward rows of the admitted jobs",
                                        engine.rows_in_flight)
                yield GaugeMetricFamily("muse_rows_per_forward", "mean rows per engine forward since start",
                                        stats.rows_per_forward)
                yield CounterMetricFamily("muse_engine_forwards", "engine ticks (one batched forward each)",
                                          stats.ticks)
                yield CounterMetricFamily("muse_engine_rows", "rows through the model, summed over ticks",
                                          stats.rows_forwarded)
                yield CounterMetricFamily("muse_engine_busy_seconds", "seconds the engine spent in ticks",
                                          stats.busy_seconds)
                yield GaugeMetricFamily("muse_open_connections", "HTTP connections open now", connections.open)
                closed = CounterMetricFamily("muse_connections_closed", "connections the server closed on a "
                                             "client that held them (header or body timeout, evicted at the cap)",
                                             labels=["reason"])
                for reason, count in sorted(connections.closed.items()):
                    closed.add_metric([reason], count)
                yield closed

        self.registry.register(Collector())

    def refused(self, endpoint: str, error: RequestError) -> None:
        self.requests.labels(endpoint, str(error.status)).inc()
        self.rejections.labels(error.reason).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class PastDeadline(Exception):
    """The request's `request_timeout` passed before its task ended (the task is then cancelled)."""


class Serving:
    """Turns requests into engine tasks and follows them; one per app."""

    def __init__(self, pipe, engine, settings: ServerSettings, metrics: Metrics, preview_every) -> None:
        self.pipe, self.engine, self.settings, self.metrics = pipe, engine, settings, metrics
        self.preview_every = preview_every  # () -> int: measured at start-up unless set
        self.models = {endpoint: request_model(endpoint) for endpoint in TASKS}

    async def start(self, endpoint: str, request: Request) -> Run:
        """Read, check and submit a request; RequestError (with its status) if it is refused."""
        from muse.engine import EngineFull

        started = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # no form or text posts: those are the ones a web page sends cross-origin
            raise RequestError(f"the body must be JSON (Content-Type: application/json), got "  # with no preflight
                               f"{kind or 'no Content-Type'!r}", 415, "unsupported_media_type", CLOSE)
        body = parse_body(await self.read_body(request), self.models[endpoint])
        loop = asyncio.get_running_loop()
        task = await loop.run_in_executor(None, build_task, self.pipe, endpoint, body, self.settings.limits)
        streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
        run = Run(self, endpoint, request, started, streaming, body.preview_every or self.preview_every())
        try:
            run.handle = self.engine.submit(task, on_event=run.on_event)
        except EngineFull as e:
            retry = self.settings.retry_after
            raise RequestError(f"the server is busy: {e}; retry in {retry} s", 429, "queue_full",
                               {"Retry-After": str(retry)}) from None
        return run

    async def read_body(self, request: Request) -> bytes:
        """The whole body, within `max_body_bytes` (413) and `body_timeout` (408)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the body is {declared} bytes, over the limit max_body_bytes={limit}", 413,
                               "too_large", CLOSE)
        chunks, size = [], 0

        async def receive_all() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"the body is over the limit max_body_bytes={limit}", 413, "too_large",
                                       CLOSE)
                chunks.append(chunk)

        from starlette.requests import ClientDisconnect

        try:
            await asyncio.wait_for(receive_all(), timeout=self.settings.body_timeout)
        except ClientDisconnect:  # gone mid-body (or closed by the connection layer): nobody to answer
            raise RequestError("the client disconnected before its body arrived", 499, "disconnected") from None
        except asyncio.TimeoutError:
            raise RequestError(f"the body did not arrive within body_timeout={self.settings.body_timeout} s", 408,
                               "slow_client", CLOSE) from None
        return b"".join(chunks)


class Run:
    """One submitted request, from the engine's events to its reply."""

    def __init__(self, serving: Serving, endpoint: str, request: Request, started: float, streaming: bool,
                 preview_every: int) -> None:
        self.serving, self.endpoint, self.request = serving, endpoint, request
        self.started, self.streaming, self.every = started, streaming, preview_every
        self.deadline = started + serving.settings.request_timeout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None

    def on_event(self, event) -> None:
        """On the engine thread: hand the event over, never block. Steps matter to streams only; a stream's preview
        tokens are copied here, while they are valid."""
        from muse.engine import Step

        if isinstance(event, Step):
            if not self.streaming:
                return
            last = event.masked == 0
            event = (event, event.preview().clone() if last or event.index % self.every == 0 else None)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next_event(self):
        """The next engine event; None when the client is gone; TimeoutError past the deadline."""
        while True:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                raise asyncio.TimeoutError
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=min(0.25, remaining))
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    return None

    async def events(self) -> AsyncIterator[tuple[str, dict]]:
        """("queued", {"position"}) and, when streaming, ("step", {"job", "step", "steps", "masked", "preview"?}),
        then ("done", reply) or ("error", {"error", "status"}); nothing more if the client went away. The task is
        cancelled however this ends early (deadline, disconnect, or the consumer closing the generator), and the
        request is counted once, when the generator is closed (iterate it under `contextlib.aclosing`)."""
        from muse.engine import Failed, Finished, Queued

        run = asyncio.get_running_loop().run_in_executor
        ended: tuple[int, str] | None = None  # (status, rejection reason or "") once the run has ended
        try:
            while ended is None:
                try:
                    event = await self.next_event()
                except asyncio.TimeoutError:
                    event = Failed(PastDeadline())
                if event is None:
                    ended = (499, "disconnected")
                elif isinstance(event, Queued):
                    yield "queued", {"position": event.position}
                elif isinstance(event, tuple):
                    step, tokens = event
                    data = {"job": step.job, "step": step.index, "steps": step.num_steps, "masked": step.masked}
                    if tokens is not None:
                        data["preview"] = await run(None, preview_png, self.serving.pipe, tokens, step)
                    yield "step", data
                elif isinstance(event, Finished):
                    reply = await run(None, reply_of, event.result)
                    ended = (200, "")
                    yield "done", reply
                elif isinstance(event, Failed):
                    error = self.failure(event.error)
                    ended = (error.status, error.reason)
                    yield "error", {"error": str(error), "status": error.status}
        finally:  # also when the consumer closes the generator early: the stream's client went away mid-stream
            if not self.handle.done():
                self.handle.cancel()  # its rows are freed at the engine's next tick
            status, reason = ended or (499, "disconnected")
            metrics = self.serving.metrics
            metrics.requests.labels(self.endpoint, str(status)).inc()
            metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.started)
            if reason:
                metrics.rejections.labels(reason).inc()

    def failure(self, exc: BaseException) -> RequestError:
        """A failed task (or the deadline passed) as the error its client gets."""
        from muse.engine import Cancelled

        if isinstance(exc, PastDeadline):
            return RequestError(f"the request took longer than request_timeout={self.serving.settings.request_timeout}"
                                " s and was cancelled", 504, "timeout")
        if isinstance(exc, Cancelled):
            return RequestError("cancelled", 499, "cancelled")
        if isinstance(exc, (ValueError, TypeError)):
            return RequestError(str(exc))
        log.error("a task failed", exc_info=exc)
        return RequestError("internal error; see the server log", 500, "failed")


def preview_png(pipe, tokens, step) -> str:
    """The first image of a job's preview tokens, as the stream sends it."""
    return encode_png(pipe.decode_preview(tokens[:1], step.grid, step.stage)[0])


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def error_response(error: RequestError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers or None)


async def as_json(run: Run):
    """The run as one JSON reply: the result, or the error with its status; 499 (nothing sent) if the client left."""
    from fastapi.responses import JSONResponse, Response

    async with aclosing(run.events()) as events:
        async for kind, data in events:
            if kind == "done":
                return JSONResponse(data)
            if kind == "error":
                return JSONResponse({"error": data["error"]}, status_code=data["status"])
    return Response(status_code=499)


def as_sse(run: Run):
    """The run as server-sent events, one per engine event."""
    from fastapi.responses import StreamingResponse

    async def stream() -> AsyncIterator[str]:
        async with aclosing(run.events()) as events:
            async for kind, data in events:
                yield sse(kind, data)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def serve(serving: Serving, endpoint: str, request: Request):
    """A task endpoint: start the request, then render its run as JSON or as a stream; a refusal is a JSON error."""
    try:
        run = await serving.start(endpoint, request)
    except RequestError as e:
        serving.metrics.refused(endpoint, e)
        return error_response(e)
    return as_sse(run) if run.streaming else await as_json(run)
