"""Train the prompt scorer's heads: `muse train configs/scorer/emoji.yaml` (or `muse scorer --data DIR --out DIR`).

One loop, top to bottom: setup -> model (frozen MiniLM and EfficientNet-Lite0 towers, fresh heads) -> data (the frozen
features of the "train" split, computed once and cached) -> loop (CLIP's symmetric InfoNCE on random pairs, warmup then
cosine) -> export (`out_dir/config.json` + `model.safetensors`, what `PromptScorer.load` reads) and `training.json`
with retrieval on the training and held-out splits.

The scorer keeps no checkpoints: it trains in seconds to minutes from the cached features, so `--resume` simply trains
again (reusing the cache). The inference side, `PromptScorer`, stays in `muse/scorer.py`, where the pipeline and
`muse eval` load it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from muse.config import ScorerRun
from muse.data.folder import pick_file, read_rows
from muse.data.images import ImageTransform, load_rgb
from muse.progress import progress
from muse.scorer import CHUNK, PromptScorer, contrastive_loss, target_ranks
from persist import atomic_write, atomic_write_json


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
class Features:
    """Frozen features of one split: every row's image in each view, and each row's caption."""

    images: Tensor        # (V, N, Di) one view per source size
    texts: Tensor         # (N, Dt)
    captions: list[str]   # (N,)


def train(cfg: ScorerRun, resume: bool = False, keep_every: int | None = None) -> Path:
    """The `muse train` entry point: fit per `cfg` and return the exported scorer directory, `train.out_dir`.
    `resume` trains again from the feature cache (there is no checkpoint to continue); `keep_every` is refused."""
    if keep_every is not None:
        raise ValueError("the scorer keeps no checkpoints (it trains in minutes from cached features): "
                         "drop --keep-every")
    fit(cfg)
    return Path(cfg.train.out_dir)


def fit(cfg: ScorerRun) -> ScorerTraining:
    """Fit the heads of a `PromptScorer` on the "train" split of `cfg.data.path` and save it to `cfg.train.out_dir`.

    Frozen features are cached in `data.cache_dir` (default `out_dir/feature-cache`), keyed by the files, captions,
    sizes and towers; delete it if images change in place. Rows marked `duplicate_of` are left out: the same pixels
    under two captions would be contradicting positives. Writes `out_dir/training.json` with the returned metrics.
    """
    # Setup.
    start = time.perf_counter()
    data_dir, out = Path(cfg.data.path), Path(cfg.train.out_dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir is not None else out / "feature-cache"
    train_rows = split_rows(data_dir, "train", cfg.data.max_images)
    if len(train_rows) < 2:
        raise ValueError(f"{data_dir} has fewer than 2 usable training images; the scorer needs pairs to contrast")

    # Model: the towers load in seconds, so only once the data are known good. The seed fixes the heads' init and
    # dropout.
    torch.manual_seed(cfg.train.seed)
    scorer = PromptScorer(cfg.model, device=cfg.train.device)

    # Data: the frozen features of the training split, from the cache when it holds them.
    features = split_features(scorer, data_dir, train_rows, "train", cfg.data.source_sizes, cache)

    # Loop.
    generator = torch.Generator().manual_seed(cfg.train.seed)
    heads = scorer.heads.train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps, log_every = cfg.train.steps, cfg.train.log_every
    warmup = max(1, steps // 20)
    n, views = len(features.captions), features.images.shape[0]
    batch_size = min(cfg.train.batch_size, n)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randperm(n, generator=generator)[:batch_size]  # (B,) distinct pairs
        view = torch.randint(views, (batch_size,), generator=generator)
        text, image = heads(features.texts[rows].to(scorer.device), features.images[view, rows].to(scorer.device))
        loss = contrastive_loss(image, text, heads.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):  # the last step always reports
            recent = losses[-(((step + 1) % log_every) or log_every):]
            print(f"scorer step {step + 1}/{steps}: loss {np.mean(recent):.4f}, "
                  f"temperature {1 / heads.scale.item():.4f}", file=sys.stderr)
    heads.eval()

    # Export and report: retrieval on both splits, from the cached features.
    heldout_rows = split_rows(data_dir, "heldout", cfg.data.max_images)
    heldout = None
    if heldout_rows:
        heldout = split_features(scorer, data_dir, heldout_rows, "heldout", cfg.data.source_sizes, cache)
    result = ScorerTraining(
        scorer=scorer,
        final_loss=float(np.mean(losses[-max(1, steps // 10):])),
        train=retrieval(scorer, features),
        heldout=None if heldout is None else retrieval(scorer, heldout),
        seconds=time.perf_counter() - start,
    )
    scorer.save(out)
    report = {"data": str(data_dir), "steps": steps, "batch_size": batch_size, "lr": cfg.train.lr,
              "weight_decay": cfg.train.weight_decay, "source_sizes": list(cfg.data.source_sizes),
              "seed": cfg.train.seed, "final_loss": result.final_loss, "train": asdict(result.train),
              "heldout": None if result.heldout is None else asdict(result.heldout), "seconds": result.seconds}
    atomic_write_json(out / "training.json", report)
    return result


def split_rows(data_dir: Path, split: str, max_images: int | None = None) -> list[dict]:
    """The metadata rows of one split, without those marked `duplicate_of`; at most `max_images` of them, a fixed
    random subset in folder order (the folder is sorted by style, so its first rows would be one style)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {data_dir}")
    rows = [r for r in read_rows(data_dir) if r.get("split", "train") == split and not r.get("duplicate_of")]
    if max_images is not None and len(rows) > max_images:
        keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
        rows = [rows[i] for i in keep.tolist()]
    return rows


def split_features(scorer: PromptScorer, data_dir: Path, rows: list[dict], split: str, sizes: tuple[int, ...],
                   cache: Path) -> Features:
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
            return Features(saved["images"], saved["texts"], captions)
        except Exception as e:  # noqa: BLE001 - a bad cache file is recomputed, never trusted
            print(f"ignoring unreadable feature cache {cached}: {e}", file=sys.stderr)

    print(f"scorer: extracting frozen features of {len(rows)} {split} images x {len(sizes)} views (cached for the "
          f"next run; data.max_images bounds it)", file=sys.stderr)
    views = []
    with progress(len(rows) * len(sizes), desc=f"scorer features ({split})", unit="img") as bar:
        for v, size in enumerate(sizes):
            transform = ImageTransform(size)
            feats = []
            for start in range(0, len(rows), CHUNK):
                batch = torch.stack([transform(load_rgb(data_dir / f[v])) for f in files[start : start + CHUNK]])
                feats.append(scorer.image_features(batch).cpu())
                bar.update(len(batch))
            views.append(torch.cat(feats))  # (N, Di)
    features = Features(torch.stack(views), scorer.text_features(captions).cpu(), captions)

    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda tmp: torch.save({"images": features.images, "texts": features.texts}, tmp))
    return features


@torch.inference_mode()
def retrieval(scorer: PromptScorer, features: Features) -> Retrieval:
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


__all__ = ["Retrieval", "ScorerTraining", "Features", "train", "fit", "split_rows", "split_features", "retrieval"]
