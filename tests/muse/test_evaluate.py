"""`muse eval` end to end on the tiny random pipeline and a tiny drawn dataset: eval.json and eval.md with every
section; inpainting keeps every pixel outside a token-aligned mask bit for bit; without a scorer fidelity is left out
and the rest still measured; the Frechet distance has the properties of a distance between Gaussians."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from muse import cli
from muse.evaluate import FD_LABEL, EvalConfig, evaluate, frechet_distance, markdown
from muse.pipeline import MusePipeline
from muse.config import ScorerDataConfig, ScorerRun, ScorerTrainConfig
from muse.scorer import PromptScorer, ScorerConfig
from muse.train.scorer import fit

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}


def write_dataset(root: Path) -> Path:
    """Three colours x two shapes, drawn once per split (the held-out drawing off-centre), captioned "red apple"."""
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in ("apple", "house"):
            for split, box in (("train", (4, 4, 27, 27)), ("heldout", (10, 8, 29, 27))):
                image = Image.new("RGB", (32, 32), "white")
                (ImageDraw.Draw(image).ellipse if shape == "apple" else ImageDraw.Draw(image).rectangle)(box, rgb)
                file = f"{split}-{colour}-{shape}.png"
                image.save(root / file)
                rows.append({"file": file, "caption": f"{colour} {shape}", "split": split})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def exact_pipeline_dir(tiny_pipe, tmp_path_factory) -> Path:
    """The tiny pipeline with no mask dilation and no seam: inpainting regenerates exactly the masked tokens."""
    config = dataclasses.replace(tiny_pipe.config, mask_dilation=0, seam=0)
    pipe = MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer, config=config)
    path = tmp_path_factory.mktemp("exact") / "pipe"
    pipe.save_pretrained(path)
    return path


def tiny_scorer(data_dir: Path, out: Path, seed: int) -> Path:
    fit(ScorerRun(data=ScorerDataConfig(str(data_dir), source_sizes=(32,)), model=ScorerConfig(image_size=64),
                  train=ScorerTrainConfig(str(out), steps=20, batch_size=6, log_every=0, seed=seed)))
    return out


@pytest.fixture(scope="module")
def scorer_dir(data_dir, tmp_path_factory) -> Path:
    return tiny_scorer(data_dir, tmp_path_factory.mktemp("scorer"), seed=0)


@pytest.fixture(scope="module")
def report(data_dir, exact_pipeline_dir, scorer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cli.main(["eval", "--model", str(exact_pipeline_dir), "--data", str(data_dir), "--out", str(out),
              "--scorer", str(scorer_dir), "--steps", "2", "4", "--guidance", "1", "3", "--num-prompts", "4",
              "--num-candidates", "3", "--num-recon", "3", "--num-inpaint", "3", "--retrieval-captions", "5"])
    return json.loads((out / "eval.json").read_text()), (out / "eval.md").read_text()


def test_eval_writes_every_section(report):
    data, md = report
    assert {"model", "data", "split", "scorer", "fd_label", "resolution", "reconstruction", "settings", "inpainting",
            "best_of_n", "config", "seconds"} <= set(data)
    assert data["split"] == "heldout" and data["fd_label"] == FD_LABEL and data["resolution"] == 16
    assert [(s["num_steps"], s["guidance_scale"]) for s in data["settings"]] == [(2, 1.0), (2, 3.0), (4, 1.0),
                                                                                (4, 3.0)]
    for setting in data["settings"]:
        for name in ("split", "train"):
            fidelity = setting[name]
            assert fidelity["num_images"] == 4 and fidelity["num_candidates"] == 5
            assert -1 <= fidelity["score"] <= 1 and 0 <= fidelity["top1"] <= fidelity["top5"] <= 1
        assert setting["fd"] >= 0
    (recon,) = data["reconstruction"]
    assert recon["vqgan"] == "base" and recon["num_images"] == 3 and recon["psnr"] > 0
    best = data["best_of_n"]
    assert best["n"] == 3 and {"by_scorer", "by_likelihood", "random"} <= set(best)
    assert not best["independent_judge"]  # the pipeline has no scorer of its own: --scorer both picks and measures
    assert best["random"]["num_images"] == 4 * 3  # every candidate of every caption
    # the scorer's own pick can only score at least as well as the average candidate, by the same scorer
    assert best["by_scorer"]["score"] >= best["random"]["score"] - 1e-6
    assert "FD-EffNetLite0" in md and "not comparable with published FID" in md and "Best-of-3" in md
    assert "optimistic: it also measures" in md


def test_a_separate_judge_measures_the_model_scorers_pick(tiny_pipe, data_dir, scorer_dir, tmp_path):
    pipe = MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer, config=tiny_pipe.config,
                        scorer=PromptScorer.load(scorer_dir))
    judge = PromptScorer.load(tiny_scorer(data_dir, tmp_path / "judge", seed=1))
    config = EvalConfig(num_prompts=3, steps=(2,), guidance=(3.0,), num_recon=0, num_inpaint=0, best_of=2)
    result = evaluate(pipe, data_dir, config, scorer=judge, scorer_name="judge")
    best = result.best_of_n
    assert best.independent_judge and best.random.num_images == 3 * 2
    assert "| the model's scorer |" in markdown(result) and "optimistic" not in markdown(result)


def test_inpainting_keeps_every_pixel_outside_the_mask(report):
    inpainting = report[0]["inpainting"]
    assert inpainting["num_images"] == 3 and inpainting["mask"] == "centre 8x8 of 16x16 px"
    assert inpainting["outside_mask_identical"] == 1.0  # no dilation, no seam, a token-aligned mask
    assert inpainting["kept_identical"] == 1.0 and inpainting["kept_fraction"] == 1.0
    assert inpainting["hole_score"] is not None and inpainting["original_hole_score"] is not None


def test_without_a_scorer_fidelity_is_left_out(tiny_pipe, data_dir):
    config = EvalConfig(num_prompts=3, steps=(2,), guidance=(3.0,), num_recon=2, num_inpaint=2)
    result = evaluate(tiny_pipe, data_dir, config)
    (setting,) = result.settings
    assert setting.split is None and setting.train is None and setting.fd is not None
    assert result.best_of_n is None and result.inpainting.hole_score is None
    # the tiny pipeline dilates the mask by a token and feathers a seam: the promise still holds where it is made
    assert result.inpainting.kept_identical == 1.0
    assert "No prompt scorer" in markdown(result)


def test_bad_settings_raise(tiny_pipe, data_dir):
    with pytest.raises(ValueError, match="num_prompts"):
        EvalConfig(num_prompts=0)
    with pytest.raises(ValueError, match="steps"):
        EvalConfig(steps=())
    with pytest.raises(ValueError, match="no images in split 'valid'"):
        evaluate(tiny_pipe, data_dir, EvalConfig(split="valid"))


def test_prompts_in_other_words_are_generated_reworded_and_scored_against_the_captions(tmp_path):
    from muse.evaluate import _pairs

    for i, (label, style) in enumerate([("red apple", "noto"), ("blue house", "twemoji")]):
        Image.new("RGB", (16, 16), "white").save(tmp_path / f"{i}.png")
    rows = [{"file": f"{i}.png", "caption": f"{label}, {style} style", "label": label, "style": style,
             "split": "heldout"} for i, (label, style) in enumerate([("red apple", "noto"), ("blue house", "twemoji")])]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = _pairs(tmp_path, "heldout", 16, 2, seed=0, templates=("the {style} {label}", "{label} ({style})"))
    assert pairs.captions == ["red apple, noto style", "blue house, twemoji style"]
    assert pairs.prompts == ["the noto red apple", "blue house (twemoji)"]
    assert _pairs(tmp_path, "heldout", 16, 2, seed=0).prompts == pairs.captions
    with pytest.raises(ValueError, match="prompt template '{colour} thing' is not a caption template"):
        EvalConfig(prompt_templates=("{colour} thing",))


def test_prompt_templates_need_labelled_rows(data_dir):
    from muse.evaluate import _pairs

    with pytest.raises(ValueError, match="need each row's label and style.*has no 'label'"):
        _pairs(data_dir, "heldout", 16, 2, seed=0, templates=("the {style} {label}",))


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # same covariance: |mean shift|^2
    b = 2 * torch.randn(400, 6, generator=g)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(6 * (2 - 1) ** 2, rel=0.25)  # N(0, I) vs N(0, 4I): d (2 - 1)^2
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(a[:1], b)
