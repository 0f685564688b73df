"""The app and the command: routes that hand each request to the serving handler (`muse.server.runner`), the
editor's and the API docs' static pages, `ServerThread` for tests and notebooks, and `muse serve`."""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import logging
import math
import signal
import socket
import threading
import time
from pathlib import Path

from starlette.requests import Request  # at module level: FastAPI resolves the handlers' annotations here

from muse.server.connections import ConnectionStats, Guard, bind, protocol, quiet_accept_errors
from muse.server.runner import Metrics, Serving, serve
from muse.server.schema import TASKS, encode_png
from muse.server.settings import ServerSettings, add_setting_arguments, settings_from_arguments

log = logging.getLogger("muse.server")

WEB = Path(__file__).resolve().parents[1] / "web"  # the editor's and the docs' static files
PREVIEW_SHARE = 0.2  # previews may take this share of a request's decoding time, which sets `preview_every`
WILDCARDS = ("", "0.0.0.0", "::")  # binding these serves every address of the machine


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
    """The ASGI app serving `pipe`, with its own engine (`app.state.engine`), stopped at shutdown, behind the
    connection guard (Host allow-list, unambiguous framing).

    engine_thread: start the engine on a background thread at start-up (tests, `ServerThread`). `muse serve` passes
    False and drives the engine on its main thread, the one that loaded the model: on the CPU torch runs about twice
    as fast there as on a second thread (see muse/engine.py)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles

    from muse.engine import Engine

    # A copy sharing the components: the server's limits and engine are its own, the caller's pipeline is untouched.
    pipe = copy.copy(pipe)
    pipe.config = dataclasses.replace(pipe.config, limits=settings.limits)
    engine = pipe.engine = Engine(max_rows=settings.max_rows, max_queued=settings.max_queued)
    connections = ConnectionStats(settings.max_connections)
    metrics = Metrics(engine, connections)
    state = {"preview_every": settings.preview_every}
    serving = Serving(pipe, engine, settings, metrics, preview_every=lambda: state["preview_every"] or 1)

    @asynccontextmanager
    async def lifespan(app):
        quiet_accept_errors(asyncio.get_running_loop(), connections)
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

    # Our own /docs page (muse/web/docs.html): FastAPI's Swagger UI loads from a CDN, blank offline.
    app = FastAPI(title="musegen", summary="Muse-style text-to-image generation and editing", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine, app.state.connections = engine, connections

    def route(endpoint: str):
        async def handler(request: Request):  # the body is read by the runner: bounded in size and time
            return await serve(serving, endpoint, request)

        return handler

    for endpoint in TASKS:
        schema = serving.models[endpoint].model_json_schema()
        app.add_api_route(
            endpoint, route(endpoint), methods=["POST"],
            summary=f"{endpoint[1:]} (JSON, or server-sent events with stream)",
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        )

    @app.get("/health", summary="liveness, the model's name and the engine's load")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "resolution": pipe.resolution(),
                "engine": {"queued": engine.queued, "active": engine.active, "rows_in_flight": engine.rows_in_flight,
                           "max_rows": settings.max_rows, "max_queued": settings.max_queued}}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def metrics_text():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/config", summary="the model's resolution, stride and sampling defaults, and the server's limits")
    def config() -> dict:
        """What the editor needs: the model's resolution, stride and sampling defaults, and the limits."""
        return {"resolution": pipe.resolution(), "stride": pipe.stride(), "has_superres": pipe.superres is not None,
                "defaults": dataclasses.asdict(pipe.config.sampling), "limits": settings.public(),
                "preview_every": state["preview_every"]}

    if WEB.is_dir():
        app.mount("/static", StaticFiles(directory=WEB), name="static")

        @app.get("/", include_in_schema=False)
        def editor():
            return FileResponse(WEB / "index.html")

        @app.get("/docs", include_in_schema=False)
        def docs():
            return FileResponse(WEB / "docs.html")

    app.add_middleware(Guard, hosts=settings.hosts(), refused=lambda reason: metrics.rejections.labels(reason).inc())
    return app


# ----------------------------------------------------------------------------------------------------------------
# Serving


def uvicorn_config(app, host: str, port: int, settings: ServerSettings, log_level: str = "info"):
    """uvicorn's settings for `app` (from `create_app`), with our protocol (`muse.server.connections`)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, backlog=settings.backlog,
                          timeout_keep_alive=settings.keep_alive, lifespan="on",
                          http=protocol(settings.body_timeout, app.state.connections), log_level=log_level)


class ServerThread:
    """A server on a background thread, for tests, benchmarks and notebooks: `with ServerThread(app) as url:`."""

    def __init__(self, app, settings: ServerSettings = ServerSettings(), host: str = "127.0.0.1") -> None:
        import uvicorn

        self.socket = bind(host, 0)
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
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps, ... (default: the GPU when there is one, else cpu)")
    add_setting_arguments(parser)


def served_hosts(host: str) -> tuple[str, ...]:
    """The Host names a server bound to `host` answers besides the local ones: that address, or, bound to every
    address, this machine's names (others, such as a LAN address, by --allowed-hosts)."""
    if host in WILDCARDS:
        return (socket.gethostname(),)
    return (host,)


def main(args: argparse.Namespace) -> None:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"muse serve: --port must be in 0..65535, got {args.port}")
    try:
        settings = settings_from_arguments(args)
        settings = settings.replace(allowed_hosts=settings.allowed_hosts + served_hosts(args.host))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"muse serve: {e}") from None
    try:  # before the model loads: a port in use or a bad host fails in a second
        listening = bind(args.host, args.port)
    except OSError as e:
        raise SystemExit(f"muse serve: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from muse.options import default_device
    from muse.pipeline import MusePipeline

    try:
        pipe = MusePipeline.from_pretrained(args.model).to(args.device or default_device())
        if pipe.config.sampling.num_candidates > 1:
            pipe.scorer  # loaded now: a corrupt scorer must stop the server here, not fail every request later
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        listening.close()
        raise SystemExit(f"muse serve: {e}") from None
    name = args.model if args.model is not None and not Path(args.model).exists() else (
        "the bundled model" if args.model is None else Path(args.model).name)
    # Everything that runs the model stays on this thread: the preview cost is measured here, and this thread drives
    # the engine while uvicorn serves HTTP from another (see create_app's engine_thread).
    if settings.preview_every is None:
        settings = settings.replace(preview_every=measure_preview_every(pipe))
        log.info("stream previews every %d steps", settings.preview_every)
    app = create_app(pipe, settings, model_name=name, engine_thread=False)
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, args.host, port, settings))
    http = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, name="muse-http")
    # Signals arrive on the main thread: the first Ctrl-C or SIGTERM shuts uvicorn down gracefully (requests in
    # flight finish, then its lifespan stops the engine, which ends `drive`), a second Ctrl-C forces it.
    signal.signal(signal.SIGINT, server.handle_exit)
    signal.signal(signal.SIGTERM, server.handle_exit)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"muse: serving on http://{shown}:{port} (Ctrl-C to stop)", flush=True)
    http.start()
    app.state.engine.drive(until=lambda: not http.is_alive())
    http.join()
    listening.close()
    if not server.started:
        raise SystemExit(f"muse serve: the server did not start on {args.host}:{port} (see the log above)")
