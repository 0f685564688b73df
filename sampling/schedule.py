"""The mask schedule: one function, used by training and by decoding.

`mask_ratio(t)` is the fraction of tokens still masked at progress `t` in [0, 1] (1 at t=0, 0 at t=1, non-increasing).

* Training draws t ~ U(0, 1) per example and masks a fraction `mask_ratio(t)` of its tokens
  (`sample_mask_ratio`, `sample_training_mask`). With the cosine schedule the ratio r = cos(pi t / 2) has the density
  p(r) = (2/pi) (1 - r^2)^(-1/2) on (0, 1] -- Muse's "truncated arccos" distribution: CDF F(r) = (2/pi) arcsin(r),
  mean 2/pi ~= 0.64. Training therefore sees mostly heavily masked grids, which is where decoding starts.
* Decoding runs T steps; after step s a row that began with N unknown tokens keeps about N * mask_ratio(s / T) of them
  masked. `num_masked` turns that into exact integer counts per row (see its docstring for the rounding rules).

Names (MaskGIT's family):
    cosine  cos(pi t / 2)        the default for training and decoding (MaskGIT, Muse)
    linear  1 - t
    square  1 - t^2
    cubic   1 - t^3
    sqrt    1 - sqrt(t)
    arccos  (2/pi) arccos(t)     the inverse of cosine: reveals quickly at first. Not to be confused with Muse's arccos
                                 *distribution* of training ratios, which is what "cosine" produces.
"""

import math

import torch
from torch import Tensor

SCHEDULES = ("cosine", "linear", "square", "cubic", "sqrt", "arccos")


def _ratio(t: Tensor, schedule: str) -> Tensor:
    if schedule == "cosine":
        r = torch.cos(t * (math.pi / 2))
    elif schedule == "linear":
        r = 1 - t
    elif schedule == "square":
        r = 1 - t**2
    elif schedule == "cubic":
        r = 1 - t**3
    elif schedule == "sqrt":
        r = 1 - torch.sqrt(t)
    elif schedule == "arccos":
        r = torch.arccos(t) * (2 / math.pi)
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    # Exact ends (cos(pi/2) is 6e-17 in float64 and -4e-8 in float32, whose pi/2 lies above the true one).
    return torch.where(t >= 1, 0.0, torch.where(t <= 0, 1.0, r.clamp(0.0, 1.0)))


def mask_ratio(progress: Tensor | float, schedule: str = "cosine") -> Tensor | float:
    """Fraction of tokens still masked at `progress` in [0, 1]; a float gives a float, a tensor a tensor of its shape.

    Raises ValueError for an unknown schedule name or a progress outside [0, 1].
    """
    if isinstance(progress, Tensor):
        t = progress if progress.is_floating_point() else progress.to(torch.float32)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("mask_ratio: progress must lie in [0, 1]")
        return _ratio(t, schedule)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"mask_ratio: progress must lie in [0, 1], got {progress}")
    return float(_ratio(torch.tensor(float(progress), dtype=torch.float64), schedule))


def sample_mask_ratio(n: int, generator: torch.Generator | None = None, schedule: str = "cosine") -> Tensor:
    """Training mask ratios: t ~ U(0, 1), returns mask_ratio(t) as (n,) float32 on the generator's device.

    t is drawn in [0, 1), so every ratio is > 0 (computed in float64: float32 rounding could produce an exact 0);
    `sample_training_mask` turns ratios into at least one masked token per row. With "cosine" the ratios follow the
    truncated arccos density described in the module docstring.
    """
    device = generator.device if generator is not None else None
    t = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return mask_ratio(t, schedule).to(torch.float32)


def sample_training_mask(
    batch_size: int, num_tokens: int, generator: torch.Generator | None = None, schedule: str = "cosine"
) -> Tensor:
    """Random training masks (B, L) bool, True = masked (the model must predict it).

    Row b masks ceil(r_b * L) uniformly chosen tokens with r_b from `sample_mask_ratio`; since r_b > 0 that is always
    between 1 and L, so every row has a loss term -- the "at least one masked token" clamp lives here, not in callers.
    """
    if batch_size < 1 or num_tokens < 1:
        raise ValueError(
            f"sample_training_mask: need batch_size >= 1 and num_tokens >= 1, got {batch_size}, {num_tokens}"
        )
    device = generator.device if generator is not None else None
    ratios = sample_mask_ratio(batch_size, generator, schedule).to(torch.float64)
    count = torch.ceil(ratios * num_tokens).long().clamp(1, num_tokens)  # (B,)
    scores = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L) uniform random permutation ranks
    return rank < count[:, None]


def num_masked(num_unknown: Tensor, num_steps: int, schedule: str = "cosine") -> Tensor:
    """Per-row decoding plan: how many tokens are still masked after each step.

    num_unknown: (B,) integer count of unknown tokens per row at the START of decoding (N).
    Returns (B, num_steps + 1) long; column s is the count after step s (column 0 is N, the last column is 0).

    Counts are relative to each row's own N, so a small inpainting hole follows the same curve as a full grid instead
    of being starved by a budget sized for the whole image. Rules, in order:
      1. target_s = floor(N * mask_ratio(s / T)) -- floor rounds towards revealing, and gives 0 at s = T;
      2. at least one token is revealed per step while any remain: count_s <= count_(s-1) - 1 (clipped at 0).
         A row whose N is small therefore finishes before step T (with a concave schedule such as cosine a row with
         N <= T reveals one token per step and is done after about N steps); decode skips steps once every row is done;
      3. a step never leaves exactly one token for later: a forward pass spent re-predicting a single token costs as
         much as a full step, so that token is committed together with the others (count 1 becomes 0).
    Rule 2 is why this takes the step grid rather than a bare progress value: the cap depends on the number of steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_masked: num_steps must be >= 1, got {num_steps}")
    if num_unknown.dim() != 1:
        raise ValueError(f"num_masked: num_unknown must be (B,), got shape {tuple(num_unknown.shape)}")
    device = num_unknown.device
    progress = torch.arange(num_steps + 1, device=device, dtype=torch.float64) / num_steps  # (T+1,)
    ratios = mask_ratio(progress, schedule)
    # The 1e-6 keeps exact fractions (N * 0.75 == 48) from flooring to one less through float64 rounding.
    target = torch.floor(num_unknown.to(torch.float64)[:, None] * ratios + 1e-6).long()  # (B, T+1)
    steps = torch.arange(num_steps + 1, device=device)
    # count_s = min(target_s, count_(s-1) - 1)  <=>  count_s + s = running minimum of (target_s + s).
    counts = ((target + steps).cummin(dim=1).values - steps).clamp(min=0)
    # Rule 3 applied after the recursion is exact: counts fall strictly while positive, so a 1 is always followed by 0.
    counts[:, 1:] = counts[:, 1:].masked_fill(counts[:, 1:] == 1, 0)
    return counts
