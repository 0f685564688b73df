"""Streaming image-caption pairs from webdataset-style tar shards.

A shard is a plain tar file. Files that share a key (the member path up to the first "." of its file name) form one
sample: `0001.png` + `0001.txt` is the image and caption of sample "0001". Images may be jpg, jpeg, png or webp;
the caption is UTF-8 text. Members of one sample must be adjacent, as every webdataset writer (and
`write_webdataset_shards`) leaves them.

Reading is split over every data-loading process of the job: slot = rank * num_workers + worker id. With at least as
many shards as slots each slot reads whole shards (shard i goes to slot i mod slots); with fewer, every slot reads all
shards and keeps every slots-th sample. Either way each sample is seen exactly once per pass. Whole-shard splitting
can give ranks a few more or fewer samples per pass, so train for a number of steps and restart the iterator when it
runs out, rather than counting epochs in lockstep across ranks.

The plain `tarfile` module is used instead of the `webdataset` package so that splitting and corrupt-sample handling
are a few visible lines here rather than pipeline options.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from muse.data.images import ImageTransform, load_rgb
from persist import replace_synced

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class WebDatasetImages(IterableDataset):
    """Iterable dataset of dict(image=(3, H, W) float in [-1, 1], caption=str, key=str) from tar shards.

    `shards` is a directory (all `*.tar` in it), one path, or a list of paths. `rank`/`world_size` default to
    torch.distributed's when a process group is initialized, else 0/1. With `shuffle`, the shard order is permuted per
    epoch (the same permutation on every rank, so the split stays a partition) and samples pass through a shuffle buffer
    of `shuffle_buffer` items. Corrupt or incomplete samples are skipped and counted in one warning per pass of each
    worker. Call `set_epoch` before each pass to change the order and the random crops.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        transform: ImageTransform,
        *,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = list_shards(shards)
        self.transform = transform
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        rank, world_size = self._rank_and_world_size()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * num_workers + worker, world_size * num_workers

        order = np.arange(len(self.shards))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        shards = [self.shards[i] for i in order]
        split_by_shard = len(shards) >= slots
        if split_by_shard:
            shards = shards[slot::slots]

        rng = np.random.default_rng([self.seed, self.epoch, slot, slots])
        skipped = {"samples": 0, "shards": 0}
        raw = (
            sample
            for n, sample in enumerate(read_samples(shards, skipped))
            if split_by_shard or n % slots == slot
        )
        if self.shuffle and self.shuffle_buffer > 1:
            raw = shuffled(raw, self.shuffle_buffer, rng)
        try:
            for key, image_bytes, caption in raw:
                try:
                    image = load_rgb(image_bytes)
                except Exception:  # noqa: BLE001 - any decode failure means "skip this sample"
                    skipped["samples"] += 1
                    continue
                yield {"image": self.transform(image, rng), "caption": caption, "key": key}
        finally:
            if skipped["samples"] or skipped["shards"]:
                warnings.warn(
                    f"WebDatasetImages (rank {rank}, worker {worker}): skipped {skipped['samples']} corrupt or "
                    f"incomplete samples and {skipped['shards']} unreadable shard(s)",
                    stacklevel=2,
                )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            if self.rank is None or self.world_size is None:
                raise ValueError("give both rank and world_size, or neither")
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


def list_shards(shards: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(shards, (str, Path)):
        path = Path(shards)
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in {path}")
            return found
        shards = [path]
    paths = [Path(p) for p in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing)}")
    return paths


def read_samples(shards: Iterable[Path], skipped: dict[str, int]) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) for each complete sample; incomplete samples and unreadable shards are counted in
    `skipped` (keys "samples", "shards") rather than raised."""
    for shard in shards:
        try:
            for key, files in grouped_members(shard):
                image_ext = next((ext for ext in IMAGE_EXTS if ext in files), None)
                if image_ext is None or "txt" not in files:
                    skipped["samples"] += 1
                    continue
                try:
                    caption = files["txt"].decode("utf-8").strip()
                except UnicodeDecodeError:
                    skipped["samples"] += 1
                    continue
                yield key, files[image_ext], caption
        except (tarfile.TarError, OSError, EOFError):
            # A truncated or damaged tar: the samples read so far were yielded; the rest of this shard is lost.
            skipped["shards"] += 1


def grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar and group adjacent members by key: ("dir/0001", {"png": b"...", "txt": b"..."})."""
    key, files = None, {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            member_key = f"{directory}/{stem}" if directory else stem
            if member_key != key:
                if key is not None:
                    yield key, files
                key, files = member_key, {}
            files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def shuffled(items: Iterator, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle of a stream with a fixed-size buffer (each new item swaps out a random buffered one)."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def write_webdataset_shards(
    samples: Iterable[tuple[str, Image.Image | bytes, str]],
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "shard",
) -> list[Path]:
    """Write (key, image, caption) samples to `out_dir/<prefix>-000000.tar`, ... and return the shard paths.

    A PIL image is encoded as `image_format`; bytes are stored as they are under that extension. Keys must be unique
    and contain no "." (the dot separates key from extension). Each shard is written to a `.tmp` file and renamed
    into place when complete, so a reader never sees half a shard.
    """
    if image_format not in _PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_PIL_FORMATS)}, got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    tar, tmp, count = None, None, 0
    try:
        for key, image, caption in samples:
            if "." in key.rpartition("/")[2] or not key:
                raise ValueError(f"sample key must be non-empty and contain no '.': {key!r}")
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            if tar is None:
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                tmp = paths[-1].with_name(paths[-1].name + ".tmp")
                tar = tarfile.open(tmp, mode="w")
            if isinstance(image, Image.Image):
                encoded = io.BytesIO()
                image.save(encoded, format=_PIL_FORMATS[image_format])
                image = encoded.getvalue()
            add_member(tar, f"{key}.{image_format}", image)
            add_member(tar, f"{key}.txt", caption.encode("utf-8"))
            count += 1
            if count == samples_per_shard:
                finish(tar, tmp, paths[-1])
                tar, count = None, 0
        if tar is not None:
            finish(tar, tmp, paths[-1])
            tar = None
    finally:
        if tar is not None:  # an exception mid-shard: drop the partial file
            tar.close()
            tmp.unlink(missing_ok=True)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def finish(tar: tarfile.TarFile, tmp: Path, path: Path) -> None:
    tar.close()
    replace_synced(tmp, path)
