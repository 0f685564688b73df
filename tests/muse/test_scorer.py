"""PromptScorer: trained a few dozen steps on drawings of coloured shapes, it ranks an unseen drawing of the prompt's
concept above every other concept; PIL and tensor inputs agree; save -> load gives identical scores; missing and
corrupt files raise errors that name them.

The frozen towers are the real offline MiniLM and EfficientNet-Lite0 (about 3 s to load, once per module); the data
are drawn here, since no dataset is built before the tests run."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from muse.config import load_config
from muse.scorer import PromptScorer, image_batch
from muse.train.scorer import fit

REPO = Path(__file__).resolve().parents[2]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
# The training drawing of a concept is large and centred; the held-out one is smaller and off-centre.
BOXES = {"train": (4, 4, 27, 27), "heldout": (10, 8, 29, 27)}


def draw(shape: str, colour: str, box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (32, 32), "white")
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = box
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=COLOURS[colour])
    return image


def write_shapes(root: Path) -> Path:
    """An image-caption folder: every (colour, shape) drawn once per split, captioned "red circle"."""
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for split, box in BOXES.items():
                file = f"{split}/{colour}-{shape}.png"
                (root / split).mkdir(parents=True, exist_ok=True)
                draw(shape, colour, box).save(root / file)
                rows.append({"file": file, "caption": f"{colour} {shape}", "split": split})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


CAPTIONS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer")
    cfg = load_config(REPO / "configs" / "scorer" / "emoji.yaml", [
        f"data.path={shapes_dir}", f"train.out_dir={out}", "data.source_sizes=[32]", "model.image_size=64",
        "train.steps=40", "train.batch_size=12", "train.log_every=0"])
    return fit(cfg), out


def heldout_drawings() -> list[Image.Image]:
    return [draw(caption.split()[1], caption.split()[0], BOXES["heldout"]) for caption in CAPTIONS]


def test_ranks_the_prompts_concept_above_the_others_on_unseen_drawings(trained):
    result, out = trained
    scorer = result.scorer
    images = heldout_drawings()
    ranks = scorer.retrieval(images, CAPTIONS, list(range(len(CAPTIONS))))
    assert ranks.tolist() == [0] * len(CAPTIONS)
    # score(): each image's own caption beats the same image under every other caption
    for i, image in enumerate(images):
        scores = scorer.score([image] * len(CAPTIONS), CAPTIONS)
        assert int(scores.argmax()) == i
    assert result.heldout is not None and result.heldout.top1 == 1.0 and result.heldout.num_candidates == 12
    report = json.loads((out / "training.json").read_text())
    assert report["heldout"]["top1"] == 1.0 and report["steps"] == 40


def test_training_uses_the_training_split_only(trained):
    result, out = trained
    assert result.train.num_images == 12  # one drawing per concept: the held-out drawings were not trained on
    cached = sorted(p.name for p in (out / "feature-cache").iterdir())
    assert [name.split("-")[0] for name in cached] == ["heldout", "train"]


def test_pil_and_tensor_images_give_the_same_scores(trained):
    scorer = trained[0].scorer
    images = heldout_drawings()[:3]
    tensor = image_batch(images, 32)  # (3, 3, 32, 32) in [-1, 1], the drawings' own pixels
    assert tensor.shape == (3, 3, 32, 32) and tensor.min() >= -1 and tensor.max() <= 1
    a, b = scorer.score(images, CAPTIONS[:3]), scorer.score(tensor, CAPTIONS[:3])
    assert a.shape == (3,) and torch.allclose(a, b, atol=1e-5)
    assert (a.abs() <= 1 + 1e-5).all()  # cosine similarities


def test_bad_inputs_raise(trained):
    scorer = trained[0].scorer
    images = heldout_drawings()[:2]
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        scorer.score(images, ["red circle"])
    with pytest.raises(ValueError, match="distinct"):
        scorer.retrieval(images, ["red circle", "red circle"], [0, 1])
    with pytest.raises(ValueError, match="targets must index"):
        scorer.retrieval(images, ["red circle", "blue square"], [0, 2])
    with pytest.raises(TypeError, match="PIL"):
        scorer.score(["not an image"], ["red circle"])


def test_save_load_roundtrip_gives_identical_scores(trained, tmp_path):
    scorer = trained[0].scorer
    scorer.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    loaded = PromptScorer.load(tmp_path / "saved")
    assert loaded.config == scorer.config
    images = heldout_drawings()
    assert torch.equal(loaded.score(images, CAPTIONS), scorer.score(images, CAPTIONS))


def test_missing_and_corrupt_files_raise_clear_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptScorer.load(tmp_path / "nowhere")
    saved = tmp_path / "saved"
    trained[0].scorer.save(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        PromptScorer.load(saved)
    trained[0].scorer.save(saved)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors does not match the SHA-256"):
        PromptScorer.load(saved)


def test_training_needs_a_training_split(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a", "split": "heldout"}) + "\n")
    cfg = load_config(REPO / "configs" / "scorer" / "emoji.yaml", [f"data.path={tmp_path}",
                                                                    f"train.out_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="fewer than 2 usable training images"):
        fit(cfg)


def test_scorer_config_default_is_the_minilm_alias():
    # ScorerConfig sits in muse.config (presets load without torch), so the alias is spelled there once more.
    from muse.config import ScorerConfig
    from transformer.text import MINILM_ALIAS

    assert ScorerConfig().text_encoder == MINILM_ALIAS


def test_muse_scorer_and_muse_train_run_the_same_training(trained, shapes_dir, tmp_path, monkeypatch, capsys):
    from muse.cli import main as cli
    from muse.train import scorer as scorer_trainer

    # `muse scorer` flags: trains (from the fixture's feature cache) and saves a loadable scorer.
    cache = trained[1] / "feature-cache"
    cli(["scorer", "--data", str(shapes_dir), "--out", str(tmp_path / "cli"), "--steps", "3", "--batch-size", "4",
         "--sizes", "32", "--image-size", "64", "--cache", str(cache)])
    assert "scorer saved to" in capsys.readouterr().out
    assert PromptScorer.load(tmp_path / "cli").config.image_size == 64
    assert json.loads((tmp_path / "cli" / "training.json").read_text())["steps"] == 3

    # `muse train configs/scorer/emoji.yaml` builds the same run from the preset and dispatches to the same fit.
    seen = []
    monkeypatch.setattr(scorer_trainer, "fit", seen.append)
    cli(["train", str(REPO / "configs" / "scorer" / "emoji.yaml"), "--set", f"data.path={shapes_dir}",
         "--out-dir", str(tmp_path / "preset"), "--set", "train.steps=3"])
    assert len(seen) == 1 and seen[0].train.steps == 3 and seen[0].data.source_sizes == (64, 128)
    assert seen[0].train.out_dir == str(tmp_path / "preset") and "exported scorer model" in capsys.readouterr().out


def test_max_images_bounds_extraction_and_the_last_step_logs_its_loss(shapes_dir, tmp_path, capsys):
    # A quick run must be able to bound the frozen-feature extraction, and end with a loss line whatever log_every.
    cfg = load_config(REPO / "configs" / "scorer" / "emoji.yaml", [
        f"data.path={shapes_dir}", f"train.out_dir={tmp_path}", "data.source_sizes=[32]", "model.image_size=64",
        "data.max_images=5", "train.steps=2", "train.batch_size=4"])
    result = fit(cfg)
    assert result.train.num_images == 5 and result.heldout.num_images == 5
    err = capsys.readouterr().err
    assert "extracting frozen features of 5 train images" in err and "scorer step 2/2: loss" in err
    with pytest.raises(ValueError, match="max_images must be at least 2"):
        load_config(REPO / "configs" / "scorer" / "emoji.yaml", [f"data.path={shapes_dir}", "data.max_images=1"])
