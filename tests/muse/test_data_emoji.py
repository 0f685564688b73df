"""The emoji dataset builder: held-out split, duplicates, npm fetching, rendering a handful of real emoji.

Tests that need the npm packages fetch them into the shared cache (~/.cache/musegen/npm) and are skipped only when
npm itself is absent.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from muse.data import emoji
from muse.data.emoji import (
    DEFAULT_NPM_DIR, PACKAGES, STYLES, IconSet, NpmError, assign_splits, build_emoji_dataset, fetch_npm_packages,
    heldout_pairs, render_pair,
)
from muse.data.folder import ImageCaptionDataset
from muse.data.images import ImageTransform

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
STYLE_NAMES = list(STYLES)


def synthetic_pairs():
    pairs = [(f"concept-{i}", style) for i in range(400) for style in STYLE_NAMES]
    pairs += [(f"lonely-{i}", "noto") for i in range(100)]  # drawn in one style only
    return pairs


def test_heldout_split_keeps_each_concept_in_training_in_other_styles():
    pairs = synthetic_pairs()
    held = heldout_pairs(pairs)
    assert 0.07 <= len(held) / len(pairs) <= 0.13
    held_concepts = [concept for concept, _ in held]
    assert len(held_concepts) == len(set(held_concepts))  # at most one style per concept
    for concept, style in held:
        assert not concept.startswith("lonely-")  # a single-style concept is never held out
        others = {(concept, s) for s in STYLE_NAMES if s != style}
        assert others <= set(pairs) and not others & held  # ... and stays in training in the other styles
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert heldout_pairs(shuffled) == held


def test_heldout_split_does_not_depend_on_python_hash_seed():
    code = ("import json; from muse.data.emoji import heldout_pairs; "
            "print(json.dumps(sorted(heldout_pairs([(f'c{i}', s) for i in range(300) for s in ('noto', 'fluent')]))))")
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and json.loads(runs[0])


def test_duplicates_are_marked_and_kept_in_training():
    rows = [{"id": f"{style}/{concept}", "concept": concept, "style": style}
            for concept in (f"c{i}" for i in range(200)) for style in ("noto", "twemoji")]
    # Every twemoji image is pixel-identical to its noto twin; c0 noto and c1 noto are twins as well.
    digests = [f"{row['concept']}" for row in rows]
    digests[2] = digests[0]
    assign_splits(rows, digests)
    assert rows[1]["duplicate_of"] == "noto/c0" and rows[2]["duplicate_of"] == "noto/c0"
    assert rows[0]["duplicate_of"] is None
    assert all(row["split"] == "train" for row in rows)  # every image has a twin, so nothing may be held out
    unique = [f"{row['id']}" for row in rows]
    assign_splits(rows, unique)
    assert all(row["duplicate_of"] is None for row in rows) and any(row["split"] == "heldout" for row in rows)


def test_missing_npm_is_a_clear_error_and_present_packages_are_not_refetched(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(NpmError, match="npm is needed .* not installed"):
        fetch_npm_packages(tmp_path, {"emojibase-data": PACKAGES["emojibase-data"]})
    present = tmp_path / f"emojibase-data@{PACKAGES['emojibase-data']}"
    present.mkdir()
    (present / "package.json").write_text("{}")
    assert fetch_npm_packages(tmp_path, {"emojibase-data": PACKAGES["emojibase-data"]}) == {"emojibase-data": present}


@needs_npm
def test_flipped_alias_renders_as_mirror_of_its_parent(tmp_path):
    package = STYLES["fluent"]
    icons = IconSet.load("fluent", package, fetch_npm_packages(DEFAULT_NPM_DIR, {package: PACKAGES[package]})[package])
    assert icons.data["aliases"]["backhand-index-pointing-right"] == {
        "parent": "backhand-index-pointing-left", "hFlip": True}
    for name in ("backhand-index-pointing-left", "backhand-index-pointing-right"):
        render_pair((icons.svg(name), [(32, str(tmp_path / f"{name}.png"))]))
    left = np.asarray(Image.open(tmp_path / "backhand-index-pointing-left.png"))
    right = np.asarray(Image.open(tmp_path / "backhand-index-pointing-right.png"))
    assert left.std() > 10  # drawn, not blank
    # Anti-aliased edges differ by a few levels between an image and its mirror, so compare mean differences.
    mirrored = np.abs(right.astype(int) - left[:, ::-1]).mean()
    unmirrored = np.abs(right.astype(int) - left).mean()
    assert mirrored < 0.5 and unmirrored > 10 * mirrored, (mirrored, unmirrored)


@needs_npm
def test_builder_on_a_handful_of_emoji(tmp_path):
    summary = build_emoji_dataset(tmp_path / "a", [16, 32], limit=6, progress=False)
    assert summary.concepts == 6 and summary.rows == sum(summary.per_style.values())
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == summary.rows and {row["style"] for row in rows} == set(STYLES)
    for row in rows:
        assert row["caption"] == f"{row['label']}, {row['style']} style"
        assert row["split"] in ("train", "heldout") and row["hexcode"] and row["group"]
        for size in (16, 32):
            with Image.open(tmp_path / "a" / row["files"][str(size)]) as image:
                assert image.mode == "RGB" and image.size == (size, size)
                pixels = np.asarray(image)
                assert pixels.std() > 10 and (pixels == 255).all(axis=-1).any()  # artwork on a white background

    attribution = (tmp_path / "a" / "ATTRIBUTION.md").read_text()
    for package, version in PACKAGES.items():
        assert f"{package}@{version}" in attribution
    for licence in ("Apache-2.0", "CC-BY-4.0", "MIT"):
        assert f"`{licence}`" in attribution

    # A second build gives the same split and the same pixels.
    build_emoji_dataset(tmp_path / "b", [16], limit=6, progress=False, workers=1)
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metadata.jsonl").read_text().splitlines()]
    assert [(r["id"], r["split"]) for r in rows_b] == [(r["id"], r["split"]) for r in rows]
    for row in rows:
        a = np.asarray(Image.open(tmp_path / "a" / row["files"]["16"]))
        b = np.asarray(Image.open(tmp_path / "b" / row["files"]["16"]))
        assert np.array_equal(a, b)

    data = ImageCaptionDataset(tmp_path / "a", ImageTransform(16), split="train")
    assert len(data) == sum(row["split"] == "train" for row in rows)
    assert data[0]["image"].shape == (3, 16, 16) and data[0]["caption"].endswith(" style")
