import pytest
import torch

from sampling.decode import decode
from sampling.masks import (
    TokenCanvas,
    Window,
    composite,
    edit_mask,
    feathered_composite_weights,
    masked_grid,
    outpaint_canvas,
    pixel_to_token_mask,
    plan_windows,
    token_padding,
)

K = 16
MASK = K


def test_a_token_is_regenerated_if_any_of_its_pixels_is_masked():
    mask = torch.zeros(2, 16, 24, dtype=torch.bool)
    mask[0, 5, 6] = True  # one pixel inside token (1, 1) with stride 4
    mask[1, 12:16, 20:24] = True  # exactly token (3, 5)
    tokens = pixel_to_token_mask(mask, stride=4)
    assert tokens.shape == (2, 4, 6) and tokens.dtype == torch.bool
    assert tokens[0].nonzero().tolist() == [[1, 1]]
    assert tokens[1].nonzero().tolist() == [[3, 5]]


def test_dilation_grows_a_square_clipped_at_the_border():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 0, 0] = True  # token (0, 0)
    mask[0, 20, 17] = True  # token (5, 4) with stride 4
    grown = pixel_to_token_mask(mask, stride=4, dilate=1)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:2, 0:2] = True
    expected[4:7, 3:6] = True
    assert torch.equal(grown, expected)
    assert int(pixel_to_token_mask(mask, stride=4, dilate=2)[0].sum()) == 9 + 25


@pytest.mark.parametrize(
    "mask, stride, dilate, message",
    [
        (torch.zeros(1, 10, 16, dtype=torch.bool), 4, 0, "multiple of the token stride"),
        (torch.zeros(1, 16, 18, dtype=torch.bool), 4, 0, "multiple of the token stride"),
        (torch.zeros(16, 16, dtype=torch.bool), 4, 0, r"\(B, H, W\)"),
        (torch.zeros(1, 16, 16), 4, 0, "bool"),
        (torch.zeros(1, 16, 16, dtype=torch.bool), 0, 0, "stride"),
        (torch.zeros(1, 16, 16, dtype=torch.bool), 4, -1, "dilate"),
    ],
)
def test_pixel_to_token_mask_rejects_bad_input(mask, stride, dilate, message):
    with pytest.raises(ValueError, match=message):
        pixel_to_token_mask(mask, stride, dilate)


def test_masked_grid_puts_the_mask_token_exactly_where_asked():
    tokens = torch.randint(0, K, (2, 4, 4))
    token_mask = torch.rand(2, 4, 4) > 0.5
    grid = masked_grid(tokens, token_mask, MASK)
    assert torch.equal(grid == MASK, token_mask)
    assert torch.equal(grid[~token_mask], tokens[~token_mask])
    with pytest.raises(ValueError, match="shape"):
        masked_grid(tokens, token_mask[:, :2], MASK)


def chebyshev_distance_to_region(region: torch.Tensor) -> torch.Tensor:
    """Brute-force pixel distance (H, W) to the nearest True pixel of region (H, W)."""
    points = region.nonzero().float()  # (P, 2)
    h, w = region.shape
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).float()  # (H, W, 2)
    return (grid[:, :, None] - points[None, None]).abs().amax(dim=-1).amin(dim=-1)


@pytest.mark.parametrize("seam", [0, 1, 3])
def test_composite_weights_are_one_inside_linear_in_the_seam_and_zero_beyond(seam):
    token_mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    token_mask[0, 2, 1:3] = True
    token_mask[0, 5, 5] = True
    weights = feathered_composite_weights(token_mask, stride=4, seam=seam)
    assert weights.shape == (1, 1, 24, 24)
    region = token_mask[0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    distance = chebyshev_distance_to_region(region)
    expected = ((seam + 1 - distance) / (seam + 1)).clamp(min=0)
    assert torch.equal(weights[0, 0], expected)
    assert bool((weights[0, 0][region] == 1).all())
    assert bool((weights[0, 0][distance > seam] == 0).all())


def test_composite_is_bit_identical_outside_the_region_and_seam():
    g = torch.Generator().manual_seed(0)
    pixel_mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    pixel_mask[0, 9:14, 3:20] = True
    pixel_mask[1, 30, 30] = True
    token_mask = pixel_to_token_mask(pixel_mask, stride=8, dilate=1)
    weights = feathered_composite_weights(token_mask, stride=8, seam=4)
    original = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    generated = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    out = composite(generated, original, weights)
    outside = (weights == 0).expand_as(out)
    inside = (weights == 1).expand_as(out)
    assert bool(outside.any()) and bool(inside.any())
    assert torch.equal(out[outside], original[outside])
    assert torch.equal(out[inside], generated[inside])
    # The masked pixels themselves are all inside.
    assert bool(inside[:, 0][pixel_mask].all())
    seam = ~outside & ~inside
    low = torch.minimum(generated, original)[seam]
    high = torch.maximum(generated, original)[seam]
    assert bool(((out[seam] >= low - 1e-6) & (out[seam] <= high + 1e-6)).all())


def test_composite_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        composite(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="weights"):
        composite(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_token_padding_converts_pixels_and_rejects_partial_tokens():
    assert token_padding((0, 32, 16, 8), stride=8) == (0, 4, 2, 1)
    with pytest.raises(ValueError, match="multiple of the token stride 8"):
        token_padding((0, 12, 0, 0), stride=8)
    with pytest.raises(ValueError, match="non-negative"):
        token_padding((0, -8, 0, 0), stride=8)


def test_outpaint_canvas_embeds_the_tokens_and_masks_the_border():
    tokens = torch.randint(0, K, (2, 3, 4))
    canvas = outpaint_canvas(tokens, (1, 2, 0, 3), MASK)
    assert isinstance(canvas, TokenCanvas)
    assert canvas.tokens.shape == canvas.mask.shape == (2, 2 + 3 + 3, 1 + 4 + 0)
    assert torch.equal(canvas.tokens[:, 2:5, 1:5], tokens)
    assert torch.equal(canvas.mask, canvas.tokens == MASK)
    assert int(canvas.mask.sum()) == 2 * (8 * 5 - 12)


def check_plan(unknown: torch.Tensor, plan: list[Window], window_hw: tuple[int, int]) -> None:
    """Each window fits, adds unknown tokens, and (unless nothing was known yet) overlaps decoded context; together
    they cover every unknown token."""
    h, w = unknown.shape
    decoded = ~unknown.clone()
    for index, window in enumerate(plan):
        assert (window.height, window.width) == (min(window_hw[0], h), min(window_hw[1], w))
        assert 0 <= window.top and window.top + window.height <= h
        assert 0 <= window.left and window.left + window.width <= w
        crop = decoded[window.rows, window.cols]
        assert not bool(crop.all()), f"window {index} has nothing new"
        assert bool(crop.any()) or (index == 0 and not bool((~unknown).any())), f"window {index} has no context"
        decoded[window.rows, window.cols] = True
    assert bool(decoded.all())


def test_outpaint_windows_grow_outward_from_the_known_region():
    unknown = outpaint_canvas(torch.zeros(1, 16, 16, dtype=torch.long), (8, 8, 24, 8), MASK).mask[0]  # 32 x 48
    plan = plan_windows(unknown, (16, 16), overlap=8)
    check_plan(unknown, plan, (16, 16))
    # Manhattan distance from each window to the nearest known token never decreases along the plan.
    known = (~unknown).nonzero()  # (P, 2)
    distances = []
    for wd in plan:
        gap_y = (wd.top - known[:, 0]).clamp(min=0) + (known[:, 0] - (wd.top + wd.height - 1)).clamp(min=0)
        gap_x = (wd.left - known[:, 1]).clamp(min=0) + (known[:, 1] - (wd.left + wd.width - 1)).clamp(min=0)
        distances.append(int((gap_y + gap_x).min()))
    assert distances == sorted(distances) and distances[0] == 0 and distances[-1] > 0
    assert plan[-1].left == 48 - 16  # the far right strip comes last


@pytest.mark.parametrize(
    "shape, known, window, overlap",
    [
        ((16, 40), (slice(0, 16), slice(0, 16)), (16, 16), 8),  # extend to the right only
        ((40, 40), (slice(12, 28), slice(12, 28)), (16, 16), 4),  # all sides
        ((24, 24), None, (16, 16), 8),  # nothing known: plain generation of a large canvas
        ((10, 12), (slice(0, 4), slice(0, 4)), (16, 16), 8),  # canvas smaller than the window
        ((20, 33), (slice(5, 9), slice(30, 33)), (8, 12), 3),  # odd sizes, known strip at an edge
    ],
)
def test_windows_cover_the_canvas_with_context(shape, known, window, overlap):
    unknown = torch.ones(shape, dtype=torch.bool)
    if known is not None:
        unknown[known] = False
    check_plan(unknown, plan_windows(unknown, window, overlap), window)


def test_windows_for_random_holes():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        unknown = torch.rand(30, 26, generator=g) < torch.rand(1, generator=g)
        check_plan(unknown, plan_windows(unknown, (8, 10), 3), (8, 10))


def test_fully_known_canvas_needs_no_window_and_bad_overlap_raises():
    assert plan_windows(torch.zeros(20, 20, dtype=torch.bool), (8, 8), 2) == []
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(torch.ones(20, 20, dtype=torch.bool), (8, 8), 8)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(torch.ones(20, 20, dtype=torch.bool), (8, 8), 0)


def test_windowed_outpainting_with_decode_fills_the_canvas_and_keeps_the_image():
    table = torch.randn(8 * 8, K, generator=torch.Generator().manual_seed(1))  # the "model" knows an 8 x 8 grid

    def logits_fn(tokens, positions, step):
        assert tokens.shape[1] == 64
        return table[positions]

    image = torch.randint(0, K, (2, 8, 8))
    canvas = outpaint_canvas(image, (0, 4, 12, 0), MASK)  # 12 x 20 tokens
    grid = canvas.tokens.clone()
    for window in plan_windows(canvas.mask[0], (8, 8), overlap=4):
        crop = grid[:, window.rows, window.cols]
        out = decode(crop.reshape(2, -1), logits_fn, mask_token_id=MASK, seeds=torch.tensor([1, 2]), num_steps=4)
        grid[:, window.rows, window.cols] = out.tokens.reshape(crop.shape)
    assert not bool((grid == MASK).any())
    assert torch.equal(grid[:, 4:12, 0:8], image)


def test_edit_strength_zero_and_one_and_counts_between():
    seeds = torch.tensor([1, 2, 3])
    assert not bool(edit_mask((3, 4, 4), 0.0, seeds).any())
    assert bool(edit_mask((3, 4, 4), 1.0, seeds).all())
    mask = edit_mask((3, 8, 8), 0.25, seeds)
    assert mask.shape == (3, 8, 8) and mask.flatten(1).sum(dim=1).tolist() == [16, 16, 16]
    assert not torch.equal(mask[0], mask[1])


def test_random_edit_mask_depends_only_on_the_rows_seed():
    seeds = torch.tensor([5, 6, 7, 8])
    together = edit_mask((4, 64), 0.4, seeds)
    assert torch.equal(edit_mask((4, 64), 0.4, seeds), together)
    for row in range(4):
        assert torch.equal(edit_mask((1, 64), 0.4, seeds[row : row + 1])[0], together[row])
    # Positions are re-masked uniformly over many seeds.
    many = edit_mask((2000, 64), 0.25, torch.arange(2000)).float().mean(dim=0)
    assert (many - 0.25).abs().max().item() < 0.05


def test_edit_mask_with_confidence_takes_the_least_confident_tokens():
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    mask = edit_mask((2, 4), 0.5, torch.arange(2), confidence=confidence)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]
    with pytest.raises(ValueError, match="confidence"):
        edit_mask((2, 4), 0.5, torch.arange(2), confidence=confidence[:, :3])
    with pytest.raises(ValueError, match="strength"):
        edit_mask((2, 4), 1.5, torch.arange(2))
    with pytest.raises(ValueError, match="seeds"):
        edit_mask((2, 4), 0.5, torch.arange(3))


def test_editing_is_decode_on_a_remasked_grid():
    table = torch.randn(16, K, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(0, K, (3, 4, 4))
    seeds = torch.tensor([4, 5, 6])
    for strength in (0.0, 0.5):
        remask = edit_mask(tuple(tokens.shape), strength, seeds)
        grid = masked_grid(tokens, remask, MASK).reshape(3, 16)
        out = decode(grid, lambda t, p, s: table[p], mask_token_id=MASK, seeds=seeds, num_steps=4)
        kept = ~remask.reshape(3, 16)
        assert torch.equal(out.tokens[kept], tokens.reshape(3, 16)[kept])
        assert torch.equal(out.generated, ~kept)
    again = decode(grid, lambda t, p, s: table[p], mask_token_id=MASK, seeds=seeds, num_steps=4)
    assert torch.equal(out.tokens, again.tokens)
