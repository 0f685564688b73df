import math

import pytest
import torch

from sampling.schedule import SCHEDULES, mask_ratio, num_masked, sample_mask_ratio, sample_training_mask


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_ratio_runs_from_one_to_zero_and_never_rises(schedule):
    assert mask_ratio(0.0, schedule) == 1.0
    assert mask_ratio(1.0, schedule) == 0.0
    t = torch.linspace(0, 1, 1001)
    r = mask_ratio(t, schedule)
    assert r.shape == t.shape
    assert bool((r[1:] <= r[:-1]).all())
    assert bool(((r >= 0) & (r <= 1)).all())


def test_mask_ratio_named_formulas():
    t = 0.3
    assert mask_ratio(t, "cosine") == pytest.approx(math.cos(math.pi * t / 2))
    assert mask_ratio(t, "linear") == pytest.approx(1 - t)
    assert mask_ratio(t, "square") == pytest.approx(1 - t**2)
    assert mask_ratio(t, "cubic") == pytest.approx(1 - t**3)
    assert mask_ratio(t, "sqrt") == pytest.approx(1 - math.sqrt(t))
    assert mask_ratio(t, "arccos") == pytest.approx(2 / math.pi * math.acos(t))
    assert isinstance(mask_ratio(t), float)
    assert isinstance(mask_ratio(torch.tensor([t])), torch.Tensor)


def test_mask_ratio_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown mask schedule 'cosin'"):
        mask_ratio(0.5, "cosin")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_ratio(1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_ratio(torch.tensor([0.2, -0.1]))


def test_training_ratios_follow_truncated_arccos_distribution():
    r = sample_mask_ratio(200_000, torch.Generator().manual_seed(0))
    assert r.dtype == torch.float32 and bool((r > 0).all()) and bool((r <= 1).all())
    assert r.mean().item() == pytest.approx(2 / math.pi, abs=0.004)
    # Quantiles of F(r) = (2/pi) arcsin(r): q -> sin(pi q / 2).
    q = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95])
    expected = torch.sin(math.pi * q / 2)
    assert torch.allclose(torch.quantile(r, q), expected, atol=0.006)
    # Kolmogorov-Smirnov distance to the CDF.
    sorted_r = r.double().sort().values
    cdf = 2 / math.pi * torch.arcsin(sorted_r)
    n = len(sorted_r)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 0.006


def test_training_ratios_are_reproducible_with_a_generator():
    a = sample_mask_ratio(16, torch.Generator().manual_seed(3), "linear")
    b = sample_mask_ratio(16, torch.Generator().manual_seed(3), "linear")
    assert torch.equal(a, b)


def test_training_mask_masks_between_one_and_all_tokens():
    mask = sample_training_mask(4000, 64, torch.Generator().manual_seed(1))
    assert mask.shape == (4000, 64) and mask.dtype == torch.bool
    count = mask.sum(dim=1)
    assert bool((count >= 1).all()) and bool((count <= 64).all())
    # ceil(r L) / L has mean 2/pi plus at most 1/L.
    assert 2 / math.pi - 0.01 < count.float().mean().item() / 64 < 2 / math.pi + 1 / 64 + 0.01
    # Positions are uniform: every position is masked about as often.
    per_position = mask.float().mean(dim=0)
    assert (per_position - per_position.mean()).abs().max().item() < 0.05


def reference_counts(n: int, steps: int, schedule: str) -> list[int]:
    """The documented rules, one step at a time in plain Python."""
    counts = [n]
    for s in range(1, steps + 1):
        target = math.floor(n * mask_ratio(s / steps, schedule) + 1e-6)
        count = max(0, min(target, counts[-1] - 1))
        counts.append(0 if count == 1 else count)
    return counts


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_num_masked_matches_stepwise_reference(schedule):
    unknown = torch.tensor([0, 1, 2, 3, 5, 10, 24, 30, 64, 100, 256, 1000])
    for steps in (1, 2, 5, 12, 24):
        counts = num_masked(unknown, steps, schedule)
        assert counts.shape == (len(unknown), steps + 1) and counts.dtype == torch.long
        expected = [reference_counts(int(n), steps, schedule) for n in unknown]
        assert counts.tolist() == expected


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_num_masked_properties(schedule):
    unknown = torch.arange(0, 300)
    counts = num_masked(unknown, 24, schedule)
    assert torch.equal(counts[:, 0], unknown)
    assert bool((counts[:, -1] == 0).all())
    before, after = counts[:, :-1], counts[:, 1:]
    assert bool(((after < before) | (before == 0)).all()), "each step reveals at least one token while any remain"
    assert not bool((after == 1).any()), "no step leaves a single token for later"
    # Counts are per row: a 64-token hole follows the same curve as a full grid, scaled.
    ratios = mask_ratio(torch.arange(25, dtype=torch.float64) / 24, schedule)
    assert bool(((counts[256] - torch.floor(256 * ratios + 1e-6)).abs() <= 24).all())


def test_num_masked_small_rows_finish_early():
    counts = num_masked(torch.tensor([3, 10, 256]), 24, "cosine")
    steps_needed = (counts[:, :-1] > 0).sum(dim=1)
    assert steps_needed.tolist()[0] == 2  # 3 -> 2 -> 0
    assert steps_needed.tolist()[1] <= 10
    assert steps_needed.tolist()[2] == 24


def test_num_masked_rejects_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        num_masked(torch.tensor([4]), 0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        num_masked(torch.tensor([[4]]), 3)
