"""The emoji image-caption dataset: every emoji concept drawn in three art styles, captioned "red apple, noto style".

Sources (npm packages, pinned in `PACKAGES`, fetched once into a cache directory with `npm pack`):

* artwork: the Iconify JSON sets `@iconify-json/noto`, `@iconify-json/twemoji` and `@iconify-json/fluent-emoji-flat`
  (styles "noto", "twemoji", "fluent"). Each set's `chars.json` maps an emoji's codepoints (lowercase hex joined by
  "-", without the FE0F variation selector) to an icon name, which is how icons are matched to concepts: icon names
  differ between sets ("hugging-face" vs "smiling face with open hands") but codepoints do not.
* captions: `emojibase-data` `en/data.json` (label, hexcode, group, tags, skin-tone variants).

Each (concept, style) pair is rendered with resvg at every requested size onto a white background and saved as
`DIR/<size>/<style>/<concept>.png`. `DIR/metadata.jsonl` holds one row per pair: id, concept, label, style, caption,
emoji, hexcode, group, subgroup, tags, icon, files (size -> path), split, duplicate_of. `DIR/ATTRIBUTION.md` names
each source with its exact version and licence, read from the packages themselves.

Skin-tone variants are left out unless asked for, as are the "component" entries (bare skin-tone swatches and hair
parts) and the regional-indicator letters, which are building blocks of flags rather than emoji of their own.

Held-out split: see `heldout_pairs`. Pairs whose rendered pixels are identical to another pair's (at the smallest
size) are marked with `duplicate_of` (the id of the first such pair) and always kept in training, because a held-out
image whose exact twin is in the training set would measure memorization, not generalization.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES: dict[str, str] = {
    "@iconify-json/noto": "1.2.9",
    "@iconify-json/twemoji": "1.2.5",
    "@iconify-json/fluent-emoji-flat": "1.2.6",
    "emojibase-data": "17.0.0",
}
STYLES: dict[str, str] = {
    "noto": "@iconify-json/noto",
    "twemoji": "@iconify-json/twemoji",
    "fluent": "@iconify-json/fluent-emoji-flat",
}
CAPTIONS_PACKAGE = "emojibase-data"
DEFAULT_NPM_DIR = Path("~/.cache/musegen/npm")
DEFAULT_SIZES = (64, 128, 256)
HELDOUT_FRACTION = 0.1
SKIPPED_GROUPS = {"component"}


class NpmError(RuntimeError):
    """npm is missing, or could not fetch a package."""


# ---------------------------------------------------------------------------------------------------------------------
# Fetching the packages


def fetch_npm_packages(npm_dir: Path, packages: Mapping[str, str] = PACKAGES) -> dict[str, Path]:
    """Unpack each `name@version` into `npm_dir/<name with / as +>@<version>/` (skipped when already there) and return
    name -> package directory. `npm pack` downloads only the tarball: no install scripts run, no dependencies."""
    npm_dir = Path(npm_dir).expanduser()
    npm_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, version in packages.items():
        target = npm_dir / f"{name.replace('/', '+')}@{version}"
        if not (target / "package.json").is_file():
            npm_pack(name, version, target)
        found[name] = target
    return found


def npm_pack(name: str, version: str, target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError(
            f"npm is needed to fetch {name}@{version} but is not installed: install Node.js with npm "
            f"(e.g. `apt-get install npm`), or unpack the package into {target} yourself"
        )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        try:
            result = subprocess.run(
                [npm, "pack", f"{name}@{version}", "--pack-destination", tmp, "--fetch-retries=1"],
                capture_output=True, text=True, timeout=600, cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise NpmError(f"npm pack {name}@{version} timed out: is the npm registry reachable?") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            lines = (result.stderr or result.stdout).strip().splitlines()
            detail = [line for line in lines if line.startswith("npm error")][:4] or lines[-3:]
            raise NpmError(
                f"npm could not fetch {name}@{version} (is the npm registry reachable?): " + " | ".join(detail)
            )
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(Path(tmp) / "x", filter="data")
        unpacked = Path(tmp) / "x" / "package"
        meta = json.loads((unpacked / "package.json").read_text(encoding="utf-8"))
        if (meta.get("name"), meta.get("version")) != (name, version):
            raise NpmError(f"npm returned {meta.get('name')}@{meta.get('version')} for {name}@{version}")
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / "package.json").is_file():  # not a concurrent fetch that finished first
                raise


# ---------------------------------------------------------------------------------------------------------------------
# Reading the sources


@dataclass(frozen=True)
class Concept:
    concept: str  # unique slug of the label, e.g. "red-apple"; also the file name
    label: str  # emojibase English label, e.g. "red apple"
    hexcode: str  # emojibase hexcode, e.g. "1F34E"
    emoji: str
    group: str
    subgroup: int | None
    tags: tuple[str, ...]


def normalize_hexcode(hexcode: str) -> str:
    """Codepoints as Iconify's chars.json spells them: lowercase, "-"-joined, without the FE0F selector."""
    return "-".join(part for part in hexcode.lower().split("-") if part != "fe0f")


def slugify(label: str) -> str:
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_label).strip("-")


def load_concepts(emojibase_dir: Path, *, include_skin_tones: bool) -> list[Concept]:
    """Emojibase entries in emojibase order (skin-tone variants right after their base when included)."""
    entries = json.loads((emojibase_dir / "en" / "data.json").read_text(encoding="utf-8"))
    groups = json.loads((emojibase_dir / "meta" / "groups.json").read_text(encoding="utf-8"))["groups"]
    chosen = []
    for entry in entries:
        group = groups.get(str(entry.get("group")))
        if group is None or group in SKIPPED_GROUPS:
            continue
        chosen.append((entry, group))
        if include_skin_tones:
            chosen += [(skin, group) for skin in entry.get("skins", [])]
    slugs = Counter(slugify(entry["label"]) for entry, _ in chosen)
    concepts = []
    for entry, group in chosen:
        slug = slugify(entry["label"])
        # Labels like "keycap: #" and "keycap: *" slugify alike; every member of such a clash gets its hexcode.
        if slugs[slug] > 1 or not slug:
            slug = f"{slug}-{entry['hexcode'].lower()}".strip("-")
        concepts.append(Concept(
            concept=slug,
            label=entry["label"],
            hexcode=entry["hexcode"],
            emoji=entry.get("emoji", ""),
            group=group,
            subgroup=entry.get("subgroup"),
            tags=tuple(entry.get("tags", ())),
        ))
    return concepts


@dataclass(frozen=True)
class IconSet:
    """One Iconify JSON icon set: icons, aliases, default box, and codepoints -> icon name."""

    style: str
    package: str
    directory: Path
    data: dict = field(repr=False)
    chars: dict[str, str] = field(repr=False)
    info: dict = field(repr=False)

    @classmethod
    def load(cls, style: str, package: str, directory: Path) -> IconSet:
        def read(name: str) -> dict:
            return json.loads((directory / name).read_text(encoding="utf-8"))

        chars = {normalize_hexcode(code): name for code, name in read("chars.json").items()}
        return cls(style, package, directory, read("icons.json"), chars, read("info.json"))

    def svg(self, name: str) -> str:
        """A standalone SVG document of icon `name`, without width and height (see `sized_svg`).

        Aliases are followed to their parent, collecting their flips and rotations; the icon box (left, top, width,
        height) comes from the first of alias, icon or set that defines it. A non-square box is centred (SVG's default
        xMidYMid meet), which the white background then fills.
        """
        box: dict[str, float] = {}
        h_flip = v_flip = False
        rotate = 0
        aliases, icons = self.data.get("aliases", {}), self.data["icons"]
        for _ in range(len(aliases) + 1):  # bounded, so an alias cycle in bad data cannot hang the build
            if name in icons:
                break
            alias = aliases[name]
            for key in ("left", "top", "width", "height"):
                if key in alias:
                    box.setdefault(key, alias[key])
            h_flip ^= bool(alias.get("hFlip"))
            v_flip ^= bool(alias.get("vFlip"))
            rotate += int(alias.get("rotate", 0))
            name = alias["parent"]
        icon = icons[name]
        h_flip ^= bool(icon.get("hFlip"))
        v_flip ^= bool(icon.get("vFlip"))
        rotate += int(icon.get("rotate", 0))
        # Iconify's defaults when neither alias, icon nor set gives a value: a 16x16 box at the origin.
        left, top, width, height = (
            box.get(key, icon.get(key, self.data.get(key, default)))
            for key, default in (("left", 0), ("top", 0), ("width", 16), ("height", 16))
        )
        body = icon["body"]
        # SVG applies the rightmost transform first: rotate about the centre, then mirror within the box.
        transforms = []
        if h_flip:
            transforms.append(f"translate({2 * left + width} 0) scale(-1 1)")
        if v_flip:
            transforms.append(f"translate(0 {2 * top + height}) scale(1 -1)")
        if rotate % 4:
            transforms.append(f"rotate({90 * (rotate % 4)} {left + width / 2} {top + height / 2})")
        if transforms:
            body = f'<g transform="{" ".join(transforms)}">{body}</g>'
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}">{body}</svg>'
        )


def sized_svg(svg: str, size: int) -> str:
    """`svg` from `IconSet.svg`, drawn `size` pixels square."""
    return svg.replace("<svg ", f'<svg width="{size}" height="{size}" ', 1)


# ---------------------------------------------------------------------------------------------------------------------
# The held-out split


def pair_score(concept: str, style: str) -> float:
    """A uniform number in [0, 1) fixed by sha256("concept|style"): the same on every machine and Python run."""
    digest = hashlib.sha256(f"{concept}|{style}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_pairs(pairs: Iterable[tuple[str, str]], fraction: float = HELDOUT_FRACTION) -> set[tuple[str, str]]:
    """The (concept, style) pairs to hold out: about `fraction` of all pairs, at most one style per concept.

    Held-out pairs test whether the model composes a concept it has seen with a style it has seen, so a concept is
    held out in one style at most and stays in training in its other styles; a concept drawn in only one style is
    never held out. For a concept with n >= 2 styles, the style with the lowest `pair_score` is held out when that
    score is below t = 1 - (1 - n * fraction) ** (1 / n): the minimum of n uniforms falls below t with probability
    n * fraction, so on average `fraction` of the concept's n pairs are held out. Everything depends only on the pair
    names, so the split is the same on every run and in every order.
    """
    styles_of: dict[str, set[str]] = defaultdict(set)
    for concept, style in pairs:
        styles_of[concept].add(style)
    held = set()
    for concept, styles in styles_of.items():
        n = len(styles)
        if n < 2:
            continue
        threshold = 1 - max(0.0, 1 - n * fraction) ** (1 / n)
        style = min(sorted(styles), key=lambda s: pair_score(concept, s))
        if pair_score(concept, style) < threshold:
            held.add((concept, style))
    return held


def assign_splits(rows: list[dict], digests: Sequence[str], fraction: float = HELDOUT_FRACTION) -> None:
    """Set `duplicate_of` and `split` on rows (dicts with id, concept, style), given each row's pixel digest.

    The first row with a digest is the original and later ones name it in `duplicate_of`. The split follows
    `heldout_pairs`, except that a row whose pixels appear in any other row stays in training.
    """
    first_with: dict[str, str] = {}
    for row, digest in zip(rows, digests, strict=True):
        first = first_with.setdefault(digest, row["id"])
        row["duplicate_of"] = None if first == row["id"] else first
    shared = Counter(digests)
    held = heldout_pairs(((row["concept"], row["style"]) for row in rows), fraction)
    for row, digest in zip(rows, digests):
        row["split"] = "heldout" if (row["concept"], row["style"]) in held and shared[digest] == 1 else "train"


# ---------------------------------------------------------------------------------------------------------------------
# Rendering (runs in pool workers: keep it free of torch and of large arguments)


def render_pair(task: tuple[str, list[tuple[int, str]]]) -> str:
    """Render (svg, [(size, path), ...]) (smallest size first) to RGB PNGs on white; return the sha256 of the
    smallest image's pixels, which is what duplicate detection compares."""
    import resvg_py
    from PIL import Image

    svg, outputs = task
    digest = ""
    for size, path in outputs:
        png = resvg_py.svg_to_bytes(svg_string=sized_svg(svg, size), background="#ffffff", skip_system_fonts=True)
        with Image.open(io.BytesIO(bytes(png))) as image:
            rgb = image.convert("RGB")  # opaque already: resvg composited the artwork over the white background
        if rgb.size != (size, size):
            raise RuntimeError(f"resvg rendered {path} at {rgb.size}, expected {size}x{size}")
        if not digest:
            digest = hashlib.sha256(rgb.tobytes()).hexdigest()
        tmp = f"{path}.tmp"
        rgb.save(tmp, format="PNG")
        os.replace(tmp, path)
    return digest


# ---------------------------------------------------------------------------------------------------------------------
# The builder


@dataclass(frozen=True)
class EmojiBuildSummary:
    out: Path
    sizes: tuple[int, ...]
    concepts: int
    rows: int
    per_style: dict[str, int]
    heldout: int
    duplicates: int
    images: int
    seconds: float
    versions: dict[str, str]

    @property
    def heldout_fraction(self) -> float:
        return self.heldout / self.rows if self.rows else 0.0

    def __str__(self) -> str:
        styles = ", ".join(f"{style} {count}" for style, count in self.per_style.items())
        return (
            f"emoji dataset in {self.out}: {self.concepts} concepts, {self.rows} (concept, style) pairs ({styles}); "
            f"{self.heldout} held out ({self.heldout_fraction:.1%}); {self.duplicates} exact duplicates marked; "
            f"{self.images} images at sizes {list(self.sizes)} in {self.seconds:.1f} s"
        )


def build_emoji_dataset(
    out: Path,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    limit: int | None = None,
    styles: Sequence[str] = tuple(STYLES),
    include_skin_tones: bool = False,
    npm_dir: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> EmojiBuildSummary:
    """Fetch the sources if needed, render every (concept, style) pair at every size, write metadata and attribution.

    `limit` keeps the first concepts (emojibase order) that at least one chosen style draws. `workers` <= 1 renders in
    this process. Files of an earlier build in `out` are overwritten; metadata.jsonl is replaced last, atomically.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    out = Path(out)
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if not sizes or sizes[0] <= 0:
        raise ValueError(f"sizes must be positive, got {sizes}")
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown styles {unknown}; choose from {list(STYLES)}")
    needed = {CAPTIONS_PACKAGE} | {STYLES[style] for style in styles}
    packages = {name: version for name, version in PACKAGES.items() if name in needed}
    dirs = fetch_npm_packages(npm_dir or DEFAULT_NPM_DIR, packages)
    icon_sets = [IconSet.load(style, STYLES[style], dirs[STYLES[style]]) for style in styles]

    rows: list[dict] = []
    tasks: list[tuple[str, list[tuple[int, str]]]] = []
    kept = 0
    for concept in load_concepts(dirs[CAPTIONS_PACKAGE], include_skin_tones=include_skin_tones):
        if limit is not None and kept >= limit:
            break
        drawn = [s for s in icon_sets if normalize_hexcode(concept.hexcode) in s.chars]
        kept += bool(drawn)
        for icon_set in drawn:
            icon = icon_set.chars[normalize_hexcode(concept.hexcode)]
            files = {str(size): f"{size}/{icon_set.style}/{concept.concept}.png" for size in sizes}
            rows.append({
                "id": f"{icon_set.style}/{concept.concept}",
                "concept": concept.concept,
                "label": concept.label,
                "style": icon_set.style,
                "caption": f"{concept.label}, {icon_set.style} style",
                "emoji": concept.emoji,
                "hexcode": concept.hexcode,
                "group": concept.group,
                "subgroup": concept.subgroup,
                "tags": list(concept.tags),
                "icon": f"{icon_set.data['prefix']}:{icon}",
                "files": files,
            })
            tasks.append((icon_set.svg(icon), [(size, str(out / files[str(size)])) for size in sizes]))
    for size in sizes:
        for icon_set in icon_sets:
            (out / str(size) / icon_set.style).mkdir(parents=True, exist_ok=True)

    # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork reliably.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    digests: list[str] = []
    bar = tqdm(total=len(tasks), desc="rendering emoji", unit="pair", disable=not progress)
    with bar, pool or nullcontext():
        for digest in pool.imap(render_pair, tasks, chunksize=16) if pool else map(render_pair, tasks):
            digests.append(digest)
            bar.update()

    assign_splits(rows, digests)

    write_atomic(out / "metadata.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    per_style = Counter(row["style"] for row in rows)
    write_atomic(out / "ATTRIBUTION.md", attribution(icon_sets, dirs[CAPTIONS_PACKAGE], sizes, per_style))
    return EmojiBuildSummary(
        out=out,
        sizes=sizes,
        concepts=len({row["concept"] for row in rows}),
        rows=len(rows),
        per_style={s.style: per_style[s.style] for s in icon_sets},
        heldout=sum(row["split"] == "heldout" for row in rows),
        duplicates=sum(row["duplicate_of"] is not None for row in rows),
        images=len(rows) * len(sizes),
        seconds=time.perf_counter() - start,
        versions=packages,
    )


def attribution(
    icon_sets: Sequence[IconSet], emojibase_dir: Path, sizes: Sequence[int], counts: Mapping[str, int]
) -> str:
    """ATTRIBUTION.md text, with every licence and author read from the packages' own metadata."""
    lines = [
        "# Attribution",
        "",
        "This dataset was generated by musegen (`muse data emoji`) from the npm packages below.",
        f"Each image is the source artwork rasterized with resvg at {', '.join(map(str, sizes))} px and composited on",
        "a white background; nothing else was changed.",
        "Captions are emojibase's English labels followed by the style name.",
        "",
    ]
    for icon_set in icon_sets:
        package_json = json.loads((icon_set.directory / "package.json").read_text(encoding="utf-8"))
        licence, author = icon_set.info.get("license", {}), icon_set.info.get("author", {})
        name = icon_set.info.get("name", icon_set.style)
        lines += [
            f"## {name} (style \"{icon_set.style}\", {counts[icon_set.style]} concepts)",
            "",
            f"- package: `{package_json['name']}@{package_json['version']}` (Iconify JSON, "
            f"{package_json.get('homepage', '')})",
            f"- author: {author.get('name', 'unknown')} {author.get('url', '')}".rstrip(),
            f"- licence: {licence.get('title', '?')} (SPDX `{licence.get('spdx', package_json.get('license', '?'))}`) "
            f"{licence.get('url', '')}".rstrip(),
            f"- licence field of package.json: `{package_json.get('license', '?')}`",
            "",
        ]
    package_json = json.loads((emojibase_dir / "package.json").read_text(encoding="utf-8"))
    repository = package_json.get("repository", {})
    lines += [
        "## Captions: emojibase-data",
        "",
        f"- package: `{package_json['name']}@{package_json['version']}`",
        f"- author: {package_json.get('author', 'unknown')}",
        f"- licence: `{package_json.get('license', '?')}` (package.json; LICENSE file in the package)",
        f"- repository: {repository.get('url', repository) if isinstance(repository, dict) else repository}",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# `muse data emoji`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="square sizes in pixels")
    parser.add_argument("--styles", nargs="+", choices=list(STYLES), default=list(STYLES))
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N concepts (quick trials)")
    parser.add_argument("--include-skin-tones", action="store_true", help="add every skin-tone variant as a concept")
    parser.add_argument("--npm-dir", type=Path, default=None, help=f"package cache (default {DEFAULT_NPM_DIR})")
    parser.add_argument("--workers", type=int, default=2, help="render processes")


def main(args: argparse.Namespace) -> int:
    try:
        summary = build_emoji_dataset(
            args.out,
            args.sizes,
            limit=args.limit,
            styles=args.styles,
            include_skin_tones=args.include_skin_tones,
            npm_dir=args.npm_dir,
            workers=args.workers,
        )
    except NpmError as error:
        print(f"muse data emoji: {error}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the emoji image-caption dataset.")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
