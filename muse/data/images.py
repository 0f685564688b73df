"""Image loading and the one transform every image dataset shares: resize, crop, scale to [-1, 1].

Transparent images are composited on white before anything else, because white is the background our emoji data and
our editing masks assume; compositing on black would teach the model dark halos around every cut-out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB, the one conversion of training and inference alike: transparency (RGBA, LA, palette or
    greyscale with transparency) is composited on white; 16-bit and 32-bit greyscale are scaled to 8 bits (PIL's own
    conversion clips them, so a 16-bit PNG became pure white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if pixels.size and pixels.max() <= 1.0 else 255.0  # floats in [0, 1], else already 8-bit
        else:
            top = 255.0 if pixels.size and pixels.max() <= 255 else 65535.0  # "I" holds 8- or 16-bit data
        grey = np.clip(np.nan_to_num(pixels) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (path or encoded bytes) fully and return it as RGB.

    Raises whatever PIL raises for unreadable data (OSError, ValueError, Image.DecompressionBombError, ...); callers
    that skip corrupt images catch `Exception` around this call.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()  # decode now, so a truncated file fails here and not later inside a transform
        return to_rgb(image)


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `resize` (`size` when None), crop a `size` x `size` square, scale to [-1, 1].

    `crop` is "center" (deterministic) or "random". A random crop of an image whose shorter side equals `size` can only
    move along the longer side, so for square sources (the emoji set) set `resize` above `size` to get any jitter.
    No horizontal flips: they would mirror arrows and text, and captions like "left arrow" would then lie.
    """

    size: int
    resize: int | None = None
    crop: str = "center"

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.size <= 0 or self.resize_to < self.size:
            raise ValueError(f"need 0 < size <= resize, got size={self.size}, resize={self.resize}")

    @property
    def resize_to(self) -> int:
        return self.size if self.resize is None else self.resize

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """PIL image -> float tensor (3, H, W) in [-1, 1] with H == W == size. A random crop needs `rng`."""
        image = to_rgb(image)
        width, height = image.size
        scale = self.resize_to / min(width, height)
        # max() guards against rounding the shorter side to one pixel below the crop size.
        new_w = max(self.resize_to, round(width * scale))
        new_h = max(self.resize_to, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if self.crop == "center":
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        else:
            if rng is None:
                raise ValueError("a random crop needs an rng (numpy Generator); the datasets pass one per item")
            left = int(rng.integers(0, new_w - self.size + 1))
            top = int(rng.integers(0, new_h - self.size + 1))
        image = image.crop((left, top, left + self.size, top + self.size))
        # In numpy: on a busy CPU, small torch element-wise ops in loader workers cost 10x more than this.
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
        return torch.from_numpy(np.ascontiguousarray(pixels / 127.5 - 1.0, dtype=np.float32))


def source_size_for(transform: ImageTransform, available: list[int]) -> int:
    """Of several pre-rendered sizes of one image, the smallest that needs no upscaling (else the largest)."""
    enough = [s for s in available if s >= transform.resize_to]
    return min(enough) if enough else max(available)


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-item randomness that depends only on (seed, epoch, index), never on which worker loads the item."""
    return np.random.default_rng([seed, epoch, index])


__all__ = ["IMAGE_EXTENSIONS", "ImageTransform", "load_rgb", "to_rgb", "source_size_for", "rng_for"]
