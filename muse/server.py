"""`muse serve`: the interactive editing backend -- FastAPI on uvicorn over the decoding engine, and a web editor.

    GET  /                 the web editor (static files shipped in the package, nothing fetched from elsewhere)
    GET  /health           {"status": "ok", "model": <name>, "engine": {...}}
    GET  /metrics          Prometheus text format
    GET  /docs, /openapi.json
    POST /generate  {"prompt": "a red apple", "num_images": 2, "seed": 0, ...}
    POST /inpaint   {"prompt": ..., "image": <png>, "mask": <png, white = regenerate>, ...}
    POST /outpaint  {"prompt": ..., "image": <png>, "pad": [left, top, right, bottom], ...}
    POST /edit      {"prompt": ..., "image": <png>, "strength": 0.5, "iterations": 1, "mode": "random", ...}
    POST /upscale   {"prompt": ..., "image": <png at the base resolution>, ...}    (the super-res stage alone)

Images travel as base64-encoded PNG (or JPEG / WebP). Every POST takes the task's arguments (`num_images`, `seed`,
`negative_prompt`, and the task's own) and every sampling option by its `SamplingOptions` field name; a field left out
takes the model's default. The reply is {"images": [...], "seeds": [...]}, plus "scores" and "candidate_seeds" with
best-of-N. An unknown key, a bad value or a bad image is a 400 naming it; a body over the limit a 413.

With "stream": true (or `Accept: text/event-stream`) the reply is a stream of server-sent events:
    queued  {"position": n}                   waiting behind n other tasks
    step    {"job", "step", "steps", "masked", "preview"?}   after each decoding step; every `preview_every` steps, and
                                              at the end of each job, "preview" is a PNG of the current guess
    done    the reply above
    error   {"error": "...", "status": 400 | 429 | 504 | 500}

One thread owns the model and drives the engine (under `muse serve` the main thread, which loaded the model, while
uvicorn serves HTTP from another); every request becomes a task whose jobs share decoding steps with every other
request in flight (`muse.engine`). Beyond `max_rows` rows in flight jobs wait in the queue, and beyond `max_queued`
waiting tasks a request gets 429 with Retry-After. A request past its deadline, or whose client disconnects, is
cancelled and its rows are freed at the next tick.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import dataclasses
import io
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from starlette.requests import Request  # at module level: FastAPI resolves the handlers' annotations here

from muse.options import Limits, SamplingOptions, option_names, option_types

log = logging.getLogger("muse.server")

WEB = Path(__file__).resolve().parent / "web"  # the editor's static files
PREVIEW_SHARE = 0.2  # previews may take this share of a request's decoding time, which sets `preview_every`


def _setting(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerSettings:
    """Limits and timeouts of one server; `muse serve --help` lists them as flags, with these texts."""

    max_rows: int = _setting(64, "forward rows in flight in the engine (a guided image counts twice)")
    max_queued: int = _setting(64, "tasks waiting for the engine; beyond: 429 with Retry-After")
    max_images: int = _setting(16, "most images per request, candidates included")
    max_steps: int = _setting(100, "most num_steps and superres_steps a request may ask")
    max_candidates: int = _setting(8, "most num_candidates a request may ask")
    max_pixels: int = _setting(512 * 512, "largest input image, width x height, and outpainted canvas")
    max_pad: int = _setting(256, "most pixels /outpaint adds on any side")
    max_iterations: int = _setting(8, "most /edit iterations")
    max_body_bytes: int = _setting(16 << 20, "largest request body, in bytes")
    request_timeout: float = _setting(120.0, "seconds from arrival to the result; past it the task is cancelled (504)")
    body_timeout: float = _setting(10.0, "seconds for a client to send its headers, and then its whole body (408)")
    keep_alive: int = _setting(5, "seconds an idle connection stays open")
    backlog: int = _setting(2048, "connections the kernel queues before accepting")
    # None: measured at start-up, so that previews take at most PREVIEW_SHARE of a stream's time.
    preview_every: int | None = _setting(None, "steps between stream previews (default: measured at start-up)")
    retry_after: int = _setting(1, "seconds, in 429 replies")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")

    def limits(self) -> Limits:
        """The pipeline limits these settings set; the others keep `Limits`' defaults."""
        return dataclasses.replace(Limits(), max_steps=self.max_steps, max_images=self.max_images,
                                   max_candidates=self.max_candidates, max_pixels=self.max_pixels,
                                   max_pad=self.max_pad, max_iterations=self.max_iterations)


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status and the message goes back to the client."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Request schemas, from the task signatures and SamplingOptions


# endpoint -> (pipeline task (`pipe.request`), its own arguments besides the shared ones, the options it does not take)
TASKS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "/generate": ("generate", (), ()),
    "/inpaint": ("inpaint", ("image", "mask"), ()),
    "/outpaint": ("outpaint", ("image", "pad"), ()),
    "/edit": ("edit", ("image", "strength", "iterations", "mode"), ()),
    # The super-res stage alone: no base-stage steps, no choice of stages.
    "/upscale": ("upscale", ("image",), ("num_steps", "stages")),
}
IMAGE_FIELDS = ("image", "mask")
_TASK_FIELDS: dict[str, tuple[Any, Any]] = {  # the task arguments' JSON types and defaults
    "image": (str, ...),
    "mask": (str, ...),
    "pad": (tuple[int, int, int, int], ...),
    "strength": (float, ...),
    "iterations": (int, 1),
    "mode": (Literal["random", "confidence"], "random"),
}


def request_model(endpoint: str):
    """The pydantic model of an endpoint's JSON body: prompt, the shared call arguments, the task's own arguments,
    every sampling option it takes (None = the model's default), and the stream controls. Unknown keys are errors."""
    from pydantic import ConfigDict, Field, create_model

    _, own, excluded = TASKS[endpoint]
    fields: dict[str, Any] = {
        "prompt": (str | list[str], Field(..., description="one prompt, or a list")),
        "num_images": (int, 1),
        "seed": (Optional[int | list[int]], None),
        "negative_prompt": (Optional[str | list[str]], None),
    }
    fields.update({name: _TASK_FIELDS[name] for name in own})
    types = option_types()
    for f in dataclasses.fields(SamplingOptions):
        if f.name not in excluded:
            fields[f.name] = (Optional[types[f.name]], Field(None, description=f.metadata["help"]))
    fields["stream"] = (bool, Field(False, description="reply with server-sent events (queued, step, done, error)"))
    fields["preview_every"] = (Optional[int], Field(None, ge=1, description="steps between stream previews"))
    name = "".join(part.capitalize() for part in endpoint.strip("/").split("_")) + "Request"
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=False), **fields)


def parse_body(raw: bytes, model) -> Any:
    """Bytes -> the validated request, or RequestError naming what is wrong."""
    from pydantic import ValidationError

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            where = ".".join(str(part) for part in error["loc"]) or "body"
            message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{where}: {message}")
        unknown = sorted({str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden"})
        hint = f" (allowed: {', '.join(model.model_fields)})" if unknown else ""
        raise RequestError("invalid request: " + "; ".join(problems[:5]) + hint) from None


def decode_image(data: str, name: str, max_pixels: int):
    """Base64 image -> PIL image, refusing one over `max_pixels` from its header, before any pixel is decoded (a
    10000 x 10000 PNG is a few kilobytes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"'{name}' is not valid base64") from None
    try:
        try:
            image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError as e:  # PIL's own guard, far above ours, fires when the header is read
            raise RequestError(f"'{name}' claims more pixels than PIL decodes ({e}), over the limit "
                               f"max_pixels={max_pixels}", status=413, reason="too_large") from None
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(f"'{name}' is {width}x{height} pixels, over the limit max_pixels={max_pixels}",
                               status=413, reason="too_large")
        image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise RequestError(f"'{name}' is not a readable image") from None
    return image


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_task(pipe, endpoint: str, body, max_pixels: int):
    """The engine task of a validated request (every input checked by the pipeline's task builder)."""
    builder, own, excluded = TASKS[endpoint]
    arguments = {"num_images": body.num_images, "seed": body.seed, "negative_prompt": body.negative_prompt}
    for name in own:
        value = getattr(body, name)
        arguments[name] = decode_image(value, name, max_pixels) if name in IMAGE_FIELDS else value
    overrides = {name: getattr(body, name) for name in option_names()
                 if name not in excluded and name in body.model_fields_set}
    try:
        return pipe.task(pipe.request(builder, body.prompt, **arguments, **overrides))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise RequestError(str(e)) from None


def reply_of(output) -> dict:
    reply = {"images": [encode_png(im) for im in output.images], "seeds": [int(s) for s in output.seeds]}
    if output.scores is not None:  # best-of-N: the chosen candidates' scores and seeds
        reply["scores"] = [float(s) for s in output.scores]
        reply["candidate_seeds"] = [int(s) for s in output.candidate_seeds]
    return reply


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self, engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("muse_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.rejections = Counter("muse_rejections", "refused requests by reason", ["reason"],
                                  registry=self.registry)
        self.latency = Histogram("muse_request_seconds", "request latency, arrival to reply", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)

        class EngineCollector:
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

        self.registry.register(EngineCollector())

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ----------------------------------------------------------------------------------------------------------------
# The app


def measure_preview_every(pipe) -> int:
    """Steps between stream previews so that decoding previews (VQ decode + PNG) costs at most PREVIEW_SHARE of the
    decoding time, from one timed generation and one timed preview on this machine."""
    from muse.engine import Step

    marks: list[float] = []
    kept: list = []

    def listen(event) -> None:
        if isinstance(event, Step):
            marks.append(time.perf_counter())
            if not kept:
                kept.append(event.preview().clone())

    pipe.engine.run(pipe.task(pipe.request("generate", "a preview", seed=0, num_candidates=1, stages=1)),
                    on_event=listen)
    step = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
    start = time.perf_counter()
    encode_png(pipe.decode_preview(kept[0][:1], (pipe.transformer.config.grid_size,) * 2, 0)[0])
    preview = time.perf_counter() - start
    return max(1, math.ceil(preview / (PREVIEW_SHARE * step)))


def create_app(pipe, settings: ServerSettings = ServerSettings(), model_name: str = "model",
               engine_thread: bool = True):
    """The ASGI app serving `pipe`, with its own engine (`app.state.engine`), stopped at shutdown.

    engine_thread: start the engine on a background thread at start-up (tests, `ServerThread`). `muse serve` passes
    False and drives the engine on its main thread, the one that loaded the model: on the CPU torch runs about twice
    as fast there as on a second thread (see muse/engine.py)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    from muse.engine import Cancelled, Engine, EngineFull, Failed, Finished, Queued, Step

    # A copy sharing the components: the server's limits and engine are its own, the caller's pipeline is untouched.
    pipe = copy.copy(pipe)
    pipe.config = dataclasses.replace(pipe.config, limits=settings.limits())
    engine = pipe.engine = Engine(max_rows=settings.max_rows, max_queued=settings.max_queued)
    metrics = Metrics(engine)
    preview_every = settings.preview_every
    state = {"preview_every": preview_every}

    @asynccontextmanager
    async def lifespan(app):
        if state["preview_every"] is None:
            state["preview_every"] = await asyncio.get_running_loop().run_in_executor(None, measure_preview_every,
                                                                                      pipe)
            log.info("stream previews every %d steps", state["preview_every"])
        if engine_thread:
            engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="musegen", summary="Muse-style text-to-image generation and editing", lifespan=lifespan)
    app.state.engine = engine
    models = {endpoint: request_model(endpoint) for endpoint in TASKS}

    def error(status: int, message: str, reason: str, headers: dict | None = None) -> JSONResponse:
        metrics.rejections.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise RequestError(f"the body is {declared} bytes, over the limit max_body_bytes="
                               f"{settings.max_body_bytes}", status=413, reason="too_large")
        chunks, size = [], 0

        async def receive_all() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_body_bytes:
                    raise RequestError(f"the body is over the limit max_body_bytes={settings.max_body_bytes}",
                                       status=413, reason="too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive_all(), timeout=settings.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the body did not arrive within body_timeout={settings.body_timeout} s", status=408,
                               reason="slow_client") from None
        return b"".join(chunks)

    async def run_task(endpoint: str, request: Request):
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        status = 200
        try:
            body = parse_body(await read_body(request), models[endpoint])
            task = await loop.run_in_executor(None, build_task, pipe, endpoint, body, settings.max_pixels)
        except RequestError as e:
            status = e.status
            metrics.requests.labels(endpoint, str(status)).inc()
            return error(e.status, str(e), e.reason)
        streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
        every = body.preview_every or state["preview_every"] or 1
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:  # on the engine thread: hand over, never block
            if isinstance(event, Step) and streaming:
                last = event.masked == 0
                preview = event.preview().clone() if last or event.index % every == 0 else None
                event = (event, preview)
            elif isinstance(event, Step):
                return
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = engine.submit(task, on_event=on_event)
        except EngineFull as e:
            metrics.requests.labels(endpoint, "429").inc()
            return error(429, f"the server is busy: {e}; retry in {settings.retry_after} s", "queue_full",
                         {"Retry-After": str(settings.retry_after)})
        deadline = started + settings.request_timeout

        async def next_event():
            """The next engine event; None when the client is gone; TimeoutError past the deadline."""
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    return await asyncio.wait_for(events.get(), timeout=min(0.25, remaining))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None

        def finish(code: int) -> None:
            metrics.requests.labels(endpoint, str(code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        if not streaming:
            try:
                while True:
                    event = await next_event()
                    if event is None:
                        handle.cancel()
                        finish(499)
                        metrics.rejections.labels("disconnected").inc()
                        return Response(status_code=499)
                    if isinstance(event, Finished):
                        reply = await loop.run_in_executor(None, reply_of, event.result)
                        finish(200)
                        return JSONResponse(reply)
                    if isinstance(event, Failed):
                        code, message = failure(event.error)
                        finish(code)
                        return error(code, message, "failed" if code == 500 else "invalid")
            except asyncio.TimeoutError:
                handle.cancel()
                finish(504)
                return error(504, f"the request took longer than request_timeout={settings.request_timeout} s "
                             "and was cancelled", "timeout")

        async def stream():
            code = 200
            try:
                while True:
                    try:
                        event = await next_event()
                    except asyncio.TimeoutError:
                        handle.cancel()
                        code = 504
                        metrics.rejections.labels("timeout").inc()
                        yield sse("error", {"error": f"the request took longer than request_timeout="
                                                     f"{settings.request_timeout} s and was cancelled", "status": 504})
                        return
                    if event is None:
                        handle.cancel()
                        code = 499
                        metrics.rejections.labels("disconnected").inc()
                        return
                    if isinstance(event, Queued):
                        yield sse("queued", {"position": event.position})
                    elif isinstance(event, tuple):
                        step, tokens = event
                        data = {"job": step.job, "step": step.index, "steps": step.num_steps, "masked": step.masked}
                        if tokens is not None:
                            data["preview"] = await loop.run_in_executor(None, preview_png, pipe, tokens, step)
                        yield sse("step", data)
                    elif isinstance(event, Finished):
                        yield sse("done", await loop.run_in_executor(None, reply_of, event.result))
                        return
                    elif isinstance(event, Failed):
                        code, message = failure(event.error)
                        yield sse("error", {"error": message, "status": code})
                        return
            finally:  # the client went away mid-stream (the generator is closed): free its rows
                if not handle.done():
                    handle.cancel()
                finish(code)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def failure(exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, Cancelled):
            return 499, "cancelled"
        if isinstance(exc, (ValueError, TypeError)):
            return 400, str(exc)
        log.error("a task failed", exc_info=exc)
        return 500, "internal error; see the server log"

    def route(endpoint: str):
        async def handler(request: Request):
            return await run_task(endpoint, request)

        return handler

    for endpoint in TASKS:
        handler = route(endpoint)

        schema = models[endpoint].model_json_schema()
        app.add_api_route(
            endpoint, handler, methods=["POST"], summary=f"{endpoint[1:]} (JSON, or server-sent events with stream)",
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "resolution": pipe.resolution(),
                "engine": {"queued": engine.queued, "active": engine.active, "rows_in_flight": engine.rows_in_flight,
                           "max_rows": settings.max_rows, "max_queued": settings.max_queued}}

    @app.get("/metrics", response_class=Response)
    def metrics_text():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/config")
    def config() -> dict:
        """What the editor needs: the model's resolution, stride and sampling defaults, and the limits."""
        return {"resolution": pipe.resolution(), "stride": pipe.stride(), "has_superres": pipe.superres is not None,
                "defaults": dataclasses.asdict(pipe.config.sampling), "limits": dataclasses.asdict(settings),
                "preview_every": state["preview_every"]}

    if WEB.is_dir():
        app.mount("/static", StaticFiles(directory=WEB), name="static")

        @app.get("/", include_in_schema=False)
        def editor():
            return FileResponse(WEB / "index.html")

    return app


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def preview_png(pipe, tokens, step) -> str:
    """The first image of a job's preview tokens, as the stream sends it."""
    return encode_png(pipe.decode_preview(tokens[:1], step.grid, step.stage)[0])


# ----------------------------------------------------------------------------------------------------------------
# Serving


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn arms no timer until a first
    response, so a client that opens a connection and sends headers slowly (or never) would hold it forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _header_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._header_timer.cancel()
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return Protocol


def uvicorn_config(app, host: str, port: int, settings: ServerSettings, log_level: str = "info"):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, backlog=settings.backlog, timeout_keep_alive=settings.keep_alive,
                          http=_protocol(settings.body_timeout), log_level=log_level)


class ServerThread:
    """A server on a background thread, for tests, benchmarks and notebooks: `with ServerThread(app) as url:`."""

    def __init__(self, app, settings: ServerSettings = ServerSettings(), host: str = "127.0.0.1") -> None:
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, host, 0, settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="pipeline directory or bundled preset (default: the bundled "
                                                      "model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    defaults = ServerSettings()
    group = parser.add_argument_group("limits and timeouts")
    for f in dataclasses.fields(ServerSettings):
        kind = float if isinstance(f.default, float) else int
        group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                           metavar="N", help=f.metadata["help"] + ("" if f.default is None else " (default: %(default)s)"))


def main(args: argparse.Namespace) -> None:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"muse serve: --port must be in 0..65535, got {args.port}")
    try:
        settings = ServerSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings)})
    except ValueError as e:
        raise SystemExit(f"muse serve: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from muse.pipeline import MusePipeline

    try:
        pipe = MusePipeline.from_pretrained(args.model).to(args.device)
        if pipe.config.sampling.num_candidates > 1:
            pipe.scorer  # loaded now: a corrupt scorer must stop the server here, not fail every request later
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"muse serve: {e}") from None
    name = args.model if args.model is not None and not Path(args.model).exists() else (
        "the bundled model" if args.model is None else Path(args.model).name)
    # Everything that runs the model stays on this thread: the preview cost is measured here, and this thread drives
    # the engine while uvicorn serves HTTP from another (see create_app's engine_thread).
    if settings.preview_every is None:
        settings = dataclasses.replace(settings, preview_every=measure_preview_every(pipe))
        log.info("stream previews every %d steps", settings.preview_every)
    app = create_app(pipe, settings, model_name=name, engine_thread=False)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, settings))
    http = threading.Thread(target=server.run, name="muse-http")
    # Signals arrive on the main thread: the first Ctrl-C or SIGTERM shuts uvicorn down gracefully (requests in
    # flight finish, then its lifespan stops the engine, which ends `drive`), a second Ctrl-C forces it.
    signal.signal(signal.SIGINT, server.handle_exit)
    signal.signal(signal.SIGTERM, server.handle_exit)
    print(f"muse: serving on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    http.start()
    app.state.engine.drive(until=lambda: not http.is_alive())
    http.join()
    if not server.started:
        raise SystemExit(f"muse serve: the server did not start on {args.host}:{args.port} (see the log above)")
