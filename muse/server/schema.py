"""What a request may say and what a reply holds: the JSON schema of each endpoint (derived from the tasks' arguments
and `SamplingOptions`), the bounded body parser, the image decoder that reads only the formats we document, and the
engine task a validated request becomes. Every refusal is a `RequestError` carrying its HTTP status."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from typing import Any, Optional

from muse.options import LimitExceeded, Limits, SamplingOptions, option_names, option_types
from muse.requests import REQUESTS, Request, request_fields

# Bounds of a body's JSON, checked while parsing: the longest integer (a seed needs at most 20 digits, and int() of a
# 5000-digit one raises ValueError deep in the parser) and the deepest nesting (a valid body has 2 levels: a list of
# seeds inside the object).
MAX_DIGITS = 30
MAX_DEPTH = 8


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status, `reason` its label in the muse_rejections metric,
    and the message goes back to the client."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


# endpoint -> the request class its body builds: its JSON fields, and the sampling options it takes, come from it.
TASKS: dict[str, type[Request]] = {f"/{name}": cls for name, cls in REQUESTS.items()}
IMAGE_FIELDS = ("image", "mask")  # base64 in the body, decoded by `muse.inputs` as a file would be
# JSON spellings of request fields whose Python type is not one: a pad is a list, an image base64 text.
_JSON_CONSTRAINTS: dict[str, dict[str, Any]] = {"pad": {"min_length": 4, "max_length": 4}}


def request_model(endpoint: str):
    """The pydantic model of an endpoint's JSON body: the request's fields (`muse.requests.request_fields`: prompt,
    the shared call arguments, the task's own), every sampling option it takes (None = the model's default), and the
    stream controls. Unknown keys are errors, and types are strict: `true` is no integer, `"4"` no number, `"yes"` no
    boolean."""
    from pydantic import ConfigDict, Field, create_model

    cls = TASKS[endpoint]
    fields: dict[str, Any] = {}
    for f in request_fields(cls):
        kind = list[int] if f.name == "pad" else f.type
        default = ... if f.default is dataclasses.MISSING else f.default
        help = f.help + ("; base64 in JSON" if f.name in IMAGE_FIELDS else "")
        fields[f.name] = (kind, Field(default, description=help, **_JSON_CONSTRAINTS.get(f.name, {})))
    types = option_types()
    for f in dataclasses.fields(SamplingOptions):
        if f.name not in cls.excluded_options:
            fields[f.name] = (Optional[types[f.name]], Field(None, description=f.metadata["help"]))
    fields["stream"] = (bool, Field(False, description="reply with server-sent events (queued, step, done, error)"))
    fields["preview_every"] = (Optional[int], Field(None, ge=1, description="steps between stream previews"))
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid", strict=True), **fields)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise RequestError(f"the body holds an integer of {len(text.lstrip('-'))} digits; at most {MAX_DIGITS} are "
                           "accepted")
    return int(text)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (an object or list counts one level), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_body(raw: bytes, model) -> Any:
    """Bytes -> the validated request, or RequestError naming what is wrong. Integers are bounded while parsing
    (`MAX_DIGITS`), and so is the nesting (`MAX_DEPTH`)."""
    from pydantic import ValidationError

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 text: {e}") from None
    try:
        data = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(f"the body's JSON is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    if _depth(data) > MAX_DEPTH:
        raise RequestError(f"the body's JSON is nested too deeply (at most {MAX_DEPTH} levels)")
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


def decode_image(data: str, name: str, max_pixels: int) -> bytes:
    """Base64 text -> the encoded image's bytes, checked as `muse.inputs` checks a file: only PNG, JPEG and WebP are
    decoded (no other decoder, such as Ghostscript for EPS, ever sees remote bytes), and an image over `max_pixels`
    is refused from its header, before any pixel is decoded (a 10000 x 10000 PNG is a few kilobytes)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"'{name}' is not valid base64") from None
    from muse import inputs  # here: `muse serve --help` imports no torch

    try:
        inputs.image_size(raw, name, max_pixels)
    except LimitExceeded as e:
        raise RequestError(limit_message(e), status=413, reason="too_large") from None
    except (ValueError, OSError) as e:
        raise RequestError(str(e)) from None
    return raw


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_task(pipe, endpoint: str, body, limits: Limits):
    """The engine task of a validated request: the prompts' length checked first (before any image is decoded or
    text tokenized), then the images' headers, then every other input as the pipeline checks a request."""
    cls = TASKS[endpoint]
    try:
        limits.check_prompts("prompt", body.prompt)
        limits.check_prompts("negative_prompt", body.negative_prompt)
    except LimitExceeded as e:
        raise RequestError(limit_message(e), status=413, reason="too_large") from None
    arguments = {f.name: getattr(body, f.name) for f in request_fields(cls) if f.name != "prompt"}
    for name in IMAGE_FIELDS:
        if name in arguments:
            arguments[name] = decode_image(arguments[name], name, limits.max_pixels)
    if "pad" in arguments:
        arguments["pad"] = tuple(arguments["pad"])
    overrides = {name: getattr(body, name) for name in option_names()
                 if name not in cls.excluded_options and name in body.model_fields_set}
    try:
        return pipe.task(pipe.request(cls.task, body.prompt, **arguments, **overrides))
    except LimitExceeded as e:
        raise RequestError(limit_message(e)) from None
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise RequestError(str(e)) from None


def limit_message(error: LimitExceeded) -> str:
    """A limit named as the server's operator sets it: its `muse serve` flag."""
    return error.message(f"muse serve --{error.limit.replace('_', '-')}")


def reply_of(output) -> dict:
    """A pipeline output as the JSON reply: {"images", "seeds"}, plus "scores" and "candidate_seeds" with best-of-N."""
    reply = {"images": [encode_png(im) for im in output.images], "seeds": [int(s) for s in output.seeds]}
    if output.scores is not None:  # best-of-N: the chosen candidates' scores and seeds
        reply["scores"] = [float(s) for s in output.scores]
        reply["candidate_seeds"] = [int(s) for s in output.candidate_seeds]
    return reply
