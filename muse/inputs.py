"""Inputs of the pipeline's tasks, coerced and checked: prompts, seeds, pads, images and masks (anchor: diffusers'
`VaeImageProcessor`). Every function raises TypeError or ValueError naming the argument (and the file), never an
error from inside PIL, numpy or torch.

Images come as PIL images, numpy arrays, tensors, encoded bytes (PNG, JPEG or WebP) or file paths, or a list of
them of one size, and become (N, 3, H, W) float32 in [-1, 1]; masks become (N, H, W) bool, True = regenerate.
Files and bytes are read with care, since they may come from anyone (the server, the command line):

* only a regular file is opened -- a directory, a FIFO or a device is refused without reading it (a FIFO would block,
  /dev/zero never end);
* the size is read from the header and checked against the pipeline's `limits.max_pixels` before any pixel is
  decoded (a 10000 x 10000 PNG is a few kilobytes);
* only PNG, JPEG and WebP are decoded (`DECODED_FORMATS`): other formats' decoders are not exposed to them (PIL would
  hand an EPS file to Ghostscript).
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import random
import re
import stat
from typing import Any, BinaryIO, Callable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from muse.data.images import to_rgb
from muse.options import LimitExceeded
from transformer.text import check_text

MAX_SEED = 2**32  # seeds are 32-bit so that sub-streams (windows, stages, edit rounds) can use the high word
EDIT_MODES = ("random", "confidence")
DECODED_FORMATS = ("PNG", "JPEG", "WEBP")  # PIL's names of the only file formats decoded
# First bytes of formats we do not decode, to name them in the refusal (PIL is not asked: its parsers are the risk).
OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\0": "TIFF", b"MM\0*": "TIFF", b"%!PS": "EPS",
                 b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF", b"8BPS": "PSD", b"\0\0\1\0": "ICO", b"icns": "ICNS",
                 b"\x00\x00\x00\x0cjP": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000", b"qoif": "QOI"}

# One image (or mask) in any of these forms, or a list of them of one size.
ImageInput = Union[Image.Image, np.ndarray, Tensor, bytes, str, os.PathLike, Sequence]
MaskInput = Union[Image.Image, np.ndarray, Tensor, bytes, str, os.PathLike, Sequence]
_FORMS = "a PIL image, a path, encoded bytes, a numpy array or a tensor"


# --------------------------------------------------------------------------------------------------------------------
# Prompts, counts, seeds, pads


def prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
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


def check_int(value: int, name: str) -> int:
    """A positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_seed(seed: int | Sequence[int] | None) -> None:
    """The form of `seed`: None, an integer, or a list of integers (their count and range: `seed_list`)."""
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return
    if not isinstance(seed, (list, tuple)):
        raise TypeError(f"seed must be an integer, a list of integers or None, got {type(seed).__name__}")


def seed_list(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: int s -> s, s+1, ...; a list -> itself; None -> a random base seed, counted up."""
    if seed is None:
        base = random.SystemRandom().randrange(MAX_SEED - n)
        return [base + i for i in range(n)]
    check_seed(seed)
    if isinstance(seed, numbers.Integral):
        seeds = [int(seed) + i for i in range(n)]
    else:
        if len(seed) != n:
            raise ValueError(f"seed is a list of {len(seed)} but there are {n} images; give one seed per image")
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seed):
            raise TypeError("every seed must be an integer")
        seeds = [int(s) for s in seed]
    if min(seeds) < 0 or max(seeds) >= MAX_SEED:
        raise ValueError(f"seeds must lie in [0, 2**32), got {min(seeds)}..{max(seeds)}")
    return seeds


def check_pad(pad: Sequence[int]) -> tuple[int, int, int, int]:
    """Four non-negative integers (left, top, right, bottom) in pixels."""
    if not isinstance(pad, (list, tuple)) or len(pad) != 4 \
            or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in pad):
        raise ValueError(f"pad must be four integers (left, top, right, bottom) in pixels, got {pad!r}")
    pad = tuple(int(p) for p in pad)
    if any(p < 0 for p in pad):
        raise ValueError(f"pad must not be negative, got {pad}")
    return pad


def check_pad_stride(pad: tuple[int, int, int, int], stride: int) -> None:
    if any(p % stride for p in pad):
        raise ValueError(f"pad {pad} must be multiples of {stride} pixels (one token at this resolution)")


def check_size(images: Tensor, stride: int, name: str) -> None:
    """(N, 3, H, W) images with sides positive multiples of `stride`."""
    height, width = images.shape[-2:]
    if height == 0 or width == 0 or height % stride or width % stride:
        raise ValueError(f"{name} is {width}x{height} pixels; width and height must be positive multiples of "
                         f"{stride} (the pixels per token at this resolution)")


def broadcast(values: list, n: int, name: str, of: str) -> list:
    """`values` for n things (`of` names them): one value broadcasts, n pair up."""
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"got {len(values)} values for {name} but {n} {of}; give one or {n}")


def paired(prompts: list[str], images: Tensor, masks: Tensor | None = None) -> tuple[list[str], Tensor, Tensor | None]:
    """Pair prompts with images (N, 3, H, W) and masks (N, H, W): equal counts pair up, a count of 1 broadcasts."""
    counts = [len(prompts), images.shape[0]] + ([] if masks is None else [masks.shape[0]])
    n = max(counts)
    if any(c not in (1, n) for c in counts):
        raise ValueError(f"cannot pair {' / '.join(map(str, counts))} prompts / images / masks: give one of each, or "
                         "equal numbers")

    def expand(x: Tensor) -> Tensor:
        return x.expand(n, *x.shape[1:])

    return broadcast(prompts, n, "prompt", "images"), expand(images), None if masks is None else expand(masks)


# --------------------------------------------------------------------------------------------------------------------
# Image files and bytes


def file_problem(path: str | os.PathLike, expected: str = "an image file") -> str | None:
    """What keeps `path` from being read as a file, in words ("does not exist", "is a directory, not an image file",
    "is a FIFO, not a regular file", ...), or None for a regular file. Reads nothing, so it never blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return _mode_problem(mode, expected)


def _mode_problem(mode: int, expected: str = "an image file") -> str | None:
    if stat.S_ISDIR(mode):
        return f"is a directory, not {expected}"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"is {kind}, not a regular file"


def _refuse(problem: str | None, where: str, name: str) -> None:
    if problem == "does not exist":
        raise FileNotFoundError(f"{name}: {where} does not exist")
    if problem is not None:
        raise ValueError(f"{name}: {where} {problem}")


def open_image(source: str | os.PathLike | bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """The image file at a path, or encoded image bytes, fully decoded -- only a regular file, only PNG, JPEG or WebP,
    and only when its header's size is within `max_pixels`. FileNotFoundError or ValueError naming it otherwise."""
    with _opened(source, name) as (file, what), _header(file, what, max_pixels) as image:
        _check_pixels(image, what, max_pixels)  # from the header: no pixel decoded yet
        try:
            image.load()  # decode now: a truncated file fails here, with its name
        except Image.DecompressionBombError as e:
            raise ValueError(f"{what} is too large to decode safely ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{what} is truncated or corrupt ({e})") from None
        return image


def image_size(source: str | os.PathLike | bytes, name: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of an image file or bytes from its header, refused as `open_image` refuses it (not a regular
    file, not PNG, JPEG or WebP, over `max_pixels`), decoding no pixel: what the command line checks before it loads a
    model, and the server before it accepts a request."""
    with _opened(source, name) as (file, what), _header(file, what, max_pixels) as image:
        _check_pixels(image, what, max_pixels)
        return image.size


def _check_pixels(image: Image.Image, what: str, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise LimitExceeded(f"{what} is {width}x{height} pixels; the image's pixels", width * height, "max_pixels",
                            max_pixels)


@contextlib.contextmanager
def _opened(source: str | os.PathLike | bytes, name: str) -> Iterator[tuple[BinaryIO, str]]:
    """(a binary file of `source`, how errors name it: "image: photo.png"); a path only if it is a regular file."""
    if isinstance(source, (bytes, bytearray)):
        yield io.BytesIO(source), f"{name}: the image bytes"
        return
    where = os.fspath(source)
    _refuse(file_problem(where), where, name)
    # Opened without blocking (a regular file swapped for a FIFO after the check cannot hang us) and checked again
    # on the open file itself.
    try:
        fd = os.open(where, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: {where} does not exist") from None
    except OSError as e:
        raise ValueError(f"{name}: {where} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        _refuse(_mode_problem(os.fstat(fd).st_mode), where, name)
        yield file, f"{name}: {where}"


def _header(file: BinaryIO, what: str, max_pixels: int | None = None) -> Image.Image:
    """`file` opened by PIL as PNG, JPEG or WebP -- its header read, no pixel decoded -- or ValueError naming it
    (and the format, when it is another one; and `max_pixels`, when it is larger than PIL itself opens)."""
    try:
        return Image.open(file, formats=list(DECODED_FORMATS))
    except UnidentifiedImageError:
        file.seek(0)
        head = file.read(16)
        other = next((fmt for magic, fmt in OTHER_FORMATS.items() if head.startswith(magic)), None)
        if other is not None:
            raise ValueError(f"{what} is in {other} format; musegen decodes PNG, JPEG and WebP only") from None
        raise ValueError(f"{what} is not an image file PIL can read (not a PNG, JPEG or WebP image, or truncated or "
                         "corrupt before its header ends)") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, far above ours, fires on the header
        if max_pixels is None:
            raise ValueError(f"{what} is too large to decode safely ({e})") from None
        claimed = re.search(r"\((\d+) pixels\)", str(e))  # PIL says "Image size (N pixels) exceeds limit ..."
        raise LimitExceeded(f"{what} claims more pixels than PIL decodes safely; the image's pixels",
                            int(claimed.group(1)) if claimed else max_pixels + 1, "max_pixels", max_pixels) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what} is truncated or corrupt ({e})") from None


# --------------------------------------------------------------------------------------------------------------------
# Images and masks


def check_image_form(image: Any, name: str) -> None:
    """TypeError unless `image` is one of the accepted forms, or a (flat) list of them; reads nothing."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name} is an empty list")
        for i, item in enumerate(image):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"{name}[{i}] must be {_FORMS}, got a nested {type(item).__name__}")
            check_image_form(item, f"{name}[{i}]")
        return
    if not isinstance(image, (Image.Image, np.ndarray, Tensor, bytes, bytearray, str, os.PathLike)):
        raise TypeError(f"{name} must be {_FORMS}, got {type(image).__name__}")


def image_tensor(image: ImageInput, name: str, max_pixels: int | None = None) -> Tensor:
    """Any accepted image form, or a list of them -> (N, 3, H, W) float32 in [-1, 1] on the CPU. Files and bytes
    over `max_pixels` are refused from their header."""
    if isinstance(image, (list, tuple)):
        return _stacked(list(image), lambda item, where: image_tensor(item, where, max_pixels), name)
    if isinstance(image, (bytes, bytearray, str, os.PathLike)):
        image = open_image(image, name, max_pixels)
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
    raise TypeError(f"{name} must be {_FORMS}, got {type(image).__name__}")


def mask_tensor(mask: MaskInput, name: str, max_pixels: int | None = None) -> Tensor:
    """Any accepted mask form -> (N, H, W) bool on the CPU, True = regenerate.

    PIL and uint8 masks are white = regenerate (>= 128) unless they hold only 0 and 1; float masks are >= 0.5. A list
    of masks stacks.
    """
    if isinstance(mask, (list, tuple)):
        return _stacked(list(mask), lambda item, where: mask_tensor(item, where, max_pixels), name)
    if isinstance(mask, (bytes, bytearray, str, os.PathLike)):
        mask = open_image(mask, name, max_pixels)
    if isinstance(mask, Image.Image):
        mask = np.asarray(_mask_grey(mask))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be {_FORMS}, got {type(mask).__name__}")
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


def _stacked(items: list, convert: Callable[[Any, str], Tensor], name: str) -> Tensor:
    """A list of images (or masks) of one size, each in any accepted form -> one batch."""
    if not items:
        raise ValueError(f"{name} is an empty list")
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            raise TypeError(f"{name}[{i}] must be {_FORMS}, got a nested {type(item).__name__}")
    parts = [convert(item, f"{name}[{i}]") for i, item in enumerate(items)]
    sizes = {tuple(p.shape[-2:]) for p in parts}
    if len(sizes) > 1:
        raise ValueError(f"the {name} list mixes sizes {sorted(sizes)} (height, width); give images of one size")
    return torch.cat(parts)
