"""`MusePipeline`: text -> tokens -> pixels, plus inpainting, outpainting and mask-free editing.

    pipe = MusePipeline.from_pretrained()                       # the bundled model, or a saved directory
    out = pipe("a red apple", num_images=4, seed=0)
    out.images[0].save("apple.png")
    pipe.inpaint("a dog face", image=img, mask=mask)            # white = regenerate
    pipe.outpaint("a sunny sky", image=img, pad=(0, 32, 0, 0))  # left, top, right, bottom in pixels
    pipe.edit("a green apple", image=img, strength=0.5)         # Muse section 4.3, no mask
    pipe.upscale("a red apple", image=small)                    # the super-res stage alone, on any base-size image

Every sampling option (`muse.options.SamplingOptions`: num_steps, guidance_scale, temperature, ...) can be passed by
keyword to every task; what a call does not set comes from `config.sampling`.

This file holds the tasks. Its neighbours hold their plumbing: `muse.requests` (each task's inputs as a frozen,
checked value), `muse.inputs` (images, masks, prompts, seeds and pads coerced and checked), `muse.loading` (pipeline
directories, diffusers aMUSEd directories and hub ids, read and written) and `muse.components` (the registry of
component kinds: the pipeline names no architecture).

Every task is a *task builder* over the one decoding engine (`muse.engine`, `pipe.engine`): it turns its request into
a starting token grid -- all masked for generation, the image's tokens with the masked ones removed for inpainting,
the image's tokens on a larger masked canvas for outpainting, the image's tokens with a fraction re-masked for
editing -- and yields it as a job; the engine decodes it, batched with whatever else is in flight. A grid larger than
the transformer's is decoded window by window (`sampling.plan_windows`), one job per window, so a canvas can grow
without limit. Each task has one code path: `pipe.inpaint(...)` makes an `InpaintRequest`, builds its task
(`pipe.task(request)`) and waits for it; `pipe.submit(request)` starts it and returns a handle to wait on, stream step
events from, or cancel (what the server does).

Text never reaches `sampling`: classifier-free guidance is mixed by the engine on the logits. The prompts are encoded
once per task (through the text encoder's cache), and the transformer's cross-attention keys/values once per task
for [conditional; unconditional] rows.

Seeds are per image: image b uses seed `seeds[b]` for all its randomness (counter-based, see `sampling.rng`), so an
image is the same whatever batch it is generated in, alone or beside other requests.

With a super-resolution stage (`superres`), the base stage's tokens condition a second masked transformer over a finer
grid, decoded with `superres_steps` steps, and the result is decoded to pixels by `superres_vqgan` (the base VQGAN
when None). Images passed to inpaint/outpaint/edit are at the resolution of the last stage that runs.

Best-of-N (`num_candidates`): each image is chosen from N candidates, generated in the same batch, by a scorer of
(images, prompts). Candidate j of the image with seed s has seed (s * N + j) mod 2**32; `PipelineOutput.seeds` holds
the images' own seeds and `candidate_seeds` the chosen candidates', which a call with `num_candidates=1` reproduces.
The default scorer is the pipeline's `scorer` (a `muse.scorer.PromptScorer` saved as `scorer/` in the pipeline
directory, loaded on first use), else the model's own mean log-probability of the tokens it decoded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from muse import inputs
from muse.bundled import bundled_presets  # noqa: F401 - re-exported: `from muse.pipeline import bundled_presets`
from muse.components import ROLES, BaseTransformer, ImageTokenizer, SuperResModel, check_components
from muse.engine import Engine, Event, Job, ScoreJob, Step, Task, TaskHandle, TaskSteps
from muse.guidance import with_unconditional
from muse.inputs import MAX_SEED, ImageInput, MaskInput
from muse.loading import SCORER_DIR, PipelineConfig, load_scorer, read_pipeline, save_pipeline
from muse.options import SamplingOptions, decode_cost, fast_bfloat16
from muse.progress import progress
from muse.requests import (REQUESTS, EditRequest, GenerateRequest, InpaintRequest, OutpaintRequest, Request, Scorer,
                           UpscaleRequest)
from sampling import (Window, composite, edit_mask, feathered_composite_weights, masked_grid, outpaint_canvas,
                      pixel_to_token_mask, plan_windows, token_padding)
from transformer.model import TextContext
from transformer.text import TextEmbedding, TextEncoder

__all__ = ["MusePipeline", "PipelineConfig", "PipelineOutput", "Scorer", "SCORER_DIR"]


@dataclass
class PipelineOutput:
    # One per row: prompt-major, then image index. In the request's `output_type`: a list of PIL images ("pil"), a
    # float32 array (B, H, W, 3) in [0, 1] ("np"), a float32 tensor (B, 3, H, W) in [0, 1] ("pt"), or the tokens
    # (B, h, w) ("tokens", "latent"). np and pt are the PIL images' values / 255, exactly.
    images: list[Image.Image] | np.ndarray | Tensor
    tokens: Tensor                # (B, h, w) long tokens of the last stage that ran
    seeds: list[int]              # the seed of each image; pass them back to reproduce it
    prompts: list[str]            # the prompt of each image
    low_res_tokens: Tensor | None  # (B, h, w) base-stage tokens when the super-resolution stage ran, else None
    scores: list[float] | None = None  # best-of-N: the chosen candidate's score; None with one candidate
    # best-of-N: the chosen candidate's own seed (`num_candidates=1, seed=...` remakes that image alone)
    candidate_seeds: list[int] | None = None


@dataclass(frozen=True)
class _Call:
    """The resolved inputs of one task, one row per image to decode (every candidate a row of its own)."""

    prompts: list[str]
    negatives: list[str]          # the unconditional branch's prompt per row ("" = none); unused without guidance
    seeds: Tensor                 # (B,) int64 on the pipeline's device, each row's seed (a candidate's seed)
    image_seeds: list[int]        # the seed of each output image (B / num_candidates of them)
    options: SamplingOptions
    stages: int
    output_type: str = "pil"
    decode: bool = True            # whether the VQGAN decodes the tokens to pixels (not for tokens alone)
    prompt_embeds: TextEmbedding | None = None  # one row per prompt of `prompts` (B / (num_images x n) rows)

    @property
    def row_keys(self) -> tuple[str, ...] | None:
        """Keys of equal text rows for the engine (a prompt names its row); None with precomputed embeddings, which
        a prompt's text does not name."""
        return tuple(self.text_rows) if self.prompt_embeds is None else None

    @property
    def guided(self) -> bool:
        """Whether guidance runs (the rule is `muse.options.Guidance.on`)."""
        return self.options.guided

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_candidates(self) -> int:
        return self.options.num_candidates

    @property
    def text_rows(self) -> list[str]:
        """The prompt of each text-context row: B conditional rows, then B unconditional ones when guided."""
        return with_unconditional(self.prompts, self.negatives) if self.guided else self.prompts

    def repeat(self, x: Tensor) -> Tensor:
        """(N, ...) inputs, one per prompt, -> (B, ...): each repeated for its images and candidates."""
        return x.repeat_interleave(self.batch_size // x.shape[0], dim=0)


class MusePipeline:
    """Text-to-image generation and editing with a VQGAN, a text encoder, a masked transformer and, optionally, a
    token super-resolution stage. Components are public attributes, of any kind `muse.components` registers;
    `superres_vqgan=None` means the high-res tokens share the base VQGAN. `scorer` is the default best-of-N scorer (see
    the `scorer` property). `engine` decodes."""

    def __init__(
        self,
        vqgan: ImageTokenizer,
        text_encoder: TextEncoder,
        transformer: BaseTransformer,
        superres: SuperResModel | None = None,
        superres_vqgan: ImageTokenizer | None = None,
        config: PipelineConfig | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.vqgan = vqgan.eval()
        self.text_encoder = text_encoder
        self.transformer = transformer.eval()
        self.superres = None if superres is None else superres.eval()
        self.superres_vqgan = None if superres_vqgan is None else superres_vqgan.eval()
        self.config = config or PipelineConfig()
        self.engine = Engine()
        self._progress_bar_config: dict[str, Any] = {}  # `set_progress_bar_config`
        self._scorer = scorer
        self._scorer_dir: Path | None = None  # a saved PromptScorer not loaded yet (from_pretrained)
        check_components(self.vqgan, self.text_encoder, self.transformer, self.superres, self.superres_vqgan,
                         self.config.sampling.stages)
        self._apply_precision()

    def _apply_precision(self) -> None:
        """Put the token models in the dtype `config.precision` asks for on their device."""
        precision = self.config.precision
        if precision == "auto":
            precision = "bfloat16" if fast_bfloat16(self.device) else "float32"
        dtype = getattr(torch, precision)
        for model in (self.transformer, self.superres):
            if model is not None:
                model.to(dtype=dtype)

    # ----------------------------------------------------------------------------------------------------------------
    # Facts about sizes

    @property
    def high_vqgan(self) -> ImageTokenizer:
        """The VQGAN of the super-resolution stage's tokens."""
        return self.vqgan if self.superres_vqgan is None else self.superres_vqgan

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The token models' dtype: the arithmetic of sampling (`config.precision`, or `to(dtype=...)`). The VQGAN
        and the text encoder may hold another (float32 unless moved with a dtype)."""
        return next(self.transformer.parameters()).dtype

    @property
    def components(self) -> dict[str, Any]:
        """The named parts, as `MusePipeline(**pipe.components, config=pipe.config)` takes them: vqgan,
        text_encoder, transformer, superres, superres_vqgan (None when absent) and the default best-of-N scorer
        (loaded now if the pipeline directory saved one)."""
        return {"vqgan": self.vqgan, "text_encoder": self.text_encoder, "transformer": self.transformer,
                "superres": self.superres, "superres_vqgan": self.superres_vqgan, "scorer": self.scorer}

    def set_progress_bar_config(self, **config: Any) -> None:
        """Options of the progress bar that the task methods show over their decoding steps (on a terminal only):
        `disable=True` turns it off, other keys are tqdm's (`desc`, `leave`, `position`, ...), as in diffusers.
        `submit` never shows one: its caller has the step events."""
        fixed = sorted({"total", "initial", "file", "dynamic_ncols"} & set(config))
        if fixed:
            raise TypeError(f"the progress bar sets {', '.join(fixed)} itself (it counts the task's steps on stderr)")
        self._progress_bar_config = dict(config)

    @property
    def scorer(self) -> Scorer | None:
        """The default best-of-N scorer, or None for the model's own log-likelihood; assign None or any `Scorer` to
        change it. A pipeline directory's `scorer/` is loaded here, on first use, so a pipeline that never ranks
        candidates never pays for the scorer's frozen towers."""
        if self._scorer is None and self._scorer_dir is not None:
            self._scorer = load_scorer(self._scorer_dir, self.device)
            self._scorer_dir = None
        return self._scorer

    @scorer.setter
    def scorer(self, scorer: Scorer | None) -> None:
        self._scorer, self._scorer_dir = scorer, None

    @property
    def _scale(self) -> int:
        """High-res tokens per low-res token along each axis."""
        return self.superres.config.high.grid_size // self.transformer.config.grid_size

    def _resolve_stages(self, stages: int | None) -> int:
        if stages is None:
            return 1 if self.superres is None else 2
        if stages == 2 and self.superres is None:
            raise ValueError("stages=2 needs a super-resolution stage, and this pipeline has none")
        return stages

    def stride(self, stages: int | None = None) -> int:
        """Pixels per base-stage token at the output resolution: image sizes and outpainting pads must be multiples.
        `stages` None means the pipeline's default (`config.sampling.stages`)."""
        if stages is not None and (isinstance(stages, bool) or stages not in (1, 2)):
            raise ValueError(f"stages must be 1 or 2, got {stages!r}")
        if self._resolve_stages(stages if stages is not None else self.config.sampling.stages) == 1:
            return self.vqgan.config.downsample_factor
        return self._scale * self.high_vqgan.config.downsample_factor

    def resolution(self, stages: int | None = None) -> int:
        """Side in pixels of a generated image (the transformer's grid at the output resolution)."""
        return self.transformer.config.grid_size * self.stride(stages)

    def options(self, options: SamplingOptions | None = None, **overrides: Any) -> SamplingOptions:
        """The sampling options of a call: `options` (default: `config.sampling`) with `overrides` by field name.
        Raises TypeError for an unknown name and ValueError for an invalid value or one over `config.limits`."""
        self.config.limits.check(overrides)  # first, so that 10**9 steps are refused by the limit's name
        resolved = (self.config.sampling if options is None else options).with_overrides(overrides)
        self.config.limits.check(resolved)
        return resolved

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and loading (`muse.loading`)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, precision: str | None = None) -> MusePipeline:
        """Load a pipeline: a directory written by `save_pretrained`, a diffusers aMUSEd directory (one with
        `model_index.json`, such as a download of amused/amused-256), a Hugging Face hub id of one (downloaded into
        the hub cache when online, read from it offline), or a model bundled with the package by its preset name;
        None is the bundled default model.

        `precision` overrides the saved `config.precision`: "float32" keeps the stored weights exact (what re-saving
        a model needs; "auto" on a CPU with fast bfloat16 would round them to bfloat16).

        Raises FileNotFoundError for an unknown path or preset or a missing component, ValueError for a corrupt
        component, naming it, and OSError for a hub id that cannot be had (offline and not in the cache).
        """
        saved = read_pipeline(path, precision)
        parts = saved.components
        pipe = cls(parts["vqgan"], saved.text_encoder, parts["transformer"], parts.get("superres"),
                   parts.get("superres_vqgan"), saved.config)
        pipe._scorer_dir = saved.scorer_dir
        return pipe

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write one directory per component, text_encoder.json, `scorer/` when the default scorer is a saved or
        savable PromptScorer, and pipeline.json (last, so an interrupted save is never mistaken for a complete one),
        which names each component's kind (`muse.components`).

        Weights are stored as the components hold them, or cast to `dtype` (torch.float16 halves a float32 model on
        disk; loading casts back). Under `config.precision` "auto" on a CPU with fast bfloat16 the token models hold
        bfloat16 weights -- what runs is what is saved; load with `precision="float32"` to re-save exact weights.

        The pipeline is written into a new folder beside `path` and swapped in at the end: nothing of what was at
        `path` before (another pipeline's scorer/ or superres/) survives into it, and an interrupted save leaves the
        old one whole."""
        scorer = self._scorer_dir if self._scorer_dir is not None else self._scorer
        save_pipeline(path, {role: getattr(self, role) for role in ROLES}, self.text_encoder, self.config, scorer,
                      dtype)

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
           ) -> MusePipeline:
        """Move every component (in place) and return the pipeline. Without `dtype`, the token models take the
        dtype `config.precision` chooses for the new device. As with torch, a dtype may come first: `pipe.to(
        torch.float32)` is `pipe.to(dtype=torch.float32)`."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to() got two dtypes ({device} and dtype={dtype}); give a device and a dtype, as "
                                "pipe.to('cuda', torch.float16)")
            device, dtype = None, device
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        for module in (self.vqgan, self.transformer, self.superres, self.superres_vqgan):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self.text_encoder.to(device, dtype)
        if hasattr(self._scorer, "to") and device is not None:
            self._scorer.to(device)  # the scorer keeps float32: it only ranks finished images
        if dtype is None:
            self._apply_precision()
        return self

    # ----------------------------------------------------------------------------------------------------------------
    # Requests and tasks: each method below makes its request and runs its task to the end. Sampling options go by
    # keyword (`SamplingOptions`), or all at once as `options`.

    def request(self, task: str, prompt: str | Sequence[str], *, options: SamplingOptions | None = None,
                **arguments: Any) -> Request:
        """The request of `task` ("generate", "inpaint", "outpaint", "edit", "upscale") from the keyword form of its
        method: the request's own fields by name (`image=...`, `seed=...`), and sampling options by name over
        `options` (default: `config.sampling`; the editing tasks make one candidate unless asked, and upscale takes
        no base-stage option). What a server or a queue builds from a call's keywords."""
        if task not in REQUESTS:
            raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(REQUESTS)}")
        if "generator" in arguments:
            # A generator is one stream for the batch: an image would depend on its place in it.
            raise TypeError("generator is not taken: every image draws from its own seed, so it is the same "
                            "whatever batch it is made in. Pass seed=S (image k gets S + k) or seed=[...] (one per "
                            "image); PipelineOutput.seeds records them")
        cls = REQUESTS[task]
        own = {f.name for f in dataclasses.fields(cls)} - {"prompt", "options"}
        for name in cls.excluded_options:
            if name in arguments:
                raise ValueError(f"{task} runs the super-resolution stage alone: {name} does not apply (the stage's "
                                 "steps are superres_steps)")
        overrides = {name: value for name, value in arguments.items() if name not in own}
        if not cls.default_candidates and options is None and "num_candidates" not in overrides:
            overrides["num_candidates"] = 1
        resolved = self.options(options, **overrides)
        return cls(prompt, options=resolved, **{name: value for name, value in arguments.items() if name in own})

    def task(self, request: Request) -> Task:
        """The engine task of `request`, for `submit` or an engine of your own. Every input is checked here, before
        any work: the request checked itself when made; what depends on this pipeline (its limits, its token size,
        the images' real sizes, the decoding the task will cost) is checked now."""
        if not isinstance(request, Request):
            raise TypeError(f"a task is made from a request (GenerateRequest, InpaintRequest, ...), got "
                            f"{type(request).__name__}")
        # The prompts' length first, before any image is decoded or text tokenized: tokenizing a 15 MiB prompt took
        # 19 s, on the engine thread in a server, where no deadline interrupts it.
        self.config.limits.check_prompts("prompt", request.prompt)
        self.config.limits.check_prompts("negative_prompt", request.negative_prompt)
        self.config.limits.check(request.options)  # options made elsewhere than `self.options`
        build = {GenerateRequest: self._generate_task, InpaintRequest: self._inpaint_task,
                 OutpaintRequest: self._outpaint_task, EditRequest: self._edit_task,
                 UpscaleRequest: self._upscale_task}[type(request)]
        return build(request)

    def _run(self, request: Request, on_step: Callable[[Step], None] | None) -> PipelineOutput:
        """Run `request`'s task to the end on this thread, with a progress bar over its decoding steps (on a terminal
        only, `set_progress_bar_config`) and `on_step` called with every `Step` event.

        The bar's total grows as the task's jobs start (a cascade's second stage, an outpainting window: a task does
        not know its jobs in advance); a job whose rows all finish early fills its remaining steps at once."""
        task = self.task(request)
        failure: list[BaseException] = []
        config = {"desc": request.task, "unit": "step", **self._progress_bar_config}
        with progress(total=0, **config) as bar:
            def on_event(event: Event) -> None:
                if not isinstance(event, Step):
                    return
                if event.index == 1:
                    bar.total += event.num_steps
                    bar.refresh()
                bar.update(event.num_steps - event.index + 1 if event.masked == 0 else 1)
                if on_step is not None and not failure:
                    try:
                        on_step(event)
                    except Exception as error:  # the engine logs and swallows a listener's errors: keep it
                        failure.append(error)

            out = self.engine.run(task, on_event)
        if failure:
            raise failure[0]
        return out

    def submit(self, request: Request | Task, on_event: Callable[[Event], None] | None = None) -> TaskHandle:
        """Start a request's task (or a task already built by `task`) without waiting for it (`engine.submit`)."""
        return self.engine.submit(self.task(request) if isinstance(request, Request) else request, on_event)

    # The tasks' keyword form. Each method names its own task's fields; `**arguments` takes what every task takes --
    # the request's shared fields (num_images, seed, negative_prompt, scorer, output_type, prompt_embeds, options;
    # see `muse.requests.Request`, where their defaults and checks live) and any sampling option by name -- so that
    # each is defined once, in the request.

    def __call__(self, prompt: str | Sequence[str], *, on_step: Callable[[Step], None] | None = None,
                 **arguments: Any) -> PipelineOutput:
        """Generate `num_images` images per prompt (`GenerateRequest`).

        Images are ordered prompt-major. `seed`: an int gives image i seed + i, a list gives one seed per image,
        None draws a random base seed; `PipelineOutput.seeds` records each. `negative_prompt` (one, or one per
        prompt) replaces the empty prompt in guidance's unconditional branch. Sampling options (`SamplingOptions`)
        go by keyword, or all at once as `options`; `stages=1` stops after the base stage.

        `num_candidates` > 1 makes that many candidates per image and keeps the best by `scorer` (None: `self.scorer`,
        else the model's mean token log-probability); see the module docstring for the candidates' seeds.

        As in diffusers, and the same for every task: `output_type` is the form of `images` ("pil", "np", "pt", or
        "tokens" / "latent" without the VQGAN decode; see `PipelineOutput`); `prompt_embeds` (a `TextEmbedding`, one
        row per prompt, from `pipe.text_encoder(prompts)`) replaces encoding the prompts; `on_step` is called with
        every decoding step's `muse.engine.Step` event (on the thread that drives the engine; it observes, and an
        exception it raises is raised by the call once the task has ended). A progress bar counts the steps on a
        terminal (`set_progress_bar_config(disable=True)` turns it off). There is no `generator`: `seed` reproduces
        an image whatever batch it is in.
        """
        return self._run(self.request("generate", prompt, **arguments), on_step)

    def inpaint(self, prompt: str | Sequence[str], *, image: ImageInput, mask: MaskInput,
                on_step: Callable[[Step], None] | None = None, **arguments: Any) -> PipelineOutput:
        """Regenerate the part of `image` where `mask` is white (True), guided by the prompt (`InpaintRequest`;
        `arguments` as for `__call__`).

        image: PIL image, path, encoded bytes, numpy (H, W, 3) uint8 or float in [0, 1], or tensor (3, H, W) /
        (N, 3, H, W) in [-1, 1]; H and W multiples of `stride(stages)`. mask: same size, PIL (L or 1) / path / bytes /
        numpy / tensor, white or True = regenerate; one mask, or one per image. Several images and prompts pair up (or
        one broadcasts). Files and bytes: PNG, JPEG or WebP (`muse.inputs`).

        Every token touching a masked pixel, grown by `config.mask_dilation` tokens, is regenerated; the masked
        pixels are blanked before encoding so the kept tokens carry nothing of the old content. The result is pasted
        over the input with a `config.seam`-pixel feather: pixels farther than that from the regenerated tokens are
        the input's, bit for bit.
        """
        return self._run(self.request("inpaint", prompt, image=image, mask=mask, **arguments), on_step)

    def outpaint(self, prompt: str | Sequence[str], *, image: ImageInput, pad: tuple[int, int, int, int],
                 on_step: Callable[[Step], None] | None = None, **arguments: Any) -> PipelineOutput:
        """Extend `image` by `pad` = (left, top, right, bottom) pixels, each a multiple of `stride(stages)`
        (`OutpaintRequest`; `arguments` as for `__call__`).

        The canvas may be larger than the model's grid: it is decoded window by window, each window overlapping what
        is already known, growing outward from the image. The original pixels are kept exactly.
        """
        return self._run(self.request("outpaint", prompt, image=image, pad=pad, **arguments), on_step)

    def edit(self, prompt: str | Sequence[str], *, image: ImageInput, strength: float,
             on_step: Callable[[Step], None] | None = None, **arguments: Any) -> PipelineOutput:
        """Mask-free editing and variations (Muse section 4.3): re-mask a fraction `strength` of the image's tokens
        and resample them under the new prompt, `iterations` times (`EditRequest`, whose `iterations` and `mode` go in
        `arguments` with the rest as for `__call__`).

        mode "random" re-masks tokens chosen by the image's seed; "confidence" re-masks those the model finds least
        likely under the new prompt. strength 0 returns the input unchanged; strength 1 ignores it (with one iteration
        and mode "random", the result is `pipe(prompt, seed=...)`'s). With a super-resolution stage, the high-res
        tokens under every re-masked low-res token are regenerated.
        """
        return self._run(self.request("edit", prompt, image=image, strength=strength, **arguments), on_step)

    def upscale(self, prompt: str | Sequence[str], *, image: ImageInput,
                on_step: Callable[[Step], None] | None = None, **arguments: Any) -> PipelineOutput:
        """Super-resolve `image` with the super-res stage alone (`UpscaleRequest`; `arguments` as for `__call__`): the
        image, at the base stage's resolution (sides multiples of `stride(1)`), is tokenized by the base VQGAN and its
        tokens condition the super-res transformer, which decodes the high-res grid from scratch in `superres_steps`
        steps. Any image works, not only the base stage's own; a larger one is decoded window by window.
        `low_res_tokens` holds the input's tokens. The base stage's options (num_steps, stages) do not apply."""
        return self._run(self.request("upscale", prompt, image=image, **arguments), on_step)

    # ----------------------------------------------------------------------------------------------------------------
    # Task builders: the checks that depend on this pipeline, then the task's steps

    def _generate_task(self, request: GenerateRequest) -> Task:
        call = self._call(request.prompts, request)
        g = self.transformer.config.grid_size
        self._check_cost(call, torch.ones(g, g, dtype=torch.bool), self._superres_unknown(call, (g, g)))
        return Task(self._best_of(self._generate(call), call, request.scorer), "generate")

    def _inpaint_task(self, request: InpaintRequest) -> Task:
        stride = self.stride(self._resolve_stages(request.options.stages))
        images = self._image_input(request.image)
        masks = inputs.mask_tensor(request.mask, "mask", self.config.limits.max_pixels)
        if masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"the mask is {masks.shape[-1]}x{masks.shape[-2]} pixels but the image is "
                             f"{images.shape[-1]}x{images.shape[-2]}; they must be the same size")
        inputs.check_size(images, stride, "image")
        self._check_canvas(*images.shape[-2:], stride)
        prompts, images, masks = inputs.paired(request.prompts, images, masks)
        call = self._call(prompts, request)
        dilation = self.config.mask_dilation
        high = None
        if call.stages == 2:
            high = pixel_to_token_mask(masks, self.high_vqgan.config.downsample_factor, dilation).any(dim=0)
        self._check_cost(call, pixel_to_token_mask(masks, stride, dilation).any(dim=0), high)
        return Task(self._best_of(self._inpaint(call, call.repeat(images), call.repeat(masks)), call,
                                  request.scorer), "inpaint")

    def _outpaint_task(self, request: OutpaintRequest) -> Task:
        stride = self.stride(self._resolve_stages(request.options.stages))
        images = self._image_input(request.image)
        inputs.check_size(images, stride, "image")
        pad = request.pad
        inputs.check_pad_stride(pad, stride)
        self.config.limits.check_value("the largest pad", max(pad), "max_pad")
        height, width = images.shape[-2] + pad[1] + pad[3], images.shape[-1] + pad[0] + pad[2]
        self.config.limits.check_value("the outpainted canvas's pixels", height * width, "max_pixels")
        self._check_canvas(height, width, stride)
        prompts, images, _ = inputs.paired(request.prompts, images)
        call = self._call(prompts, request)
        high = None
        if call.stages == 2:
            high = _outpaint_unknown(images.shape[-2:], pad, self.high_vqgan.config.downsample_factor)
        self._check_cost(call, _outpaint_unknown(images.shape[-2:], pad, stride), high)
        return Task(self._best_of(self._outpaint(call, call.repeat(images), pad), call, request.scorer), "outpaint")

    def _edit_task(self, request: EditRequest) -> Task:
        self.config.limits.check_value("iterations", request.iterations, "max_iterations")
        stride = self.stride(self._resolve_stages(request.options.stages))
        images = self._image_input(request.image)
        inputs.check_size(images, stride, "image")
        self._check_canvas(*images.shape[-2:], stride)
        prompts, images, _ = inputs.paired(request.prompts, images)
        call = self._call(prompts, request)
        strength = float(request.strength)
        if strength > 0:
            # Which tokens are re-masked is drawn later (or scored, in confidence mode): any window may hold some.
            canvas = (images.shape[-2] // stride, images.shape[-1] // stride)
            self._check_cost(call, torch.ones(canvas, dtype=torch.bool), self._superres_unknown(call, canvas),
                             rounds=request.iterations, scored=request.mode != "random")
        steps = self._edit(call, call.repeat(images), strength, request.iterations, request.mode)
        return Task(self._best_of(steps, call, request.scorer, unchanged=strength == 0), "edit")

    def _upscale_task(self, request: UpscaleRequest) -> Task:
        if self.superres is None:
            raise ValueError("this pipeline has no super-resolution stage to upscale with")
        images = self._image_input(request.image)
        inputs.check_size(images, self.stride(1), "image")
        self._check_canvas(*images.shape[-2:], self.stride(1))
        prompts, images, _ = inputs.paired(request.prompts, images)
        call = self._call(prompts, request, dataclasses.replace(request.options, stages=2))
        canvas = (images.shape[-2] // self.stride(1), images.shape[-1] // self.stride(1))
        self._check_cost(call, None, self._superres_unknown(call, canvas))
        return Task(self._best_of(self._upscale(call, call.repeat(images)), call, request.scorer), "upscale")

    def _call(self, prompts: list[str], request: Request, options: SamplingOptions | None = None) -> _Call:
        """Expand the request's per-prompt inputs (`prompts` paired with its images) to one row per image and
        candidate, checking what depends on the count: the images' limit, negative prompts, seeds."""
        options = request.options if options is None else options
        num_images, n = request.num_images, options.num_candidates
        self.config.limits.check_value("images (prompts x num_images x num_candidates)",
                                       len(prompts) * num_images * n, "max_images")
        negatives = [""] * len(prompts)
        if request.negative_prompt is not None:
            negatives = inputs.broadcast(inputs.prompt_list(request.negative_prompt, "negative_prompt"), len(prompts),
                                         "negative_prompt", "prompts")
        image_seeds = inputs.seed_list(request.seed, len(prompts) * num_images)
        seeds = torch.tensor(image_seeds, dtype=torch.int64, device=self.device)
        # Candidate j of the image with seed s: seed (s * n + j) mod 2**32, so distinct images' candidates never share
        # a seed (below 2**32 / n), and n = 1 is the image's own seed.
        seeds = ((seeds[:, None] * n + torch.arange(n, device=self.device)) % MAX_SEED).flatten()  # (B,)
        # Tokens alone skip the VQGAN decode, unless a best-of-N scorer must see the images to choose (then the
        # choice, and so the tokens, are the same whatever the output type).
        decode = request.output_type not in ("tokens", "latent") or (
            n > 1 and (request.scorer is not None or self.scorer is not None))
        return _Call(
            prompts=[p for p in prompts for _ in range(num_images * n)],
            negatives=[q for q in negatives for _ in range(num_images * n)],
            seeds=seeds,
            image_seeds=image_seeds,
            options=options,
            stages=self._resolve_stages(options.stages),
            output_type=request.output_type,
            decode=decode,
            prompt_embeds=None if request.prompt_embeds is None else self._prompt_embeds(request.prompt_embeds,
                                                                                          len(prompts)),
        )

    def _prompt_embeds(self, embeds: TextEmbedding, num_prompts: int) -> TextEmbedding:
        """`prompt_embeds` (one row per request prompt) checked against this pipeline's text encoder -- the rows an
        encoding of "" has: length, width, pooled vector -- and broadcast to `num_prompts` rows (one prompt paired
        with several images), on the encoder's device and dtype."""
        like = self.text_encoder([""])
        if embeds.states.shape[1:] != like.states.shape[1:] or (embeds.pooled is None) != (like.pooled is None) or (
                like.pooled is not None and embeds.pooled.shape[1:] != like.pooled.shape[1:]):
            shape = lambda e: f"states (N, {', '.join(map(str, e.states.shape[1:]))})" + (
                "" if e.pooled is None else f", pooled (N, {e.pooled.shape[-1]})")
            raise ValueError(f"prompt_embeds has {shape(embeds)}, but this pipeline's text encoder makes "
                             f"{shape(like)}; make them with pipe.text_encoder(prompts)")
        rows = embeds.states.shape[0]
        if rows != num_prompts:  # one prompt for several images (`inputs.paired`); other counts were refused
            embeds = TextEmbedding(*(None if t is None else t.expand(num_prompts, *t.shape[1:])
                                     for t in (embeds.states, embeds.mask, embeds.pooled)))
        to = dict(device=like.states.device)
        return TextEmbedding(embeds.states.to(**to, dtype=like.states.dtype), embeds.mask.to(**to),
                             None if embeds.pooled is None else embeds.pooled.to(**to, dtype=like.pooled.dtype))

    def _image_input(self, image: ImageInput) -> Tensor:
        """(N, 3, H, W) images within `limits.max_pixels` (files and bytes checked from their header)."""
        images = inputs.image_tensor(image, "image", self.config.limits.max_pixels)
        self.config.limits.check_value(f"the image's pixels ({images.shape[-1]}x{images.shape[-2]})",
                                       images.shape[-1] * images.shape[-2], "max_pixels")
        return images

    def _check_cost(self, call: _Call, low: Tensor | None, high: Tensor | None, rounds: int = 1,
                    scored: bool = False) -> None:
        """Refuse a task whose decoding would cost more than `limits.max_row_steps` (`muse.options.decode_cost`),
        before any of it runs. `low`, `high`: (h, w) bool, True where the base / super-res grid has tokens to decode
        (shared by the batch; None: the stage does not run), planned into windows as `_decode_windows` plans them.
        `rounds`: base-stage decodes (edit iterations); `scored`: each round first scores the whole base grid, one
        step per window (edit's confidence mode). Every candidate is a row, and a guided one two."""
        rows, options = call.options.guidance.context_rows(call.batch_size), call.options
        g = self.transformer.config.grid_size
        cost = 0
        if low is not None:
            windows = len(plan_windows(low, (g, g), self._overlap(g)))
            cost += rounds * decode_cost(windows, options.num_steps, rows)
            if scored:
                everything = torch.ones_like(low)
                cost += rounds * decode_cost(len(plan_windows(everything, (g, g), self._overlap(g))), 1, rows)
        if high is not None:
            gh = self.superres.config.high.grid_size
            windows = len(plan_windows(high, (gh, gh), self._scale * self._overlap(g)))
            cost += decode_cost(windows, options.superres_steps, rows, row_tokens=(gh / g) ** 2)
        self.config.limits.check_value("the request's decoding cost in row-steps (estimated)", cost, "max_row_steps")

    def _superres_unknown(self, call: _Call, canvas: tuple[int, int]) -> Tensor | None:
        """(h * scale, w * scale) bool, all True: the super-res grid over a (h, w) base canvas, decoded whole; None
        when the call has no super-res stage."""
        if call.stages == 1:
            return None
        return torch.ones(canvas[0] * self._scale, canvas[1] * self._scale, dtype=torch.bool)

    def _check_canvas(self, height: int, width: int, stride: int) -> None:
        """The base-stage token canvas of a (height, width) pixel image is within `limits.max_tokens`."""
        tokens = (height // stride) * (width // stride)
        self.config.limits.check_value(f"the canvas's tokens ({width // stride}x{height // stride})", tokens,
                                       "max_tokens")

    # ----------------------------------------------------------------------------------------------------------------
    # The tasks' steps: generators that yield engine jobs and return (PipelineOutput, mean log-probability (B,))

    def _generate(self, call: _Call) -> TaskSteps:
        B, g = call.batch_size, self.transformer.config.grid_size
        low = self._masked(B, (g, g), self.transformer.config.mask_token_id)
        high = None
        if call.stages == 2:
            high = self._masked(B, (g * self._scale, g * self._scale), self.superres.config.mask_token_id)
        low, high, log_prob = yield from self._sample(call, low, high)
        tokens = low if high is None else high
        images = _to_pil(self._decode_pixels(tokens, call.stages)) if call.decode else []
        return self._output(images, tokens, call, low if high is not None else None), log_prob

    def _inpaint(self, call: _Call, images: Tensor, masks: Tensor) -> TaskSteps:
        stride = self.stride(call.stages)
        dilation = self.config.mask_dilation
        # A token is regenerated if any of its pixels is masked; blank those pixels so the encoder cannot smuggle the
        # old content into neighbouring kept tokens.
        blanked = images.masked_fill(masks[:, None], 0.0)
        masks = masks.to(self.device)
        low_mask = pixel_to_token_mask(masks, stride, dilation)  # (B, h, w)
        low = masked_grid(self._encode(self.vqgan, self._base_image(blanked, stride, call.stages)), low_mask,
                          self.transformer.config.mask_token_id)
        high = None
        region, region_stride = low_mask, stride
        if call.stages == 2:
            region_stride = self.high_vqgan.config.downsample_factor
            region = pixel_to_token_mask(masks, region_stride, dilation)  # (B, hh, wh)
            high = masked_grid(self._encode(self.high_vqgan, blanked), region, self.superres.config.mask_token_id)
        low, high, log_prob = yield from self._sample(call, low, high)
        tokens = low if high is None else high
        if not call.decode:
            return self._output([], tokens, call, low if high is not None else None), log_prob
        generated = self._decode_pixels(tokens, call.stages)
        weights = feathered_composite_weights(region.cpu(), region_stride, self.config.seam)
        pixels = composite(generated, images, weights)
        return self._output(_to_pil(pixels), tokens, call, low if high is not None else None), log_prob

    def _outpaint(self, call: _Call, images: Tensor, pad: tuple[int, int, int, int]) -> TaskSteps:
        stride = self.stride(call.stages)
        canvas = outpaint_canvas(self._encode(self.vqgan, self._base_image(images, stride, call.stages)),
                                 token_padding(pad, stride), self.transformer.config.mask_token_id)
        low, high = canvas.tokens, None
        region, region_stride = canvas.mask, stride
        if call.stages == 2:
            region_stride = self.high_vqgan.config.downsample_factor
            high_canvas = outpaint_canvas(self._encode(self.high_vqgan, images), token_padding(pad, region_stride),
                                          self.superres.config.mask_token_id)
            high, region = high_canvas.tokens, high_canvas.mask
        low, high, log_prob = yield from self._sample(call, low, high)
        tokens = low if high is None else high
        if not call.decode:
            return self._output([], tokens, call, low if high is not None else None), log_prob
        generated = self._decode_pixels(tokens, call.stages)
        left, top, right, bottom = pad
        original = F.pad(images, (left, right, top, bottom))  # (B, 3, H', W'), only read where the weight is 0
        # No seam: the border tokens outside the image are new, so there is nothing of the input to feather into.
        weights = feathered_composite_weights(region.cpu(), region_stride, 0)
        pixels = composite(generated, original, weights)
        return self._output(_to_pil(pixels), tokens, call, low if high is not None else None), log_prob

    def _edit(self, call: _Call, images: Tensor, strength: float, iterations: int, mode: str) -> TaskSteps:
        stride = self.stride(call.stages)
        low = self._encode(self.vqgan, self._base_image(images, stride, call.stages))  # (B, h, w)
        high = None if call.stages == 1 else self._encode(self.high_vqgan, images)
        log_prob = torch.zeros(call.batch_size, device=self.device)
        if strength == 0:
            out = self._output(_to_pil(images), low if high is None else high, call, None if high is None else low)
            return out, log_prob

        mask_id = self.transformer.config.mask_token_id
        text = self._text(call)
        context = self.transformer.text_context(text.states, text.mask, text.pooled)
        changed = torch.zeros_like(low, dtype=torch.bool)
        for iteration in range(iterations):
            seeds = _substream(call.seeds, 0, iteration, 0)
            confidence = None if mode == "random" else (yield from self._confidence(low, context, call))
            remask = edit_mask(tuple(low.shape), strength, seeds, confidence)  # (B, h, w)
            changed |= remask
            low, log_prob = yield from self._fill(low.masked_fill(remask, mask_id), call, context, iteration=iteration)
        if high is not None:
            region = changed.repeat_interleave(self._scale, 1).repeat_interleave(self._scale, 2)  # (B, hh, wh)
            masked = masked_grid(high, region, self.superres.config.mask_token_id)
            high, high_log_prob = yield from self._superres_fill(masked, low, text, call)
            log_prob = (log_prob + high_log_prob) / 2
        tokens = low if high is None else high
        images = _to_pil(self._decode_pixels(tokens, call.stages)) if call.decode else []
        return self._output(images, tokens, call, low if high is not None else None), log_prob

    def _upscale(self, call: _Call, images: Tensor) -> TaskSteps:
        low = self._encode(self.vqgan, images)  # (B, h, w)
        r = self._scale
        high = self._masked(low.shape[0], (low.shape[1] * r, low.shape[2] * r), self.superres.config.mask_token_id)
        high, log_prob = yield from self._superres_fill(high, low, self._text(call), call)
        images = _to_pil(self._decode_pixels(high, 2)) if call.decode else []
        return self._output(images, high, call, low), log_prob

    def _best_of(self, steps: TaskSteps, call: _Call, scorer: Scorer | None, unchanged: bool = False) -> TaskSteps:
        """The task's steps, then, with several candidates per image, the one of every n consecutive rows with the
        highest score (the first on a tie), its images in the call's `output_type`. `unchanged`: the result is the
        input image itself, nothing to choose."""
        return _in_output_type((yield from self._choose(steps, call, scorer, unchanged)), call.output_type)

    def _choose(self, steps: TaskSteps, call: _Call, scorer: Scorer | None, unchanged: bool) -> TaskSteps:
        out, log_prob = yield from steps
        n = call.num_candidates
        if n == 1 or unchanged:
            return out if n == 1 else self._pick(out, n, torch.zeros(len(out.images)), scores=None)
        scorer = self.scorer if scorer is None else scorer
        if scorer is None:
            scores = log_prob.float().cpu()
        else:
            scores = torch.as_tensor(scorer(out.images, out.prompts)).detach().float().cpu()
            if scores.shape != (len(out.images),):
                raise ValueError(f"the best-of-N scorer must return one score per image, shape ({len(out.images)},); "
                                 f"got shape {tuple(scores.shape)}")
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("the best-of-N scorer returned NaN or infinite scores")
        return self._pick(out, n, scores, scores=scores)

    def _pick(self, out: PipelineOutput, n: int, ranking: Tensor, scores: Tensor | None) -> PipelineOutput:
        best = ranking.view(-1, n).argmax(dim=1)  # (B,) candidate index per image
        rows = torch.arange(best.shape[0]) * n + best  # (B,) row of each chosen candidate
        picked = rows.tolist()
        index = rows.to(out.tokens.device)
        return PipelineOutput(
            images=[out.images[r] for r in picked] if out.images else [],  # none: tokens without a decode
            tokens=out.tokens[index],
            seeds=out.seeds[::n],
            prompts=[out.prompts[r] for r in picked],
            low_res_tokens=None if out.low_res_tokens is None else out.low_res_tokens[index],
            scores=None if scores is None else scores[rows].tolist(),
            candidate_seeds=None if scores is None else [out.candidate_seeds[r] for r in picked],
        )

    # ----------------------------------------------------------------------------------------------------------------
    # The shared machinery

    def _text(self, call: _Call) -> TextEmbedding:
        """The text of every row, encoded once: B conditional rows, then B unconditional ones when guided. With
        `prompt_embeds`, those are the conditional rows, and the unconditional ones the encoded negative prompts."""
        if call.prompt_embeds is None:
            return self.text_encoder(call.text_rows)
        given = call.prompt_embeds
        rows = [TextEmbedding(call.repeat(given.states), call.repeat(given.mask),
                              None if given.pooled is None else call.repeat(given.pooled))]  # (B, S, D) ...
        if call.guided:
            rows.append(self.text_encoder(call.negatives))
        return TextEmbedding(torch.cat([r.states for r in rows]), torch.cat([r.mask for r in rows]),
                             None if given.pooled is None else torch.cat([r.pooled for r in rows]))

    def _sample(self, call: _Call, low: Tensor, high: Tensor | None) -> TaskSteps:
        """Fill the mask tokens of the base grid `low` (B, h, w) and then, when given, of the super-res grid `high`
        (B, h * scale, w * scale) conditioned on the filled base grid.

        Returns (low, high, mean log-probability (B,) of the decoded tokens): each stage's mean, averaged over the
        stages, so that the super-res stage's many more tokens do not drown the base stage that sets the layout."""
        text = self._text(call)
        context = self.transformer.text_context(text.states, text.mask, text.pooled)
        low, log_prob = yield from self._fill(low, call, context)
        if high is not None:
            high, high_log_prob = yield from self._superres_fill(high, low, text, call)
            log_prob = (log_prob + high_log_prob) / 2
        return low, high, log_prob

    def _fill(self, grid: Tensor, call: _Call, context: TextContext, iteration: int = 0) -> TaskSteps:
        """Base stage: decode the mask tokens of `grid` (B, h, w), one model-sized window at a time."""
        g = self.transformer.config.grid_size
        return (yield from self._decode_windows(
            grid, self.transformer, lambda window: context, (g, g), self._overlap(g), call, stage=0,
            iteration=iteration, row_keys=call.row_keys,
        ))

    def _superres_fill(self, high: Tensor, low: Tensor, text: TextEmbedding, call: _Call) -> TaskSteps:
        """Super-res stage: decode the mask tokens of `high` (B, hh, wh) given the complete base grid `low` (B, h, w).

        Windows are laid on the high-res grid with the base stage's overlap in low-res tokens, so every window is
        aligned with whole low-res tokens and reads exactly the low-res crop under it.
        """
        r, g = self._scale, self.superres.config.high.grid_size

        def context(window: Window) -> TextContext:
            crop = low[:, window.top // r : (window.top + window.height) // r,
                       window.left // r : (window.left + window.width) // r]  # (B, h', w')
            flat = crop.reshape(crop.shape[0], -1)  # (B, h' * w')
            if call.guided:
                flat = with_unconditional(flat, flat)  # (2B, h' * w')
            return self.superres.context(flat, text.states, text.mask, low_grid=tuple(crop.shape[1:]))

        overlap = r * self._overlap(self.transformer.config.grid_size)
        return (yield from self._decode_windows(high, self.superres, context, (g, g), overlap, call, stage=1))

    def _decode_windows(
        self,
        grid: Tensor,
        model: nn.Module,
        context_of: Callable[[Window], TextContext],
        window: tuple[int, int],
        overlap: int,
        call: _Call,
        stage: int,
        iteration: int = 0,
        row_keys: tuple[str, ...] | None = None,
    ) -> TaskSteps:
        """Decode every mask token of `grid` (B, h, w) with `model`, one window of at most `window` tokens at a time,
        each window a job. `row_keys` names the text rows of every window's context that are equal.

        A grid no larger than the window is a single job. The plan is shared by the batch (a token is decoded in the
        first window that holds it unknown in any row), and each window's randomness is its own sub-stream of the
        rows' seeds, the first window using the seeds themselves.

        Returns the filled grid and the mean log-probability (B,) of the tokens decoded (0 for a row with none).
        """
        mask_id = model.config.mask_token_id
        B = grid.shape[0]
        grid = grid.clone()
        log_prob_sum = torch.zeros(B, device=grid.device)
        decoded = torch.zeros(B, device=grid.device)
        plan = plan_windows((grid == mask_id).any(dim=0).cpu(), window, overlap)
        for index, win in enumerate(plan):
            crop = grid[:, win.rows, win.cols]
            h, w = crop.shape[1:]
            out = yield Job(
                model=model,
                tokens=crop.reshape(B, h * w),  # (B, L)
                grid=(h, w),
                context=context_of(win),
                options=call.options,
                seeds=_substream(call.seeds, stage, iteration, index),
                row_keys=row_keys,
                stage=stage,
            )
            grid[:, win.rows, win.cols] = out.tokens.view(B, h, w)  # (B, h, w)
            log_prob_sum += out.log_probs.sum(dim=1)
            decoded += out.generated.sum(dim=1)
        return grid, log_prob_sum / decoded.clamp(min=1)

    def _confidence(self, tokens: Tensor, context: TextContext, call: _Call) -> TaskSteps:
        """Steps returning (B, h, w): the guided log-probability of each token of the complete base grid `tokens`
        (B, h, w) under the call's prompts, one model-sized window at a time (where windows overlap, the later one's).

        Each window is a `ScoreJob` handed to the engine, not a model call made here: the engine batches it with
        every other job in flight (and counts its rows against `max_rows`), and guides it as the call's options say,
        `guidance_schedule` included (a complete grid is scored at the scale of a decode's last step)."""
        g = self.transformer.config.grid_size
        B = tokens.shape[0]
        confidence = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        everything = torch.ones(tokens.shape[1:], dtype=torch.bool)
        for win in plan_windows(everything, (g, g), self._overlap(g)):
            crop = tokens[:, win.rows, win.cols]
            h, w = crop.shape[1:]
            scores = yield ScoreJob(model=self.transformer, tokens=crop.reshape(B, h * w), grid=(h, w),
                                    context=context, options=call.options)  # (B, L)
            confidence[:, win.rows, win.cols] = scores.view(B, h, w)  # (B, h, w)
        return confidence

    def _overlap(self, side: int) -> int:
        """Tokens shared by neighbouring windows of a `side`-token model grid."""
        return min(max(1, round(self.config.window_overlap * side)), max(1, side - 1))

    def _masked(self, batch: int, grid: tuple[int, int], mask_id: int) -> Tensor:
        return torch.full((batch, *grid), mask_id, dtype=torch.long, device=self.device)

    def _encode(self, vqgan: ImageTokenizer, images: Tensor) -> Tensor:
        """(B, 3, H, W) float32 in [-1, 1] on any device -> (B, h, w) long on the pipeline's device."""
        weight = next(vqgan.parameters())
        images = images.to(weight.device, weight.dtype)
        # One image at a time, like `_decode_pixels`, so that a row's tokens never depend on the rest of the batch.
        return torch.cat([vqgan.encode(row[None]) for row in images]).to(self.device)

    def _decode_pixels(self, tokens: Tensor, stages: int) -> Tensor:
        """(B, h, w) tokens of the last stage -> (B, 3, H, W) float32 pixels in [-1, 1] on the CPU."""
        vqgan = self.vqgan if stages == 1 else self.high_vqgan
        # One image at a time: convolution kernels pick different algorithms for different batch sizes, and the last
        # bit of a pixel must not depend on which other images were in the batch. Decoding is a small part of a call.
        return torch.cat([vqgan.decode(row[None]).float().cpu() for row in tokens])

    def decode_preview(self, tokens: Tensor, grid: tuple[int, int], stage: int) -> list[Image.Image]:
        """Images of (B, L) preview tokens (`engine.Step.preview()`) of a (h, w) grid of stage `stage` (0 base, 1
        super-res): what a live preview shows. Positions no step has sampled yet show the last code."""
        mask_id = (self.transformer if stage == 0 else self.superres).config.mask_token_id
        ids = tokens.view(-1, *grid).clamp(max=mask_id - 1)  # (B, h, w)
        return _to_pil(self._decode_pixels(ids, 1 if stage == 0 else 2))

    def _base_image(self, images: Tensor, stride: int, stages: int) -> Tensor:
        """(B, 3, H, W) images at the output resolution -> the base VQGAN's resolution (H / stride tokens high).

        With super-resolution this is the bicubic antialiased resize that made the low-res half of its training pairs.
        """
        if stages == 1:
            return images
        f = self.vqgan.config.downsample_factor
        size = (images.shape[-2] // stride * f, images.shape[-1] // stride * f)
        return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)

    def _output(self, images: list[Image.Image], tokens: Tensor, call: _Call, low: Tensor | None) -> PipelineOutput:
        n = call.num_candidates
        row_seeds = [int(s) for s in call.seeds.tolist()]
        return PipelineOutput(images=images, tokens=tokens, seeds=[s for s in call.image_seeds for _ in range(n)],
                              prompts=list(call.prompts), low_res_tokens=low,
                              candidate_seeds=row_seeds if n > 1 else None)




def _outpaint_unknown(size: tuple[int, int], pad: tuple[int, int, int, int], stride: int) -> Tensor:
    """(h', w') bool: the new border of an image of `size` (H, W) pixels outpainted by `pad` pixels, in tokens of
    `stride` pixels (the canvas `sampling.outpaint_canvas` makes)."""
    tokens = torch.zeros(1, size[0] // stride, size[1] // stride, dtype=torch.long)
    return outpaint_canvas(tokens, token_padding(pad, stride), 0).mask[0]


def _substream(seeds: Tensor, stage: int, iteration: int, window: int) -> Tensor:
    """Seeds for one (stage, edit round, window) of a call: the image's own seeds for (0, 0, 0), so the first window
    of the base stage reproduces plain generation; otherwise the same 32-bit seed with a distinct high word (the
    decoder's hash folds in both halves)."""
    tag = ((stage * 1_000_003 + iteration) * 1_000_003 + window) % (2**31 - 1)
    return seeds + (tag << 32)


def _in_output_type(out: PipelineOutput, output_type: str) -> PipelineOutput:
    """`out` with its images (PIL) in `output_type` (`PipelineOutput.images`). From the PIL images, so every form
    holds the same values: np and pt are the 8-bit pixels / 255, and an inpainted image's kept pixels stay exact."""
    if output_type == "pil":
        return out
    if output_type in ("tokens", "latent"):
        return dataclasses.replace(out, images=out.tokens)
    array = np.stack([np.asarray(image, dtype=np.float32) for image in out.images]) / np.float32(255)  # (B, H, W, 3)
    if output_type == "np":
        return dataclasses.replace(out, images=array)
    return dataclasses.replace(out, images=torch.from_numpy(array).permute(0, 3, 1, 2).contiguous())  # (B, 3, H, W)


def _to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> PIL RGB images. Exact inverse of the uint8 -> float mapping of the inputs
    (`muse.inputs.image_tensor`)."""
    array = pixels.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]
