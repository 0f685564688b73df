"""What a request may say and what a reply holds: the JSON schema of each endpoint (derived from the tasks' arguments
and `SamplingOptions`), the bounded body parser, the image decoder that reads only the formats we document, and the
engine task a validated request becomes. Every refusal is a `RequestError` carrying its HTTP status."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from typing import Any, Literal, Optional

from muse.options import LimitExceeded, Limits, SamplingOptions, option_names, option_types

# Bounds of a body's JSON, checked while parsing: the longest integer (a seed needs at most 20 digits, and int() of a
# 5000-digit one raises ValueError deep in the parser) and the deepest nesting (a valid body has 2 levels: a list of
# seeds inside the object).
MAX_DIGITS = 30
MAX_DEPTH = 8
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what Pillow may decode of a posted image: never EPS (Ghostscript) & co.


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status, `reason` its label in the muse_rejections metric,
    and the message goes back to the client."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


# endpoint -> (pipeline task builder, its own arguments besides the shared ones, the options it does not take)
TASKS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "/generate": ("generate_task", (), ()),
    "/inpaint": ("inpaint_task", ("image", "mask"), ()),
    "/outpaint": ("outpaint_task", ("image", "pad"), ()),
    "/edit": ("edit_task", ("image", "strength", "iterations", "mode"), ()),
    # The super-res stage alone: no base-stage steps, no choice of stages.
    "/upscale": ("upscale_task", ("image",), ("num_steps", "stages")),
}
IMAGE_FIELDS = ("image", "mask")


def _task_fields() -> dict[str, tuple[Any, Any]]:
    """The task arguments' JSON types and defaults."""
    from pydantic import Field

    return {
        "image": (str, Field(..., description="base64 PNG, JPEG or WebP")),
        "mask": (str, Field(..., description="base64 PNG, JPEG or WebP; white = regenerate")),
        "pad": (list[int], Field(..., min_length=4, max_length=4, description="[left, top, right, bottom] pixels")),
        "strength": (float, ...),
        "iterations": (int, 1),
        "mode": (Literal["random", "confidence"], "random"),
    }


def request_model(endpoint: str):
    """The pydantic model of an endpoint's JSON body: prompt, the shared call arguments, the task's own arguments,
    every sampling option it takes (None = the model's default), and the stream controls. Unknown keys are errors,
    and types are strict: `true` is no integer, `"4"` no number, `"yes"` no boolean."""
    from pydantic import ConfigDict, Field, create_model

    _, own, excluded = TASKS[endpoint]
    fields: dict[str, Any] = {
        "prompt": (str | list[str], Field(..., description="one prompt, or a list")),
        "num_images": (int, 1),
        "seed": (Optional[int | list[int]], None),
        "negative_prompt": (Optional[str | list[str]], None),
    }
    task_fields = _task_fields()
    fields.update({name: task_fields[name] for name in own})
    types = option_types()
    for f in dataclasses.fields(SamplingOptions):
        if f.name not in excluded:
            fields[f.name] = (Optional[types[f.name]], Field(None, description=f.metadata["help"]))
    fields["stream"] = (bool, Field(False, description="reply with server-sent events (queued, step, done, error)"))
    fields["preview_every"] = (Optional[int], Field(None, ge=1, description="steps between stream previews"))
    name = "".join(part.capitalize() for part in endpoint.strip("/").split("_")) + "Request"
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), **fields)


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


def decode_image(data: str, name: str, max_pixels: int):
    """Base64 PNG, JPEG or WebP -> PIL image. Pillow is told to try those formats only (`IMAGE_FORMATS`), so no other
    decoder (Ghostscript for EPS, ...) ever sees remote bytes, and an image over `max_pixels` is refused from its
    header, before any pixel is decoded (a 10000 x 10000 PNG is a few kilobytes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"'{name}' is not valid base64") from None
    try:
        try:
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
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
        raise RequestError(f"'{name}' is not a readable PNG, JPEG or WebP image") from None
    return image


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_task(pipe, endpoint: str, body, limits: Limits):
    """The engine task of a validated request: the prompts' length checked first (before any image is decoded or
    text tokenized), then every other input by the pipeline's task builder."""
    builder, own, excluded = TASKS[endpoint]
    try:
        limits.check_prompts("prompt", body.prompt)
        limits.check_prompts("negative_prompt", body.negative_prompt)
    except LimitExceeded as e:
        raise RequestError(limit_message(e), status=413, reason="too_large") from None
    arguments = {"num_images": body.num_images, "seed": body.seed, "negative_prompt": body.negative_prompt}
    for name in own:
        value = getattr(body, name)
        if name in IMAGE_FIELDS:
            value = decode_image(value, name, limits.max_pixels)
        elif name == "pad":
            value = tuple(value)
        arguments[name] = value
    overrides = {name: getattr(body, name) for name in option_names()
                 if name not in excluded and name in body.model_fields_set}
    try:
        return getattr(pipe, builder)(body.prompt, **arguments, **overrides)
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
