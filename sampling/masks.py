"""Starting grids for inpainting, outpainting and editing, and the pixel compositing that follows decoding.

Convention everywhere: a bool mask where True means unknown / regenerate (in user images, white = regenerate).
Every task below ends in the same `decode` call on a pre-filled grid; these helpers only build that grid.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sampling import rng


def pixel_to_token_mask(mask: Tensor, stride: int, dilate: int = 0) -> Tensor:
    """Token mask (B, h, w) from a pixel mask (B, H, W), h = H / stride: a token is regenerated if ANY of its
    stride x stride pixels is masked, then the token mask is grown by `dilate` tokens in every direction (square).

    Raises ValueError if the mask is not (B, H, W) bool, H or W is not a multiple of stride, or stride/dilate are bad.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        got = f"{tuple(mask.shape)} {mask.dtype}"
        raise ValueError(f"pixel_to_token_mask: mask must be a (B, H, W) bool tensor, got {got}")
    if stride < 1 or dilate < 0:
        raise ValueError(f"pixel_to_token_mask: need stride >= 1 and dilate >= 0, got {stride}, {dilate}")
    batch, height, width = mask.shape
    if height % stride or width % stride:
        raise ValueError(
            f"pixel_to_token_mask: mask size {height}x{width} is not a multiple of the token stride {stride}"
        )
    blocks = mask.reshape(batch, height // stride, stride, width // stride, stride)  # (B, h, s, w, s)
    return dilate_token_mask(blocks.any(dim=4).any(dim=2), dilate)


def dilate_token_mask(token_mask: Tensor, tokens: int) -> Tensor:
    """Grow a (B, h, w) bool mask by `tokens` in every direction (a (2n+1) x (2n+1) square), clipped at the border."""
    if tokens < 0:
        raise ValueError(f"dilate_token_mask: tokens must be >= 0, got {tokens}")
    if tokens == 0:
        return token_mask.clone()
    grown = F.max_pool2d(token_mask[:, None].float(), kernel_size=2 * tokens + 1, stride=1, padding=tokens)
    return grown[:, 0] > 0


def masked_grid(tokens: Tensor, token_mask: Tensor, mask_token_id: int) -> Tensor:
    """Starting grid: `tokens` with mask_token_id wherever token_mask is True. Any matching shapes, e.g. (B, h, w)."""
    if token_mask.dtype != torch.bool or token_mask.shape != tokens.shape:
        raise ValueError(
            f"masked_grid: token_mask must be bool with the tokens' shape {tuple(tokens.shape)}, "
            f"got {tuple(token_mask.shape)} {token_mask.dtype}"
        )
    return tokens.masked_fill(token_mask, mask_token_id)


def feathered_composite_weights(token_mask: Tensor, stride: int, seam: int) -> Tensor:
    """Per-pixel weight (B, 1, H, W) of the generated image when pasting it over the input, H = h * stride.

    1 on every pixel of a regenerated token; outside, it falls linearly over `seam` pixels,
    (seam + 1 - d) / (seam + 1) at Chebyshev pixel distance d from the regenerated region, and is exactly 0 beyond.
    The feather lies OUTSIDE the region because the tokens there were kept: the generated image shows only their
    VQGAN reconstruction, which blends smoothly into the exact input. Take token_mask from `pixel_to_token_mask` (with
    the same dilation used for decoding) so the region matches the decoded tokens.
    """
    if token_mask.dim() != 3 or token_mask.dtype != torch.bool:
        raise ValueError(
            "feathered_composite_weights: token_mask must be (B, h, w) bool, "
            f"got {tuple(token_mask.shape)} {token_mask.dtype}"
        )
    if stride < 1 or seam < 0:
        raise ValueError(f"feathered_composite_weights: need stride >= 1 and seam >= 0, got {stride}, {seam}")
    region = token_mask.repeat_interleave(stride, dim=1).repeat_interleave(stride, dim=2)[:, None].float()  # (B,1,H,W)
    # Sum of the region grown by 0..seam pixels: a pixel at distance d is inside seam + 1 - d of those.
    total = region.clone()
    grown = region
    for _ in range(seam):
        grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        total += grown
    return total / (seam + 1)


def composite(generated: Tensor, original: Tensor, weights: Tensor) -> Tensor:
    """Paste `generated` over `original` (both (B, C, H, W)) with `weights` (B, 1, H, W) in [0, 1].

    Pixels with weight 0 are copied from `original` bit for bit; weight 1 gives `generated` exactly.
    """
    if generated.shape != original.shape or generated.dim() != 4:
        raise ValueError(
            f"composite: generated and original must be (B, C, H, W) of one shape, got {tuple(generated.shape)} "
            f"and {tuple(original.shape)}"
        )
    batch, _, height, width = generated.shape
    if weights.shape != (batch, 1, height, width):
        raise ValueError(f"composite: weights must be ({batch}, 1, {height}, {width}), got {tuple(weights.shape)}")
    weights = weights.to(generated.dtype)
    return torch.where(weights == 0, original, weights * generated + (1 - weights) * original)


@dataclass
class TokenCanvas:
    tokens: Tensor  # (B, h, w) long grid with mask_token_id where unknown
    mask: Tensor  # (B, h, w) bool, True = unknown


def token_padding(pad: tuple[int, int, int, int], stride: int) -> tuple[int, int, int, int]:
    """Pixel padding (left, top, right, bottom) -> token padding; ValueError unless each is a non-negative multiple
    of stride."""
    if len(pad) != 4 or any(p < 0 for p in pad):
        raise ValueError(
            f"token_padding: pad must be four non-negative pixel counts (left, top, right, bottom), got {pad}"
        )
    if any(p % stride for p in pad):
        raise ValueError(f"token_padding: pad {tuple(pad)} must be a multiple of the token stride {stride} pixels")
    left, top, right, bottom = (p // stride for p in pad)
    return left, top, right, bottom


def outpaint_canvas(tokens: Tensor, pad_tokens: tuple[int, int, int, int], mask_token_id: int) -> TokenCanvas:
    """Grow a (B, h, w) token grid by pad_tokens = (left, top, right, bottom) tokens of unknowns.

    Returns the canvas (B, top + h + bottom, left + w + right) and its mask (True on the new border).
    """
    if tokens.dim() != 3:
        raise ValueError(f"outpaint_canvas: tokens must be (B, h, w), got {tuple(tokens.shape)}")
    if len(pad_tokens) != 4 or any(p < 0 for p in pad_tokens):
        raise ValueError(f"outpaint_canvas: pad_tokens must be four non-negative counts, got {pad_tokens}")
    left, top, right, bottom = pad_tokens
    batch, height, width = tokens.shape
    grid = F.pad(tokens, (left, right, top, bottom), value=mask_token_id)
    mask = torch.ones(grid.shape, dtype=torch.bool, device=tokens.device)
    mask[:, top : top + height, left : left + width] = False
    return TokenCanvas(tokens=grid, mask=mask)


@dataclass(frozen=True)
class Window:
    """A window of the token canvas: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


def plan_windows(unknown: Tensor, window_hw: tuple[int, int], overlap: int) -> list[Window]:
    """Order in which to decode a canvas larger than the model's token grid, one window at a time.

    unknown: (h, w) bool, True = still to generate (shared by the batch); window_hw: the model's grid (h, w);
    overlap: tokens that neighbouring windows share along each axis (1 <= overlap < window side).

    Algorithm: candidate windows sit on a lattice with step (window - overlap) along each axis, plus one window flush
    with the far edge, so they cover the canvas. Each candidate's distance is the smallest Manhattan distance from any
    of its tokens to a known token. Candidates are visited by increasing distance (ties in row-major order) -- the
    decoded area grows outward from the known region in rings -- and a candidate is kept only if it still holds
    unknown tokens when its turn comes. Every kept window after the first overlaps known or already-decoded tokens:
    a window at distance d > 0 has a lattice neighbour, towards its nearest known token, at a smaller distance that
    shares >= overlap rows or columns with it. (With no known token at all, the row-major order gives the same
    guarantee from the second window on.) A canvas no larger than the window gets the single window covering it.

    The pipeline runs `decode` on each window's crop of the current canvas and pastes the result back.
    """
    if unknown.dim() != 2 or unknown.dtype != torch.bool:
        got = f"{tuple(unknown.shape)} {unknown.dtype}"
        raise ValueError(f"plan_windows: unknown must be an (h, w) bool tensor, got {got}")
    canvas_h, canvas_w = unknown.shape
    win_h, win_w = min(window_hw[0], canvas_h), min(window_hw[1], canvas_w)
    if min(window_hw) < 1 or not 1 <= overlap < min(window_hw):
        raise ValueError(
            f"plan_windows: need 1 <= overlap < window side, got window {tuple(window_hw)}, overlap {overlap}"
        )

    known = ~unknown
    tops = _lattice(canvas_h, win_h, window_hw[0] - overlap)
    lefts = _lattice(canvas_w, win_w, window_hw[1] - overlap)
    distance = _distance_to_known(known)  # (h, w) float, inf where no known token exists
    # Smallest distance inside each window, for every origin; then read the lattice origins.
    window_distance = -F.max_pool2d(-distance[None, None], kernel_size=(win_h, win_w), stride=1)[0, 0]
    candidates = sorted(
        ((float(window_distance[top, left]), top, left) for top in tops for left in lefts),
        key=lambda c: c[0],  # stable: ties stay in row-major order
    )
    decoded = known.clone()
    plan = []
    for _, top, left in candidates:
        window = Window(top, left, win_h, win_w)
        if bool(decoded[window.rows, window.cols].all()):
            continue
        decoded[window.rows, window.cols] = True
        plan.append(window)
    return plan


def _lattice(size: int, window: int, step: int) -> list[int]:
    """Window origins 0, step, 2 step, ... and the one flush with the far edge."""
    if window >= size:
        return [0]
    return sorted(set(range(0, size - window, step)) | {size - window})


def _distance_to_known(known: Tensor) -> Tensor:
    """Manhattan distance (h, w) from each token to the nearest known token; inf everywhere if none is known.

    Separable: first the distance along each row to a known token of that row, then the best row.
    """
    height, width = known.shape
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    # along_row[y, x] = min over known (y, x') of |x - x'|
    col_gap = (cols[:, None] - cols[None, :]).abs()  # (w, w')
    along_row = torch.where(known.cpu()[:, None, :], col_gap[None], inf).amin(dim=2)  # (h, w)
    row_gap = (rows[:, None] - rows[None, :]).abs()  # (h, h')
    return (row_gap[:, :, None] + along_row[None, :, :]).amin(dim=1)  # (h, w)


def edit_mask(shape: tuple[int, ...], strength: float, seeds: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Tokens to re-mask for editing (Muse section 4.3), bool of `shape` = (B, L) or (B, h, w); True = regenerate.

    Each row re-masks round(strength * L) of its L tokens (strength 0: none, 1: all). Without `confidence` they are
    chosen at random by a counter-based hash of the row's seed and the token position (seeds (B,), so a row's mask
    does not depend on the batch); with `confidence` (same shape, higher = more sure) the least confident tokens go,
    ties broken by position, and the seeds are not used.
    """
    if len(shape) < 2:
        raise ValueError(f"edit_mask: shape must be (B, L) or (B, h, w), got {tuple(shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"edit_mask: strength must lie in [0, 1], got {strength}")
    batch = shape[0]
    length = 1
    for size in shape[1:]:
        length *= size
    if seeds.shape != (batch,) or seeds.is_floating_point():
        got = f"{tuple(seeds.shape)} {seeds.dtype}"
        raise ValueError(f"edit_mask: seeds must be a ({batch},) integer tensor, got {got}")
    if confidence is None:
        keys = rng.seed_keys(seeds)
        positions = torch.arange(length, device=seeds.device)
        scores = rng.random_bits(keys, 0, rng.EDIT_STREAM, positions)  # (B, L)
    else:
        if tuple(confidence.shape) != tuple(shape):
            raise ValueError(f"edit_mask: confidence must have shape {tuple(shape)}, got {tuple(confidence.shape)}")
        scores = confidence.reshape(batch, length)  # (B, L)
    count = int(strength * length + 0.5)
    order = torch.argsort(scores, dim=1, stable=True)  # lowest score first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand(batch, length))
    return (rank < count).reshape(shape)
