"""Each task of the pipeline as a value: the request of one call, with its sampling options whole.

    request = InpaintRequest("a dog face", image=img, mask=mask, seed=0, options=pipe.options(num_steps=12))
    handle = pipe.submit(request)                         # or pipe.task(request) for an engine of your own
    out = handle.result()                                 # what pipe.inpaint("a dog face", image=img, ...) returns

A request is frozen and checked when it is made, as `SamplingOptions` is: the prompts, counts, seeds, the negative
prompt (which needs guidance), the task's own values (pad, strength, iterations, mode) and the *form* of its images.
What depends on the pipeline -- its limits, its token size, how many images a file really holds -- is checked by
`pipe.task(request)`, still before any work. `options` is a whole `SamplingOptions` (usually `pipe.options(...)`, the
pipeline's defaults with a call's overrides), carried as it is to every job of the task.

Every entry point derives from these fields, with the help text written here once: the keyword arguments of
`MusePipeline`'s task methods, the command-line flags of `muse generate / inpaint / outpaint / edit / upscale`
(`add_request_arguments`) and a server's request schema (`request_fields`).
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Optional, Sequence

from muse.options import SamplingOptions

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from muse.inputs import ImageInput, MaskInput
    from transformer.text import TextEmbedding

# Best-of-N: (images, prompts) -> (B,) scores, higher is better. `muse.scorer.PromptScorer` is one.
Scorer = Callable[[list["Image.Image"], list[str]], "Tensor"]

OUTPUT_TYPES = ("pil", "np", "pt", "tokens", "latent")  # "latent": diffusers' name for the tokens

# This module imports no torch (`muse.inputs` does, and is imported when a request is made), so that `muse X --help`,
# which builds its flags from these fields, starts at once.


def _field(default: Any = dataclasses.MISSING, *, help: str, json: Any = None, cli: dict | None = None) -> Any:
    """A request field with the text every entry point shows for it. `json`: the type of its value in a JSON body
    (None: not in JSON, e.g. a Python callable); `cli`: its command-line form (None: not on the command line), with
    keys `flag` (absent: positional), `type`, `metavar`, `choices`."""
    return field(default=default, metadata={"help": help, "json": json, "cli": cli})


def _parse_pad(text: str) -> tuple[int, int, int, int]:
    """--pad LEFT,TOP,RIGHT,BOTTOM -> four integers; a negative one is refused with the API's words."""
    try:
        pad = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pad must be four integers LEFT,TOP,RIGHT,BOTTOM, got {text!r}") from None
    if len(pad) != 4:
        raise argparse.ArgumentTypeError(f"--pad must be four integers LEFT,TOP,RIGHT,BOTTOM, got {text!r}")
    if any(p < 0 for p in pad):
        raise argparse.ArgumentTypeError(f"pad must not be negative, got {text!r} (left,top,right,bottom pixels)")
    return pad


_IMAGE_CLI = {"flag": "--image", "type": Path, "metavar": "FILE"}
_IMAGE_HELP = ("the image: a PNG, JPEG or WebP file (the API also takes a PIL image, an array or a tensor, the server "
               "base64)")
_IMAGE_JSON = str  # base64 of a PNG, JPEG or WebP file


@dataclass(frozen=True, eq=False)  # eq=False: images may be arrays, whose == is elementwise
class Request:
    """What every task takes. Not a task itself: one of its subclasses is."""

    task: ClassVar[str] = ""
    # Sampling options a task does not take (upscale runs the super-res stage alone: no base-stage steps, no stages).
    excluded_options: ClassVar[tuple[str, ...]] = ()
    # Whether the pipeline's best-of-N default (`config.sampling.num_candidates`) applies: it pays for generation; an
    # edit is interactive and its image constrains it, so editing tasks make one candidate unless asked.
    default_candidates: ClassVar[bool] = False

    prompt: str | Sequence[str] = _field(
        help="the text of the image to make (the API and the server also take a list: one prompt per image, or "
             "one for all)",
        json=str | list[str], cli={})
    _: KW_ONLY
    options: SamplingOptions = _field(help="the sampling options, whole (`pipe.options(...)`)")
    num_images: int = _field(1, help="images per prompt", json=int,
                             cli={"flag": "--num-images", "type": int, "metavar": "N"})
    seed: int | Sequence[int] | None = _field(
        None, help="seed of the first image; image k gets seed + k (default: random, recorded in the output; the "
                   "API and the server also take a list, one seed per image)",
        json=Optional[int | list[int]], cli={"flag": "--seed", "type": int})
    negative_prompt: str | Sequence[str] | None = _field(
        None, help="prompt for guidance's unconditional branch, instead of the empty prompt (one, or one per prompt)",
        json=Optional[str | list[str]], cli={"flag": "--negative-prompt"})
    scorer: Scorer | None = _field(
        None, help="best-of-N: (images, prompts) -> (B,) scores, higher is better (default: the pipeline's scorer, "
                   "else the model's mean token log-probability)")
    # What the API returns, not what is made: the tokens, seeds and pixels are the same whatever the form. Not in JSON
    # nor on the command line, which write image files.
    output_type: str = _field(
        "pil", help="the form of `PipelineOutput.images`: pil (PIL images), np (a float32 array (B, H, W, 3) in "
                    "[0, 1]), pt (a float32 tensor (B, 3, H, W) in [0, 1]), or tokens / latent (the (B, h, w) token "
                    "grids, the VQGAN decode skipped unless a best-of-N scorer must see the images)")
    prompt_embeds: TextEmbedding | None = _field(
        None, help="the prompts already encoded, one row per prompt (`pipe.text_encoder(prompts)`, possibly "
                   "edited); used instead of encoding `prompt`, which still names the images (outputs, the best-of-N "
                   "scorer). Guidance's unconditional rows are the encoded negative prompt (default: the empty one)")

    def __post_init__(self) -> None:
        import muse.inputs as inputs  # torch: imported when a request is made (see the top of the module)

        if type(self) is Request:
            raise TypeError("Request is the fields every task shares; make a GenerateRequest, InpaintRequest, ...")
        if not isinstance(self.options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions (e.g. pipe.options(...)), got "
                            f"{type(self.options).__name__}")
        inputs.prompt_list(self.prompt)
        inputs.check_int(self.num_images, "num_images")
        inputs.check_seed(self.seed)
        if self.negative_prompt is not None:
            if not self.options.guided:
                raise ValueError(f"negative_prompt replaces the unconditional branch of guidance, which is off at "
                                 f"guidance_scale={self.options.guidance_scale}; use a guidance_scale above 1")
            inputs.prompt_list(self.negative_prompt, "negative_prompt")
        if self.scorer is not None and not callable(self.scorer):
            raise TypeError(f"scorer must be a callable (images, prompts) -> scores, got {type(self.scorer).__name__}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        if self.prompt_embeds is not None:
            _check_prompt_embeds(self.prompt_embeds, len(self.prompts))
        # Lists become tuples: a request is a value, which nobody can change after it was checked.
        for name in ("prompt", "seed", "negative_prompt"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "num_images", int(self.num_images))

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def _check_prompt_embeds(embeds: Any, num_prompts: int) -> None:
    """The form of `prompt_embeds`: a `TextEmbedding` of one row per prompt (that it comes from the pipeline's own
    text encoder -- its length, width and pooled vector -- is checked by the pipeline's task)."""
    import torch

    from transformer.text import TextEmbedding

    if not isinstance(embeds, TextEmbedding):
        raise TypeError(f"prompt_embeds must be a TextEmbedding (pipe.text_encoder(prompts)), got "
                        f"{type(embeds).__name__}")
    states, mask = embeds.states, embeds.mask
    if not (isinstance(states, torch.Tensor) and states.dim() == 3 and states.is_floating_point()):
        raise ValueError(f"prompt_embeds.states must be a float tensor (N, S, D), got "
                         f"{getattr(states, 'shape', type(states).__name__)}")
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == states.shape[:2]):
        raise ValueError(f"prompt_embeds.mask must be a bool tensor {tuple(states.shape[:2])} (N, S), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if states.shape[0] != num_prompts:
        raise ValueError(f"prompt_embeds has {states.shape[0]} rows for {num_prompts} prompt(s); give one row per "
                         "prompt")
    if not bool(torch.isfinite(states).all()):
        raise ValueError("prompt_embeds.states holds NaN or infinite values")


@dataclass(frozen=True, eq=False)
class GenerateRequest(Request):
    """Generate `num_images` images per prompt, ordered prompt-major."""

    task: ClassVar[str] = "generate"
    default_candidates: ClassVar[bool] = True


@dataclass(frozen=True, eq=False)
class InpaintRequest(Request):
    """Regenerate the part of `image` where `mask` is white (True), guided by the prompt."""

    task: ClassVar[str] = "inpaint"

    _: KW_ONLY
    image: ImageInput = _field(help=_IMAGE_HELP, json=_IMAGE_JSON, cli=_IMAGE_CLI)
    mask: MaskInput = _field(help="the mask, as the image: same size, white = regenerate", json=_IMAGE_JSON,
                             cli={**_IMAGE_CLI, "flag": "--mask"})

    def __post_init__(self) -> None:
        super().__post_init__()
        import muse.inputs as inputs

        inputs.check_image_form(self.image, "image")
        inputs.check_image_form(self.mask, "mask")


@dataclass(frozen=True, eq=False)
class OutpaintRequest(Request):
    """Extend `image` by `pad` pixels on each side."""

    task: ClassVar[str] = "outpaint"

    _: KW_ONLY
    image: ImageInput = _field(help=_IMAGE_HELP, json=_IMAGE_JSON, cli=_IMAGE_CLI)
    pad: tuple[int, int, int, int] = _field(
        help="pixels to add on each side (left, top, right, bottom), multiples of the model's token size",
        json=tuple[int, int, int, int], cli={"flag": "--pad", "type": _parse_pad, "metavar": "LEFT,TOP,RIGHT,BOTTOM"})

    def __post_init__(self) -> None:
        super().__post_init__()
        import muse.inputs as inputs

        inputs.check_image_form(self.image, "image")
        object.__setattr__(self, "pad", inputs.check_pad(self.pad))


@dataclass(frozen=True, eq=False)
class EditRequest(Request):
    """Mask-free editing and variations (Muse section 4.3): re-mask a fraction of the image's tokens and resample."""

    task: ClassVar[str] = "edit"

    _: KW_ONLY
    image: ImageInput = _field(help=_IMAGE_HELP, json=_IMAGE_JSON, cli=_IMAGE_CLI)
    strength: float = _field(help="fraction of the image's tokens to resample, in [0, 1]", json=float,
                             cli={"flag": "--strength", "type": float})
    iterations: int = _field(1, help="re-mask and resample this many times", json=int,
                             cli={"flag": "--iterations", "type": int})
    mode: str = _field("random", help="which tokens to re-mask: random, or the least likely under the new prompt",
                       json=Literal["random", "confidence"],
                       cli={"flag": "--mode", "choices": ("random", "confidence")})

    def __post_init__(self) -> None:
        super().__post_init__()
        import muse.inputs as inputs

        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        inputs.check_int(self.iterations, "iterations")
        if self.mode not in inputs.EDIT_MODES:
            raise ValueError(f"mode must be one of {inputs.EDIT_MODES}, got {self.mode!r}")
        inputs.check_image_form(self.image, "image")
        object.__setattr__(self, "iterations", int(self.iterations))


@dataclass(frozen=True, eq=False)
class UpscaleRequest(Request):
    """Super-resolve `image`, at the base stage's resolution, with the super-res stage alone."""

    task: ClassVar[str] = "upscale"
    excluded_options: ClassVar[tuple[str, ...]] = ("num_steps", "stages")

    _: KW_ONLY
    image: ImageInput = _field(
        help="the image, at the base stage's resolution (64 px for the bundled model; larger sides in multiples of "
             "its token size are decoded in windows): a PNG, JPEG or WebP file", json=_IMAGE_JSON, cli=_IMAGE_CLI)

    def __post_init__(self) -> None:
        super().__post_init__()
        import muse.inputs as inputs

        inputs.check_image_form(self.image, "image")


REQUESTS: dict[str, type[Request]] = {cls.task: cls for cls in (GenerateRequest, InpaintRequest, OutpaintRequest,
                                                                 EditRequest, UpscaleRequest)}


# --------------------------------------------------------------------------------------------------------------------
# What the entry points derive from the fields


@dataclass(frozen=True)
class RequestField:
    """One field of a request as a JSON body carries it."""

    name: str
    type: Any          # the type of its JSON value (e.g. `str | list[str]`, `Optional[int | list[int]]`)
    default: Any       # `dataclasses.MISSING` when the field is required
    help: str

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def request_fields(cls: type[Request]) -> list[RequestField]:
    """The JSON-able fields of a request class, in order (prompt, the shared ones, the task's own); not `options`
    (its fields are `SamplingOptions`', minus `cls.excluded_options`) nor `scorer` (a Python callable)."""
    return [RequestField(f.name, f.metadata["json"], f.default, f.metadata["help"])
            for f in dataclasses.fields(cls) if f.metadata.get("json") is not None]


def add_request_arguments(parser: argparse.ArgumentParser, cls: type[Request], prompt_required: bool = True) -> None:
    """One command-line argument per field of `cls` that has a command-line form: the prompt positional (optional
    when not `prompt_required`, for `muse generate --prompts FILE`), the rest as flags, required where the field
    has no default, with the field's help."""
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        kwargs: dict[str, Any] = {"help": f.metadata["help"]}
        for key in ("type", "metavar", "choices"):
            if key in cli:
                kwargs[key] = cli[key]
        if "flag" not in cli:
            if not prompt_required:
                kwargs.update(nargs="?", default=None, help=kwargs["help"] + " (or use --prompts FILE)")
            parser.add_argument(f.name, **kwargs)
            continue
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        parser.add_argument(cli["flag"], dest=f.name, **kwargs)


def given_request(args: argparse.Namespace, cls: type[Request]) -> dict[str, Any]:
    """The request fields parsed by `add_request_arguments`, by name (all but the prompt and Python-only ones)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli") and "flag" in f.metadata["cli"]}
