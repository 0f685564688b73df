"""MusePipeline on a diffusers aMUSEd directory (a tiny random one, built offline by diffusers itself): it loads
without diffusers' code, its guided logits at a step equal AmusedPipeline's, every task runs, the engine batches it
exactly, and `muse convert` writes a musegen pipeline directory of it."""

import json

import numpy as np
import pytest
import torch

from muse.engine import Engine
from muse.options import amused_options
from muse.guidance import guided_logits
from muse.pipeline import MusePipeline
from tests.amused_fixture import MASK_TOKEN_ID, write_amused_directory

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def amused_dir(tmp_path_factory):
    return write_amused_directory(tmp_path_factory.mktemp("amused") / "amused-256")


@pytest.fixture(scope="module")
def amused(amused_dir):
    return MusePipeline.from_pretrained(amused_dir)


def test_loads_as_the_components_and_defaults_of_amused(amused):
    assert type(amused.transformer).__name__ == "UVit2D" and type(amused.vqgan).__name__ == "VQModel"
    assert amused.transformer.config.mask_token_id == MASK_TOKEN_ID
    assert amused.text_encoder.config.kind == "clip" and amused.resolution() == 64  # 4x4 tokens, 16 px each
    assert amused.config.sampling == amused_options()
    assert amused.config.sampling.num_steps == 12 and amused.config.sampling.guidance_scale == 10.0


@torch.no_grad()
@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_guided_logits_at_a_step_equal_amused_pipelines(amused_dir, amused, scale):
    from diffusers import AmusedPipeline

    reference = AmusedPipeline.from_pretrained(amused_dir)
    seen = {}
    real_step = reference.scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        if "logits" not in seen:  # the guided logits the scheduler receives at the first step
            seen["logits"], seen["sample"] = model_output.clone(), sample.clone()
        return real_step(model_output, timestep, sample, *args, **kwargs)

    reference.scheduler.step = step
    reference(["a red apple", "a dog"], num_inference_steps=2, guidance_scale=scale, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    B, K, h, w = seen["logits"].shape
    text = amused.text_encoder(["a red apple", "a dog"] + ([""] * 2 if scale > 1 else []))
    context = amused.transformer.text_context(text.states, text.mask, text.pooled)
    tokens = seen["sample"].reshape(B, h * w)  # (B, L), all masked
    positions = torch.arange(h * w).expand(B, -1)
    ours = guided_logits(amused.transformer, tokens, positions, context, (h, w), scale)  # (B, L, K)
    expected = seen["logits"].flatten(2).transpose(1, 2)
    assert (ours - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))


def test_every_task_runs_on_the_amused_layout(amused):
    out = amused(["a red apple", "a dog"], seed=0, num_steps=4)
    assert [im.size for im in out.images] == [(64, 64)] * 2 and int(out.tokens.max()) < 32
    image = out.images[0]
    mask = np.zeros((64, 64), bool)
    mask[:, 32:] = True  # the right half
    edited = amused.inpaint("a dog", image=image, mask=mask, seed=1, num_steps=4)
    kept = np.zeros((64, 64), bool)
    kept[:, : 32 - 16 - 4] = True  # beyond the regenerated tokens (one token of dilation) and the seam
    assert np.array_equal(np.asarray(edited.images[0])[kept], np.asarray(image)[kept])
    wide = amused.outpaint("a sky", image=image, pad=(0, 0, 64, 0), seed=2, num_steps=4)  # beyond the 4x4 grid
    assert wide.images[0].size == (128, 64)
    assert np.array_equal(np.asarray(wide.images[0])[:, :64], np.asarray(image))
    assert amused.edit("a cat", image=image, strength=0.5, seed=3, num_steps=4).images[0].size == (64, 64)
    best = amused("a tree", seed=4, num_steps=3, num_candidates=3)
    assert best.scores is not None and len(best.candidate_seeds) == 1


def test_the_engine_batches_amused_jobs_exactly(amused):
    tasks = lambda: [amused.task(amused.request("generate", "a red apple", seed=5, num_steps=4)),
                     amused.task(amused.request("generate", ["a dog", "a cat"], seed=6, num_steps=6,
                                                guidance_scale=3.0))]
    alone = [amused.engine.run(task) for task in tasks()]
    engine = Engine()
    handles = [engine.submit(task) for task in tasks()]
    while not all(h.done() for h in handles):
        engine.tick()
    for handle, solo in zip(handles, alone):
        assert torch.equal(handle.result().tokens, solo.tokens)


def test_convert_writes_a_musegen_directory_that_loads_the_same(amused_dir, amused, tmp_path):
    from muse import cli

    cli.main(["convert", str(amused_dir), "--out", str(tmp_path / "converted"), "--weights-dtype", "float16"])
    manifest = json.loads((tmp_path / "converted" / "pipeline.json").read_text())
    assert manifest["components"] == {"vqgan": "vqmodel", "transformer": "uvit2d"}
    converted = MusePipeline.from_pretrained(tmp_path / "converted")
    assert converted.config.sampling == amused.config.sampling
    weight = next(converted.transformer.parameters())
    original = dict(amused.transformer.named_parameters())[next(converted.transformer.named_parameters())[0]]
    assert torch.equal(weight, original.half().float())  # stored in float16, loaded back as float32
    with pytest.raises(SystemExit, match="holds a pipeline already"):
        cli.main(["convert", str(amused_dir), "--out", str(tmp_path / "converted")])


def test_a_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="neither a local directory nor in the Hugging Face cache"):
        MusePipeline.from_pretrained("amused/amused-256")


def test_a_wrong_model_index_is_named(amused_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(amused_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="_class_name is 'StableDiffusionPipeline'"):
        MusePipeline.from_pretrained(copy)
