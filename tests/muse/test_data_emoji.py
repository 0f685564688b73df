"""The emoji dataset builder: held-out split, duplicates, name matching, captions, npm fetching, rendering a handful
of real emoji.

Tests that need the npm packages fetch them into the shared cache (~/.cache/musegen/npm) and are skipped only when
npm itself is absent.
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from muse.data import emoji
from muse.data.captions import (
    EVAL_TEMPLATES, TRAIN_TEMPLATES, caption_label, caption_of, keywords, render_caption, training_captions,
    with_article,
)
from muse.data.emoji import (
    CAPTIONS_PACKAGE, DEFAULT_NPM_DIR, DEFAULT_STYLES, NAME_REFERENCES, OPT_IN_STYLES, PACKAGES, SPLIT_GROUPS, STYLES,
    IconSet, NameIndex, NpmError, assign_splits, build_emoji_dataset, fetch_npm_packages, heldout_pairs,
    load_concepts, normalize_hexcode, rasterize, read_chars, render_pair,
)
from muse.data.folder import ImageCaptionDataset
from muse.data.images import ImageTransform

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
STYLE_NAMES = list(SPLIT_GROUPS[0])  # the first release's styles
NEW_STYLES = [style for group in SPLIT_GROUPS[1:] for style in group]


def fetched(*packages):
    return fetch_npm_packages(DEFAULT_NPM_DIR, {name: PACKAGES[name] for name in packages})


def old_assign_splits(rows, digests, fraction=emoji.HELDOUT_FRACTION):
    """`assign_splits` as the first release had it (one group), the reference the grouped split must reproduce."""
    first_with = {}
    for row, digest in zip(rows, digests, strict=True):
        first = first_with.setdefault(digest, row["id"])
        row["duplicate_of"] = None if first == row["id"] else first
    shared = Counter(digests)
    held = heldout_pairs(((row["concept"], row["style"]) for row in rows), fraction)
    for row, digest in zip(rows, digests):
        row["split"] = "heldout" if (row["concept"], row["style"]) in held and shared[digest] == 1 else "train"


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


def test_a_single_split_group_is_the_first_release_split():
    rows = [{"id": f"{style}/c{i}", "concept": f"c{i}", "style": style} for i in range(300) for style in STYLE_NAMES]
    digests = [row["id"] if k % 7 else "twin" for k, row in enumerate(rows)]
    reference = [dict(row) for row in rows]
    old_assign_splits(reference, digests)
    assign_splits(rows, digests)
    assert rows == reference and any(row["split"] == "heldout" for row in rows)


def test_new_split_groups_leave_the_first_release_split_unchanged():
    rng = random.Random(0)
    rows = [{"id": f"{style}/c{i}", "concept": f"c{i}", "style": style}
            for i in range(600) for style in STYLE_NAMES + NEW_STYLES if style == "noto" or rng.random() < 0.7]
    digests = [row["id"] for row in rows]
    old = [k for k, row in enumerate(rows) if row["style"] in STYLE_NAMES]
    reference = [dict(rows[k]) for k in old]
    old_assign_splits(reference, [digests[k] for k in old])
    held_old = [k for k, ref in zip(old, reference) if ref["split"] == "heldout"]
    # Pixel twins: a new-style image identical to a held-out first-release image, to a training one, and twins
    # within a new group; the first-release split must not notice any of them.
    new = [k for k, row in enumerate(rows) if row["style"] not in STYLE_NAMES]
    rng.shuffle(new)
    copied_held, copied_train = new[:20], new[20:60]
    twins = [k for k in new[60:] if rows[k]["style"] in SPLIT_GROUPS[1]][:20]  # within one group: both train
    for k, source in zip(copied_held, held_old[:20], strict=True):
        digests[k] = digests[source]
    for k in copied_train:
        digests[k] = digests[rng.choice(old)]
    for a, b in zip(twins[::2], twins[1::2]):
        digests[b] = digests[a]

    assign_splits(rows, digests, groups=SPLIT_GROUPS)
    assert [{key: rows[k][key] for key in reference[0]} for k in old] == reference
    assert all(rows[k]["split"] == "heldout" for k in copied_held)  # they follow their held-out twin
    assert all(rows[k]["split"] == "train" for k in twins)
    train_digests = {d for row, d in zip(rows, digests) if row["split"] == "train"}
    assert not any(row["split"] == "heldout" and d in train_digests for row, d in zip(rows, digests))  # no leak
    new_rows = [rows[k] for k in new]
    assert 0.05 <= sum(row["split"] == "heldout" for row in new_rows) / len(new_rows) <= 0.15
    for group in SPLIT_GROUPS:
        copies = set(copied_held + copied_train)  # these follow a twin rather than the rule
        picked = Counter(row["concept"] for k, row in enumerate(rows)
                         if row["split"] == "heldout" and row["style"] in group and k not in copies)
        assert max(picked.values(), default=0) <= 1  # by the rule itself, at most one style per concept and group
    with pytest.raises(ValueError, match="in no split group"):
        assign_splits([{"id": "x/c", "concept": "c", "style": "x"}], ["d"], groups=SPLIT_GROUPS)


@needs_npm
def test_first_release_heldout_pairs_are_pinned():
    dirs = fetched(CAPTIONS_PACKAGE, *(STYLES[style] for style in STYLE_NAMES))
    chars = {style: read_chars(dirs[STYLES[style]]) for style in STYLE_NAMES}
    pairs = [(concept.concept, style)
             for concept in load_concepts(dirs[CAPTIONS_PACKAGE], include_skin_tones=False)
             for style in STYLE_NAMES if normalize_hexcode(concept.hexcode) in chars[style]]
    held = sorted(heldout_pairs(pairs))
    # Computed with the first release's code (commit da89bb4); its build held out 444 of these (one has a twin).
    assert len(pairs) == 5160 and len(held) == 445
    assert hashlib.sha256(json.dumps(held).encode()).hexdigest() == (
        "071cdd137b716339b2f10267346f7fa65377e4d8be151369b8622acb5fd67160")


@needs_npm
def test_name_matching_agrees_with_a_codepoint_table():
    """noto has a chars.json; matched by name instead (noto left out of the references) it gets the same icons."""
    dirs = fetched(CAPTIONS_PACKAGE, *NAME_REFERENCES)
    noto = IconSet.load("noto", STYLES["noto"], dirs[STYLES["noto"]])
    others = [read_chars(dirs[name]) for name in NAME_REFERENCES if name != STYLES["noto"]]
    by_name = NameIndex.build(dirs[CAPTIONS_PACKAGE], others).match(noto.data)
    both = set(by_name) & set(noto.chars)
    same = sum(noto.svg(by_name[h]) == noto.svg(noto.chars[h]) for h in both)
    assert len(both) >= 0.98 * len(noto.chars) and same >= 0.995 * len(both), (len(both), same, len(noto.chars))


@needs_npm
def test_name_matching_reads_old_names_and_leaves_ambiguous_ones_out():
    dirs = fetched(CAPTIONS_PACKAGE, *NAME_REFERENCES)
    names = NameIndex.build(dirs[CAPTIONS_PACKAGE], [read_chars(dirs[name]) for name in NAME_REFERENCES])
    assert names.lookup("red-apple") == ("1f34e", 0)
    assert names.lookup("sakebottleandcup") == ("1f376", 2)  # a Unicode name run together (Firefox OS)
    assert names.lookup("flag-for-japan") == ("1f1ef-1f1f5", 2)  # an older CLDR flag name
    assert names.lookup("boy-light") == ("1f466-1f3fb", 0)  # Fluent's skin-tone naming, from its chars.json
    assert names.lookup("sunglasses") is None  # emojibase's label of 1F576, but a shortcode of 1F60E
    body = {"body": '<path d="M0 0h1v1H0z"/>'}
    data = {"icons": {"girl-1": body, "girl-2": body, "cat-face": body, "emoji-of-nothing": body},
            "aliases": {"cat-face-2": {"parent": "cat-face"}}}
    assert names.match(data) == {"1f467": "girl-1", "1f431": "cat-face"}


def test_caption_templates():
    assert render_caption(TRAIN_TEMPLATES[0], label="red apple", style="noto") == "red apple, noto style"
    tags = ["apple", "diet", "food", "fruit", "health", "red", "ripe"]
    captions = training_captions(label="red apple", style="noto", tags=tags)
    assert captions[:4] == ["red apple, noto style", "a red apple, noto style", "noto style red apple",
                            "red apple emoji, noto style"]
    assert "a red apple emoji in the noto style" in captions and len(captions) == len(set(captions))
    assert keywords("red apple", tags) == "red, apple, diet, food, fruit, health"
    assert captions[-1] == "red, apple, diet, food, fruit, health, noto style"
    row = {"label": "eagle", "style": "twemoji", "tags": ["bird"]}
    assert [caption_of(row, template) for template in EVAL_TEMPLATES] == [
        "the twemoji eagle", "eagle icon, twemoji", "an emoji of an eagle drawn in twemoji style", "twemoji: eagle",
        "eagle (twemoji)"]
    articles = {"unicorn": "a unicorn", "hourglass done": "an hourglass done", "sparkles": "sparkles",
                "people with bunny ears": "people with bunny ears", "bus": "a bus", "flag: Japan": "flag: Japan",
                "face with tears of joy": "a face with tears of joy", "1st place medal": "1st place medal"}
    assert {label: with_article(label) for label in articles} == articles
    assert caption_label("waving hand: medium skin tone") == "waving hand, medium skin tone"
    assert caption_label("man: light skin tone, beard") == "man, light skin tone, beard"
    assert caption_label("flag: Japan") == "flag: Japan"  # base emoji keep their first-release captions


@needs_npm
def test_no_evaluation_template_gives_a_training_caption():
    """Over every real label (skin tones included) and style word: evaluation prompts are worded unseen."""
    concepts = load_concepts(fetched(CAPTIONS_PACKAGE)[CAPTIONS_PACKAGE], include_skin_tones=True)
    train, evaluation = set(), set()
    for concept in concepts:
        for style in STYLES:
            train.update(training_captions(label=concept.label, style=style, tags=concept.tags))
            evaluation.update(render_caption(t, label=concept.label, style=style, tags=concept.tags)
                              for t in EVAL_TEMPLATES)
    assert len(evaluation) == len(EVAL_TEMPLATES) * len({c.label for c in concepts}) * len(STYLES)
    assert not train & evaluation


@needs_npm
def test_skin_tone_variants_are_concepts_of_their_own():
    directory = fetched(CAPTIONS_PACKAGE)[CAPTIONS_PACKAGE]
    plain = load_concepts(directory, include_skin_tones=False)
    every = load_concepts(directory, include_skin_tones=True)
    assert [c.concept for c in every if c.base is None] == [c.concept for c in plain]  # base slugs do not move
    waving = [c for c in every if c.base == "waving-hand"]
    assert [c.skin_tone for c in waving] == [1, 2, 3, 4, 5]
    assert waving[2].concept == "waving-hand-medium-skin-tone" and waving[2].tags == plain[[
        c.concept for c in plain].index("waving-hand")].tags
    assert training_captions(label=waving[2].label, style="noto")[0] == "waving hand, medium skin tone, noto style"
    assert any(isinstance(c.skin_tone, tuple) for c in every)  # two people, two tones


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


def test_a_resvg_panic_falls_back_to_drawing_larger(monkeypatch):
    import resvg_py

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    real = resvg_py.svg_to_bytes

    def panics_at_16(*, svg_string, **options):
        if 'width="16"' in svg_string:
            raise PanicException("index out of bounds: the len is 12 but the index is 12")
        return real(svg_string=svg_string, **options)

    monkeypatch.setattr(resvg_py, "svg_to_bytes", panics_at_16)
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           '<rect x="4" y="4" width="8" height="8" fill="red"/></svg>')
    image = rasterize(svg, 16, "square.png")
    pixels = np.asarray(image)
    assert image.size == (16, 16) and (pixels[8, 8] == (255, 0, 0)).all() and (pixels[1, 1] == 255).all()
    monkeypatch.setattr(resvg_py, "svg_to_bytes", lambda **options: (_ for _ in ()).throw(PanicException("no")))
    with pytest.raises(RuntimeError, match="could not render square.png at 16 px"):
        rasterize(svg, 16, "square.png")


@needs_npm
def test_builder_on_a_handful_of_emoji(tmp_path):
    summary = build_emoji_dataset(tmp_path / "a", [16, 32], limit=6, progress=False)
    assert summary.concepts == 6 and summary.rows == sum(summary.per_style.values())
    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == summary.rows and {row["style"] for row in rows} == set(DEFAULT_STYLES)
    matched = {row["style"]: row["matched_by"] for row in rows}
    assert matched["noto"] == "codepoints" and matched["blob"] == "names"
    for row in rows:
        assert row["caption"] == f"{row['label']}, {row['style']} style"
        assert row["captions"][0] == row["caption"] and len(row["captions"]) == len(set(row["captions"])) > 5
        assert row["licence"] in ("Apache-2.0", "CC-BY-4.0", "MIT") and row["skin_tone"] is row["base"] is None
        assert row["split"] in ("train", "heldout") and row["hexcode"] and row["group"]
        for size in (16, 32):
            with Image.open(tmp_path / "a" / row["files"][str(size)]) as image:
                assert image.mode == "RGB" and image.size == (size, size)
                pixels = np.asarray(image)
                assert pixels.std() > 10 and (pixels == 255).all(axis=-1).any()  # artwork on a white background

    attribution = (tmp_path / "a" / "ATTRIBUTION.md").read_text()
    for package, version in PACKAGES.items():
        used = package == CAPTIONS_PACKAGE or package in {STYLES[style] for style in DEFAULT_STYLES}
        assert (f"{package}@{version}" in attribution) == used, package
    for licence in ("Apache-2.0", "CC-BY-4.0", "MIT"):
        assert f"`{licence}`" in attribution
    assert "share-alike" not in attribution

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


@needs_npm
def test_share_alike_styles_are_opt_in_and_say_so(tmp_path):
    assert set(OPT_IN_STYLES) == set(SPLIT_GROUPS[-1]) and not set(OPT_IN_STYLES) & set(DEFAULT_STYLES)
    build_emoji_dataset(tmp_path, [16], limit=2, styles=["openmoji", "emojione-v1"], progress=False, workers=1)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert {row["style"] for row in rows} == set(OPT_IN_STYLES)
    assert {row["licence"] for row in rows} == {"CC-BY-SA-4.0"}
    attribution = (tmp_path / "ATTRIBUTION.md").read_text()
    assert attribution.count("- share-alike: the images of this style") == 2
