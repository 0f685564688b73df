"""Inpainting, outpainting and editing: what must stay bit-identical, what must not leak, sizes, and windows."""

import numpy as np
import pytest
import torch
from PIL import Image

from sampling import feathered_composite_weights, pixel_to_token_mask


@pytest.fixture(scope="module")
def picture(tiny_pipe) -> Image.Image:
    """A 16 px image with detail in every pixel (so a changed pixel is visible)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def kept_pixels(mask: np.ndarray, stride: int, dilation: int, seam: int) -> np.ndarray:
    """(H, W) bool: pixels farther than the seam from every regenerated (dilated) token."""
    token_mask = pixel_to_token_mask(torch.from_numpy(mask)[None], stride, dilation)
    return (feathered_composite_weights(token_mask, stride, seam)[0, 0] == 0).numpy()


def test_inpaint_keeps_pixels_outside_the_dilated_seam_widened_mask(tiny_pipe, picture):
    mask = np.zeros((16, 16), np.uint8)
    mask[1:3, 13:15] = 255  # two-by-two pixels in the top-right token
    out = tiny_pipe.inpaint("a red apple", image=picture, mask=mask, seed=0, num_images=2)
    kept = kept_pixels(mask > 0, 4, tiny_pipe.config.mask_dilation, tiny_pipe.config.seam)
    assert kept.sum() > 0 and (~kept).sum() > 0
    original = np.asarray(picture)
    for image in out.images:
        result = np.asarray(image)
        assert image.size == (16, 16)
        assert np.array_equal(result[kept], original[kept])
        assert not np.array_equal(result[~kept], original[~kept])
    assert out.tokens.shape == (2, 4, 4)


def test_masked_pixels_do_not_leak_into_the_result(tiny_pipe, picture):
    """Two images that differ only under the mask give identical results: the old content is blanked before
    encoding, so no kept token (and nothing generated) can depend on it."""
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:12] = True
    other = np.asarray(picture).copy()
    other[mask] = 255 - other[mask]
    a = tiny_pipe.inpaint("a dog", image=picture, mask=mask, seed=3)
    b = tiny_pipe.inpaint("a dog", image=Image.fromarray(other), mask=mask, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    # outside the mask the two inputs agree, and inside both come from the same generated pixels
    assert np.array_equal(np.asarray(a.images[0])[~mask], np.asarray(b.images[0])[~mask])


def test_mask_and_image_formats_agree(tiny_pipe, picture, tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[8:, :5] = 255
    reference = tiny_pipe.inpaint("a cat", image=picture, mask=Image.fromarray(mask), seed=5).tokens
    as_tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 127.5 - 1
    picture.save(tmp_path / "in.png")
    Image.fromarray(mask).convert("1").save(tmp_path / "mask.png")
    variants = [
        dict(image=np.asarray(picture), mask=mask > 0),
        dict(image=np.asarray(picture).astype(np.float32) / 255, mask=(mask > 0).astype(np.uint8)),
        dict(image=as_tensor, mask=torch.from_numpy(mask > 0)),
        dict(image=as_tensor[None], mask=torch.from_numpy(mask > 0)[None].float()),
        dict(image=str(tmp_path / "in.png"), mask=tmp_path / "mask.png"),
    ]
    for variant in variants:
        assert torch.equal(tiny_pipe.inpaint("a cat", seed=5, **variant).tokens, reference)


def test_inpaint_with_nothing_masked_returns_the_input(tiny_pipe, picture):
    out = tiny_pipe.inpaint("a cat", image=picture, mask=np.zeros((16, 16), bool), seed=0)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(picture))


def test_outpaint_beyond_the_grid_keeps_the_original_and_decodes_in_windows(tiny_pipe, picture):
    pad = (8, 4, 24, 0)  # canvas 48 x 20 px = 12 x 5 tokens, larger than the 4 x 4 grid
    stats = tiny_pipe.engine.stats
    ticks = stats.ticks
    out = tiny_pipe.outpaint("a sunny sky", image=picture, pad=pad, seed=1, num_images=2)
    assert [im.size for im in out.images] == [(48, 20), (48, 20)] and out.tokens.shape == (2, 5, 12)
    # Window after window, each a decode of its own: more engine ticks than one decode of the grid takes.
    assert stats.ticks - ticks > tiny_pipe.config.sampling.num_steps
    for image in out.images:
        assert np.array_equal(np.asarray(image)[4:20, 8:24], np.asarray(picture))
    assert int(out.tokens.max()) < 16
    # the seed is per image here too
    again = tiny_pipe.outpaint("a sunny sky", image=picture, pad=pad, seed=2)
    assert torch.equal(again.tokens[0], out.tokens[1])


def test_outpaint_can_grow_a_panorama_repeatedly(tiny_pipe, picture):
    image = picture
    for _ in range(3):
        image = tiny_pipe.outpaint("blue sky", image=image, pad=(0, 0, 12, 0), seed=0).images[0]
    assert image.size == (52, 16)
    assert np.array_equal(np.asarray(image)[:, :16], np.asarray(picture))


def test_edit_strength_zero_returns_the_input_and_one_ignores_it(tiny_pipe, picture):
    unchanged = tiny_pipe.edit("a green apple", image=picture, strength=0.0, seed=0)
    assert np.array_equal(np.asarray(unchanged.images[0]), np.asarray(picture))
    full = tiny_pipe.edit("a green apple", image=picture, strength=1.0, seed=6)
    other_input = tiny_pipe.edit("a green apple", image=picture.transpose(Image.FLIP_LEFT_RIGHT), strength=1.0, seed=6)
    assert torch.equal(full.tokens, other_input.tokens)
    assert torch.equal(full.tokens, tiny_pipe("a green apple", seed=6).tokens)


@pytest.mark.parametrize("mode", ["random", "confidence"])
def test_edit_resamples_a_strength_fraction_of_tokens(tiny_pipe, picture, mode):
    original = tiny_pipe.edit("x", image=picture, strength=0.0).tokens
    out = tiny_pipe.edit("a green apple", image=picture, strength=0.25, mode=mode, seed=2, num_images=3)
    changed = (out.tokens != original).flatten(1).sum(dim=1)
    assert int(changed.max()) <= 4  # round(0.25 * 16) re-masked tokens at most differ
    assert int(changed.sum()) > 0
    twice = tiny_pipe.edit("a green apple", image=picture, strength=0.25, mode=mode, seed=2, iterations=2)
    assert int((twice.tokens != original).sum()) <= 8
    assert torch.equal(tiny_pipe.edit("a green apple", image=picture, strength=0.25, mode=mode, seed=2).tokens[0],
                       out.tokens[0])


def test_cascade_inpaint_outpaint_and_edit_work_at_high_resolution(tiny_cascade):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), bool)
    mask[0:6, 0:6] = True
    out = tiny_cascade.inpaint("a dog", image=image, mask=mask, seed=0)
    assert out.images[0].size == (32, 32) and out.low_res_tokens.shape == (1, 4, 4)
    kept = kept_pixels(mask, 4, tiny_cascade.config.mask_dilation, tiny_cascade.config.seam)
    assert np.array_equal(np.asarray(out.images[0])[kept], np.asarray(image)[kept])

    wide = tiny_cascade.outpaint("a dog", image=image, pad=(0, 8, 48, 0), seed=0)
    assert wide.images[0].size == (80, 40) and wide.tokens.shape == (1, 10, 20)
    assert np.array_equal(np.asarray(wide.images[0])[8:, :32], np.asarray(image))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_cascade.outpaint("a dog", image=image, pad=(0, 4, 0, 0))

    assert np.array_equal(np.asarray(tiny_cascade.edit("a", image=image, strength=0).images[0]), np.asarray(image))
    edited = tiny_cascade.edit("a cat", image=image, strength=0.5, seed=0)
    assert edited.images[0].size == (32, 32) and edited.tokens.shape == (1, 8, 8)
    low_only = tiny_cascade.inpaint("a dog", image=image.resize((16, 16)), mask=mask[::2, ::2], seed=0, stages=1)
    assert low_only.images[0].size == (16, 16)
