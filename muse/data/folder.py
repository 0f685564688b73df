"""Image-caption pairs from a folder.

Two layouts are read:

* `root/metadata.jsonl`, one JSON object per line with `caption` and either `file` (a path relative to `root`) or
  `files` (pre-rendered sizes, `{"64": "64/noto/red-apple.png", ...}`, as the emoji builder writes). Optional fields:
  `id` (the item key; default the file path without extension), `split` (default "train"), `duplicate_of`.
* no metadata file: every image under `root` (recursively) with a sidecar caption `<same name>.txt`; the split is
  "train" for all of them.

Unreadable images (missing, truncated, not an image) are found once, when the dataset is built, and reported in one
warning; they are left out rather than crashing a training run hours later.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from muse.data.images import IMAGE_EXTENSIONS, ImageTransform, load_rgb, rng_for, source_size_for
from persist import bounded_repr, parse_json

METADATA_FILE = "metadata.jsonl"


class ImageCaptionDataset(Dataset):
    """Map-style dataset of dict(image=(3, H, W) float in [-1, 1], caption=str, key=str).

    `split` keeps only rows of that split ("train", "heldout", ...); `drop_duplicates` leaves out rows whose
    `duplicate_of` is set. Random crops draw from a generator seeded by (seed, epoch, index), so the same seed gives the
    same crops whatever the number of workers; call `set_epoch` to get new crops each epoch. The kept metadata records
    are in `rows` (same order as the items) for anything the items leave out. With `all_captions`, a row with a
    `captions` list (other phrasings of its caption) is one item per phrasing, the canonical `caption` among them.
    """

    def __init__(
        self,
        root: str | Path,
        transform: ImageTransform,
        *,
        split: str | None = None,
        drop_duplicates: bool = False,
        seed: int = 0,
        all_captions: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        all_rows = read_rows(self.root)
        if not all_rows:
            raise ValueError(
                f"no captioned images in {self.root} (expected {METADATA_FILE} or images with .txt captions)"
            )
        candidates = [
            row
            for row in all_rows
            if (split is None or row.get("split", "train") == split)
            and not (drop_duplicates and row.get("duplicate_of"))
        ]
        self.rows: list[dict] = []
        self.paths: list[Path] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        bad: list[str] = []
        for row in candidates:
            path = self.root / pick_file(row, transform)
            if not readable(path):
                bad.append(str(path.relative_to(self.root)))
                continue
            default_key = path.relative_to(self.root).with_suffix("").as_posix()
            phrasings = captions_of(row) if all_captions else [row["caption"]]
            for k, caption in enumerate(phrasings):
                self.rows.append(row)
                self.paths.append(path)
                key = str(row.get("id", default_key))
                self.keys.append(key if k == 0 else f"{key}#{k}")  # one key per item, the canonical one unmarked
                self.captions.append(caption)
        if bad and not self.rows:
            raise ValueError(f"{self.root}: none of the {len(candidates)} images could be read (e.g. {bad[0]}): "
                             "missing, truncated or not images")
        if bad:
            shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            warnings.warn(
                f"{self.root}: skipped {len(bad)} of {len(candidates)} images that could not be read: {shown}",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} items")  # ends `for item in dataset`
        index %= len(self.rows)
        # Files checked at construction can still go bad (replaced or truncated while training); then the next
        # readable item stands in, so a long run loses one sample instead of crashing.
        for offset in range(len(self.rows)):
            i = (index + offset) % len(self.rows)
            try:
                image = load_rgb(self.paths[i])
            except Exception as error:  # noqa: BLE001 - any decode failure means "skip this file"
                warnings.warn(f"skipped unreadable image {self.paths[i]}: {error}", stacklevel=2)
                continue
            return {
                "image": self.transform(image, rng_for(self.seed, self.epoch, index)),
                "caption": self.captions[i],
                "key": self.keys[i],
            }
        raise RuntimeError(f"no readable images left in {self.root}")


def read_rows(root: Path) -> list[dict]:
    """The records of `root`: metadata.jsonl lines, else one record per image with a sidecar .txt caption."""
    metadata = root / METADATA_FILE
    if metadata.is_file():
        rows = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = parse_json(line, f"{metadata}:{number}")
            if not isinstance(row, dict) or "caption" not in row or not ("file" in row or "files" in row):
                raise ValueError(f"{metadata}:{number}: each line needs 'caption' and 'file' (or 'files')")
            if not isinstance(row["caption"], str):
                raise ValueError(f"{metadata}:{number}: 'caption' must be a string, got "
                                 f"{bounded_repr(row['caption'])}")
            files = [row["file"]] if "file" in row else row["files"].values() if isinstance(row["files"], dict) else None
            if files is None:
                raise ValueError(f"{metadata}:{number}: 'files' must map sizes to paths, got "
                                 f"{bounded_repr(row['files'])}")
            for file in files:
                _check_inside(root, file, f"{metadata}:{number}")
            rows.append(row)
        return rows
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
            rows.append({"file": path.relative_to(root).as_posix(), "caption": caption})
    return rows


def captions_of(row: dict) -> list[str]:
    """A row's phrasings: its `caption`, then the other strings of its `captions` list, without repeats."""
    others = row.get("captions") if isinstance(row.get("captions"), list) else []
    return list(dict.fromkeys([row["caption"], *(c for c in others if isinstance(c, str) and c.strip())]))


def _check_inside(root: Path, file: object, where: str) -> None:
    """A metadata path must name a file inside the dataset folder: relative, and not climbing out with "..", so a
    downloaded dataset cannot make training read (and a sample grid show) files elsewhere on the machine."""
    if not isinstance(file, str) or not file:
        raise ValueError(f"{where}: a file path must be a non-empty string, got {file!r}")
    if Path(file).is_absolute():
        raise ValueError(f"{where}: {file!r} is an absolute path; paths are relative to the dataset folder {root}")
    if not (root / file).resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{where}: {file!r} points outside the dataset folder {root}")


def pick_file(row: dict, transform: ImageTransform) -> str:
    if "file" in row:
        return row["file"]
    files = {int(size): path for size, path in row["files"].items()}
    return files[source_size_for(transform, list(files))]


def readable(path: Path) -> bool:
    """Cheap check that a file is an intact image: `verify` reads it through (PNG chunk checksums included) without
    decoding pixels, so a folder of tens of thousands of images is checked in seconds."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - missing, truncated or not an image: all mean "leave it out"
        return False
