"""The emoji image-caption dataset: every emoji concept in up to ten art styles, captioned "red apple, noto style".

Sources (npm packages, pinned in `PACKAGES`, fetched once into a cache directory with `npm pack`):

* artwork: Iconify JSON sets, one per style (`STYLES`): "noto", "twemoji" and "fluent" (Fluent Flat) from the first
  release; "blob" (Noto's first design), "emojione", "firefox" (Firefox OS), "streamline" and "fluent-color" (Fluent's
  gradient design); and, only when asked for, the CC BY-SA styles "openmoji" and "emojione-v1" (`OPT_IN_STYLES`).
  Icons are matched to emoji by codepoints: a set's `chars.json` maps codepoints (lowercase hex joined by "-", without
  the FE0F variation selector) to an icon name, because icon names differ between sets ("hugging-face" vs
  "smiling-face-with-open-hands") but codepoints do not. Sets whose chars.json is empty are matched by icon name
  instead, conservatively (see `NameIndex`).
* captions: `emojibase-data` `en/data.json` (label, hexcode, group, tags, skin-tone variants); its Unicode names and
  shortcodes also serve name matching. The phrasings are in `muse.data.captions`.

Each (concept, style) pair is rendered with resvg at every requested size onto a white background and saved as
`DIR/<size>/<style>/<concept>.png`. `DIR/metadata.jsonl` holds one row per pair: id, concept, label, style, caption
(the canonical phrasing), captions (every training phrasing, the canonical one first), emoji, hexcode, group,
subgroup, tags, skin_tone and base (a skin-tone variant's emojibase tone and base concept, else null), icon,
matched_by ("codepoints" or "names"), licence (SPDX id of the artwork), files (size -> path), split, duplicate_of.
`DIR/ATTRIBUTION.md` names each source with its exact version and licence, read from the packages themselves.

Skin-tone variants are left out unless asked for (captioned "waving hand, medium skin tone, noto style"), as are the
"component" entries (bare skin-tone swatches and hair parts) and the regional-indicator letters, which are building
blocks of flags rather than emoji of their own.

Held-out split: see `heldout_pairs` and `assign_splits`. Pairs whose rendered pixels are identical to another pair's
(at the smallest size) are marked with `duplicate_of` (the id of the first such pair) and kept in training, because a
held-out image whose exact twin is in the training set would measure memorization, not generalization.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
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
from typing import TYPE_CHECKING, Literal

from muse.data.captions import TRAIN_TEMPLATES, training_captions
from persist import atomic_write, atomic_write_text, fsync_dir, read_json

if TYPE_CHECKING:
    from PIL import Image

PACKAGES: dict[str, str] = {
    "@iconify-json/noto": "1.2.9",
    "@iconify-json/twemoji": "1.2.5",
    "@iconify-json/fluent-emoji-flat": "1.2.6",
    "@iconify-json/noto-v1": "1.2.5",
    "@iconify-json/emojione": "1.2.3",
    "@iconify-json/fxemoji": "1.2.2",
    "@iconify-json/streamline-emojis": "1.2.4",
    "@iconify-json/fluent-emoji": "1.2.7",
    "@iconify-json/openmoji": "1.2.29",
    "@iconify-json/emojione-v1": "1.2.3",
    "emojibase-data": "17.0.0",
}
STYLES: dict[str, str] = {  # style word in captions -> artwork package
    "noto": "@iconify-json/noto",
    "twemoji": "@iconify-json/twemoji",
    "fluent": "@iconify-json/fluent-emoji-flat",
    "blob": "@iconify-json/noto-v1",  # Noto's first design, known as the blobs
    "emojione": "@iconify-json/emojione",
    "firefox": "@iconify-json/fxemoji",  # Firefox OS
    "streamline": "@iconify-json/streamline-emojis",
    "fluent-color": "@iconify-json/fluent-emoji",  # Fluent's gradient "Color" design; "fluent" is its "Flat" one
    "openmoji": "@iconify-json/openmoji",
    "emojione-v1": "@iconify-json/emojione-v1",
}
# CC BY-SA 4.0 artwork: built only when asked for by --styles, so the default dataset (and the weights musegen ships,
# under Apache-2.0) holds no share-alike material. docs/ATTRIBUTION.md gives the reasoning.
OPT_IN_STYLES: tuple[str, ...] = ("openmoji", "emojione-v1")
DEFAULT_STYLES: tuple[str, ...] = tuple(style for style in STYLES if style not in OPT_IN_STYLES)
# Styles added together are split together, each group by `heldout_pairs` on its own pairs, so adding a group never
# moves a pair of an earlier group between training and held-out (see `assign_splits`).
SPLIT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("noto", "twemoji", "fluent"),  # the first release
    ("blob", "emojione", "firefox", "streamline", "fluent-color"),
    ("openmoji", "emojione-v1"),  # opt-in: its own group, so opting in leaves the default build's split alone
)
# The newest Emoji version that each name-matched set draws. A set cannot draw an emoji newer than itself, so a name
# that points at one is an older name of another emoji: noto-v1 and emojione "cricket" (now "cricket game"; the
# insect came in Emoji 5.0), fxemoji "window" (the U+1F5D4 symbol, not the Emoji 13 window). Read off each set's
# matches: above these versions they had 1 to 3 each, all such names, save emojione's early England and Scotland flags.
NEWEST_EMOJI: dict[str, float] = {"blob": 4.0, "emojione": 3.0, "firefox": 2.0, "emojione-v1": 2.0}
# Sets with a codepoint table whose icon names teach `NameIndex` how Iconify names each emoji.
NAME_REFERENCES: tuple[str, ...] = ("@iconify-json/noto", "@iconify-json/twemoji", "@iconify-json/fluent-emoji-flat")
SHORTCODE_SETS: tuple[str, ...] = ("cldr", "emojibase", "emojibase-legacy", "github", "iamcal", "joypixels")
CAPTIONS_PACKAGE = "emojibase-data"
DEFAULT_NPM_DIR = Path("~/.cache/musegen/npm")
DEFAULT_SIZES = (64, 128, 256)
HELDOUT_FRACTION = 0.1
SKIPPED_GROUPS = {"component"}
# The npm packages' JSON (an Iconify set's icons.json holds every SVG of the set: tens of megabytes) is read whole; the
# bound only turns a wrong file into a clear error instead of an exhausted memory.
PACKAGE_JSON_BYTES = 1024 * 1024 * 1024


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
        meta = read_json(unpacked / "package.json", PACKAGE_JSON_BYTES)
        if (meta.get("name"), meta.get("version")) != (name, version):
            raise NpmError(f"npm returned {meta.get('name')}@{meta.get('version')} for {name}@{version}")
        try:
            os.replace(unpacked, target)  # a directory: moved whole, so a fetch cut short leaves no package
            fsync_dir(target.parent)
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
    version: float = 0.0  # the Emoji version that introduced it
    skin_tone: int | tuple[int, ...] | None = None  # emojibase's tone (1 light .. 5 dark; one per person) of a variant
    base: str | None = None  # a skin-tone variant's base concept, e.g. "waving-hand"


def normalize_hexcode(hexcode: str) -> str:
    """Codepoints as Iconify's chars.json spells them: lowercase, "-"-joined, without the FE0F selector."""
    return "-".join(part for part in hexcode.lower().split("-") if part != "fe0f")


def slugify(label: str) -> str:
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_label).strip("-")


def load_concepts(emojibase_dir: Path, *, include_skin_tones: bool) -> list[Concept]:
    """Emojibase entries in emojibase order (skin-tone variants right after their base when included)."""
    entries = read_json(emojibase_dir / "en" / "data.json", PACKAGE_JSON_BYTES)
    groups = read_json(emojibase_dir / "meta" / "groups.json", PACKAGE_JSON_BYTES)["groups"]
    chosen = []  # (entry, group, base entry or None)
    for entry in entries:
        group = groups.get(str(entry.get("group")))
        if group is None or group in SKIPPED_GROUPS:
            continue
        chosen.append((entry, group, None))
        if include_skin_tones:
            chosen += [(skin, group, entry) for skin in entry.get("skins", [])]
    slugs = Counter(slugify(entry["label"]) for entry, _, _ in chosen)

    def slug_of(entry: dict) -> str:
        slug = slugify(entry["label"])
        # Labels like "keycap: #" and "keycap: *" slugify alike; every member of such a clash gets its hexcode.
        if slugs[slug] > 1 or not slug:
            slug = f"{slug}-{entry['hexcode'].lower()}".strip("-")
        return slug

    concepts = []
    for entry, group, base in chosen:
        tone = entry.get("tone")
        concepts.append(Concept(
            concept=slug_of(entry),
            label=entry["label"],
            hexcode=entry["hexcode"],
            emoji=entry.get("emoji", ""),
            group=group,
            subgroup=entry.get("subgroup"),
            # Variants carry no tags of their own in emojibase; they share their base emoji's.
            tags=tuple(entry.get("tags", base.get("tags", ()) if base else ())),
            version=float(entry.get("version", 0.0)),
            skin_tone=tuple(tone) if isinstance(tone, list) else tone,
            base=slug_of(base) if base else None,
        ))
    return concepts


def read_chars(directory: Path) -> dict[str, str]:
    """An Iconify package's chars.json as normalized codepoints -> icon name (empty when the set has no table)."""
    path = directory / "chars.json"
    chars = read_json(path, PACKAGE_JSON_BYTES) if path.is_file() else {}
    return {normalize_hexcode(code): name for code, name in chars.items()}


@dataclass(frozen=True)
class NameIndex:
    """Icon name -> codepoints, for the Iconify sets that ship an empty chars.json (all but a few emoji sets).

    Their icon names are slugs of an emoji name, but of which name depends on the set's age: the current CLDR name
    ("beaming-face-with-smiling-eyes"), an older one ("grinning-face-with-smiling-eyes", which today names another
    emoji), the Unicode character name ("sake-bottle-and-cup"), a shortcode ("smirk"), or one of those run together
    ("sakebottleandcup"). So a name is looked up under every reading at once, each with a strength (0 is strongest):
    emojibase labels and the icon names of the `NAME_REFERENCES` sets' chars.json (0); Unicode names and emojibase's
    shortcode sets (1); every key with its hyphens dropped, and "flag-for-X" read as "flag-X" (2). A name is matched only when
    all readings that know it agree on one emoji; a name that two readings give to different emoji is left out.

    Checked on the sets that have a chars.json, each left out of the references in turn: of the codepoints matched
    by name, the icon drawn is the one chars.json names for noto 3680 of 3682, twemoji 3930 of 3931, openmoji 3959
    of 3961 and fluent-emoji-flat 1542 of 1543; all but one of the rest are an older design of the same emoji.
    """

    keys: dict[str, dict[str, int]] = field(repr=False)  # slug -> {normalized codepoints: strongest strength}

    @classmethod
    def build(cls, emojibase_dir: Path, references: Iterable[Mapping[str, str]]) -> NameIndex:
        """From emojibase (every entry, skin tones and components included, so that their names are taken) and the
        chars of the reference sets (`read_chars`)."""
        keys: dict[str, dict[str, int]] = defaultdict(dict)

        def add(name: str, hexcode: str, strength: int) -> None:
            slug = slugify(name)
            for key, s in ((slug, strength), (_squashed(slug), 2)):
                if key and s < keys[key].get(hexcode, 3):
                    keys[key][hexcode] = s

        entries = read_json(emojibase_dir / "en" / "data.json", PACKAGE_JSON_BYTES)
        unicode_names = read_json(emojibase_dir / "meta" / "unicode-names.json", PACKAGE_JSON_BYTES)
        shortcodes = [
            read_json(emojibase_dir / "en" / "shortcodes" / f"{name}.json", PACKAGE_JSON_BYTES)
            for name in SHORTCODE_SETS
        ]
        for entry in entries:
            for item in [entry, *entry.get("skins", [])]:
                hexcode, code = normalize_hexcode(item["hexcode"]), item["hexcode"]
                add(item["label"], hexcode, 0)
                if code in unicode_names:
                    add(unicode_names[code], hexcode, 1)
                for table in shortcodes:
                    names = table.get(code, [])
                    for name in [names] if isinstance(names, str) else names:
                        add(name.replace("_", "-"), hexcode, 1)
        for chars in references:
            for hexcode, name in chars.items():
                add(name, hexcode, 0)
        return cls(dict(keys))

    def lookup(self, name: str) -> tuple[str, int] | None:
        """(codepoints, strength) of icon name `name`, or None when no reading knows it or readings disagree."""
        found: dict[str, int] = {}
        readings = [(name, 0)]
        if name.startswith("flag-for-"):
            readings.append(("flag-" + name.removeprefix("flag-for-"), 2))
        for reading, penalty in readings:
            for key, floor in ((reading, penalty), (_squashed(reading), 2)):
                for hexcode, strength in self.keys.get(key, {}).items():
                    found[hexcode] = min(found.get(hexcode, 3), max(strength, floor))
        return next(iter(found.items())) if len(found) == 1 else None

    def match(self, data: Mapping) -> dict[str, str]:
        """Codepoints -> icon name for an Iconify set's icons.json `data`.

        Names "X-1", "X-2", ... that are not themselves known are numbered designs of X (Streamline draws "girl-1",
        "girl-2", "girl-3" in three skin colours); the lowest number stands for X. When several icons match one emoji
        the strongest match wins, then a real icon over an alias, then the first name in sort order.
        """
        aliases = data.get("aliases", {})
        best: dict[str, tuple[int, int, bool, str]] = {}
        for name in sorted([*data["icons"], *aliases]):
            found, number = self.lookup(name), 0
            numbered = re.fullmatch(r"(.+)-(\d+)", name)
            if found is None and numbered:
                found, number = self.lookup(numbered.group(1)), int(numbered.group(2))
            if found is None:
                continue
            hexcode, strength = found
            rank = (number, strength, name in aliases, name)
            if hexcode not in best or rank < best[hexcode]:
                best[hexcode] = rank
        return {hexcode: rank[-1] for hexcode, rank in best.items()}


def _squashed(slug: str) -> str:
    return slug.replace("-", "")


@dataclass(frozen=True)
class IconSet:
    """One Iconify JSON icon set: icons, aliases, default box, and codepoints -> icon name."""

    style: str
    package: str
    directory: Path
    data: dict = field(repr=False)
    chars: dict[str, str] = field(repr=False)
    info: dict = field(repr=False)
    matched_by: Literal["codepoints", "names"] = "codepoints"  # how `chars` was made: from chars.json or by name

    @classmethod
    def load(cls, style: str, package: str, directory: Path, names: NameIndex | None = None) -> IconSet:
        """The set in `directory`; one without a chars.json table is matched by icon name through `names`."""

        def read(name: str) -> dict:
            return read_json(directory / name, PACKAGE_JSON_BYTES)

        data, chars = read("icons.json"), read_chars(directory)
        if chars:
            return cls(style, package, directory, data, chars, read("info.json"))
        if names is None:
            raise ValueError(f"{package} has no codepoints in chars.json: pass a NameIndex to match its icon names")
        return cls(style, package, directory, data, names.match(data), read("info.json"), "names")

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


def assign_splits(
    rows: list[dict],
    digests: Sequence[str],
    fraction: float = HELDOUT_FRACTION,
    groups: Sequence[Sequence[str]] | None = None,
) -> None:
    """Set `duplicate_of` and `split` on rows (dicts with id, concept, style), given each row's pixel digest.

    `groups` lists the styles split together (`SPLIT_GROUPS`); None puts every row in one group. Groups are taken in
    order, and rows in their given order within a group:

    1. the first row with a digest is the original and later ones name it in `duplicate_of`;
    2. a row whose pixels appear in an earlier group follows those rows: held out only if all of them are. So a later
       group neither puts a held-out image back into training nor changes an earlier group's split;
    3. any other row is held out when `heldout_pairs` of its group's pairs picks it and no other row of its group has
       the same pixels: a held-out image whose exact twin is in training would measure memorization.

    With a single group, rule 2 never applies and this is the split of the first release exactly.
    """
    if len(rows) != len(digests):
        raise ValueError(f"{len(rows)} rows but {len(digests)} digests")
    styles = {row["style"] for row in rows}
    group_of = {style: g for g, group in enumerate(groups or [styles]) for style in group}
    if styles - set(group_of):
        raise ValueError(f"styles {sorted(styles - set(group_of))} are in no split group")
    order = sorted(range(len(rows)), key=lambda i: (group_of[rows[i]["style"]], i))
    first_with: dict[str, int] = {}
    for i in order:
        first = first_with.setdefault(digests[i], i)
        rows[i]["duplicate_of"] = None if first == i else rows[first]["id"]
    earlier: dict[str, set[str]] = defaultdict(set)  # digest -> splits of its rows in earlier groups
    for g in sorted({group_of[style] for style in styles}):
        members = [i for i in order if group_of[rows[i]["style"]] == g]
        held = heldout_pairs(((rows[i]["concept"], rows[i]["style"]) for i in members), fraction)
        shared = Counter(digests[i] for i in members)
        for i in members:
            row, digest = rows[i], digests[i]
            if earlier.get(digest):
                row["split"] = "train" if "train" in earlier[digest] else "heldout"
            else:
                picked = (row["concept"], row["style"]) in held and shared[digest] == 1
                row["split"] = "heldout" if picked else "train"
        for i in members:
            earlier[digests[i]].add(rows[i]["split"])


# ---------------------------------------------------------------------------------------------------------------------
# Rendering (runs in pool workers: keep it free of torch and of large arguments)


def render_pair(task: tuple[str, list[tuple[int, str]]]) -> str:
    """Render (svg, [(size, path), ...]) (smallest size first) to RGB PNGs on white; return the sha256 of the
    smallest image's pixels, which is what duplicate detection compares."""
    svg, outputs = task
    digest = ""
    for size, path in outputs:
        rgb = rasterize(svg, size, path)
        if rgb.size != (size, size):
            raise RuntimeError(f"resvg rendered {path} at {rgb.size}, expected {size}x{size}")
        if not digest:
            digest = hashlib.sha256(rgb.tobytes()).hexdigest()
        atomic_write(path, lambda tmp: rgb.save(tmp, format="PNG"))
    return digest


def rasterize(svg: str, size: int, path: str) -> Image.Image:
    """`svg` drawn `size` pixels square on white, as RGB (`path` only names the image in errors)."""
    import resvg_py
    from PIL import Image

    def draw(side: int) -> Image.Image:
        png = resvg_py.svg_to_bytes(svg_string=sized_svg(svg, side), background="#ffffff", skip_system_fonts=True)
        with Image.open(io.BytesIO(bytes(png))) as image:
            return image.convert("RGB")  # opaque already: resvg composited the artwork over the white background

    try:
        return draw(size)
    except BaseException as error:  # pyo3 raises a Rust panic as PanicException, which derives from BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        # resvg 0.48 panics in a filter of a few icons at small sizes (Fluent's "person-curly-hair-dark" at 16 px);
        # drawing 4x larger and averaging each 4x4 block down gives the same picture.
        try:
            return draw(4 * size).resize((size, size), Image.Resampling.BOX)
        except BaseException as retry:
            if isinstance(retry, (KeyboardInterrupt, SystemExit)):
                raise
            raise RuntimeError(f"resvg could not render {path} at {size} px: {retry}") from None


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
    styles: Sequence[str] = DEFAULT_STYLES,
    include_skin_tones: bool = False,
    npm_dir: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> EmojiBuildSummary:
    """Fetch the sources if needed, render every (concept, style) pair at every size, write metadata and attribution.

    `limit` keeps the first concepts (emojibase order) that at least one chosen style draws. `include_skin_tones` adds
    every skin-tone variant as a concept of its own, right after its base. `workers` <= 1 renders in this process.
    Files of an earlier build in `out` are overwritten; metadata.jsonl is replaced last, atomically.
    """
    from muse.progress import progress as progress_bar

    start = time.perf_counter()
    out = Path(out)
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if not sizes or sizes[0] <= 0:
        raise ValueError(f"sizes must be positive, got {sizes}")
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles or len(set(styles)) != len(styles):
        raise ValueError(f"styles must be distinct and known, got {list(styles)}; choose from {list(STYLES)}")
    npm_dir = npm_dir or DEFAULT_NPM_DIR
    needed = {CAPTIONS_PACKAGE} | {STYLES[style] for style in styles}
    dirs = fetch_npm_packages(npm_dir, {name: version for name, version in PACKAGES.items() if name in needed})
    names = None
    if any(not read_chars(dirs[STYLES[style]]) for style in styles):
        needed |= set(NAME_REFERENCES)
        dirs = fetch_npm_packages(npm_dir, {name: version for name, version in PACKAGES.items() if name in needed})
        names = NameIndex.build(dirs[CAPTIONS_PACKAGE], [read_chars(dirs[name]) for name in NAME_REFERENCES])
    packages = {name: version for name, version in PACKAGES.items() if name in needed}
    icon_sets = [IconSet.load(style, STYLES[style], dirs[STYLES[style]], names) for style in styles]

    rows: list[dict] = []
    tasks: list[tuple[str, list[tuple[int, str]]]] = []
    kept = 0
    for concept in load_concepts(dirs[CAPTIONS_PACKAGE], include_skin_tones=include_skin_tones):
        if limit is not None and kept >= limit:
            break
        drawn = [s for s in icon_sets if normalize_hexcode(concept.hexcode) in s.chars
                 and concept.version <= NEWEST_EMOJI.get(s.style, math.inf)]
        kept += bool(drawn)
        for icon_set in drawn:
            icon = icon_set.chars[normalize_hexcode(concept.hexcode)]
            files = {str(size): f"{size}/{icon_set.style}/{concept.concept}.png" for size in sizes}
            captions = training_captions(label=concept.label, style=icon_set.style, tags=concept.tags)
            rows.append({
                "id": f"{icon_set.style}/{concept.concept}",
                "concept": concept.concept,
                "label": concept.label,
                "style": icon_set.style,
                "caption": captions[0],
                "captions": captions,
                "emoji": concept.emoji,
                "hexcode": concept.hexcode,
                "group": concept.group,
                "subgroup": concept.subgroup,
                "tags": list(concept.tags),
                "skin_tone": list(concept.skin_tone) if isinstance(concept.skin_tone, tuple) else concept.skin_tone,
                "base": concept.base,
                "icon": f"{icon_set.data['prefix']}:{icon}",
                "matched_by": icon_set.matched_by,
                "licence": icon_set.info.get("license", {}).get("spdx"),
                "files": files,
            })
            tasks.append((icon_set.svg(icon), [(size, str(out / files[str(size)])) for size in sizes]))
    for size in sizes:
        for icon_set in icon_sets:
            (out / str(size) / icon_set.style).mkdir(parents=True, exist_ok=True)

    # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork reliably.
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    digests: list[str] = []
    bar = progress_bar(len(tasks), desc="rendering emoji", unit="pair", disable=None if progress else True)
    with bar, pool or nullcontext():
        for digest in pool.imap(render_pair, tasks, chunksize=16) if pool else map(render_pair, tasks):
            digests.append(digest)
            bar.update()

    assign_splits(rows, digests, groups=SPLIT_GROUPS)

    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    per_style = Counter(row["style"] for row in rows)
    atomic_write_text(out / "ATTRIBUTION.md", attribution(icon_sets, dirs[CAPTIONS_PACKAGE], sizes, per_style))
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
        "Captions are emojibase's English labels with the style name (\"red apple, noto style\"), each also in",
        f"{len(TRAIN_TEMPLATES) - 1} other phrasings (musegen's `muse/data/captions.py`).",
        "",
    ]
    references = ", ".join(f"`{name}@{PACKAGES[name]}`" for name in NAME_REFERENCES)
    for icon_set in icon_sets:
        package_json = read_json(icon_set.directory / "package.json", PACKAGE_JSON_BYTES)
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
            "- matched to emoji: " + (
                "by the codepoints in the package's chars.json" if icon_set.matched_by == "codepoints" else
                "by icon name (the package has no codepoint table), against emojibase's names and the icon names "
                f"in the chars.json of {references}"
            ),
        ]
        if "-SA-" in str(licence.get("spdx", "")):
            lines += [
                f"- share-alike: the images of this style are this artwork rasterized, redistributed under "
                f"{licence.get('title', licence.get('spdx'))} ({licence.get('url', '')}) with the attribution above;",
                "  the other styles keep their own licences. Whether a model trained on these images is an adaptation",
                "  of them is not settled; musegen's default build leaves this style out, so the weights musegen ships",
                "  (Apache-2.0) are trained on no share-alike artwork.",
            ]
        lines.append("")
    package_json = read_json(emojibase_dir / "package.json", PACKAGE_JSON_BYTES)
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


# ---------------------------------------------------------------------------------------------------------------------
# `muse data emoji`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="square sizes in pixels")
    parser.add_argument("--styles", nargs="+", choices=list(STYLES), default=list(DEFAULT_STYLES),
                        help=f"art styles (default: all but the share-alike {', '.join(OPT_IN_STYLES)})")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N concepts (quick trials)")
    parser.add_argument("--skin-tones", "--include-skin-tones", dest="include_skin_tones", action="store_true",
                        help="add every skin-tone variant as a concept of its own")
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
