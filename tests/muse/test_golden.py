"""Golden outputs: every task's tokens and images, for fixed seeds, as musegen d178d65 made them.

Issue 21 rewrites the pipeline and the engine and must not change what they make. Each case below runs one public
call (`MusePipeline.from_pretrained`, `__call__`, `inpaint`, `outpaint`, `edit`, `upscale`, their keyword options)
on the tiny models the other tests build (`conftest.py`'s pipeline and cascade, `tests/amused_fixture.py`'s aMUSEd
directory) and compares its `PipelineOutput` with `golden/tokens.json`: `tokens` (and `low_res_tokens` where a
super-res stage ran), the images' and candidates' seeds and the images' sizes exactly, and the images by a SHA-256 of
their raw RGB bytes (see BLOCKS below for a machine of another kind than the recording's). The record depends on
those fixtures too: change how they are built, and the cases must be re-recorded from d178d65's code.

The tokens are float32 on the CPU: every pipeline is loaded with `precision="float32"`, so that "auto" cannot pick
bfloat16 on a CPU with AMX or AVX512-BF16; the tokens then came out the same under AVX512, AVX2 and SSE4 kernels
and with 1 or 2 threads.

Only the public API is used here, so that the record survives the rewrite of the internals it checks.

Recording (never done by a plain run, which only compares):

    MUSE_RECORD_GOLDEN=1 python -m pytest tests/muse/test_golden.py                      # every case
    MUSE_RECORD_GOLDEN=1 python -m pytest tests/muse/test_golden.py -k edit_confidence   # one case, others kept

Each case records the commit it was recorded at (d178d65, before issue 21's refactor). Edit's confidence mode was
expected to change in that round: its scoring now runs through the engine (a `ScoreJob`, batched with every job in
flight, within `max_rows`) and honours `guidance_schedule`, where d178d65 called the model beside the engine at
`guidance_scale`. Its tokens did not change, and `test_golden_edit_confidence` shows why on two cases recorded from
d178d65's code: a complete grid is scored at its schedule's last step, and for both schedules (constant, and linear
with guidance 4) that scale is `guidance_scale`, so the scores are the same numbers, now computed in the engine's
batch. Should a later change move them, re-record those cases alone (`-k edit_confidence`) and write the reason
into `CONFIDENCE_NOTE`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from muse.pipeline import MusePipeline, PipelineOutput

GOLDEN_FILE = Path(__file__).parent / "golden" / "tokens.json"
RECORD = os.environ.get("MUSE_RECORD_GOLDEN") == "1"
# Why the confidence cases were last re-recorded; empty while they are still d178d65's own output (they are).
CONFIDENCE_NOTE = ""


def picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W, 3) uint8 noise: an input image with detail in every pixel, the same on every machine."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def right_half_mask(size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True (regenerate) on the right half."""
    mask = np.zeros(size, bool)
    mask[:, size[1] // 2:] = True
    return mask


def corner_mask(size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8, white (regenerate) on a 6 x 6 pixel square at the top left: part of four tokens at 4 px each."""
    mask = np.zeros(size, np.uint8)
    mask[1:7, 1:7] = 255
    return mask


# name -> (the pipeline fixture it runs on, the call). The tiny pipeline: 16 px images, a 4 x 4 grid of 4 px tokens,
# 4 steps, guidance 3 by default. The cascade: the same base stage, then an 8 x 8 super-res grid (32 px), 3 steps.
# aMUSEd: 64 px, a 4 x 4 grid of 16 px tokens, its preset's guidance 10.
Case = tuple[str, Callable[[MusePipeline], PipelineOutput]]
CASES: dict[str, Case] = {
    "generate_guided_negative": ("tiny", lambda p: p(
        "a red apple", num_images=2, seed=11, guidance_scale=3.0, negative_prompt="blurry ugly")),
    "generate_unguided": ("tiny", lambda p: p("a red apple", num_images=2, seed=11, guidance_scale=1.0)),
    "generate_linear_guidance_and_sampling_options": ("tiny", lambda p: p(
        "a green tree", num_images=2, seed=21, guidance_scale=5.0, guidance_schedule="linear", temperature=0.8,
        top_k=8, top_p=0.9, choice_temperature=2.0, mask_schedule="linear", num_steps=5)),
    "best_of_n_likelihood": ("tiny", lambda p: p(  # the tiny pipeline has no scorer/: the model's log-likelihood
        ["a dog", "a cat"], num_images=1, seed=[30, 40], num_candidates=3)),
    "two_prompts_two_images": ("tiny", lambda p: p(
        ["a sunny sky", "a blue car"], num_images=2, seed=50, negative_prompt=["a tree", "the house"])),
    "inpaint": ("tiny", lambda p: p.inpaint(
        "a dog face", image=picture((16, 16), 0), mask=corner_mask((16, 16)), num_images=2, seed=60)),
    "outpaint_beyond_the_grid": ("tiny", lambda p: p.outpaint(  # 48 x 20 px: 12 x 5 tokens, several 4 x 4 windows
        "a sunny sky", image=picture((16, 16), 1), pad=(8, 4, 24, 0), num_images=2, seed=70)),
    "edit_random": ("tiny", lambda p: p.edit(
        "a green apple", image=picture((16, 16), 2), strength=0.5, iterations=2, mode="random", num_images=2,
        seed=80)),
    "cascade_generate": ("cascade", lambda p: p(["a dog", "a cat"], seed=90, negative_prompt="blurry")),
    "cascade_edit_random": ("cascade", lambda p: p.edit(
        "a red car", image=picture((32, 32), 3), strength=0.4, mode="random", seed=95)),
    "upscale": ("cascade", lambda p: p.upscale(
        ["a dog", "a cat"], image=[picture((16, 16), 4), picture((16, 16), 5)], seed=100)),
    "amused_generate": ("amused", lambda p: p(["a red apple", "a dog"], seed=110, num_steps=4)),
    "amused_inpaint": ("amused", lambda p: p.inpaint(
        "a dog", image=picture((64, 64), 6), mask=right_half_mask((64, 64)), seed=120, num_steps=4)),
}
CONFIDENCE_CASE: dict[str, Case] = {
    "edit_confidence": ("tiny", lambda p: p.edit(
        "a green apple", image=picture((16, 16), 2), strength=0.5, iterations=2, mode="confidence", num_images=2,
        seed=80)),
    # The schedule is what issue 21 made confidence scoring honour: the same tokens here say that, for a complete grid,
    # the scheduled scale (its last step's) is the guidance_scale the old code used.
    "edit_confidence_linear_guidance": ("tiny", lambda p: p.edit(
        "a green apple", image=picture((16, 16), 2), strength=0.5, iterations=2, mode="confidence", num_images=2,
        seed=81, guidance_scale=4.0, guidance_schedule="linear")),
}


# ----------------------------------------------------------------------------------------------------------------
# The pipelines: fresh ones (not the session fixtures other tests use), each loaded in float32


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_dir, tiny_cascade, tmp_path_factory) -> Callable[[str], MusePipeline]:
    """Kind ("tiny", "cascade", "amused") -> that pipeline, built on first use, so that a run of one case builds only
    what it needs."""
    root = tmp_path_factory.mktemp("golden")

    def cascade() -> MusePipeline:
        tiny_cascade.save_pretrained(root / "cascade")  # the fixture is built in memory; saved, precision is ours
        return MusePipeline.from_pretrained(root / "cascade", precision="float32")

    def amused() -> MusePipeline:
        pytest.importorskip("diffusers")  # only to write the directory; musegen reads it without diffusers
        from tests.amused_fixture import write_amused_directory

        return MusePipeline.from_pretrained(write_amused_directory(root / "amused-256"), precision="float32")

    makers = {"tiny": lambda: MusePipeline.from_pretrained(tiny_pipeline_dir, precision="float32"),
              "cascade": cascade, "amused": amused}
    return functools.cache(lambda kind: makers[kind]())


# ----------------------------------------------------------------------------------------------------------------
# Record and compare


# float32 convolutions and matrix products round differently on different instruction sets (MKL and oneDNN pick
# kernels by CPU): the tokens came out the same under AVX512, AVX2 and SSE4 kernels, but one or two pixel values of
# a case's images moved by 1. So the images are bit-exact on a machine of the recording's kind (`platform()`) and,
# elsewhere, within BLOCK_TOLERANCE of the recorded block means: a flip by 1 moves the mean of the smallest block
# (4 x 4 pixels) by 1/16 of a level, a wrong pixel path (composite, seam, decoded stage) far more.
BLOCKS = 4  # each image's block means: a BLOCKS x BLOCKS grid of bands, row-major, channels innermost
BLOCK_TOLERANCE = 0.5  # of 255 levels
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def platform() -> str:
    """What decides which float32 kernels run: torch's version, the CPU's vendor and vector extensions, and any
    variable that overrides the kernels' choice. Not the thread count (the comparison passes with 1 and 2)."""
    vendor, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                vendor = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    overrides = [f"{v}={os.environ[v]}" for v in KERNEL_VARIABLES if v in os.environ]
    return " ".join([f"torch {torch.__version__}", vendor, torch.backends.cpu.get_cpu_capability(), *isa, *overrides])


def block_means(image: Image.Image) -> list[float]:
    """(BLOCKS * BLOCKS * 3,) mean pixel values of the image's blocks, rounded to 1/100 of a level."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    rows = np.array_split(pixels, BLOCKS, axis=0)
    return [round(float(v), 2) for band in rows for block in np.array_split(band, BLOCKS, axis=1)
            for v in block.mean(axis=(0, 1))]


def summary(out: PipelineOutput) -> dict[str, Any]:
    """What a case records of its output: tokens as nested int lists, seeds, and the images' SHA-256 (of their raw
    RGB bytes, one image after the other) and block means."""
    rgb = hashlib.sha256()
    for image in out.images:
        rgb.update(image.convert("RGB").tobytes())
    return {
        "tokens": out.tokens.tolist(),
        "low_res_tokens": None if out.low_res_tokens is None else out.low_res_tokens.tolist(),
        "seeds": list(out.seeds),
        "candidate_seeds": None if out.candidate_seeds is None else list(out.candidate_seeds),
        "image_sizes": [list(image.size) for image in out.images],
        "images_sha256": rgb.hexdigest(),
        "image_block_means": [block_means(image) for image in out.images],
    }


def token_difference(name: str, field: str, got: list, want: list) -> str | None:
    """A message naming the case and how many tokens differ, or None when they are equal."""
    a, b = torch.tensor(got), torch.tensor(want)
    if a.shape != b.shape:
        return f"golden case {name!r}: {field} has shape {tuple(a.shape)}, the record {tuple(b.shape)}"
    differ = (a != b).flatten(1).sum(dim=1)  # (B,) differing tokens per image
    if int(differ.sum()) == 0:
        return None
    return (f"golden case {name!r}: {int(differ.sum())} of {a.numel()} {field} differ from the record "
            f"(per image: {differ.tolist()})")


def compare(name: str, got: dict[str, Any], want: dict[str, Any]) -> None:
    """Fail naming the case and what differs; tokens first, since the images follow from them."""
    problems = []
    for field in ("tokens", "low_res_tokens"):
        if got[field] is None or want[field] is None:
            if got[field] != want[field]:
                state = lambda v: "absent" if v is None else "present"
                problems.append(f"golden case {name!r}: {field} is {state(got[field])}, in the record "
                                f"{state(want[field])}")
        elif message := token_difference(name, field, got[field], want[field]):
            problems.append(message)
    problems += [f"golden case {name!r}: {field} is {got[field]}, the record {want[field]}"
                 for field in ("seeds", "candidate_seeds", "image_sizes") if got[field] != want[field]]
    if problems:
        pytest.fail("\n".join(problems))
    if got["images_sha256"] == want["images_sha256"]:
        return
    moved = max(abs(a - b) for g, w in zip(got["image_block_means"], want["image_block_means"]) for a, b in zip(g, w))
    if got["platform"] == want["platform"] or moved > BLOCK_TOLERANCE:
        pytest.fail(f"golden case {name!r}: the tokens are equal but the images differ (SHA-256 "
                    f"{got['images_sha256'][:16]}..., the record {want['images_sha256'][:16]}...; block means moved "
                    f"by up to {moved:.2f} levels)")
    warnings.warn(f"golden case {name!r}: the images are not bit-identical on this machine ({got['platform']}; "
                  f"recorded on {want['platform']}), but their block means are within {moved:.2f} levels")


def recorded_at() -> str:
    """The code's commit, marked when files outside tests/ differ from it (a record of uncommitted code)."""
    git = lambda *args: subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("diff", "--quiet", "HEAD", "--", ":(top)", ":(top,exclude)tests").returncode != 0
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" with uncommitted changes" if changed else "")


@pytest.fixture(scope="module")
def golden():
    """The record, as a dict case -> summary. When recording, the cases run are written back at the module's end
    (merged into the file, so that recording one case keeps the others)."""
    data = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {"cases": {}}
    fresh: dict[str, Any] = {}
    yield data["cases"], fresh
    if RECORD and fresh:
        cases = {**data["cases"], **fresh}
        data = {"about": "Golden outputs of tests/muse/test_golden.py: float32 on the CPU. Regenerate with "
                         "MUSE_RECORD_GOLDEN=1 python -m pytest tests/muse/test_golden.py [-k CASE].",
                "cases": {name: cases[name] for name in sorted(cases)}}
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        # One row of a token grid per line: a changed token shows in a diff where it is.
        text = re.sub(r"\[\s+([-.\d,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m[1]) + "]",
                      json.dumps(data, indent=1))
        GOLDEN_FILE.write_text(text + "\n")


def check(name: str, case: Case, pipelines, golden) -> None:
    record, fresh = golden
    kind, call = case
    got = {"platform": platform(), **summary(call(pipelines(kind)))}
    if RECORD:
        fresh[name] = {"recorded_at": recorded_at(), **got}
        if name in CONFIDENCE_CASE and CONFIDENCE_NOTE:
            fresh[name]["note"] = CONFIDENCE_NOTE
        return
    if name not in record:
        pytest.fail(f"golden case {name!r} has no record in {GOLDEN_FILE}; record it with MUSE_RECORD_GOLDEN=1")
    compare(name, got, record[name])


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name, pipelines, golden):
    check(name, CASES[name], pipelines, golden)


@pytest.mark.parametrize("name", list(CONFIDENCE_CASE))
def test_golden_edit_confidence(name, pipelines, golden):
    check(name, CONFIDENCE_CASE[name], pipelines, golden)


def test_the_record_has_exactly_these_cases():
    """A case renamed or dropped here, or left in the file, is noticed rather than silently unchecked."""
    if RECORD:
        pytest.skip("recording")
    recorded = set(json.loads(GOLDEN_FILE.read_text())["cases"])
    assert recorded == set(CASES) | set(CONFIDENCE_CASE), (
        f"{GOLDEN_FILE} records {sorted(recorded)}; the cases are {sorted(set(CASES) | set(CONFIDENCE_CASE))}")
