"""Datasets named by a run's `DataConfig`: image-caption folders or webdataset shards, and fixed validation items.

    train_set = image_dataset(cfg.data, train=True, seed=cfg.train.seed)
    val_items = validation_items(cfg.data, resolution=64, limit=256)   # None when there is no validation split

Training images are random- or center-cropped per `data.crop`; validation images are always center-cropped, so the
validation set is the same tensor at every evaluation.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from muse.config import DataConfig
from muse.data.folder import ImageCaptionDataset
from muse.data.images import ImageTransform
from muse.data.streaming import WebDatasetImages

# A random crop takes a resolution-sized window out of the image resized to 9/8 of the resolution (72 px for 64).
# Resizing to the resolution itself would leave square sources (the emoji set) no room to move.
RANDOM_CROP_SCALE = 1.125


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
        return ImageCaptionDataset(path, transform, split=split, seed=seed)
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


__all__ = [
    "RANDOM_CROP_SCALE",
    "image_transform",
    "image_dataset",
    "has_validation",
    "validation_items",
    "stack_images",
    "token_split_dir",
]
