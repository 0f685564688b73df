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

Every task is a *task builder* over the one decoding engine (`muse.engine`, `pipe.engine`): it turns its inputs into
a starting token grid -- all masked for generation, the image's tokens with the masked ones removed for inpainting,
the image's tokens on a larger masked canvas for outpainting, the image's tokens with a fraction re-masked for
editing -- and yields it as a job; the engine decodes it, batched with whatever else is in flight. A grid larger than
the transformer's is decoded window by window (`sampling.plan_windows`), one job per window, so a canvas can grow
without limit. `pipe.inpaint(...)` runs its task to the end; `pipe.submit(pipe.inpaint_task(...))` starts it and
returns a handle to wait on, stream step events from, or cancel (what the server does).

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
import json
import numbers
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from muse import bundled
from muse.bundled import DEFAULT_PRESET, PIPELINE_FILE, bundled_presets
from muse.components import ROLES, kind_of, load_component, parse_components
from muse.data.images import to_rgb
from muse.engine import Engine, Event, Job, ScoreJob, Task, TaskHandle, TaskSteps
from muse.guidance import with_unconditional
from muse.options import PRECISIONS, Limits, SamplingOptions, fast_bfloat16, option_names
from sampling import (
    Window,
    composite,
    edit_mask,
    feathered_composite_weights,
    masked_grid,
    outpaint_canvas,
    pixel_to_token_mask,
    plan_windows,
    token_padding,
)
from superres.model import SuperResTransformer
from transformer.config import TextEncoderConfig
from transformer.model import MaskedTransformer, TextContext
from transformer.saving import CONFIG_NAME, WEIGHTS_NAME, config_from_dict, load_config, read_weights
from transformer.text import MINILM_ALIAS, TextEmbedding, TextEncoder, check_text
from vqgan.model import VQGAN

if TYPE_CHECKING:  # the second architecture's classes load through muse.components, when a pipeline uses them
    from transformer.uvit import UVit2D
    from vqgan.vqmodel import VQModel

TEXT_ENCODER_FILE = "text_encoder.json"
TEXT_ENCODER_DIR = "text_encoder"  # a local text encoder is copied here so the saved pipeline is self-contained

EDIT_MODES = ("random", "confidence")
MAX_SEED = 2**32  # seeds are 32-bit so that sub-streams (windows, stages, edit rounds) can use the high word

# One image (or mask) in any of these forms, or a list of them of one size.
ImageInput = Union[Image.Image, np.ndarray, Tensor, str, os.PathLike, Sequence]
MaskInput = Union[Image.Image, np.ndarray, Tensor, str, os.PathLike, Sequence]
# Best-of-N: (images, prompts) -> (B,) scores, higher is better. `muse.scorer.PromptScorer` is one.
Scorer = Callable[[list[Image.Image], list[str]], Tensor]
SCORER_DIR = "scorer"  # a PromptScorer saved here inside a pipeline directory is the default best-of-N scorer
AMUSED_INDEX = "model_index.json"  # marks a diffusers pipeline directory
AMUSED_PIPELINES = ("AmusedPipeline", "AmusedInpaintPipeline", "AmusedImg2ImgPipeline")
AMUSED_TEXT_LENGTH = 77  # CLIP's context, which aMUSEd pads every prompt to


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline's defaults; saved as pipeline.json beside the components."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)  # what a call does not set
    mask_dilation: int = 1              # inpainting: tokens added around the masked ones, so edges are regenerated too
    seam: int = 4                       # inpainting: pixels outside the regenerated tokens over which it is feathered
    window_overlap: float = 0.5         # large canvases: fraction of the model's grid shared by neighbouring windows
    # The token models' arithmetic: "auto" runs them in bfloat16 where the device does it fast (a CPU with AMX or
    # AVX512-BF16, a GPU of compute capability 8.0 or more), else in float32. Set per model, once its quality in
    # bfloat16 was measured equal (`muse eval --precision`).
    precision: str = "float32"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.mask_dilation < 0 or self.seam < 0:
            raise ValueError(f"mask_dilation and seam must be >= 0, got {self.mask_dilation} and {self.seam}")
        if not 0.0 < self.window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in (0, 1), got {self.window_overlap}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.limits.check(self.sampling)

    def with_sampling(self, **overrides: Any) -> PipelineConfig:
        """This config with some sampling defaults replaced: `config.with_sampling(num_steps=12)`."""
        return dataclasses.replace(self, sampling=self.sampling.with_overrides(overrides))

    @staticmethod
    def from_dict(data: Any, where: str = "config") -> PipelineConfig:
        """Read a saved config; the flat layout of earlier versions (sampling options beside the others) too."""
        if isinstance(data, dict) and "sampling" not in data:
            flat = {k: v for k, v in data.items() if k in option_names()}
            data = {**{k: v for k, v in data.items() if k not in flat}, "sampling": flat}
        return config_from_dict(PipelineConfig, data, where=where)


@dataclass
class PipelineOutput:
    images: list[Image.Image]     # one per row: prompt-major, then image index
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
    token super-resolution stage. Components are public attributes; `superres_vqgan=None` means the high-res tokens
    share the base VQGAN. `scorer` is the default best-of-N scorer (see the `scorer` property). `engine` decodes."""

    def __init__(
        self,
        vqgan: VQGAN | VQModel,
        text_encoder: TextEncoder,
        transformer: MaskedTransformer | UVit2D,
        superres: SuperResTransformer | None = None,
        superres_vqgan: VQGAN | VQModel | None = None,
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
        self._scorer = scorer
        self._scorer_dir: Path | None = None  # a saved PromptScorer not loaded yet (from_pretrained)
        self._check_components()
        self._apply_precision()

    def _check_components(self) -> None:
        t = self.transformer.config
        if t.codebook_size != self.vqgan.config.codebook_size:
            raise ValueError(
                f"the transformer predicts {t.codebook_size} codes but the VQGAN has {self.vqgan.config.codebook_size}"
            )
        if t.text_dim != self.text_encoder.dim:
            raise ValueError(f"the transformer expects text states of width {t.text_dim}, the text encoder gives "
                             f"{self.text_encoder.dim}")
        pooled = getattr(t, "pooled_dim", None)  # architectures conditioned on a pooled text vector too (aMUSEd)
        if pooled is not None and pooled != getattr(self.text_encoder, "pooled_dim", None):
            raise ValueError(f"the transformer expects a pooled text vector of width {pooled}, the text encoder "
                             f"gives {getattr(self.text_encoder, 'pooled_dim', None)}")
        if self.superres is None:
            if self.superres_vqgan is not None:
                raise ValueError("superres_vqgan was given without a superres model")
            if self.config.sampling.stages == 2:
                raise ValueError("config.sampling.stages=2 needs a super-resolution stage, and this pipeline has none")
            return
        s = self.superres.config
        if s.low_codebook_size != self.vqgan.config.codebook_size:
            raise ValueError(f"the super-res model reads {s.low_codebook_size} low-res codes but the base VQGAN has "
                             f"{self.vqgan.config.codebook_size}")
        if s.high.codebook_size != self.high_vqgan.config.codebook_size:
            raise ValueError(f"the super-res model predicts {s.high.codebook_size} codes but its VQGAN has "
                             f"{self.high_vqgan.config.codebook_size}")
        if s.high.text_dim != self.text_encoder.dim:
            raise ValueError(f"the super-res model expects text states of width {s.high.text_dim}, the text encoder "
                             f"gives {self.text_encoder.dim}")
        if s.high.grid_size % t.grid_size:
            raise ValueError(f"the super-res grid ({s.high.grid_size}) must be a multiple of the base grid "
                             f"({t.grid_size})")
        if s.low_grid_size != t.grid_size:
            raise ValueError(f"the super-res model was trained on {s.low_grid_size}x{s.low_grid_size} low-res grids, "
                             f"the base transformer makes {t.grid_size}x{t.grid_size}")

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
    def high_vqgan(self) -> VQGAN:
        """The VQGAN of the super-resolution stage's tokens."""
        return self.vqgan if self.superres_vqgan is None else self.superres_vqgan

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def scorer(self) -> Scorer | None:
        """The default best-of-N scorer, or None for the model's own log-likelihood; assign None or any `Scorer` to
        change it. A pipeline directory's `scorer/` is loaded here, on first use, so a pipeline that never ranks
        candidates never pays for the scorer's frozen towers."""
        if self._scorer is None and self._scorer_dir is not None:
            from muse.scorer import PromptScorer

            self._scorer = _load_component(SCORER_DIR, self._scorer_dir.parent,
                                           lambda where: PromptScorer.load(where, device=self.device))
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

    def _editing_options(self, options: SamplingOptions | None, overrides: dict[str, Any]) -> SamplingOptions:
        """An editing task's options: as `options`, but one candidate unless the call asks for more -- a pipeline's
        best-of-N default is for generation, where it pays; an edit is interactive, and its image constrains it."""
        if options is None and "num_candidates" not in overrides:
            overrides = {**overrides, "num_candidates": 1}
        return self.options(options, **overrides)

    def options(self, options: SamplingOptions | None = None, **overrides: Any) -> SamplingOptions:
        """The sampling options of a call: `options` (default: `config.sampling`) with `overrides` by field name.
        Raises TypeError for an unknown name and ValueError for an invalid value or one over `config.limits`."""
        self.config.limits.check(overrides)  # first, so that 10**9 steps are refused by the limit's name
        resolved = (self.config.sampling if options is None else options).with_overrides(overrides)
        self.config.limits.check(resolved)
        return resolved

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and loading

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
        path = _resolve_model(path)
        manifest_file = path / PIPELINE_FILE
        if not manifest_file.is_file() and (path / AMUSED_INDEX).is_file():
            return cls._from_diffusers(path, precision)
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved MusePipeline: {PIPELINE_FILE} not found")
        try:
            manifest = json.loads(manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{manifest_file} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or set(manifest) != {"components", "config"}:
            raise ValueError(f"{manifest_file} must be a JSON object with exactly the keys 'components' and 'config'")
        config = PipelineConfig.from_dict(manifest["config"], where=str(manifest_file))
        if precision is not None:
            config = dataclasses.replace(config, precision=precision)
        kinds = parse_components(manifest["components"], str(manifest_file))
        loaded = {role: _load_component(role, path, lambda where, kind=kind: load_component(kind, where))
                  for role, kind in kinds.items()}
        text_encoder = _load_component("text_encoder", path, _load_text_encoder)
        pipe = cls(loaded["vqgan"], text_encoder, loaded["transformer"], loaded.get("superres"),
                   loaded.get("superres_vqgan"), config)
        if (path / SCORER_DIR).is_dir():
            # Its towers load on first use, but its own files are checked now: a damaged scorer must stop the load,
            # not fail the first best-of-N request.
            _load_component(SCORER_DIR, path, _check_scorer)
            pipe._scorer_dir = path / SCORER_DIR
        return pipe

    @classmethod
    def _from_diffusers(cls, path: Path, precision: str | None = None) -> MusePipeline:
        """A diffusers aMUSEd directory, read without diffusers: transformer/ (UVit2DModel), vqvae/ (VQModel),
        text_encoder/ + tokenizer/ (CLIPTextModelWithProjection), scheduler/ (its mask token and schedule). Sampling
        defaults: the `amused` preset, AmusedScheduler's own. The weights' licence is the model's (aMUSEd:
        OpenRAIL++-M, on its model card); musegen redistributes none of them."""
        from muse.options import amused_options

        index_file = path / AMUSED_INDEX
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index_file} is not valid JSON: {e}") from None
        kind = index.get("_class_name") if isinstance(index, dict) else None
        if kind not in AMUSED_PIPELINES:
            raise ValueError(f"{index_file}: _class_name is {kind!r}; musegen reads {', '.join(AMUSED_PIPELINES)}")
        transformer = _load_component("transformer", path, lambda where: load_component("uvit2d", where))
        vqgan = _load_component("vqvae", path, lambda where: load_component("vqmodel", where))
        text_encoder = _load_component("text_encoder", path, lambda where: TextEncoder(
            TextEncoderConfig(str(path), kind="clip", max_length=AMUSED_TEXT_LENGTH)))
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        schedule = "cosine"
        if scheduler_file.is_file():
            scheduler = json.loads(scheduler_file.read_text())
            if scheduler.get("mask_token_id", transformer.config.mask_token_id) != transformer.config.mask_token_id:
                raise ValueError(f"{scheduler_file}: mask_token_id {scheduler['mask_token_id']} is not the "
                                 f"transformer's last vocabulary id {transformer.config.mask_token_id}")
            schedule = scheduler.get("masking_schedule", schedule)
        config = PipelineConfig(sampling=dataclasses.replace(amused_options(), mask_schedule=schedule))
        if precision is not None:
            config = dataclasses.replace(config, precision=precision)
        return cls(vqgan, text_encoder, transformer, config=config)

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
        path = Path(path)
        fresh = path.with_name(f".{path.name}.new-{os.getpid()}")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(fresh, ignore_errors=True)
        self._write(fresh, dtype, source=path)
        if path.exists():
            os.replace(path, old)
        os.replace(fresh, path)
        shutil.rmtree(old, ignore_errors=True)

    def _write(self, path: Path, dtype: torch.dtype | None, source: Path) -> None:
        """save_pretrained's work, into the empty folder `path`; `source` is where the pipeline is being saved to
        (files already there, such as a copied text encoder, are read from it)."""
        path.mkdir(parents=True)
        components = {}
        for role in ROLES:
            module = getattr(self, role)
            if module is not None:
                module.save_pretrained(path / role, dtype)
                components[role] = kind_of(module)

        text_config = self.text_encoder.config
        if text_config.name_or_path != MINILM_ALIAS and Path(self.text_encoder.source).is_dir():
            # A local model would not exist on another machine: ship a copy and point at it (relative to `path`).
            self.text_encoder.save_pretrained(path / TEXT_ENCODER_DIR)
            text_config = dataclasses.replace(text_config, name_or_path=TEXT_ENCODER_DIR)
        _write_json(path / TEXT_ENCODER_FILE, dataclasses.asdict(text_config))
        target = path / SCORER_DIR
        if self._scorer_dir is not None:
            # Not loaded yet: copy its two files rather than load its towers just to write them back.
            target.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copyfile(self._scorer_dir / name, target / name)
        elif hasattr(self._scorer, "save"):
            self._scorer.save(target)
        # A scorer that is a plain function is the caller's code, not a component: nothing to save.
        _write_json(path / PIPELINE_FILE, {"components": components, "config": dataclasses.asdict(self.config)})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MusePipeline:
        """Move every component (in place) and return the pipeline. Without `dtype`, the token models take the
        dtype `config.precision` chooses for the new device."""
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
    # Public tasks: each `X(...)` runs `X_task(...)` to the end. Sampling options go by keyword (`SamplingOptions`).

    def submit(self, task: Task, on_event: Callable[[Event], None] | None = None) -> TaskHandle:
        """Start a task built by one of the `*_task` methods without waiting for it (`engine.submit`)."""
        return self.engine.submit(task, on_event)

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Generate `num_images` images per prompt.

        Images are ordered prompt-major. `seed`: an int gives image i seed + i, a list gives one seed per image,
        None draws a random base seed; `PipelineOutput.seeds` records each. `negative_prompt` (one, or one per
        prompt) replaces the empty prompt in guidance's unconditional branch. Sampling options (`SamplingOptions`)
        go by keyword, or all at once as `options`; `stages=1` stops after the base stage.

        `num_candidates` > 1 makes that many candidates per image and keeps the best by `scorer` (None: `self.scorer`,
        else the model's mean token log-probability); see the module docstring for the candidates' seeds.
        """
        return self.engine.run(self.generate_task(prompt, num_images=num_images, seed=seed,
                                                  negative_prompt=negative_prompt, scorer=scorer, options=options,
                                                  **overrides))

    def generate_task(
        self,
        prompt: str | Sequence[str],
        *,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> Task:
        """`__call__`'s work as a task for `submit`; every input is checked here, before any work."""
        call = self._call(_prompt_list(prompt), num_images, negative_prompt, seed, self.options(options, **overrides))
        return Task(self._best_of(self._generate(call), call, scorer), "generate")

    def inpaint(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        mask: MaskInput,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Regenerate the part of `image` where `mask` is white (True), guided by the prompt.

        image: PIL image, path, numpy (H, W, 3) uint8 or float in [0, 1], or tensor (3, H, W) / (N, 3, H, W) in
        [-1, 1]; H and W multiples of `stride(stages)`. mask: same size, PIL (L or 1) / path / numpy / tensor, white or
        True = regenerate; one mask, or one per image. Several images and prompts pair up (or one broadcasts).

        Every token touching a masked pixel, grown by `config.mask_dilation` tokens, is regenerated; the masked
        pixels are blanked before encoding so the kept tokens carry nothing of the old content. The result is pasted
        over the input with a `config.seam`-pixel feather: pixels farther than that from the regenerated tokens are
        the input's, bit for bit.
        """
        return self.engine.run(self.inpaint_task(prompt, image=image, mask=mask, num_images=num_images, seed=seed,
                                                 negative_prompt=negative_prompt, scorer=scorer, options=options,
                                                 **overrides))

    def inpaint_task(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        mask: MaskInput,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> Task:
        """`inpaint`'s work as a task for `submit`; every input is checked here, before any work."""
        options = self._editing_options(options, overrides)
        prompts = _prompt_list(prompt)
        stride = self.stride(self._resolve_stages(options.stages))
        images = self._image_input(image)
        masks = _mask_tensor(mask, "mask")
        if masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"the mask is {masks.shape[-1]}x{masks.shape[-2]} pixels but the image is "
                             f"{images.shape[-1]}x{images.shape[-2]}; they must be the same size")
        _check_size(images, stride, "image")
        self._check_canvas(*images.shape[-2:], stride)
        prompts, images, masks = _paired(prompts, images, masks)
        call = self._call(prompts, num_images, negative_prompt, seed, options)
        return Task(self._best_of(self._inpaint(call, call.repeat(images), call.repeat(masks)), call, scorer),
                    "inpaint")

    def outpaint(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        pad: tuple[int, int, int, int],
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Extend `image` by `pad` = (left, top, right, bottom) pixels, each a multiple of `stride(stages)`.

        The canvas may be larger than the model's grid: it is decoded window by window, each window overlapping what
        is already known, growing outward from the image. The original pixels are kept exactly.
        """
        return self.engine.run(self.outpaint_task(prompt, image=image, pad=pad, num_images=num_images, seed=seed,
                                                  negative_prompt=negative_prompt, scorer=scorer, options=options,
                                                  **overrides))

    def outpaint_task(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        pad: tuple[int, int, int, int],
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> Task:
        """`outpaint`'s work as a task for `submit`; every input is checked here, before any work."""
        options = self._editing_options(options, overrides)
        prompts = _prompt_list(prompt)
        stride = self.stride(self._resolve_stages(options.stages))
        images = self._image_input(image)
        _check_size(images, stride, "image")
        pad = _check_pad(pad, stride)
        self.config.limits.check_value("the largest pad", max(pad), "max_pad")
        height, width = images.shape[-2] + pad[1] + pad[3], images.shape[-1] + pad[0] + pad[2]
        self.config.limits.check_value("the outpainted canvas's pixels", height * width, "max_pixels")
        self._check_canvas(height, width, stride)
        prompts, images, _ = _paired(prompts, images)
        call = self._call(prompts, num_images, negative_prompt, seed, options)
        return Task(self._best_of(self._outpaint(call, call.repeat(images), pad), call, scorer), "outpaint")

    def edit(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        strength: float,
        iterations: int = 1,
        mode: str = "random",
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Mask-free editing and variations (Muse section 4.3): re-mask a fraction `strength` of the image's tokens
        and resample them under the new prompt, `iterations` times.

        mode "random" re-masks tokens chosen by the image's seed; "confidence" re-masks those the model finds least
        likely under the new prompt. strength 0 returns the input unchanged; strength 1 ignores it (with one iteration
        and mode "random", the result is `pipe(prompt, seed=...)`'s). With a super-resolution stage, the high-res
        tokens under every re-masked low-res token are regenerated.
        """
        return self.engine.run(self.edit_task(prompt, image=image, strength=strength, iterations=iterations,
                                              mode=mode, num_images=num_images, seed=seed,
                                              negative_prompt=negative_prompt, scorer=scorer, options=options,
                                              **overrides))

    def edit_task(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        strength: float,
        iterations: int = 1,
        mode: str = "random",
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> Task:
        """`edit`'s work as a task for `submit`; every input is checked here, before any work."""
        options = self._editing_options(options, overrides)
        prompts = _prompt_list(prompt)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        _check_int(iterations, "iterations")
        self.config.limits.check_value("iterations", iterations, "max_iterations")
        if mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
        stride = self.stride(self._resolve_stages(options.stages))
        images = self._image_input(image)
        _check_size(images, stride, "image")
        self._check_canvas(*images.shape[-2:], stride)
        prompts, images, _ = _paired(prompts, images)
        call = self._call(prompts, num_images, negative_prompt, seed, options)
        steps = self._edit(call, call.repeat(images), float(strength), iterations, mode)
        return Task(self._best_of(steps, call, scorer, unchanged=strength == 0), "edit")

    def upscale(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Super-resolve `image` with the super-res stage alone: the image, at the base stage's resolution (sides
        multiples of `stride(1)`), is tokenized by the base VQGAN and its tokens condition the super-res transformer,
        which decodes the high-res grid from scratch in `superres_steps` steps. Any image works, not only the base
        stage's own; a larger one is decoded window by window. `low_res_tokens` holds the input's tokens. The base
        stage's options (num_steps, stages) do not apply."""
        return self.engine.run(self.upscale_task(prompt, image=image, num_images=num_images, seed=seed,
                                                 negative_prompt=negative_prompt, scorer=scorer, options=options,
                                                 **overrides))

    def upscale_task(
        self,
        prompt: str | Sequence[str],
        *,
        image: ImageInput,
        num_images: int = 1,
        seed: int | Sequence[int] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scorer: Scorer | None = None,
        options: SamplingOptions | None = None,
        **overrides: Any,
    ) -> Task:
        """`upscale`'s work as a task for `submit`; every input is checked here, before any work."""
        if self.superres is None:
            raise ValueError("this pipeline has no super-resolution stage to upscale with")
        for name in ("num_steps", "stages"):
            if name in overrides:
                raise ValueError(f"upscale runs the super-resolution stage alone: {name} does not apply (the "
                                 "stage's steps are superres_steps)")
        options = self._editing_options(options, overrides)
        prompts = _prompt_list(prompt)
        images = self._image_input(image)
        _check_size(images, self.stride(1), "image")
        self._check_canvas(*images.shape[-2:], self.stride(1))
        prompts, images, _ = _paired(prompts, images)
        call = self._call(prompts, num_images, negative_prompt, seed, dataclasses.replace(options, stages=2))
        return Task(self._best_of(self._upscale(call, call.repeat(images)), call, scorer), "upscale")

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
        images = _to_pil(self._decode_pixels(tokens, call.stages))
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
        images = _to_pil(self._decode_pixels(tokens, call.stages))
        return self._output(images, tokens, call, low if high is not None else None), log_prob

    def _upscale(self, call: _Call, images: Tensor) -> TaskSteps:
        low = self._encode(self.vqgan, images)  # (B, h, w)
        r = self._scale
        high = self._masked(low.shape[0], (low.shape[1] * r, low.shape[2] * r), self.superres.config.mask_token_id)
        high, log_prob = yield from self._superres_fill(high, low, self._text(call), call)
        return self._output(_to_pil(self._decode_pixels(high, 2)), high, call, low), log_prob

    def _best_of(self, steps: TaskSteps, call: _Call, scorer: Scorer | None, unchanged: bool = False) -> TaskSteps:
        """The task's steps, then, with several candidates per image, the one of every n consecutive rows with the
        highest score (the first on a tie). `unchanged`: the result is the input image itself, nothing to choose."""
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
            images=[out.images[r] for r in picked],
            tokens=out.tokens[index],
            seeds=out.seeds[::n],
            prompts=[out.prompts[r] for r in picked],
            low_res_tokens=None if out.low_res_tokens is None else out.low_res_tokens[index],
            scores=None if scores is None else scores[rows].tolist(),
            candidate_seeds=None if scores is None else [out.candidate_seeds[r] for r in picked],
        )

    # ----------------------------------------------------------------------------------------------------------------
    # The shared machinery

    def _call(
        self,
        prompts: list[str],
        num_images: int,
        negative_prompt: str | Sequence[str] | None,
        seed: int | Sequence[int] | None,
        options: SamplingOptions,
    ) -> _Call:
        """Check the per-call inputs and expand the per-prompt ones to one row per image and candidate."""
        _check_int(num_images, "num_images")
        n = options.num_candidates
        self.config.limits.check_value("images (prompts x num_images x num_candidates)",
                                       len(prompts) * num_images * n, "max_images")
        negatives = [""] * len(prompts)
        if negative_prompt is not None:
            if not options.guided:
                raise ValueError(f"negative_prompt replaces the unconditional branch of guidance, which is off at "
                                 f"guidance_scale={options.guidance_scale}; use a guidance_scale above 1")
            negatives = _broadcast(_prompt_list(negative_prompt, "negative_prompt"), len(prompts), "negative_prompt",
                                   "prompts")
        image_seeds = _seed_list(seed, len(prompts) * num_images)
        seeds = torch.tensor(image_seeds, dtype=torch.int64, device=self.device)
        # Candidate j of the image with seed s: seed (s * n + j) mod 2**32, so distinct images' candidates never share
        # a seed (below 2**32 / n), and n = 1 is the image's own seed.
        seeds = ((seeds[:, None] * n + torch.arange(n, device=self.device)) % MAX_SEED).flatten()  # (B,)
        return _Call(
            prompts=[p for p in prompts for _ in range(num_images * n)],
            negatives=[q for q in negatives for _ in range(num_images * n)],
            seeds=seeds,
            image_seeds=image_seeds,
            options=options,
            stages=self._resolve_stages(options.stages),
        )

    def _image_input(self, image: ImageInput) -> Tensor:
        images = _image_tensor(image, "image")
        self.config.limits.check_value(f"the image's pixels ({images.shape[-1]}x{images.shape[-2]})",
                                       images.shape[-1] * images.shape[-2], "max_pixels")
        return images

    def _check_canvas(self, height: int, width: int, stride: int) -> None:
        """The base-stage token canvas of a (height, width) pixel image is within `limits.max_tokens`."""
        tokens = (height // stride) * (width // stride)
        self.config.limits.check_value(f"the canvas's tokens ({width // stride}x{height // stride})", tokens,
                                       "max_tokens")

    def _text(self, call: _Call) -> TextEmbedding:
        """The text of every row, encoded once: B conditional rows, then B unconditional ones when guided."""
        return self.text_encoder(call.text_rows)

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
            iteration=iteration, row_keys=tuple(call.text_rows),
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

    def _encode(self, vqgan: VQGAN, images: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def _prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """One prompt or a list of them, checked: strings of valid text; `prompt` also non-empty (a negative prompt may
    be "", the empty prompt guidance uses anyway)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    for i, p in enumerate(prompts):
        where = name if isinstance(prompt, str) else f"{name}[{i}]"
        if not isinstance(p, str):
            raise TypeError(f"{where} must be a string, got {type(p).__name__}")
        check_text(p, where)
        if name == "prompt" and not p.strip():
            raise ValueError(f"{where} is empty; describe the image to make")
    return list(prompts)


def _check_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _seed_list(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: int s -> s, s+1, ...; a list -> itself; None -> a random base seed, counted up."""
    if seed is None:
        base = random.SystemRandom().randrange(MAX_SEED - n)
        return [base + i for i in range(n)]
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(n)]
    elif isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"seed is a list of {len(seed)} but there are {n} images; give one seed per image")
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seed):
            raise TypeError("every seed must be an integer")
        seeds = [int(s) for s in seed]
    else:
        raise TypeError(f"seed must be an integer, a list of integers or None, got {type(seed).__name__}")
    if min(seeds) < 0 or max(seeds) >= MAX_SEED:
        raise ValueError(f"seeds must lie in [0, 2**32), got {min(seeds)}..{max(seeds)}")
    return seeds


def _substream(seeds: Tensor, stage: int, iteration: int, window: int) -> Tensor:
    """Seeds for one (stage, edit round, window) of a call: the image's own seeds for (0, 0, 0), so the first window
    of the base stage reproduces plain generation; otherwise the same 32-bit seed with a distinct high word (the
    decoder's hash folds in both halves)."""
    tag = ((stage * 1_000_003 + iteration) * 1_000_003 + window) % (2**31 - 1)
    return seeds + (tag << 32)


def _broadcast(values: list, n: int, name: str, of: str) -> list:
    """`values` for n things (`of` names them): one value broadcasts, n pair up."""
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"got {len(values)} values for {name} but {n} {of}; give one or {n}")


def _paired(
    prompts: list[str], images: Tensor, masks: Tensor | None = None
) -> tuple[list[str], Tensor, Tensor | None]:
    """Pair prompts with images (N, 3, H, W) and masks (N, H, W): equal counts pair up, a count of 1 broadcasts."""
    counts = [len(prompts), images.shape[0]] + ([] if masks is None else [masks.shape[0]])
    n = max(counts)
    if any(c not in (1, n) for c in counts):
        raise ValueError(f"cannot pair {' / '.join(map(str, counts))} prompts / images / masks: give one of each, or "
                         "equal numbers")

    def expand(x: Tensor) -> Tensor:
        return x.expand(n, *x.shape[1:])

    return _broadcast(prompts, n, "prompt", "images"), expand(images), None if masks is None else expand(masks)


def _open_image(path: str | os.PathLike, name: str) -> Image.Image:
    """The image file at `path`, fully decoded; FileNotFoundError or ValueError naming the file otherwise."""
    where = os.fspath(path)
    if not os.path.exists(where):
        raise FileNotFoundError(f"{name}: {where} does not exist")
    if os.path.isdir(where):
        raise ValueError(f"{name}: {where} is a directory, not an image file")
    try:
        with Image.open(where) as image:
            image.load()  # decode now: a truncated file fails here, with its name
            return image
    except UnidentifiedImageError:
        raise ValueError(f"{name}: {where} is not an image file PIL can read (not an image, or truncated or corrupt "
                         "before its header ends)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: {where} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name}: {where} is truncated or corrupt ({e})") from None


def _stacked(items: list, convert: Callable[[Any, str], Tensor], name: str) -> Tensor:
    """A list of images (or masks) of one size, each in any accepted form -> one batch."""
    if not items:
        raise ValueError(f"{name} is an empty list")
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            raise TypeError(f"{name}[{i}] must be a PIL image, a path, a numpy array or a tensor, got a nested "
                            f"{type(item).__name__}")
    parts = [convert(item, f"{name}[{i}]") for i, item in enumerate(items)]
    sizes = {tuple(p.shape[-2:]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"the {name} list mixes sizes {sorted(sizes)} (height, width); give images of one size")
    return torch.cat(parts)


def _image_tensor(image: ImageInput, name: str) -> Tensor:
    """Any accepted image form, or a list of them -> (N, 3, H, W) float32 in [-1, 1] on the CPU."""
    if isinstance(image, (list, tuple)):
        return _stacked(list(image), _image_tensor, name)
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, name)
    if isinstance(image, Image.Image):
        try:
            rgb = to_rgb(image)  # training's conversion: transparency on white, 16-bit scaled
        except (ValueError, OSError) as e:
            raise ValueError(f"{name}: cannot convert a {image.mode} image to RGB: {e}") from None
        image = np.asarray(rgb)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: a numpy image must be (H, W, 3) or (H, W), got shape {image.shape}")
        if image.dtype == np.uint8:
            x = torch.from_numpy(np.array(image)).float().div(127.5).sub(1.0)
        elif np.issubdtype(image.dtype, np.floating):
            if image.size and not (image.min() >= 0.0 and image.max() <= 1.0):
                raise ValueError(f"{name}: a float numpy image must hold values in [0, 1]")
            x = torch.from_numpy(np.array(image, dtype=np.float32)).mul(2.0).sub(1.0)
        else:
            raise ValueError(f"{name}: a numpy image must be uint8 or float, got {image.dtype}")
        return x.permute(2, 0, 1).expand(3, -1, -1)[None].contiguous()  # (1, 3, H, W)
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{name}: a tensor image must be float (3, H, W) or (N, 3, H, W), got "
                             f"{x.dtype} {tuple(image.shape)}")
        x = x.detach().float().cpu()
        if x.numel() and not (x.min() >= -1.0 and x.max() <= 1.0):
            raise ValueError(f"{name}: a tensor image must hold values in [-1, 1]")
        return x
    raise TypeError(f"{name} must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}")


def _mask_tensor(mask: MaskInput, name: str) -> Tensor:
    """Any accepted mask form -> (N, H, W) bool on the CPU, True = regenerate.

    PIL and uint8 masks are white = regenerate (>= 128) unless they hold only 0 and 1; float masks are >= 0.5. A list
    of masks stacks.
    """
    if isinstance(mask, (list, tuple)):
        return _stacked(list(mask), _mask_tensor, name)
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_image(mask, name)
    if isinstance(mask, Image.Image):
        mask = np.asarray(_mask_grey(mask))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a PIL image, a path, a numpy array or a tensor, got {type(mask).__name__}")
    m = mask.detach().cpu()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"{name} must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point():
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{name} holds NaN or infinite values; give 0 / 1 (or 0..255) per pixel")
        return m >= 0.5
    if m.numel() and int(m.max()) <= 1:
        return m > 0
    return m >= 128


def _mask_grey(mask: Image.Image) -> Image.Image:
    """A mask image as 8-bit grey: transparent pixels count as black (keep), since a painted mask is often strokes on
    a transparent layer; 16-bit masks are scaled like images."""
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        rgba = mask.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return to_rgb(mask).convert("L") if mask.mode.startswith(("I", "F")) else mask.convert("L")


def _check_size(images: Tensor, stride: int, name: str) -> None:
    height, width = images.shape[-2:]
    if height == 0 or width == 0 or height % stride or width % stride:
        raise ValueError(f"{name} is {width}x{height} pixels; width and height must be positive multiples of "
                         f"{stride} (the pixels per token at this resolution)")


def _check_pad(pad: Sequence[int], stride: int) -> tuple[int, int, int, int]:
    if not isinstance(pad, (list, tuple)) or len(pad) != 4 \
            or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in pad):
        raise ValueError(f"pad must be four integers (left, top, right, bottom) in pixels, got {pad!r}")
    pad = tuple(int(p) for p in pad)
    if any(p < 0 for p in pad):
        raise ValueError(f"pad must not be negative, got {pad}")
    if any(p % stride for p in pad):
        raise ValueError(f"pad {pad} must be multiples of {stride} pixels (one token at this resolution)")
    return pad


def _to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> PIL RGB images. Exact inverse of the uint8 -> float mapping of the inputs."""
    array = pixels.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


# --------------------------------------------------------------------------------------------------------------------
# Files


def _resolve_model(path: str | os.PathLike | None) -> Path:
    """The pipeline directory that `path` names: an existing directory, a bundled preset name, or a Hugging Face hub
    id ("org/name") of an aMUSEd pipeline, fetched into the hub cache."""
    if path is None:
        if DEFAULT_PRESET not in bundled_presets():
            raise FileNotFoundError(
                "the bundled default model is not installed in this version of musegen; pass the directory of a "
                "saved pipeline instead: MusePipeline.from_pretrained('path/to/model') (--model PATH on the command "
                "line)"
            )
        return bundled.ASSETS / DEFAULT_PRESET
    directory = Path(path)
    if directory.is_dir():
        return directory
    if isinstance(path, str) and path in bundled_presets():
        return bundled.ASSETS / path
    if isinstance(path, str) and _looks_like_hub_id(path):
        return _hub_download(path)
    presets = bundled_presets()
    known = f"; bundled presets: {', '.join(presets)}" if presets else ""
    raise FileNotFoundError(f"no pipeline directory or bundled preset named {os.fspath(path)!r}{known}")


def _looks_like_hub_id(name: str) -> bool:
    """"org/name" with no path-like parts: what the hub calls a repository, and no directory here."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


# What an aMUSEd download needs (the fp16 variants, the 512 px assets and the images of its model card are left out).
HUB_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
             "transformer/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]


def _hub_download(repo_id: str) -> Path:
    """The local snapshot of a hub repository: the cache first (so an offline machine never waits on the network),
    else a download. OSError, saying what to do, when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise OSError(f"{repo_id!r} is neither a local directory nor in the Hugging Face cache, and downloading it "
                      f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). With internet, run "
                      f"it once to cache it (or `huggingface-cli download {repo_id}`); offline, copy a download and "
                      "pass its directory") from None


def _load_component(name: str, path: Path, load: Callable[[Path], object]):
    """Load one component, re-raising its error with the component's name in front."""
    where = path / (TEXT_ENCODER_FILE if name == "text_encoder" else name)
    try:
        return load(path if name == "text_encoder" else where)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the pipeline's {name} at {where} is missing: {e}") from None
    except ValueError as e:
        raise ValueError(f"the pipeline's {name} at {where} is unreadable: {e}") from None
    except OSError as e:
        raise OSError(f"the pipeline's {name} at {where} cannot be loaded: {e}") from None


def _check_scorer(path: Path) -> None:
    from muse.scorer import ScorerConfig

    load_config(path, ScorerConfig)
    read_weights(path)


def _load_text_encoder(path: Path) -> TextEncoder:
    file = path / TEXT_ENCODER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    config = config_from_dict(TextEncoderConfig, data, where=str(file))
    return TextEncoder(dataclasses.replace(config, name_or_path=_text_encoder_location(config.name_or_path, path,
                                                                                       file)))


def _text_encoder_location(name: str, pipeline: Path, file: Path) -> str:
    """Where text_encoder.json's `name_or_path` points. A relative path is a directory inside the pipeline (a
    copied local encoder), wherever the pipeline now is, and may not leave it: a pipeline someone sent must not read
    files elsewhere on this machine. A text encoder elsewhere is named explicitly, by an absolute path (the opt-in)
    or a hub name ("org/name"), or is the "minilm" alias."""
    if name == MINILM_ALIAS or Path(name).is_absolute():
        return name
    local = pipeline / name
    if not local.resolve().is_relative_to(pipeline.resolve()):
        raise ValueError(f"{file}: name_or_path {name!r} leaves the pipeline directory; a text encoder outside it "
                         "must be named by an absolute path or a hub name")
    if local.is_dir():
        return str(local)
    if name.startswith("."):
        raise FileNotFoundError(f"{file}: the text encoder directory {name!r} is not in the pipeline directory")
    return name  # a hub name such as "google/t5-v1_1-xxl"


def _write_json(file: Path, data: dict) -> None:
    """Atomic: write `file.tmp`, fsync, rename."""
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
