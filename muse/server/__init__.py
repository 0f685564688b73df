"""`muse serve`: the interactive editing backend -- FastAPI on uvicorn over the decoding engine, and a web editor.

    GET  /                 the web editor (static files shipped in the package, nothing fetched from elsewhere)
    GET  /health           {"status": "ok", "model": <name>, "engine": {...}}
    GET  /metrics          Prometheus text format
    GET  /docs             every operation of /openapi.json, on a page of our own (works offline)
    POST /generate  {"prompt": "a red apple", "num_images": 2, "seed": 0, ...}
    POST /inpaint   {"prompt": ..., "image": <png>, "mask": <png, white = regenerate>, ...}
    POST /outpaint  {"prompt": ..., "image": <png>, "pad": [left, top, right, bottom], ...}
    POST /edit      {"prompt": ..., "image": <png>, "strength": 0.5, "iterations": 1, "mode": "random", ...}
    POST /upscale   {"prompt": ..., "image": <png at the base resolution>, ...}    (the super-res stage alone)

Bodies are JSON (`Content-Type: application/json`, else 415) with strict types; images travel as base64-encoded PNG,
JPEG or WebP (no other format is decoded). Every POST takes the task's arguments (`num_images`, `seed`,
`negative_prompt`, and the task's own) and every sampling option by its `SamplingOptions` field name; a field left out
takes the model's default. The reply is {"images": [...], "seeds": [...]}, plus "scores" and "candidate_seeds" with
best-of-N. An unknown key, a bad value or a bad image is a 400 naming it; a body, image or prompt over its limit a
413; a Host header the server does not answer to a 400.

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

The parts: `settings` (ServerSettings, composing the pipeline's `Limits`, and the flags), `schema` (request bodies,
images, replies), `runner` (the one request runner, rendered as JSON or as events, and the metrics), `connections`
(deadlines, the connection cap and the Host guard under the app), `app` (routes, `ServerThread`, `muse serve`).
"""

from muse.server.app import ServerThread, add_arguments, create_app, main, measure_preview_every, uvicorn_config
from muse.server.runner import Metrics, Serving
from muse.server.schema import (TASKS, RequestError, build_task, decode_image, encode_png, parse_body, reply_of,
                                request_model)
from muse.server.settings import SERVER_LIMITS, ServerSettings

__all__ = [
    "SERVER_LIMITS", "TASKS", "Metrics", "RequestError", "ServerSettings", "ServerThread", "Serving", "add_arguments",
    "build_task", "create_app", "decode_image", "encode_png", "main", "measure_preview_every", "parse_body",
    "reply_of", "request_model", "uvicorn_config",
]
