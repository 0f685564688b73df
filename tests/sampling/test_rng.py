import random

import pytest
import torch

from sampling import rng

MASK32 = 0xFFFFFFFF


def lowbias32_reference(x: int) -> int:
    """Chris Wellons' lowbias32 in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def test_mix32_matches_plain_python_lowbias32():
    edges = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, MASK32]
    values = edges + [random.Random(0).getrandbits(32) for _ in range(200)]
    got = rng.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32_reference(v) for v in values]


def test_mix32_is_a_bijection_on_a_block():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65521
    h = rng.mix32(x & MASK32)
    assert len(torch.unique(h)) == len(h)
    assert bool(((h >= 0) & (h <= MASK32)).all())


def test_uniforms_have_the_right_moments_and_range():
    keys = rng.seed_keys(torch.arange(64))
    u = rng.uniform_float32(rng.random_bits(keys, 3, rng.TOKEN_STREAM, torch.arange(4096)))  # (64, 4096)
    assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert u.mean().item() == pytest.approx(0.5, abs=0.003)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts / u.numel() - 1 / 16).abs().max().item() < 0.003


def test_neighbouring_seeds_positions_steps_and_streams_are_uncorrelated():
    keys = rng.seed_keys(torch.arange(256))
    positions = torch.arange(1024)

    def draw(step, stream):
        return rng.uniform_float32(rng.random_bits(keys, step, stream, positions)) - 0.5

    def corr(a, b):
        return ((a * b).mean() / (a.std() * b.std())).abs().item()

    base = draw(0, rng.TOKEN_STREAM)
    assert corr(base[:-1], base[1:]) < 0.01  # seed s vs s + 1
    assert corr(base[:, :-1], base[:, 1:]) < 0.01  # position p vs p + 1
    assert corr(base, draw(1, rng.TOKEN_STREAM)) < 0.01  # step
    assert corr(base, draw(0, rng.CHOICE_STREAM)) < 0.01  # stream


def test_draws_depend_only_on_their_own_coordinates():
    seeds = torch.tensor([5, -3, 2**40 + 7, 0])
    positions = torch.tensor([[0, 9, 4], [1, 1, 2], [7, 0, 3], [2, 8, 8]])
    together = rng.random_bits(rng.seed_keys(seeds), 2, rng.CHOICE_STREAM, positions)
    for row in range(4):
        alone = rng.random_bits(rng.seed_keys(seeds[row : row + 1]), 2, rng.CHOICE_STREAM, positions[row : row + 1])
        assert torch.equal(alone[0], together[row])
    assert torch.equal(together[3, 1], together[3, 2])  # same coordinates, same number


def test_high_seed_bits_matter():
    keys = rng.seed_keys(torch.tensor([1, 1 + 2**32, -1]))
    assert len(set(keys.tolist())) == 3


def test_open_unit_interval_excludes_both_ends():
    u = rng.uniform_open_float64(torch.tensor([0, MASK32]))
    assert 0 < u[0].item() and u[1].item() < 1
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_random_bits_rejects_out_of_range_step():
    with pytest.raises(ValueError, match="step"):
        rng.random_bits(rng.seed_keys(torch.tensor([1])), 2**24, 0, torch.arange(3))


def test_several_streams_in_one_call_are_the_separate_calls():
    keys = rng.seed_keys(torch.tensor([0, 5, 2**33 + 7]))
    positions = torch.randint(0, 4096, (3, 11))
    step = torch.tensor([0, 3, 2**24 - 1])
    both = rng.random_bits(keys, step, (rng.TOKEN_STREAM, rng.CHOICE_STREAM), positions)
    assert both.shape == (2, 3, 11)
    assert torch.equal(both[0], rng.random_bits(keys, step, rng.TOKEN_STREAM, positions))
    assert torch.equal(both[1], rng.random_bits(keys, step, rng.CHOICE_STREAM, positions))
    for row in range(3):  # a per-row step tensor is each row's own int step
        alone = rng.random_bits(keys[row : row + 1], int(step[row]), rng.CHOICE_STREAM, positions[row : row + 1])
        assert torch.equal(alone[0], both[1, row])
