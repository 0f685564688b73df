"""`muse eval`: a model's numbers on an image-caption folder, written to DIR/eval.json and a short DIR/eval.md.

    muse eval --model runs/pipeline --data data/emoji --split heldout --out runs/eval [--scorer runs/scorer]
              [--steps 8 16 24] [--guidance 1 4] [--num-prompts 32] [--num-candidates 8]

`--model` is a saved pipeline directory or bundled preset (default: the bundled model). `--scorer` is a
`muse.scorer.PromptScorer` directory (default: the model's own `scorer/`, if it has one); without a scorer the
prompt-fidelity numbers are left out and everything else is still measured:

* reconstruction: PSNR of each VQGAN on the split's images, in dB on uint8 pixels, averaged over images;
* prompt fidelity at every (steps, guidance) setting, on `num_prompts` captions of the split (by default the held-out
  (concept, style) pairs, never trained on) and on as many training captions: the scorer's mean cosine similarity of
  each image with its prompt, and how often its prompt is retrieved first / in the first five among `candidates`
  (`--retrieval-captions`) captions (the evaluated ones, then distractors drawn from the whole folder);
* FD-EffNetLite0: the Frechet distance between the generated and the real images of the same split captions, on
  EfficientNet-Lite0 features. Not comparable with published FID: another network, and far fewer samples, which
  inflates it; compare it only between runs with the same settings;
* inpainting: the centre square (half the side) of split images regenerated under their caption. Reported: the
  fraction of pixels outside the mask that are bit-identical to the input (below 1 by design: the tokens around the
  mask are regenerated too, and a seam is feathered), the same fraction over the pixels the pipeline promises to
  keep (beyond the dilated tokens and the seam: must be 1), and the scorer's score of the hole's crop, next to the
  original's crop under the same caption;
* best-of-N on the split's captions at the pipeline's default steps and guidance: the pick by the model's scorer
  (what `num_candidates` uses), by the model's own log-likelihood, and a random pick (the mean over all candidates,
  i.e. its expectation), all measured by the evaluation's scorer. Pass `--scorer` a second, separately trained scorer
  (a judge) to measure the model scorer's pick independently; when the same scorer picks and measures, its pick's
  numbers are an upper bound and the report says so.

`--prompt-templates eval` generates every image from its row's caption in other words (the phrasings of
`muse/data/captions.py`'s EVAL_TEMPLATES, which no training caption uses, in turn) and still scores it against the
canonical captions: how much of the model survives prompts that do not follow the training template.

Image i of a caption set has seed `seed + i` in every setting, so settings differ only in their options. Defaults
are sized for a CPU run of minutes (about 4 on one thread for a pipeline the size of the emoji base model, half of it
the best-of-N comparison); raise `--num-prompts` and the rest for tighter numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from muse.data.captions import EVAL_TEMPLATES, caption_of
from muse.options import (PRECISIONS, SamplingOptions, add_option_arguments, default_device, deprecated_alias,
                          given_options)
from muse.progress import progress
from persist import atomic_write_json, atomic_write_text

# torch, the pipeline and the scorer are imported where they are used, so that `muse eval --help` starts at once.
if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from muse.pipeline import MusePipeline, Scorer
    from muse.scorer import ImageFeatures, PromptScorer

FD_LABEL = "FD-EffNetLite0, not comparable with published FID"
REPORT_JSON = "eval.json"
REPORT_MD = "eval.md"


@dataclass(frozen=True)
class EvalConfig:
    split: str = "heldout"                  # the split whose captions and images are evaluated
    num_prompts: int = 32                   # captions per set (the split's, and as many training ones)
    steps: tuple[int, ...] = (8, 12, 16, 24)  # decoding steps of the settings grid
    guidance: tuple[float, ...] | None = None  # guidance scales of the grid; None: 1 (off), half the model's, the model's
    candidates: int = 100                   # captions each generated image's prompt is retrieved among
    best_of: int = 8                        # candidates per image in the best-of-N comparison; 1 skips it
    num_recon: int = 128                    # split images for the reconstruction PSNR
    num_inpaint: int = 16                   # split images for inpainting; 0 skips it
    batch_size: int = 32                    # images per pipeline call
    # The sampling options of every generation (the grid's steps, guidance and one candidate replace theirs);
    # None: the pipeline's own. `options.stages` 1 stops after the base stage.
    options: SamplingOptions | None = None
    # Prompts in other words: each evaluated image is generated from its row's caption rendered by one of these
    # templates (muse/data/captions.py fields: {label}, {a_label}, {style}, {keywords}), in turn, and still scored
    # against the canonical captions. Empty: the canonical captions themselves.
    prompt_templates: tuple[str, ...] = ()
    seed: int = 0

    @property
    def stages(self) -> int | None:
        return None if self.options is None else self.options.stages

    def __post_init__(self) -> None:
        for name in ("num_prompts", "candidates", "best_of", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_recon", "num_inpaint"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.steps or any(s < 1 for s in self.steps):
            raise ValueError(f"steps must be a non-empty list of counts >= 1, got {self.steps}")
        if self.guidance is not None and (not self.guidance or any(not g >= 0 for g in self.guidance)):
            raise ValueError(f"guidance must be a non-empty list of scales >= 0, got {self.guidance}")
        for template in self.prompt_templates:
            try:
                caption_of({"label": "red apple", "style": "noto", "tags": ["fruit"]}, template)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"prompt template {template!r} is not a caption template: {error!r}") from None


@dataclass
class Fidelity:
    """How well `num_images` generated images match their prompts, by the scorer."""

    num_images: int
    num_candidates: int   # captions each prompt was retrieved among
    score: float          # mean cosine similarity of an image with its own prompt
    top1: float           # fraction whose own prompt scores highest among the candidates
    top5: float


@dataclass
class Reconstruction:
    vqgan: str            # "base", or "superres" for the super-resolution stage's VQGAN
    resolution: int
    num_images: int
    psnr: float           # dB on uint8 pixels, mean over images


@dataclass
class Setting:
    num_steps: int
    guidance_scale: float
    split: Fidelity | None   # on the evaluated split's captions; None without a scorer
    train: Fidelity | None   # on training captions; None without a scorer or training rows
    fd: float | None         # FD-EffNetLite0 between generated and real split images; None with fewer than 2
    seconds: float


@dataclass
class Inpainting:
    num_images: int
    mask: str                       # which pixels were regenerated
    outside_mask_identical: float   # of the pixels outside the mask, the fraction bit-identical to the input
    kept_identical: float           # the same over the pixels the pipeline promises to keep; 1 unless it is broken
    kept_fraction: float            # promised pixels / pixels outside the mask
    hole_score: float | None        # scorer score of the hole's crop under the caption; None without a scorer
    original_hole_score: float | None  # the same for the input's crop: the reference


@dataclass
class BestOfN:
    n: int
    num_steps: int
    guidance_scale: float
    independent_judge: bool    # False: the scorer that picked also measured, so `by_scorer` is optimistic
    by_scorer: Fidelity        # the pick of the model's scorer (the measuring one when the model has none)
    by_likelihood: Fidelity    # the pick by the model's mean token log-probability
    random: Fidelity           # expectation of a uniformly random pick: every candidate, averaged


@dataclass
class EvalReport:
    model: str
    data: str
    split: str
    scorer: str | None
    fd_label: str
    resolution: int
    reconstruction: list[Reconstruction]
    settings: list[Setting]
    inpainting: Inpainting | None
    best_of_n: BestOfN | None
    config: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Pairs:
    """Captions of one split with their real images at the evaluated resolution, and the prompts the images are
    generated from: the captions, or the same rows in other words (`EvalConfig.prompt_templates`)."""

    captions: list[str]
    prompts: list[str]
    images: Tensor  # (N, 3, H, W) float in [-1, 1]


# --------------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(
    pipe: MusePipeline,
    data_dir: str | os.PathLike,
    config: EvalConfig = EvalConfig(),
    *,
    scorer: PromptScorer | None = None,
    model_name: str = "",
    scorer_name: str | None = None,
) -> EvalReport:
    """Measure `pipe` on the folder `data_dir` (see the module docstring). `scorer` None skips prompt fidelity."""
    start = time.perf_counter()
    data_dir = Path(data_dir)
    resolution = pipe.resolution(config.stages)
    from muse.data.folder import read_rows
    from muse.scorer import ImageFeatures, ScorerConfig

    split = _pairs(data_dir, config.split, resolution, config.num_prompts, config.seed, config.prompt_templates)
    if split is None:
        raise ValueError(f"{data_dir} has no images in split {config.split!r}")
    train = _pairs(data_dir, "train", resolution, config.num_prompts, config.seed + 1, config.prompt_templates)
    all_captions = list(dict.fromkeys(row["caption"] for row in read_rows(data_dir)))
    features = scorer.image_encoder if scorer is not None else ImageFeatures(ScorerConfig.image_size).to(pipe.device)

    reconstruction = _reconstruction(pipe, data_dir, config)
    default = pipe.config.sampling.guidance_scale
    guidance = config.guidance if config.guidance is not None else tuple(sorted({1.0, max(1.0, default / 2), default}))
    real_features = features(split.images).cpu() if len(split.captions) >= 2 else None
    settings = []
    for num_steps in config.steps:
        for scale in dict.fromkeys(guidance):
            _log(f"generating at {num_steps} steps, guidance {scale}")
            settings.append(_setting(pipe, scorer, features, split, train, real_features, all_captions, config,
                                     num_steps, float(scale)))
    inpainting = None
    if config.num_inpaint > 0:
        _log("inpainting")
        inpainting = _inpainting(pipe, scorer, _pairs(data_dir, config.split, resolution, config.num_inpaint,
                                                      config.seed + 2, config.prompt_templates), config)
    best_of_n = None
    if scorer is not None and config.best_of > 1:
        _log(f"best-of-{config.best_of}")
        best_of_n = _best_of_n(pipe, scorer, split, all_captions, config)
    return EvalReport(
        model=model_name, data=str(data_dir), split=config.split, scorer=scorer_name, fd_label=FD_LABEL,
        resolution=resolution, reconstruction=reconstruction, settings=settings, inpainting=inpainting,
        best_of_n=best_of_n, seconds=time.perf_counter() - start,
        # What every generation started from (the grid replaces steps, guidance and candidates), resolved.
        config=asdict(config) | {"options": asdict(pipe.options(options=config.options)),
                                 "precision": pipe.config.precision,
                                 "dtype": str(next(pipe.transformer.parameters()).dtype)},
    )


def _setting(
    pipe: MusePipeline,
    scorer: PromptScorer | None,
    features: ImageFeatures,
    split: _Pairs,
    train: _Pairs | None,
    real_features: Tensor | None,
    all_captions: list[str],
    config: EvalConfig,
    num_steps: int,
    guidance_scale: float,
) -> Setting:
    start = time.perf_counter()
    # One candidate per image whatever the pipeline's default: the grid measures single samples; best-of-N has its
    # own comparison below.
    options = {"num_steps": num_steps, "guidance_scale": guidance_scale, "num_candidates": 1}
    images = _generate(pipe, split.prompts, config, **options)
    generated = features(images).cpu()
    fd = None if real_features is None else frechet_distance(real_features, generated)
    split_fidelity = train_fidelity = None
    if scorer is not None:
        split_fidelity = _fidelity(scorer, scorer.project_images(generated), split.captions, all_captions, config)
        if train is not None:
            train_images = _generate(pipe, train.prompts, config, **options)
            train_fidelity = _fidelity(scorer, scorer.embed_images(train_images), train.captions, all_captions, config)
    return Setting(num_steps=num_steps, guidance_scale=guidance_scale, split=split_fidelity, train=train_fidelity,
                   fd=fd, seconds=time.perf_counter() - start)


def _reconstruction(pipe: MusePipeline, data_dir: Path, config: EvalConfig) -> list[Reconstruction]:
    """PSNR of the base VQGAN at the base resolution and, in a cascade, of the super-res VQGAN at the output one."""
    import torch

    if config.num_recon == 0:
        return []
    stages = [("base", pipe.vqgan, pipe.resolution(1))]
    if pipe.superres is not None and config.stages != 1:
        stages.append(("superres", pipe.high_vqgan, pipe.resolution(2)))
    results = []
    for name, vqgan, resolution in stages:
        _log(f"reconstruction ({name} VQGAN, {resolution} px)")
        pairs = _pairs(data_dir, config.split, resolution, config.num_recon, config.seed + 3)
        weight = next(vqgan.parameters())
        psnr = []
        with torch.inference_mode():
            for chunk in pairs.images.split(config.batch_size):
                decoded = vqgan.decode(vqgan.encode(chunk.to(weight.device, weight.dtype))).float().cpu()
                error = (_uint8(decoded).float() - _uint8(chunk).float()).square().mean(dim=(1, 2, 3))  # (B,)
                # An exact reconstruction would be infinite dB; 1e-10 caps it (~148 dB) so the JSON stays finite.
                psnr.append(10 * torch.log10(255.0**2 / error.clamp(min=1e-10)))
        results.append(Reconstruction(vqgan=name, resolution=resolution, num_images=len(pairs.captions),
                                      psnr=float(torch.cat(psnr).mean())))
    return results


def _inpainting(pipe: MusePipeline, scorer: PromptScorer | None, pairs: _Pairs, config: EvalConfig) -> Inpainting:
    import numpy as np
    import torch

    from sampling import feathered_composite_weights, pixel_to_token_mask

    resolution = pairs.images.shape[-1]
    stride = pipe.stride(config.stages)
    # The centre square, half the side, on token boundaries, so "outside the mask" is a clean token-aligned frame.
    side = max(stride, resolution // 2 // stride * stride)
    top = (resolution - side) // 2 // stride * stride
    mask = torch.zeros(resolution, resolution, dtype=torch.bool)
    mask[top : top + side, top : top + side] = True

    results = []
    for start in range(0, len(pairs.captions), config.batch_size):
        prompts = pairs.prompts[start : start + config.batch_size]
        out = pipe.inpaint(prompts, image=pairs.images[start : start + len(prompts)], mask=mask,
                           seed=[config.seed + start + i for i in range(len(prompts))], options=config.options)
        results.extend(out.images)
    result = torch.from_numpy(np.stack([np.asarray(im) for im in results])).permute(0, 3, 1, 2)  # (N, 3, H, W)
    original = _uint8(pairs.images)
    identical = (result == original).all(dim=1)  # (N, H, W)

    # The pipeline's promise, recomputed from its config: pixels beyond the regenerated tokens (any token touching
    # the mask, grown by mask_dilation) and the seam are copied from the input.
    last_vqgan = pipe.vqgan if config.stages == 1 or pipe.superres is None else pipe.high_vqgan
    region_stride = last_vqgan.config.downsample_factor
    region = pixel_to_token_mask(mask[None], region_stride, pipe.config.mask_dilation)
    kept = feathered_composite_weights(region, region_stride, pipe.config.seam)[0, 0] == 0  # (H, W)
    outside = ~mask

    hole_score = original_hole_score = None
    if scorer is not None:
        window = (slice(None), slice(None), slice(top, top + side), slice(top, top + side))
        hole_score = float(scorer.score(result[window].float() / 127.5 - 1, pairs.captions).mean())
        original_hole_score = float(scorer.score(pairs.images[window], pairs.captions).mean())
    return Inpainting(
        num_images=len(results),
        mask=f"centre {side}x{side} of {resolution}x{resolution} px",
        outside_mask_identical=float(identical[:, outside].float().mean()),
        kept_identical=float(identical[:, kept].float().mean()) if bool(kept.any()) else 1.0,
        kept_fraction=float(kept.sum() / outside.sum().clamp(min=1)),
        hole_score=hole_score,
        original_hole_score=original_hole_score,
    )


def _best_of_n(pipe: MusePipeline, scorer: PromptScorer, split: _Pairs, all_captions: list[str],
               config: EvalConfig) -> BestOfN:
    import torch

    n = config.best_of
    picker = pipe.scorer if pipe.scorer is not None else scorer
    recorder = _Recorder(picker, scorer)
    options = {"num_candidates": n, "batch_size": max(1, config.batch_size // n)}
    by_scorer = _generate(pipe, split.prompts, config, scorer=recorder, **options)
    default = pipe.scorer
    pipe.scorer = None  # the model's own log-likelihood
    try:
        by_likelihood = _generate(pipe, split.prompts, config, **options)
    finally:
        pipe.scorer = default
    candidates = torch.cat(recorder.embeddings)  # (N * n, E), every candidate of every caption
    every_prompt = [c for c in split.captions for _ in range(n)]
    return BestOfN(
        n=n, num_steps=pipe.config.sampling.num_steps, guidance_scale=pipe.config.sampling.guidance_scale,
        independent_judge=picker is not scorer,
        by_scorer=_fidelity(scorer, scorer.embed_images(by_scorer), split.captions, all_captions, config),
        by_likelihood=_fidelity(scorer, scorer.embed_images(by_likelihood), split.captions, all_captions, config),
        random=_fidelity(scorer, candidates, every_prompt, all_captions, config),
    )


class _Recorder:
    """A best-of-N scorer that picks with `picker` and keeps every candidate's embedding by the measuring `judge`."""

    def __init__(self, picker: Scorer, judge: PromptScorer) -> None:
        self.picker, self.judge = picker, judge
        self.embeddings: list[Tensor] = []

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        import torch

        self.embeddings.append(self.judge.embed_images(images).cpu())
        return torch.as_tensor(self.picker(images, prompts)).cpu()


# --------------------------------------------------------------------------------------------------------------------
# Pieces


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a (N, D) and b (M, D), N, M >= 2:
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    import torch

    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N, D) feature sets with N >= 2 and one D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((C_a C_b)^1/2) = tr((C_a^1/2 C_b C_a^1/2)^1/2), whose argument is symmetric PSD: two eigendecompositions
    # instead of a general matrix square root (and no SciPy).
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def _fidelity(scorer: PromptScorer, embeddings: Tensor, prompts: Sequence[str], all_captions: list[str],
              config: EvalConfig) -> Fidelity:
    """Fidelity of images given as scorer embeddings (B, E), each against its prompt among the candidate captions:
    the distinct prompts first, then distractors from `all_captions` (a fixed shuffle) up to `config.candidates`."""
    import torch

    from muse.scorer import target_ranks

    own = list(dict.fromkeys(prompts))
    taken = set(own)
    distractors = [c for c in all_captions if c not in taken]
    random.Random(config.seed).shuffle(distractors)
    candidates = own + distractors[: max(0, config.candidates - len(own))]
    index = {c: i for i, c in enumerate(candidates)}
    targets = torch.tensor([index[p] for p in prompts])
    similarity = embeddings.cpu() @ scorer.embed_texts(candidates).cpu().T  # (B, C)
    ranks = target_ranks(similarity, targets)
    return Fidelity(num_images=len(prompts), num_candidates=len(candidates),
                    score=float(similarity.gather(1, targets[:, None]).mean()),
                    top1=float((ranks < 1).float().mean()), top5=float((ranks < 5).float().mean()))


def border_statistics(images: list[Image.Image]) -> dict[str, float]:
    """Mean |difference| between neighbouring pixels at the image's edge and one line in: an edge pixel against the
    one inside it, a corner pixel against its inward diagonal neighbour, each beside the same measure one line further
    in (what a border with no artefact should match)."""
    import numpy as np

    edge, edge_inner, corner, corner_inner = [], [], [], []
    for image in images:
        a = np.asarray(image.convert("RGB")).astype(np.float64)  # (H, W, 3)
        for line, inner, deeper in ((a[0], a[1], a[2]), (a[-1], a[-2], a[-3]),
                                    (a[:, 0], a[:, 1], a[:, 2]), (a[:, -1], a[:, -2], a[:, -3])):
            edge.append(np.abs(line - inner).mean())
            edge_inner.append(np.abs(inner - deeper).mean())
        for y, x, dy, dx in ((0, 0, 1, 1), (0, -1, 1, -1), (-1, 0, -1, 1), (-1, -1, -1, -1)):
            corner.append(np.abs(a[y, x] - a[y + dy, x + dx]).mean())
            corner_inner.append(np.abs(a[y + dy, x + dx] - a[y + 2 * dy, x + 2 * dx]).mean())
    return {"edge": float(np.mean(edge)), "edge_one_in": float(np.mean(edge_inner)),
            "corner": float(np.mean(corner)), "corner_one_in": float(np.mean(corner_inner))}


def _generate(pipe: MusePipeline, prompts: list[str], config: EvalConfig, *, batch_size: int | None = None,
              **options) -> list[Image.Image]:
    """One image per prompt, image i with seed config.seed + i, in pipeline calls of `batch_size` prompts."""
    batch_size = batch_size or config.batch_size
    images = []
    with progress(len(prompts), desc="muse eval", unit="img") as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seeds = [config.seed + start + i for i in range(len(chunk))]
            images.extend(pipe(chunk, seed=seeds, options=config.options, **options).images)
            bar.update(len(chunk))
    return images


def _pairs(data_dir: Path, split: str, resolution: int, n: int, seed: int,
           templates: Sequence[str] = ()) -> _Pairs | None:
    """Up to n rows of a split (a fixed random sample, in folder order), None when the split has none. Rows marked
    `duplicate_of` are left out: their pixels are another row's. Row i's prompt is its caption, or with `templates`
    its caption_of(row, templates[i % len(templates)])."""
    import torch

    from muse.data.folder import ImageCaptionDataset
    from muse.data.images import ImageTransform

    dataset = ImageCaptionDataset(data_dir, ImageTransform(resolution), split=split, drop_duplicates=True)
    if len(dataset) == 0:
        return None
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
    items = [dataset[i] for i in chosen]
    captions = [item["caption"] for item in items]
    if templates:
        for i in chosen:
            missing = [key for key in ("label", "style") if key not in dataset.rows[i]]
            if missing:
                raise ValueError(f"prompt templates need each row's label and style; in {data_dir}, the row of "
                                 f"{dataset.rows[i].get('file')!r} has no {missing[0]!r}")
        prompts = [caption_of(dataset.rows[i], templates[k % len(templates)]) for k, i in enumerate(chosen)]
    else:
        prompts = captions
    return _Pairs(captions=captions, prompts=prompts, images=torch.stack([item["image"] for item in items]))


def _uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8, the same rounding as the pipeline's output images."""
    import torch

    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def _log(message: str) -> None:
    print(f"muse eval: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Report files


def write_report(report: EvalReport, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write DIR/eval.json (everything) and DIR/eval.md (the tables); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / REPORT_JSON, out / REPORT_MD
    atomic_write_json(json_path, asdict(report))
    atomic_write_text(md_path, markdown(report))
    return json_path, md_path


def markdown(report: EvalReport) -> str:
    """The report's headline numbers as a short Markdown page."""
    split = report.split
    lines = [f"# muse eval: {report.model or 'model'} on {report.data} ({split})", ""]
    if report.scorer is None:
        lines += [("No prompt scorer: fidelity is not measured (pass --scorer, or train one with "
                   "`muse scorer`)."), ""]
    else:
        lines += [(f"Scorer: {report.scorer}. Fidelity: mean cosine score, and top-1 / top-5 retrieval of the "
                   "prompt among the candidate captions."), ""]
    templates = report.config.get("prompt_templates")
    if templates:
        lines += [("Prompts in other words: each image generated from its row's caption in one of the templates "
                   + ", ".join(f"`{t}`" for t in templates) + " (in turn), scored against the canonical captions."),
                  ""]
    for r in report.reconstruction:
        lines.append(f"Reconstruction ({r.vqgan} VQGAN, {r.resolution} px, {r.num_images} images): "
                     f"PSNR {_num(r.psnr, 2)} dB")
    lines += [
        "",
        f"| steps | guidance | {split} score | {split} top-1 | {split} top-5 | train score | train top-1 | FD* |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.settings:
        sp, tr = s.split or _NO_FIDELITY, s.train or _NO_FIDELITY
        lines.append(f"| {s.num_steps} | {s.guidance_scale:g} | {_num(sp.score)} | {_num(sp.top1)} | "
                     f"{_num(sp.top5)} | {_num(tr.score)} | {_num(tr.top1)} | {_num(s.fd, 1)} |")
    lines += ["", f"*{report.fd_label}: generated vs real {split} images of the same captions."]
    if report.inpainting is not None:
        p = report.inpainting
        lines += ["", (f"Inpainting ({p.num_images} images, {p.mask}): {_num(p.outside_mask_identical)} of the pixels "
                       f"outside the mask are bit-identical to the input; {_num(p.kept_identical)} of those the "
                       f"pipeline promises to keep ({_num(p.kept_fraction)} of the outside). Hole score "
                       f"{_num(p.hole_score)} (the original's: {_num(p.original_hole_score)}).")]
    if report.best_of_n is not None:
        b = report.best_of_n
        lines += ["", f"Best-of-{b.n} on {split} captions ({b.num_steps} steps, guidance {b.guidance_scale:g}):", "",
                  "| pick | score | top-1 | top-5 |", "|---|---|---|---|"]
        by_scorer = "the model's scorer" if b.independent_judge else "scorer (optimistic: it also measures)"
        picks = [(by_scorer, b.by_scorer), ("model log-likelihood", b.by_likelihood), ("random (expected)", b.random)]
        lines += [f"| {name} | {_num(f.score)} | {_num(f.top1)} | {_num(f.top5)} |" for name, f in picks]
    lines += ["", f"{report.seconds:.0f} s."]
    return "\n".join(lines) + "\n"


_NO_FIDELITY = Fidelity(num_images=0, num_candidates=0, score=math.nan, top1=math.nan, top5=math.nan)


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EvalConfig()
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="saved pipeline directory or bundled preset name (default: the bundled model)")
    parser.add_argument("--data", type=Path, default=Path("data/emoji"), metavar="DIR", help="image-caption folder")
    parser.add_argument("--split", default=defaults.split, help="split whose captions and images are evaluated")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where eval.json and eval.md go")
    parser.add_argument("--scorer", default=None, metavar="PATH",
                        help="PromptScorer directory that measures (default: the model's scorer/, if any); a "
                             "separately trained one judges the model scorer's best-of-N pick independently")
    parser.add_argument("--steps", type=int, nargs="+", default=list(defaults.steps), metavar="N",
                        help="decoding steps of the settings grid")
    parser.add_argument("--guidance", type=float, nargs="+", default=None, metavar="SCALE",
                        help="guidance scales of the settings grid (default: 1, i.e. none, half the model's and the model's)")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts, metavar="N",
                        help="captions per evaluated set")
    # Best-of-N is --num-candidates everywhere (`muse generate`, the API's num_candidates); the retrieval pool says
    # what it is. The old spellings, where --candidates meant the pool, are kept with a warning for one version.
    parser.add_argument("--retrieval-captions", dest="candidates", type=int, default=defaults.candidates,
                        metavar="N", help="captions a prompt is retrieved among (prompt fidelity's top-1 / top-5)")
    parser.add_argument("--num-candidates", dest="best_of", type=int, default=defaults.best_of, metavar="N",
                        help="best-of-N: candidates per image in the best-of-N comparison (1 skips it)")
    deprecated_alias(parser, "--candidates", "--retrieval-captions", dest="candidates", type=int)
    deprecated_alias(parser, "--best-of", "--num-candidates", dest="best_of", type=int)
    parser.add_argument("--num-recon", type=int, default=defaults.num_recon, metavar="N",
                        help="images for the reconstruction PSNR (0 skips it)")
    parser.add_argument("--num-inpaint", type=int, default=defaults.num_inpaint, metavar="N",
                        help="images for inpainting (0 skips it)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                        help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="image i of a caption set has seed SEED + i")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps, ... (default: the GPU when there is one, else cpu)")
    parser.add_argument("--prompt-templates", nargs="+", default=list(defaults.prompt_templates), metavar="TEMPLATE",
                        help="generate from the rows' captions in other words: caption templates over {label}, "
                             "{a_label}, {style} and {keywords}, used in turn, or 'eval' for the held-out phrasings "
                             "of muse/data/captions.py that training never sees (default: the canonical captions)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="arithmetic of the token models, to measure it (default: the model's config.precision)")
    # Every other sampling option as for `muse generate`; the grid sets the steps, the guidance and one candidate.
    add_option_arguments(parser, exclude=("num_steps", "guidance_scale", "num_candidates"))


def main(args: argparse.Namespace) -> None:
    try:
        # Every argument is checked before the model loads, the data folder too.
        SamplingOptions().with_overrides(given_options(args))
        if not args.data.is_dir():
            raise SystemExit(f"muse eval: no image-caption folder at {args.data}; build the emoji set first with "
                             f"`muse data emoji --out {args.data} --sizes 64 128 256`, or pass --data DIR")
        config = EvalConfig(
            split=args.split, num_prompts=args.num_prompts, steps=tuple(args.steps),
            guidance=None if args.guidance is None else tuple(args.guidance), candidates=args.candidates,
            best_of=args.best_of, num_recon=args.num_recon, num_inpaint=args.num_inpaint,
            batch_size=args.batch_size, seed=args.seed,
            prompt_templates=tuple(t for name in args.prompt_templates
                                   for t in (EVAL_TEMPLATES if name == "eval" else [name])),
        )
        from muse.pipeline import MusePipeline
        from muse.scorer import PromptScorer

        device = args.device or default_device()
        pipe = MusePipeline.from_pretrained(args.model)
        if args.precision is not None:
            pipe.config = dataclasses.replace(pipe.config, precision=args.precision)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)  # the evaluation's own bars count its images
        config = dataclasses.replace(config, options=pipe.options(**given_options(args)))
        scorer = PromptScorer.load(args.scorer, device=device) if args.scorer is not None else pipe.scorer
        scorer_name = args.scorer if args.scorer is not None else (None if scorer is None else "the model's scorer/")
        report = evaluate(pipe, args.data, config, scorer=scorer, model_name=args.model or "the bundled model",
                          scorer_name=scorer_name)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"muse eval: {e}") from None
    json_path, md_path = write_report(report, args.out)
    print(markdown(report), end="")
    print(f"muse eval: wrote {json_path} and {md_path}")
