"""What a diffusers user looks for, with musegen's guarantees kept: output_type, a per-step callback, precomputed
prompt embeddings, `components` and `dtype`, a progress bar that can be turned off, `to(dtype)` first, and a
`generator` argument that points to the per-image seeds."""

import numpy as np
import pytest
import torch
from PIL import Image

from muse.engine import Step
from muse.pipeline import MusePipeline
from muse.requests import GenerateRequest
from sampling import feathered_composite_weights, pixel_to_token_mask
from transformer.text import TextEmbedding


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def pixels(out) -> np.ndarray:
    """(B, H, W, 3) uint8 of a "pil" output."""
    return np.stack([np.asarray(image) for image in out.images])


# --------------------------------------------------------------------------------------------------------------------
# Messages that point the right way


def test_a_generator_points_to_the_per_image_seeds(tiny_pipe):
    with pytest.raises(TypeError, match=r"generator is not taken.*seed=S \(image k gets S \+ k\)"):
        tiny_pipe("a red apple", generator=torch.Generator())
    with pytest.raises(TypeError, match="seed="):
        tiny_pipe.inpaint("a red apple", image=np.zeros((16, 16, 3), np.uint8), mask=np.ones((16, 16), bool),
                          generator=torch.Generator())


def test_to_takes_a_dtype_first_as_torch_does(tiny_cascade):
    pipe = tiny_cascade
    try:
        assert pipe.to(torch.float64) is pipe
        assert pipe.dtype == torch.float64 and next(pipe.vqgan.parameters()).dtype == torch.float64
        pipe.to(dtype=torch.float32)
        assert pipe.dtype == torch.float32
        with pytest.raises(TypeError, match="two dtypes"):
            pipe.to(torch.float32, dtype=torch.float64)
        with pytest.raises(TypeError, match="torch.dtype"):
            pipe.to("cpu", "float32")
    finally:
        pipe.to("cpu", torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# output_type


def test_output_types_hold_the_same_image(tiny_pipe):
    pil = tiny_pipe("a red apple", num_images=2, seed=3)
    array = tiny_pipe("a red apple", num_images=2, seed=3, output_type="np")
    tensor = tiny_pipe("a red apple", num_images=2, seed=3, output_type="pt")
    assert array.images.dtype == np.float32 and array.images.shape == (2, 16, 16, 3)
    assert 0 <= array.images.min() and array.images.max() <= 1
    assert np.array_equal(np.round(array.images * 255).astype(np.uint8), pixels(pil))
    assert tensor.images.dtype == torch.float32 and tensor.images.shape == (2, 3, 16, 16)
    assert torch.equal(tensor.images, torch.from_numpy(array.images).permute(0, 3, 1, 2))
    for out in (array, tensor):
        assert torch.equal(out.tokens, pil.tokens) and out.seeds == pil.seeds


@pytest.mark.parametrize("output_type", ["tokens", "latent"])
def test_tokens_skip_the_vqgan_decode(tiny_pipe, monkeypatch, output_type):
    decoded = []
    decode = tiny_pipe.vqgan.decode
    monkeypatch.setattr(tiny_pipe.vqgan, "decode", lambda tokens: decoded.append(1) or decode(tokens))
    pil = tiny_pipe("a red apple", num_images=2, seed=3)
    assert len(decoded) == 2
    out = tiny_pipe("a red apple", num_images=2, seed=3, output_type=output_type)
    assert len(decoded) == 2  # no decode
    assert torch.equal(out.images, pil.tokens) and torch.equal(out.tokens, pil.tokens)


def test_tokens_with_a_scorer_choose_as_the_images_do(tiny_pipe):
    """Best-of-N by a scorer reads images: they are decoded to choose, so the choice does not depend on the form."""
    def scorer(images, prompts):
        return torch.tensor([float(np.asarray(image).mean()) for image in images])

    pil = tiny_pipe("a red apple", seed=4, num_candidates=3, scorer=scorer)
    tokens = tiny_pipe("a red apple", seed=4, num_candidates=3, scorer=scorer, output_type="tokens")
    assert torch.equal(tokens.images, pil.tokens) and tokens.candidate_seeds == pil.candidate_seeds


def test_every_task_takes_output_type_and_inpaint_keeps_its_pixels_exactly(tiny_pipe, picture):
    mask = np.zeros((16, 16), bool)
    mask[0:2, 0:2] = True
    out = tiny_pipe.inpaint("a red apple", image=picture, mask=mask, seed=0, output_type="np")
    kept = (feathered_composite_weights(pixel_to_token_mask(torch.from_numpy(mask)[None], 4,
                                                            tiny_pipe.config.mask_dilation),
                                        4, tiny_pipe.config.seam)[0, 0] == 0).numpy()
    assert np.array_equal(out.images[0][kept], np.asarray(picture, np.float32)[kept] / np.float32(255))
    assert tiny_pipe.outpaint("x", image=picture, pad=(4, 0, 0, 0), seed=0, output_type="pt").images.shape == (
        1, 3, 16, 20)
    edit = tiny_pipe.edit("x", image=picture, strength=0.5, seed=0, output_type="tokens")
    assert edit.images.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, tokens, latent"):
        tiny_pipe("x", output_type="numpy")


def test_cascade_upscale_output_type(tiny_cascade):
    small = tiny_cascade("a red apple", seed=1, stages=1)
    up = tiny_cascade.upscale("a red apple", image=small.images[0], seed=2)
    tokens = tiny_cascade.upscale("a red apple", image=small.images[0], seed=2, output_type="latent")
    assert torch.equal(tokens.images, up.tokens) and tokens.images.shape == (1, 8, 8)


# --------------------------------------------------------------------------------------------------------------------
# on_step and the progress bar


def test_on_step_sees_every_decoding_step_and_changes_nothing(tiny_pipe):
    steps: list[Step] = []
    out = tiny_pipe("a red apple", seed=5, num_steps=4, on_step=steps.append)
    assert [s.index for s in steps] == [1, 2, 3, 4] and steps[-1].masked == 0
    assert all(isinstance(s, Step) and s.grid == (4, 4) for s in steps)
    assert torch.equal(out.tokens, tiny_pipe("a red apple", seed=5, num_steps=4).tokens)


def test_an_error_in_on_step_is_raised_by_the_call(tiny_pipe):
    def fail(step):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        tiny_pipe("a red apple", seed=5, on_step=fail)


def test_the_progress_bar_counts_steps_and_turns_off(tiny_cascade, capsys):
    pipe = tiny_cascade
    try:
        pipe.set_progress_bar_config(disable=False)  # on even though pytest's stderr is not a terminal
        pipe("a red apple", seed=0, num_steps=4, superres_steps=3, stages=2)
        shown = capsys.readouterr().err
        assert "generate" in shown and "7/7" in shown  # 4 base steps + 3 super-res steps
        pipe.set_progress_bar_config(disable=True)
        pipe("a red apple", seed=0, num_steps=4)
        assert capsys.readouterr().err == ""
        with pytest.raises(TypeError, match="sets file itself"):
            pipe.set_progress_bar_config(file=None)
    finally:
        pipe.set_progress_bar_config()


# --------------------------------------------------------------------------------------------------------------------
# prompt_embeds, components, dtype


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_prompt_embeds_give_the_prompts_images(tiny_pipe, guidance_scale):
    prompts = ["a red apple", "a green tree"]
    embeds = tiny_pipe.text_encoder(prompts)
    plain = tiny_pipe(prompts, num_images=2, seed=7, guidance_scale=guidance_scale)
    given = tiny_pipe(["first", "second"], num_images=2, seed=7, guidance_scale=guidance_scale,
                      prompt_embeds=embeds)
    assert torch.equal(given.tokens, plain.tokens)
    assert given.prompts == ["first", "first", "second", "second"]  # the prompts still name the images
    swapped = tiny_pipe(prompts, num_images=2, seed=7, guidance_scale=guidance_scale,
                        prompt_embeds=tiny_pipe.text_encoder(prompts[::-1]))  # the embeddings decide, not the text
    assert torch.equal(swapped.tokens, tiny_pipe(prompts[::-1], num_images=2, seed=7,
                                                 guidance_scale=guidance_scale).tokens)


def test_prompt_embeds_with_negative_prompt_and_one_prompt_for_several_images(tiny_pipe, picture):
    embeds = tiny_pipe.text_encoder(["a red apple"])
    plain = tiny_pipe("a red apple", seed=1, negative_prompt="a dog")
    assert torch.equal(tiny_pipe("x", seed=1, negative_prompt="a dog", prompt_embeds=embeds).tokens, plain.tokens)
    images = [picture, picture]
    edits = tiny_pipe.edit("a red apple", image=images, strength=0.5, seed=1)
    assert torch.equal(tiny_pipe.edit("x", image=images, strength=0.5, seed=1, prompt_embeds=embeds).tokens,
                       edits.tokens)


def test_prompt_embeds_are_checked(tiny_pipe):
    embeds = tiny_pipe.text_encoder(["a red apple"])
    with pytest.raises(ValueError, match="1 rows for 2 prompt"):
        tiny_pipe(["a", "b"], prompt_embeds=embeds)
    with pytest.raises(TypeError, match="TextEmbedding"):
        tiny_pipe("a", prompt_embeds=embeds.states)
    wide = TextEmbedding(torch.zeros(1, embeds.states.shape[1], embeds.states.shape[2] + 1), embeds.mask)
    with pytest.raises(ValueError, match="this pipeline's text encoder makes"):
        tiny_pipe("a", prompt_embeds=wide)
    with pytest.raises(ValueError, match="NaN"):
        GenerateRequest("a", options=tiny_pipe.options(),
                        prompt_embeds=TextEmbedding(embeds.states * float("nan"), embeds.mask))


def test_components_rebuild_the_pipeline_and_dtype_is_the_token_models(tiny_pipe):
    parts = tiny_pipe.components
    assert set(parts) == {"vqgan", "text_encoder", "transformer", "superres", "superres_vqgan", "scorer"}
    assert parts["vqgan"] is tiny_pipe.vqgan and parts["superres"] is None
    again = MusePipeline(**parts, config=tiny_pipe.config)
    assert torch.equal(again("a red apple", seed=2).tokens, tiny_pipe("a red apple", seed=2).tokens)
    assert tiny_pipe.dtype == next(tiny_pipe.transformer.parameters()).dtype


# --------------------------------------------------------------------------------------------------------------------
# The README's inpainting margin, exactly


def test_inpaint_changes_only_pixels_within_the_stated_margin(tiny_pipe):
    """README: a masked pixel's whole token, grown by `mask_dilation` tokens, and `seam` pixels beyond, may change;
    every other pixel is the input's, bit for bit. One masked pixel: a square of (2 dilation + 1) tokens plus the
    seam on each side."""
    stride, dilation, seam = tiny_pipe.stride(), tiny_pipe.config.mask_dilation, tiny_pipe.config.seam
    side = 32
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    y, x = 13, 18  # in token (3, 4)
    mask = np.zeros((side, side), bool)
    mask[y, x] = True
    top, left = (y // stride - dilation) * stride - seam, (x // stride - dilation) * stride - seam
    size = (2 * dilation + 1) * stride + 2 * seam
    margin = np.zeros((side, side), bool)
    margin[max(top, 0) : top + size, max(left, 0) : left + size] = True
    changed = np.zeros((side, side), bool)
    for seed in range(4):
        result = np.asarray(tiny_pipe.inpaint("a red apple", image=image, mask=mask, seed=seed).images[0])
        changed |= (result != image).any(axis=-1)
    assert not changed[~margin].any()       # nothing outside the margin
    assert changed[margin].mean() > 0.5     # and the margin is not an overstatement
