"""How an image is sampled: `SamplingOptions`, defined once, and the `Limits` on what one call may ask for.

Every entry point derives its options from these dataclasses' fields, so adding an option here adds it everywhere:
the keyword arguments of `MusePipeline`'s task methods (`pipe(prompt, num_steps=12)`), the CLI flags
(`add_option_arguments`), the server's request schema, the manifest of batch generation and `muse eval`.

    options = SamplingOptions(num_steps=12, guidance_scale=3.0)     # validated here, once
    options = pipe.config.sampling.with_overrides({"top_k": 50})    # a call's keywords over the pipeline's defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from sampling import DecodeSettings

# This module imports no torch (nor `sampling`, which does) at import time, so that `muse X --help`, which builds its
# flags from these fields, starts instantly; the decoder's own checks run when options are made.

GUIDANCE_SCHEDULES = ("constant", "linear")
# "auto" is bfloat16 where the device multiplies it fast (`fast_bfloat16`), float32 elsewhere.
PRECISIONS = ("float32", "bfloat16", "auto")


def default_device() -> str:
    """The device every entry point uses unless told otherwise (`muse generate`, the editing commands, `muse eval`,
    `muse serve`): the GPU when torch sees one -- under torchrun this process's, `cuda:$LOCAL_RANK` --, else Apple's
    mps, else "cpu". Written once, here, so that no two commands disagree."""
    import torch  # here, not at the top: see above

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def fast_bfloat16(device: Any) -> bool:
    """Whether the torch `device` multiplies bfloat16 matrices much faster than float32: measured about 4-5x on
    CPUs with AMX or AVX512-BF16 (and hundreds of times slower on AVX2-only CPUs, which emulate it). Sampling's
    `precision="auto"` and training's `mixed_precision` on the CPU both ask this."""
    import torch  # here, not at the top: see above

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


@dataclass(frozen=True)
class Guidance:
    """A job's classifier-free guidance: the scale, and how it changes over the steps (`SamplingOptions.guidance`;
    the mix and the row layout are in `muse.guidance`, which imports torch).

    schedule: "constant", or "linear": ramped from 1 to `scale`, reached at the last step (Muse).
    """

    scale: float = 1.0
    schedule: str = "constant"

    @property
    def on(self) -> bool:
        """Whether guidance runs: a scale of at most 1 means the conditional logits alone (0 and 1 alike), so no
        unconditional rows are computed. The one place this rule is written."""
        return self.scale > 1.0

    def context_rows(self, batch: int) -> int:
        """Context rows of a job of `batch` grids: each grid, twice when guided ([conditional; unconditional])."""
        return 2 * batch if self.on else batch

    def scale_at(self, step: int, num_steps: int) -> float:
        """The scale at step `step` (0 first) of `num_steps`. Written in terms of progress: trailing steps may be
        skipped (a row whose tokens are all committed stops early)."""
        if self.schedule == "linear":
            return 1.0 + (self.scale - 1.0) * (step + 1) / num_steps
        return self.scale


def _option(default: Any, help: str, *, flags: tuple[str, ...] = (), choices: tuple | None = None,
            deprecated: tuple[str, ...] = ()) -> Any:
    """A field of `SamplingOptions` with the text every entry point shows for it. `deprecated`: old spellings of its
    flag, still accepted for one version with a warning (`deprecated_alias`)."""
    return field(default=default, metadata={"help": help, "flags": flags, "choices": choices,
                                            "deprecated": deprecated})


@dataclass(frozen=True)
class SamplingOptions:
    """The options of a sampling call. A pipeline's defaults are `PipelineConfig.sampling`; a call overrides any
    field by keyword. Invalid values raise ValueError naming the field."""

    num_steps: int = _option(24, "base-stage decoding steps (Muse: 24)", flags=("--steps",))
    guidance_scale: float = _option(4.0, "classifier-free guidance scale on the logits; <= 1 turns guidance off",
                                    flags=("--guidance",))
    guidance_schedule: str = _option("constant", "constant, or linear: ramped from 1 to guidance_scale over the steps",
                                     choices=GUIDANCE_SCHEDULES)
    temperature: float = _option(1.0, "temperature of the token draws")
    top_k: int | None = _option(None, "draw tokens from the k most likely only (default: all)")
    top_p: float | None = _option(None, "draw tokens from the smallest set of probability >= p only (default: all)")
    choice_temperature: float = _option(4.5, "Gumbel noise on the confidence that picks which tokens to commit, "
                                             "annealed to 0 over the steps")
    mask_schedule: str = _option("cosine", "how many tokens stay masked after each step: a name of "
                                           "sampling.SCHEDULES (cosine, linear, square, cubic, sqrt, arccos)")
    superres_steps: int = _option(8, "super-resolution decoding steps (Muse: 8)")
    # None: every stage the pipeline has. Not said in the help: a flag's help shows the model's saved default, which
    # is what applies (the bundled model saves 1), and two defaults in one line contradict each other.
    stages: int | None = _option(None, "1: base stage only; 2: with super-resolution (a model that sets neither "
                                       "runs every stage it has)", choices=(1, 2))
    num_candidates: int = _option(1, "best-of-N: make N candidates per image and keep the one the pipeline's scorer "
                                     "rates best (its log-likelihood without a scorer); a pipeline's default applies "
                                     "to generation, editing tasks make one unless asked", deprecated=("--candidates",))

    def __post_init__(self) -> None:
        for name in ("num_steps", "superres_steps", "num_candidates"):
            _check_integer(self, name, low=1)
        _check_integer(self, "top_k", low=1, optional=True)
        _check_integer(self, "stages", low=1, optional=True)
        for name in ("guidance_scale", "temperature", "choice_temperature"):
            _check_real(self, name)
        _check_real(self, "top_p", optional=True)
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        # The decoder checks its own settings (step counts, temperature -- whose reciprocal must not overflow float32
        # logits --, top-k / top-p, choice temperature, schedule): one place for each rule.
        self.decode_settings(0)
        self.decode_settings(1)

    @property
    def guidance(self) -> Guidance:
        """The guidance scale and schedule as one value."""
        return Guidance(self.guidance_scale, self.guidance_schedule)

    @property
    def guided(self) -> bool:
        """Whether guidance runs (`Guidance.on`: the one place the rule is written)."""
        return self.guidance.on

    def with_overrides(self, overrides: Mapping[str, Any]) -> SamplingOptions:
        """These options with the given fields replaced; an unknown name raises TypeError naming it."""
        names = option_names()
        for name in overrides:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(names)}"
                raise TypeError(f"unknown sampling option {name!r}{hint}")
        return dataclasses.replace(self, **overrides) if overrides else self

    def decode_settings(self, stage: int) -> DecodeSettings:
        """The `sampling.DecodeSettings` of stage 0 (base) or 1 (super-resolution)."""
        from sampling import DecodeSettings

        return DecodeSettings(
            num_steps=self.num_steps if stage == 0 else self.superres_steps,
            schedule=self.mask_schedule,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            choice_temperature=self.choice_temperature,
        )


def amused_options() -> SamplingOptions:
    """The `amused` preset: diffusers' AmusedPipeline and AmusedScheduler defaults, in our terms. 12 steps, guidance
    10, the cosine schedule, tokens drawn from the plain softmax, and the commit noise AmusedScheduler anneals from
    2 to 0 over the steps: its temperature at step i is 2 (T - 1 - i) / (T - 1), ours is choice_temperature
    (T - 1 - i) / T, the same for choice_temperature = 2 T / (T - 1). (The preset is for 12 steps; with others, the
    ramp starts a little above or below 2.)"""
    steps = 12
    return SamplingOptions(num_steps=steps, guidance_scale=10.0, guidance_schedule="constant", temperature=1.0,
                           choice_temperature=2.0 * steps / (steps - 1), mask_schedule="cosine", num_candidates=1)


PRESETS = {"muse": SamplingOptions, "amused": amused_options}  # name -> the options it stands for


def _limit(default: int, help: str) -> Any:
    """A field of `Limits` with the text the server's flags show for it."""
    return field(default=default, metadata={"help": help})


class LimitExceeded(ValueError):
    """A call asks for more than one of its `Limits` allows. `limit` names the field; a server reports it as its own
    flag (`message(set_by="muse serve --max-images")`) rather than as the pipeline config's."""

    def __init__(self, what: str, value: int, limit: str, bound: int) -> None:
        self.what, self.value, self.limit, self.bound = what, value, limit, bound
        super().__init__(self.message(f"PipelineConfig.limits.{limit}"))

    def message(self, set_by: str) -> str:
        return f"{self.what}={self.value} is over the limit {self.limit}={self.bound} ({set_by})"


@dataclass(frozen=True)
class Limits:
    """The most one call may ask for, checked before any work starts; `PipelineConfig.limits` holds a pipeline's,
    and a server can set stricter ones (`muse serve --max-steps ...`, one flag per field). Each exists because a probe
    found a request that ran without bound or ran the machine out of memory without it."""

    max_steps: int = _limit(1000, "most num_steps and superres_steps a request may ask")
    max_images: int = _limit(256, "most images per request, candidates included (prompts x num_images x "
                                  "num_candidates)")
    max_candidates: int = _limit(64, "most num_candidates a request may ask")
    max_pixels: int = _limit(1024 * 1024, "largest input image, width x height, and outpainted canvas")
    max_pad: int = _limit(2048, "most pixels outpainting adds on any side")
    # Base-stage tokens of an edited or outpainted canvas: one larger than the model's grid is decoded window by
    # window, each a full decode, so the time grows with it (a 1024 px edit with 8 px tokens is ~1000 windows).
    max_tokens: int = _limit(4096, "most base-stage tokens of an edited or outpainted canvas (each model-grid "
                                   "window of it is a full decode)")
    max_iterations: int = _limit(100, "most /edit iterations")
    # Characters, not tokens: the text encoder truncates at its own max_length anyway (with a warning), so what a
    # long prompt costs is the tokenizer's pass over the whole string -- a 15 MiB prompt took 19 s and +1.3 GB on
    # the engine thread, where no deadline can interrupt it. Counting characters costs nothing and needs no model.
    max_prompt_chars: int = _limit(4096, "most characters of one prompt or negative prompt")
    # What the engine spends on one request, estimated before any work (`decode_cost`): the other limits bound each
    # size alone, but not their product -- a 64 px image outpainted by 192 px per side is 168 windows, each a full
    # decode, and took the engine for 100-120 s while every other client waited. A row-step took 1.1-3.4 ms on the
    # bundled model on one CPU thread; the library's default only stops a runaway call (1 M: roughly 20-60 minutes).
    max_row_steps: int = _limit(1_000_000, "most decoding work of one request, in row-steps (forward rows x "
                                           "decoding steps, summed over every window, stage, candidate and edit "
                                           "iteration; a guided row counts twice)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_integer(self, f.name, low=1)

    def check(self, options: SamplingOptions | Mapping[str, Any]) -> None:
        """Raise ValueError naming the limit if `options` (or a mapping of some of them) ask for more than it allows;
        values that are not integers are left to the options' own checks."""
        get = options.get if isinstance(options, Mapping) else lambda name: getattr(options, name)
        for name, limit in (("num_steps", "max_steps"), ("superres_steps", "max_steps"),
                            ("num_candidates", "max_candidates")):
            value = get(name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                self.check_value(name, int(value), limit)

    def check_prompts(self, what: str, prompts: Any) -> None:
        """Raise ValueError if a prompt of `prompts` (a string, a list of them, or None) is longer than
        `max_prompt_chars`; anything that is not a string is left to the prompt's own checks. Cheap: call it before
        any tokenizing."""
        for i, prompt in enumerate([prompts] if isinstance(prompts, str) else prompts or ()):
            if isinstance(prompt, str) and len(prompt) > self.max_prompt_chars:
                which = what if isinstance(prompts, str) else f"{what}[{i}]"
                self.check_value(f"{which}'s characters", len(prompt), "max_prompt_chars")

    def check_value(self, what: str, value: int, limit: str) -> None:
        """Raise `LimitExceeded` (a ValueError) if `value` (named `what`) is over the limit called `limit`."""
        bound = getattr(self, limit)
        if value > bound:
            raise LimitExceeded(what, value, limit, bound)


# A decoding step's cost beyond its rows, in rows: on the bundled model (one CPU thread) a step took about 4 ms plus
# 1.7 ms a row, so a window of one guided image (2 rows) costs nearly three times its rows alone. Counting it keeps
# the estimate honest for requests of many small windows (outpainting), whose steps cannot share a forward.
STEP_OVERHEAD_ROWS = 4


def decode_cost(windows: int, steps: int, rows: int, row_tokens: float = 1.0) -> int:
    """Row-steps of decoding `windows` windows of `steps` steps each over `rows` forward rows (a guided image is two,
    `Guidance.context_rows`), each row `row_tokens` times the base model's grid in tokens (a super-resolution window
    of 16 x 16 tokens over an 8 x 8 base grid: 4). Each step also counts `STEP_OVERHEAD_ROWS`. What
    `Limits.max_row_steps` bounds; an upper bound when some of a window's rows finish early. Tokens stand for work,
    not FLOPs: a super-res row-step of the bundled model measured nearer 6 base row-steps than its 4, and the
    server's budget is sized on measured requests of both stages."""
    return math.ceil(windows * steps * (rows * row_tokens + STEP_OVERHEAD_ROWS))


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SamplingOptions)]


def option_types() -> dict[str, Any]:
    """Each option's type annotation, resolved (e.g. `int | None`)."""
    hints = typing.get_type_hints(SamplingOptions)
    return {name: hints[name] for name in option_names()}


def option_flags(name: str) -> list[str]:
    """The CLI flags of an option: --name-with-dashes, then its short forms."""
    f = next(f for f in dataclasses.fields(SamplingOptions) if f.name == name)
    return ["--" + name.replace("_", "-"), *f.metadata["flags"]]


def option_help(name: str) -> str:
    return next(f for f in dataclasses.fields(SamplingOptions) if f.name == name).metadata["help"]


def add_option_arguments(
    parser: argparse.ArgumentParser,
    defaults: Mapping[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
    label: str = "the bundled model's default",
    title: str = "sampling options (default: the model's own)",
) -> None:
    """One flag per `SamplingOptions` field (but `exclude`). A flag that is not given is absent from the parsed
    namespace, so `given_options(args)` holds exactly what the user set, and the model's own defaults apply to the
    rest; `defaults` (e.g. the bundled model's, shown as "(`label`: value)") only feed the help text."""
    group = parser.add_argument_group(title)
    types = option_types()
    for f in dataclasses.fields(SamplingOptions):
        if f.name in exclude:
            continue
        shown = ""
        if defaults is not None and defaults.get(f.name, f.default) is not None:
            shown = f" ({label}: {defaults.get(f.name, f.default)})"
        group.add_argument(*option_flags(f.name), dest=f"option_{f.name}", type=_base_type(types[f.name]),
                           choices=f.metadata["choices"], default=argparse.SUPPRESS,
                           metavar=None if f.metadata["choices"] else f.name.upper(),
                           help=f.metadata["help"] + shown)
        for old in f.metadata["deprecated"]:
            deprecated_alias(group, old, option_flags(f.name)[0], dest=f"option_{f.name}",
                             type=_base_type(types[f.name]), choices=f.metadata["choices"], default=argparse.SUPPRESS)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores its value as the new flag does, with a FutureWarning naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next version; use {self.new}",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def deprecated_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, *, dest: str,
                     **kwargs: Any) -> None:
    """Accept `old`, a flag renamed to `new`, for one more version: it sets `dest` as `new` does (same `type`,
    `choices`, `default` in `kwargs`) and warns to use `new`. Hidden from --help, so the help shows one name."""
    parser.add_argument(old, action=_DeprecatedAlias, new=new, dest=dest, help=argparse.SUPPRESS, **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options set on the command line, by field name."""
    return {name[len("option_"):]: value for name, value in vars(args).items() if name.startswith("option_")}


def _base_type(tp: Any) -> type:
    """int for `int` and `int | None`, and so on."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _check_integer(obj: Any, name: str, low: int, optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    object.__setattr__(obj, name, int(value))  # numpy and torch integers become plain ones


def _check_real(obj: Any, name: str, optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    object.__setattr__(obj, name, float(value))
