"""Caption templates of the emoji dataset: the phrasings training samples among, and held-out ones for evaluation.

A template is a `str.format` string over these fields:

* `{label}`: the emoji's label as captions spell it (`caption_label`), "red apple", "waving hand, medium skin tone";
* `{a_label}`: the same with an indefinite article where English wants one ("a red apple", "an eagle", "sparkles");
* `{style}`: the style word, e.g. "noto";
* `{keywords}`: the label's words, then emojibase tags, comma-separated ("red, apple, diet, food, fruit, health").

`TRAIN_TEMPLATES[0]` is the canonical caption ("red apple, noto style"), the `caption` field of every metadata row;
the row's `captions` field holds what every training template gives, that one first. `EVAL_TEMPLATES` never appear in
training: they test whether a model follows a prompt worded in a way it has not seen ("prompts in other words").
No evaluation template may give a string that some training template gives for any label, tags and style;
`tests/muse/test_data_emoji.py` checks that on every real label and style word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

TRAIN_TEMPLATES: tuple[str, ...] = (
    "{label}, {style} style",  # canonical: the `caption` field; must never change (trained models and splits use it)
    "{a_label}, {style} style",
    "{style} style {label}",
    "{label} emoji, {style} style",
    "{a_label} emoji in the {style} style",
    "{style} style emoji of {a_label}",
    "{a_label} in {style} style",
    "{style} style {label} icon",
    "{keywords}, {style} style",
)
EVAL_TEMPLATES: tuple[str, ...] = (
    "the {style} {label}",
    "{label} icon, {style}",
    "an emoji of {a_label} drawn in {style} style",
    "{style}: {label}",
    "{label} ({style})",
)
MAX_KEYWORDS = 6

# Words that carry no content in a keyword list ("face with tears of joy" -> face, tears, joy).
_STOPWORDS = frozenset("a an and the of with in on for from at to by without".split())
# Words after which the phrase before them names the emoji's head noun ("face" in "face with tears of joy").
_PREPOSITIONS = frozenset("with without of in on for from at holding wearing".split())
_IRREGULAR_PLURALS = frozenset("people men women children teeth feet".split())


def caption_label(label: str) -> str:
    """The label as captions spell it: emojibase's label, except that a skin-tone variant's colon becomes a comma
    ("waving hand: medium skin tone" -> "waving hand, medium skin tone"), so the tone reads as a further attribute.

    Other colons stay ("flag: Japan", "man: beard"): canonical captions of the base emoji predate this module.
    """
    head, sep, rest = label.partition(": ")
    return f"{head}, {rest}" if sep and "skin tone" in rest else label


def with_article(phrase: str) -> str:
    """`phrase` with "a" or "an" in front when it names one countable thing; unchanged for plurals ("sparkles",
    "people with bunny ears") and for labels with a colon ("flag: Japan"), where no article reads well. A heuristic:
    good enough for caption variety, not a grammar."""
    if ":" in phrase or "," in phrase:
        return phrase
    words = phrase.split()
    head_end = next((i for i, word in enumerate(words) if word in _PREPOSITIONS and i > 0), len(words))
    head = words[head_end - 1].lower()
    if head in _IRREGULAR_PLURALS or (head.endswith("s") and not head.endswith(("ss", "us", "is"))):
        return phrase
    first = words[0].lower()
    if first[0].isdigit():  # "1st place medal": say no article rather than guess how the number is read
        return phrase
    vowel_sound = first[0] in "aeiou" and not first.startswith(("uni", "use", "usu", "uro", "one", "eu", "ewe"))
    vowel_sound |= first.startswith(("hour", "honest", "heir"))
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def keywords(label: str, tags: Sequence[str]) -> str:
    """The label's content words, then emojibase tags not already there, at most `MAX_KEYWORDS`, comma-separated."""
    words = [w for w in re.split(r"[\s,:]+", caption_label(label).lower()) if w and w not in _STOPWORDS]
    chosen = list(dict.fromkeys(words + [tag for tag in tags if tag]))
    return ", ".join(chosen[:MAX_KEYWORDS])


def render_caption(template: str, *, label: str, style: str, tags: Sequence[str] = ()) -> str:
    """`template` (one of `TRAIN_TEMPLATES`, `EVAL_TEMPLATES`, or any string over the same fields) filled in for an
    emoji with emojibase `label` and `tags` drawn in `style`."""
    subject = caption_label(label)
    return template.format(
        label=subject, a_label=with_article(subject), style=style, keywords=keywords(label, tags)
    )


def caption_of(row: Mapping, template: str) -> str:
    """`render_caption` for a metadata row of the emoji dataset (it needs the row's label, style and tags)."""
    return render_caption(template, label=row["label"], style=row["style"], tags=row.get("tags", ()))


def training_captions(*, label: str, style: str, tags: Sequence[str] = ()) -> list[str]:
    """What every training template gives, without repeats, the canonical caption first."""
    captions = (render_caption(t, label=label, style=style, tags=tags) for t in TRAIN_TEMPLATES)
    return list(dict.fromkeys(captions))
