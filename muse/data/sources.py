"""What a run's `data` section names: image datasets (folders, webdataset shards), and `TokenBatch`es for the masked
stages, from pre-encoded shards or from images tokenized on the fly.

    train_set = image_dataset(cfg.data, train=True, seed=cfg.train.seed)
    val_items = validation_items(cfg.data, limit=256)   # None when there is no validation split
    source = TokenSource(cfg, device, seed)            # the masked stages: shards or images, the same TokenBatch
    batch = source.batch(next(batches))                 # collated dataset items -> TokenBatch on the device

Training images are random- or center-cropped per `data.crop`; validation images are always center-cropped, so the
validation set is the same tensor at every evaluation. `muse data tokenize` writes shards with the same
`Tokenizers.encode`, so both paths give identical tokens. Nothing here imports the training code: the loops in
`muse/train/` read their data from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from muse.config import DataConfig, SuperResRun, TransformerRun
from muse.data.folder import ImageCaptionDataset
from muse.data.images import ImageTransform
from muse.data.streaming import WebDatasetImages
from muse.data.tokens import TokenShardDataset
from persist import parse_json
from persist.weights import load_unhashed_safetensors, save_safetensors
from transformer.config import TextEncoderConfig
from transformer.text import TextEmbedding, TextEncoder
from vqgan.model import VQGAN

# A random crop takes a resolution-sized window out of the image resized to 9/8 of the resolution (72 px for 64).
# Resizing to the resolution itself would leave square sources (the emoji set) no room to move.
RANDOM_CROP_SCALE = 1.125


# --------------------------------------------------------------------------------------------------------------------
# Images


def image_transform(data: DataConfig, *, train: bool, resolution: int | None = None) -> ImageTransform:
    size = resolution or data.resolution
    if train and data.crop == "random":
        return ImageTransform(size, resize=math.ceil(size * RANDOM_CROP_SCALE), crop="random")
    return ImageTransform(size, crop="center")


def image_dataset(data: DataConfig, *, train: bool, seed: int, resolution: int | None = None) -> Dataset:
    """The training (`train=True`) or validation image-caption dataset of `data` (folder or webdataset format).

    Items: dict(image=(3, H, W) in [-1, 1], caption=str, key=str), H = W = `resolution` or `data.resolution`.
    """
    if data.format == "tokens":
        raise ValueError("data.format is 'tokens': this needs images (format folder or webdataset)")
    transform = image_transform(data, train=train, resolution=resolution)
    path = data.path if train else (data.val_path or data.path)
    split = data.split if train else data.val_split
    if data.format == "folder":
        return ImageCaptionDataset(path, transform, split=split, seed=seed,
                                   all_captions=train and data.captions == "all")
    # Webdataset shards carry no split: the validation set is the separate shard directory `data.val_path`.
    return WebDatasetImages(path, transform, shuffle=train, seed=seed)


def has_validation(data: DataConfig) -> bool:
    if data.format == "webdataset":
        return data.val_path is not None
    return data.val_split is not None or data.val_path is not None


def validation_items(data: DataConfig, *, limit: int, resolution: int | None = None) -> list[dict] | None:
    """The first `limit` validation items in file order (center crops), or None when `data` has no validation set
    or it is empty; a fixed list, so every evaluation sees the same images."""
    if not has_validation(data):
        return None
    try:
        dataset = image_dataset(data, train=False, seed=0, resolution=resolution)
    except (FileNotFoundError, ValueError) as error:
        warnings.warn(f"no validation set ({error}); validation is skipped", stacklevel=2)
        return None
    items = []
    for item in (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset):
        items.append(item)
        if len(items) == limit:
            break
    return items or None


def stack_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([item["image"] for item in items])  # (B, 3, H, W)


def token_split_dir(data: DataConfig, *, train: bool) -> Path:
    """Where `muse data tokenize` put a split's shards: `<path>/<split>` (or `val_path` for validation)."""
    if train:
        return Path(data.path) / (data.split or "all")
    if data.val_path is not None:
        return Path(data.val_path)
    return Path(data.path) / (data.val_split or "all")


# --------------------------------------------------------------------------------------------------------------------
# Token batches of the masked stages


UNCONDITIONAL_FILE = "unconditional.safetensors"


@dataclass(frozen=True)
class TokenBatch:
    tokens: Tensor             # (B, L) long, the grid the stage predicts, row-major
    text_states: Tensor        # (B, S, Dt)
    text_mask: Tensor          # (B, S) bool, True = real text token
    low_tokens: Tensor | None  # (B, Ll) long, the low-res grid super-res is conditioned on; None for the base stage

    def to(self, device: torch.device, non_blocking: bool = False) -> TokenBatch:
        """On `device`; `non_blocking` lets a copy from pinned memory overlap the work already queued on a GPU."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TokenBatch(move(self.tokens), move(self.text_states), move(self.text_mask), move(self.low_tokens))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: slice | Tensor) -> TokenBatch:
        low = None if self.low_tokens is None else self.low_tokens[rows]
        return TokenBatch(self.tokens[rows], self.text_states[rows], self.text_mask[rows], low)


def pad_text(states: Tensor, mask: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (B, S', D) states and (B, S') mask (False) to S positions along the text axis."""
    extra = S - states.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {states.shape[1]} text positions down to {S}")
    return F.pad(states, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def trim_text(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing positions that are padding in every row (keeps at least one)."""
    used = mask.any(dim=0).nonzero()
    S = int(used.max()) + 1 if len(used) else 1
    return states[:, :S], mask[:, :S]


@dataclass
class Tokenizers:
    """The frozen models that turn (image, caption) pairs into a `TokenBatch`.

    `high` tokenizes the images the stage predicts; `low` (super-res only) tokenizes the same images downscaled to
    `low_resolution` pixels.
    """

    text: TextEncoder
    high: VQGAN
    low: VQGAN | None = None
    low_resolution: int | None = None

    @classmethod
    def load(cls, cfg: TransformerRun | SuperResRun, device: torch.device) -> Tokenizers:
        # bf16 on GPU: a T5-XXL encoder in fp32 would take 19 GB for states that are stored as fp16 anyway.
        text = TextEncoder(cfg.text, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        if isinstance(cfg, SuperResRun):
            high = VQGAN.from_pretrained(cfg.vqgan_high).to(device).eval()
            low = high if cfg.vqgan_low == cfg.vqgan_high else VQGAN.from_pretrained(cfg.vqgan_low).to(device).eval()
            return cls(text, high, low, cfg.low_resolution)
        return cls(text, VQGAN.from_pretrained(cfg.vqgan).to(device).eval())

    @torch.no_grad()
    def encode(self, images: Tensor, captions: list[str]) -> TokenBatch:
        """(B, 3, H, W) images in [-1, 1] and B captions -> TokenBatch on the images' device."""
        tokens = self.high.encode(images).flatten(1)  # (B, L)
        low_tokens = None
        if self.low is not None:
            low_images = F.interpolate(
                images, size=(self.low_resolution, self.low_resolution), mode="bicubic", antialias=True
            ).clamp(-1.0, 1.0)
            low_tokens = self.low.encode(low_images).flatten(1)  # (B, Ll)
        text = self.text(list(captions))
        states, mask = trim_text(text.states.float().to(images.device), text.mask.to(images.device))
        return TokenBatch(tokens, states, mask, low_tokens)

    def unconditional(self) -> TextEmbedding:
        """The empty prompt's states (1, S, Dt), trimmed to its real tokens, on the text encoder's device."""
        text = self.text.unconditional(1)
        states, mask = trim_text(text.states.float(), text.mask)
        return TextEmbedding(states, mask)


class TokenSource:
    """Where a masked stage's batches come from, per `cfg.data.format`.

    "tokens": shards written by `muse data tokenize` under `data.path/<split>`, with the empty prompt's states in
    `data.path/unconditional.safetensors`. "folder" / "webdataset": images (random crops per `data.crop`) tokenized
    on the fly by the frozen VQGAN(s) and text encoder on `device`.
    """

    def __init__(self, cfg: TransformerRun | SuperResRun, device: torch.device, seed: int) -> None:
        self.device = device
        self.data = cfg.data
        if cfg.data.format == "tokens":
            self.tokenizers = None
            self.train_set = TokenShardDataset(token_split_dir(cfg.data, train=True))
            self.unconditional = load_unconditional(Path(cfg.data.path), cfg.text)
        else:
            self.tokenizers = Tokenizers.load(cfg, device)
            self.train_set = image_dataset(cfg.data, train=True, seed=seed)
            self.unconditional = self.tokenizers.unconditional()
        self.unconditional = TextEmbedding(self.unconditional.states.to(device), self.unconditional.mask.to(device))

    def batch(self, items: dict) -> TokenBatch:
        """A collated batch of dataset items -> TokenBatch on the device."""
        if self.tokenizers is None:
            return shard_batch(items).to(self.device, non_blocking=True)
        return self.tokenizers.encode(items["image"].to(self.device, non_blocking=True), list(items["caption"]))

    def validation(self, limit: int, batch_size: int) -> TokenBatch | None:
        """The first `limit` validation items as one CPU TokenBatch (None without a validation set)."""
        if self.tokenizers is None:
            directory = token_split_dir(self.data, train=False)
            if not has_validation(self.data) or not any(directory.glob("tokens-*.safetensors")):
                return None
            dataset = TokenShardDataset(directory)
            items = [dataset[i] for i in range(min(limit, len(dataset)))]
            return shard_batch(default_collate(items)) if items else None
        items = validation_items(self.data, limit=limit)
        if items is None:
            return None
        chunks = [
            self.batch(default_collate(items[start : start + batch_size])).to(torch.device("cpu"))
            for start in range(0, len(items), batch_size)
        ]
        return cat_batches(chunks)


def shard_batch(items: dict) -> TokenBatch:
    """Default-collated `TokenShardDataset` items -> TokenBatch (grids flattened row-major)."""
    low = items.get("low_res_tokens")
    return TokenBatch(
        tokens=items["tokens"].flatten(1),  # (B, L)
        text_states=items["text_states"].float(),
        text_mask=items["text_mask"],
        low_tokens=None if low is None else low.flatten(1),  # (B, Ll)
    )


def cat_batches(batches: list[TokenBatch]) -> TokenBatch:
    """Rows of several batches in one, the text padded to the longest S."""
    S = max(b.text_states.shape[1] for b in batches)
    texts = [pad_text(b.text_states, b.text_mask, S) for b in batches]
    lows = [b.low_tokens for b in batches]
    return TokenBatch(
        tokens=torch.cat([b.tokens for b in batches]),
        text_states=torch.cat([states for states, _ in texts]),
        text_mask=torch.cat([mask for _, mask in texts]),
        low_tokens=None if lows[0] is None else torch.cat(lows),
    )


def save_unconditional(directory: Path, text: TextEmbedding, config: TextEncoderConfig) -> None:
    """Store the empty prompt's states beside the shards: training from shards needs them for text dropout, and
    loading the encoder (e.g. T5-XXL) only for that would be wasteful."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / UNCONDITIONAL_FILE
    tensors = {"states": text.states[0].detach().cpu().contiguous(), "mask": text.mask[0].cpu().contiguous()}
    save_safetensors(path, tensors, metadata={"text_encoder": json.dumps(dataclasses.asdict(config))})


def load_unconditional(directory: Path, config: TextEncoderConfig) -> TextEmbedding:
    """The empty prompt's states (1, S, Dt) saved by `muse data tokenize` in `directory`."""
    path = directory / UNCONDITIONAL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: token shards must come from `muse data tokenize`, which writes the empty prompt's "
            "text states there for text dropout"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated: {e}") from None
    saved = parse_json(metadata.get("text_encoder", "{}"), f"{path}'s metadata 'text_encoder'")
    if saved != dataclasses.asdict(config):
        raise ValueError(
            f"{path} was encoded with text encoder {saved}, but the run config has {dataclasses.asdict(config)}"
        )
    tensors = load_unhashed_safetensors(path)  # a cache written by `muse data tokenize`, beside its shards
    return TextEmbedding(tensors["states"][None].float(), tensors["mask"][None])


def drop_text(batch: TokenBatch, unconditional: TextEmbedding, drop: Tensor) -> TokenBatch:
    """Replace the text of rows where `drop` (B,) bool is True by the unconditional (empty prompt) states."""
    S = max(batch.text_states.shape[1], unconditional.states.shape[1])
    states, mask = pad_text(batch.text_states, batch.text_mask, S)
    null_states, null_mask = pad_text(unconditional.states, unconditional.mask, S)
    states = torch.where(drop[:, None, None], null_states.to(states), states)  # (B, S, Dt)
    mask = torch.where(drop[:, None], null_mask.to(mask.device), mask)  # (B, S)
    return replace(batch, text_states=states, text_mask=mask)


__all__ = [
    "RANDOM_CROP_SCALE",
    "image_transform",
    "image_dataset",
    "has_validation",
    "validation_items",
    "stack_images",
    "token_split_dir",
    "UNCONDITIONAL_FILE",
    "TokenBatch",
    "Tokenizers",
    "TokenSource",
    "pad_text",
    "trim_text",
    "shard_batch",
    "cat_batches",
    "save_unconditional",
    "load_unconditional",
    "drop_text",
]
