"""The serial HTTP server musegen shipped before the engine (`muse serve` until then), kept as bench/serve.py's
baseline: `http.server` threads and one global lock, so whole requests run through the pipeline one at a time.

Imported as `serial_server` by bench/serve.py; not part of the package.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger("serial_server")

MAX_BODY_BYTES = 32 * 1024 * 1024
SAMPLING_OPTIONS = {"num_images", "num_steps", "guidance_scale", "guidance_schedule", "negative_prompt", "seed",
                    "temperature", "top_k", "top_p", "stages", "superres_steps"}
# endpoint -> (pipeline method, options it takes besides `prompt`, options that are images)
ENDPOINTS: dict[str, tuple[str, set[str], set[str]]] = {
    "/generate": ("__call__", SAMPLING_OPTIONS | {"num_candidates"}, set()),
    "/inpaint": ("inpaint", SAMPLING_OPTIONS | {"image", "mask"}, {"image", "mask"}),
    "/outpaint": ("outpaint", SAMPLING_OPTIONS | {"image", "pad"}, {"image"}),
    "/edit": ("edit", SAMPLING_OPTIONS | {"image", "strength", "iterations", "mode"}, {"image"}),
    # The super-res stage alone: no base-stage steps, no choice of stages.
    "/upscale": ("upscale", SAMPLING_OPTIONS - {"num_steps", "stages"} | {"image"}, {"image"}),
}


class RequestError(ValueError):
    """A request the server refuses with 400; the message goes back to the client."""


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: Any, name: str) -> Image.Image:
    if not isinstance(data, str):
        raise RequestError(f"'{name}' must be a base64-encoded image string")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError):
        raise RequestError(f"'{name}' is not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"'{name}' is not a readable image") from None
    return image


def handle(pipe: Any, endpoint: str, body: dict) -> dict:
    """Run one request against the pipeline; the HTTP layer only parses and frames. Raises RequestError."""
    method, allowed, image_keys = ENDPOINTS[endpoint]
    unknown = sorted(set(body) - allowed - {"prompt"})
    if unknown:
        raise RequestError(f"unknown option(s) for {endpoint}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "prompt" not in body:
        raise RequestError("missing 'prompt'")
    options = {k: decode_png(v, k) if k in image_keys else v for k, v in body.items() if k != "prompt"}
    if "pad" in options:
        options["pad"] = tuple(options["pad"]) if isinstance(options["pad"], list) else options["pad"]
    try:
        out = getattr(pipe, method)(body["prompt"], **options)
    except (ValueError, TypeError) as e:
        raise RequestError(str(e)) from None
    reply = {"images": [encode_png(im) for im in out.images], "seeds": [int(s) for s in out.seeds]}
    if getattr(out, "scores", None) is not None:
        reply["scores"] = [float(s) for s in out.scores]  # best-of-N: the chosen candidates' scores
    return reply


def make_server(pipe: Any, host: str = "127.0.0.1", port: int = 8000, model_name: str = "") -> ThreadingHTTPServer:
    """A ready-to-run server (call `serve_forever()`); port 0 picks a free port (see `server.server_address`)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._reply(HTTPStatus.OK, {"status": "ok", "model": model_name})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path not in ENDPOINTS:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True  # the unread body would otherwise be parsed as the next request
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                with lock:
                    result = handle(pipe, self.path, body)
            except json.JSONDecodeError as e:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"the body is not valid JSON: {e}"})
            except RequestError as e:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception:  # a bug, not a bad request: log it whole, tell the client little
                log.exception("request to %s failed", self.path)
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the server log"})
            else:
                self._reply(HTTPStatus.OK, result)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)
