"""Every bad input to MusePipeline raises a clear error naming the problem; bad directories name the component."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from muse import bundled
from muse.pipeline import MusePipeline, PipelineConfig

IMAGE = Image.new("RGB", (16, 16), (200, 30, 30))
MASK = np.ones((16, 16), bool)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: p([]), ValueError, "empty list"),
        (lambda p: p(3), TypeError, "prompt must be a string or a list of strings"),
        (lambda p: p(["a", 3]), TypeError, r"prompt\[1\] must be a string"),
        (lambda p: p("a", num_images=0), ValueError, "num_images must be >= 1"),
        (lambda p: p("a", num_images=1.5), TypeError, "num_images must be an integer"),
        (lambda p: p("a", num_steps=0), ValueError, "num_steps must be >= 1"),
        (lambda p: p("a", superres_steps=0), ValueError, "superres_steps must be >= 1"),
        (lambda p: p("a", guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number >= 0"),
        (lambda p: p("a", guidance_schedule="cosine"), ValueError, "guidance_schedule must be one of"),
        (lambda p: p("a", negative_prompt="x", guidance_scale=1.0), ValueError, "negative_prompt replaces"),
        (lambda p: p(["a", "b"], negative_prompt=["x", "y", "z"]), ValueError, "3 values for negative_prompt"),
        (lambda p: p("a", num_images=2, seed=[1]), ValueError, "one seed per image"),
        (lambda p: p("a", seed=-1), ValueError, r"seeds must lie in \[0, 2\*\*32\)"),
        (lambda p: p("a", seed="0"), TypeError, "seed must be an integer"),
        (lambda p: p("a", temperature=0), ValueError, "temperature must be a positive finite number"),
        (lambda p: p("a", top_k=0), ValueError, "top_k must be >= 1"),
        (lambda p: p("a", top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (lambda p: p("a", stages=2), ValueError, "stages=2 needs a super-resolution stage"),
        (lambda p: p("a", stages=3), ValueError, "stages must be one of 1, 2"),
        (lambda p: p.inpaint("a", image=IMAGE, mask=np.ones((8, 8), bool)), ValueError,
         "mask is 8x8 pixels but the image is 16x16"),
        (lambda p: p.inpaint("a", image=Image.new("RGB", (18, 16)), mask=np.ones((16, 18), bool)), ValueError,
         "image is 18x16 pixels; width and height must be positive multiples of 4"),
        (lambda p: p.inpaint("a", image=np.zeros((16, 16, 4), np.uint8), mask=MASK), ValueError,
         r"must be \(H, W, 3\)"),
        (lambda p: p.inpaint("a", image=np.full((16, 16, 3), 2.0), mask=MASK), ValueError, r"values in \[0, 1\]"),
        (lambda p: p.inpaint("a", image=np.zeros((16, 16, 3), np.int32), mask=MASK), ValueError, "uint8 or float"),
        (lambda p: p.inpaint("a", image=[[0]], mask=MASK), TypeError, r"image\[0\] must be a PIL image"),
            (lambda p: p.inpaint("a", image=7, mask=MASK), TypeError, "image must be a PIL image"),
        (lambda p: p.inpaint("a", image=IMAGE, mask=np.ones((2, 2, 16, 16), bool)), ValueError, "mask must be"),
        (lambda p: p.inpaint(["a", "b", "c"], image=IMAGE, mask=np.ones((2, 16, 16), bool)), ValueError,
         "cannot pair 3 / 1 / 2"),
        (lambda p: p.outpaint("a", image=IMAGE, pad=(0, 0, 6, 0)), ValueError, "multiples of 4 pixels"),
        (lambda p: p.outpaint("a", image=IMAGE, pad=(0, -4, 0, 0)), ValueError, "must not be negative"),
        (lambda p: p.outpaint("a", image=IMAGE, pad=(4, 4)), ValueError, "four integers"),
        (lambda p: p.edit("a", image=IMAGE, strength=1.5), ValueError, r"strength must be a number in \[0, 1\]"),
        (lambda p: p.edit("a", image=IMAGE, strength=-0.1), ValueError, r"strength must be a number in \[0, 1\]"),
        (lambda p: p.edit("a", image=IMAGE, strength=0.5, mode="best"), ValueError, "mode must be one of"),
        (lambda p: p.edit("a", image=IMAGE, strength=0.5, iterations=0), ValueError, "iterations must be >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_pipe, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_pipe)


def test_image_files_that_are_not_images_or_missing(tiny_pipe, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png is not an image file"):
        tiny_pipe.edit("a", image=tmp_path / "notes.png", strength=0.5)
    with pytest.raises(ValueError, match=r"mask: .*notes\.png is not an image file"):
        tiny_pipe.inpaint("a", image=IMAGE, mask=str(tmp_path / "notes.png"))
    with pytest.raises(FileNotFoundError):
        tiny_pipe.edit("a", image=tmp_path / "absent.png", strength=0.5)


def test_bundled_model_absent_or_unknown_preset_is_explained(monkeypatch, tmp_path, tiny_pipeline_dir):
    monkeypatch.setattr(bundled, "ASSETS", tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match="bundled default model is not installed.*from_pretrained"):
        MusePipeline.from_pretrained()
    with pytest.raises(FileNotFoundError, match="no pipeline directory or bundled preset named .*nowhere"):
        MusePipeline.from_pretrained(tmp_path / "nowhere")
    shutil.copytree(tiny_pipeline_dir, tmp_path / "assets" / "tiny")
    with pytest.raises(FileNotFoundError, match="bundled preset named 'tinyy'; bundled presets: tiny"):
        MusePipeline.from_pretrained("tinyy")
    assert MusePipeline.from_pretrained("tiny").transformer.config.grid_size == 4
    with pytest.raises(FileNotFoundError, match="pipeline.json not found"):
        MusePipeline.from_pretrained(tmp_path)


def flip_a_bit(file):
    data = bytearray(file.read_bytes())
    data[-5] ^= 1  # deep inside the last tensor: still a valid safetensors file, silently other weights
    file.write_bytes(bytes(data))


def forget_hash(component):
    """The weights' SHA-256 deleted from the component's config.json (as saved before weights carried it)."""
    config = json.loads((component / "config.json").read_text())
    del config["weights_sha256"]
    (component / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: shutil.rmtree(d / "transformer"), FileNotFoundError, "pipeline's transformer .* is missing"),
    (lambda d: (d / "vqgan" / "model.safetensors").write_bytes(b"\x00" * 20), ValueError,
     "pipeline's vqgan .* does not match the SHA-256"),
    (lambda d: flip_a_bit(d / "transformer" / "model.safetensors"), ValueError,
     "pipeline's transformer .*model.safetensors does not match the SHA-256 recorded"),
    # Deleting the hash does not switch the check off: the directory is refused, saying how to fix it.
    (lambda d: (forget_hash(d / "transformer"), flip_a_bit(d / "transformer" / "model.safetensors")),
     ValueError, "pipeline's transformer .*config.json records no weights_sha256 .* re-save"),
    (lambda d: (d / "text_encoder.json").unlink(), FileNotFoundError, "pipeline's text_encoder"),
    (lambda d: (d / "text_encoder.json").write_text('{"name_or_path": "text_encoder", "kindd": "t5"}'), ValueError,
     "unknown config key 'kindd'"),
    (lambda d: (d / "pipeline.json").write_text("{oops"), ValueError, "pipeline.json is not valid JSON"),
    (lambda d: (d / "pipeline.json").write_text(json.dumps(
        {"components": ["vqgan", "transformer"], "config": {"num_stepz": 3}})), ValueError,
     "unknown config key 'num_stepz'"),
    (lambda d: (d / "pipeline.json").write_text(json.dumps(
        {"components": ["vqgan", "transformer", "superres"], "config": {}})), FileNotFoundError,
     "pipeline's superres .* is missing"),
])
def test_damaged_pipeline_directories_name_the_component(tiny_pipeline_dir, tmp_path, damage, error, message):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline_dir, copy)
    damage(copy)
    with pytest.raises(error, match=message):
        MusePipeline.from_pretrained(copy)


def test_mismatched_components_are_refused(tiny_pipe):
    from transformer.config import TransformerConfig
    from transformer.model import MaskedTransformer

    wrong = MaskedTransformer(TransformerConfig(codebook_size=32, grid_size=4, width=32, depth=1, num_heads=2,
                                                text_dim=16))
    with pytest.raises(ValueError, match="predicts 32 codes but the VQGAN has 16"):
        MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, wrong)
    with pytest.raises(ValueError, match="window_overlap"):
        PipelineConfig(window_overlap=1.0)


def estimated_cost(pipe, call) -> int:
    """The decoding cost `pipe.task` estimates for `call(pipe)`, read from the refusal of a pipeline that allows 1."""
    import copy
    import dataclasses
    import types

    from muse.options import LimitExceeded, Limits

    limited = copy.copy(pipe)
    limited.config = dataclasses.replace(pipe.config, limits=Limits(max_row_steps=1))
    # The estimate is made before any work: nothing may reach an engine.
    limited.engine = types.SimpleNamespace(run=lambda task: pytest.fail("the request reached the engine"))
    with pytest.raises(LimitExceeded) as refusal:
        call(limited)
    assert refusal.value.limit == "max_row_steps"
    return refusal.value.value


def test_decode_cost_counts_windows_steps_rows_and_each_steps_overhead():
    from muse.options import STEP_OVERHEAD_ROWS, decode_cost

    assert decode_cost(windows=1, steps=24, rows=2) == 24 * (2 + STEP_OVERHEAD_ROWS)
    assert decode_cost(windows=168, steps=24, rows=2) == 168 * 24 * (2 + STEP_OVERHEAD_ROWS)
    assert decode_cost(windows=1, steps=8, rows=2, row_tokens=4.0) == 8 * (2 * 4 + STEP_OVERHEAD_ROWS)
    assert decode_cost(windows=0, steps=24, rows=2) == 0


def test_the_cost_estimate_counts_windows_candidates_guidance_stages_and_iterations(tiny_pipe, tiny_cascade):
    """Hand-counted on the tiny pipelines (4 x 4 token grid, windows overlapping by 2 tokens, 4 steps, guidance on;
    the cascade's super-res grid is 8 x 8, 3 steps): rows x steps per window, plus 4 rows of overhead per step."""
    from muse.options import STEP_OVERHEAD_ROWS as O

    image = np.zeros((16, 16, 3), np.uint8)
    # one window, 2 guided rows per image
    assert estimated_cost(tiny_pipe, lambda p: p("a")) == 4 * (2 + O)
    assert estimated_cost(tiny_pipe, lambda p: p("a", num_images=2)) == 4 * (4 + O)
    assert estimated_cost(tiny_pipe, lambda p: p("a", guidance_scale=1.0)) == 4 * (1 + O)  # unguided: one row
    assert estimated_cost(tiny_pipe, lambda p: p(["a", "b"], num_candidates=3)) == 4 * (12 + O)  # candidates are rows
    assert estimated_cost(tiny_pipe, lambda p: p("a", num_steps=10)) == 10 * (2 + O)
    # outpainting 4 x 4 tokens by 4 on the right: windows at columns 0 (all known: skipped), 2 and 4
    assert estimated_cost(tiny_pipe, lambda p: p.outpaint("a", image=image, pad=(0, 0, 16, 0))) == 2 * 4 * (2 + O)
    # editing an 8 x 8 token image: 3 x 3 windows, twice, each round first scored (one step a window) in
    # confidence mode
    big = np.zeros((32, 32, 3), np.uint8)
    assert estimated_cost(tiny_pipe, lambda p: p.edit("a", image=big, strength=0.5, iterations=2)) == \
        2 * 9 * 4 * (2 + O)
    assert estimated_cost(tiny_pipe, lambda p: p.edit("a", image=big, strength=0.5, iterations=2,
                                                      mode="confidence")) == 2 * (9 * 4 + 9) * (2 + O)
    # inpainting: only the windows holding masked tokens (a 2-token corner, grown by mask_dilation=1)
    mask = np.zeros((32, 32), bool)
    mask[:4, :4] = True
    assert estimated_cost(tiny_pipe, lambda p: p.inpaint("a", image=big, mask=mask)) == 1 * 4 * (2 + O)
    # the cascade: the base stage, then one super-res window of 8 x 8 tokens, a row costing 4 base rows
    assert estimated_cost(tiny_cascade, lambda p: p("a")) == 4 * (2 + O) + 3 * (2 * 4 + O)
    assert estimated_cost(tiny_cascade, lambda p: p.upscale("a", image=image)) == 3 * (2 * 4 + O)
