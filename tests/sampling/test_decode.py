import math

import pytest
import torch

from sampling.decode import DecodeStep, decode
from sampling.schedule import mask_ratio, num_masked

K = 32  # codebook size
MASK = K  # mask id, outside the logits' range as in the transformer config
L = 64  # an 8 x 8 grid


class FakeLogits:
    """A stand-in for the network: a fixed random table per position, optionally plus an effect of the token to the
    left (so decoding order matters). Checks the logits_fn contract on every call."""

    def __init__(self, seed: int = 0, length: int = L, context: bool = False, scale: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(length, K, generator=g) * scale
        self.left_effect = torch.randn(K + 1, K, generator=g) if context else None
        self.steps: list[DecodeStep] = []

    def __call__(self, tokens, positions, step):
        masked = tokens == MASK
        assert positions.dtype == torch.long and positions.shape[0] == tokens.shape[0]
        # M is exactly the largest still-masked count; every entry of a row with masked tokens is a masked position,
        # and every masked position is asked for.
        assert positions.shape[1] == int(masked.sum(dim=1).max()) > 0
        active = masked.any(dim=1)
        assert bool(masked.gather(1, positions)[active].all()), "asked about a known position"
        asked = torch.zeros_like(masked).scatter_(1, positions, True)
        assert bool((asked | ~masked).all()), "a masked position was not asked for"
        self.steps.append(step)
        logits = self.table[positions]  # (B, M, K)
        if self.left_effect is not None:
            left = tokens.gather(1, (positions - 1).clamp(min=0))
            logits = logits + self.left_effect[left]
        return logits


def grid_with_holes(batch: int, hole_fractions: list[float], seed: int = 0) -> torch.Tensor:
    """Random tokens with a contiguous block of unknowns per row of the given fractions (1.0 = full grid)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K, (batch, L), generator=g)
    for row, fraction in enumerate(hole_fractions):
        size = round(fraction * L)
        start = int(torch.randint(0, L - size + 1, (1,), generator=g))
        tokens[row, start : start + size] = MASK
    return tokens


def test_fills_every_mask_and_never_touches_given_tokens():
    tokens = grid_with_holes(5, [1.0, 0.25, 0.05, 0.0, 0.5])
    fake = FakeLogits(context=True)
    out = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(5), num_steps=12, keep_intermediates=True)
    unknown = tokens == MASK
    assert not bool((out.tokens == MASK).any())
    assert bool(((out.tokens >= 0) & (out.tokens < K)).all())
    assert torch.equal(out.tokens[~unknown], tokens[~unknown])
    for grid in out.intermediates:
        assert torch.equal(grid[~unknown], tokens[~unknown])
    assert torch.equal(out.generated, unknown)
    assert bool((out.log_probs[~unknown] == 0).all()) and bool((out.log_probs[unknown] < 0).all())
    assert torch.equal(tokens, grid_with_holes(5, [1.0, 0.25, 0.05, 0.0, 0.5])), "input must not be modified"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "arccos"])
@pytest.mark.parametrize("hole", [1.0, 0.25])
def test_masked_count_follows_schedule_relative_to_initial_unknowns(schedule, hole):
    tokens = grid_with_holes(3, [hole] * 3, seed=1)
    out = decode(tokens, FakeLogits(context=True), mask_token_id=MASK, seeds=torch.tensor([4, 5, 6]),
                 num_steps=10, schedule=schedule, keep_intermediates=True)
    plan = num_masked((tokens == MASK).sum(dim=1), 10, schedule)  # (B, 11)
    still_masked = torch.stack([(grid == MASK).sum(dim=1) for grid in out.intermediates], dim=1)
    assert torch.equal(still_masked, plan[:, 1 : 1 + len(out.intermediates)])
    assert out.num_steps_run == len(out.intermediates) == int((plan[:, :-1] > 0).sum(dim=1).max())
    # The budget is the row's own: with a 25% hole the first steps already reveal tokens at the schedule's pace,
    # not one token per step as a budget counted on the whole grid would.
    n = round(hole * L)
    halfway = math.floor(n * mask_ratio(0.5, schedule) + 1e-6)
    assert still_masked[:, 4].tolist() == [halfway] * 3
    # Once committed, a token never changes.
    for before, after in zip(out.intermediates, out.intermediates[1:]):
        done = before != MASK
        assert torch.equal(after[done], before[done])


def test_logits_fn_sees_each_step_once_in_order_and_only_needed_steps_run():
    tokens = grid_with_holes(3, [1.0, 0.1, 0.0])
    fake = FakeLogits()
    out = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(3), num_steps=24)
    plan = num_masked((tokens == MASK).sum(dim=1), 24)
    effective = int((plan[:, :-1] > 0).any(dim=0).sum())
    assert len(fake.steps) == out.num_steps_run == effective
    assert [s.index for s in fake.steps] == list(range(effective))
    assert all(s.num_steps == 24 for s in fake.steps)
    assert fake.steps[0].progress == 0.0


def test_small_holes_finish_early():
    tokens = torch.randint(0, K, (4, L), generator=torch.Generator().manual_seed(2))
    tokens[:, 10:13] = MASK  # three unknowns per row: 3 -> 2 -> 0
    fake = FakeLogits()
    out = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(4), num_steps=24)
    assert len(fake.steps) == 2 and not bool((out.tokens == MASK).any())


def test_nothing_to_decode_calls_nothing():
    tokens = torch.randint(0, K, (2, L), generator=torch.Generator().manual_seed(3))
    fake = FakeLogits()
    out = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(2), keep_intermediates=True)
    assert fake.steps == [] and out.num_steps_run == 0 and out.intermediates == []
    assert torch.equal(out.tokens, tokens) and not bool(out.generated.any())
    assert torch.equal(out.mean_log_prob, torch.zeros(2))


def test_same_seed_same_tokens_different_seed_different_tokens():
    tokens = grid_with_holes(2, [1.0, 1.0])
    fake = FakeLogits(context=True, scale=0.5)  # flat enough that seeds matter
    a = decode(tokens, fake, mask_token_id=MASK, seeds=torch.tensor([7, 8]))
    b = decode(tokens, fake, mask_token_id=MASK, seeds=torch.tensor([7, 8]))
    c = decode(tokens, fake, mask_token_id=MASK, seeds=torch.tensor([9, 10]))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.tokens[0], a.tokens[1])  # same grid, different seeds
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.6}, {"temperature": 1.3, "top_k": 20, "top_p": 0.8}],
)
def test_row_result_does_not_depend_on_the_batch(options):
    tokens = grid_with_holes(8, [1.0, 0.25, 0.5, 0.05, 1.0, 0.75, 0.1, 0.3], seed=4)
    seeds = torch.tensor([11, 3, 2**35 + 1, -4, 12, 0, 99, 5])
    fake = FakeLogits(context=True, scale=0.7)
    together = decode(tokens, fake, mask_token_id=MASK, seeds=seeds, num_steps=8, **options)
    for row in (0, 3, 6):
        one = slice(row, row + 1)
        alone = decode(tokens[one], fake, mask_token_id=MASK, seeds=seeds[one], num_steps=8, **options)
        assert torch.equal(alone.tokens[0], together.tokens[row])
        assert torch.equal(alone.log_probs[0], together.log_probs[row])
    # The same row twice in one batch is decoded twice identically.
    doubled = decode(tokens[[2, 2]], fake, mask_token_id=MASK, seeds=seeds[[2, 2]], num_steps=8, **options)
    assert torch.equal(doubled.tokens[0], doubled.tokens[1])


def test_top_k_one_and_tiny_temperature_are_argmax_decoding():
    tokens = grid_with_holes(3, [1.0, 0.5, 0.25])
    fake = FakeLogits()  # position-only logits: the argmax token does not depend on the order of commits
    unknown = tokens == MASK
    argmax = fake.table.argmax(dim=-1).expand(3, L)
    greedy = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(3), top_k=1)
    cold = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(3), temperature=1e-4)
    assert torch.equal(greedy.tokens[unknown], argmax[unknown])
    assert torch.equal(cold.tokens[unknown], argmax[unknown])
    warm = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(3), temperature=5.0)
    assert not torch.equal(warm.tokens[unknown], argmax[unknown])


def test_log_probs_are_the_models_untempered_log_probabilities():
    tokens = grid_with_holes(2, [1.0, 0.4])
    fake = FakeLogits()
    out = decode(tokens, fake, mask_token_id=MASK, seeds=torch.arange(2), temperature=0.5, top_k=4)
    expected = torch.log_softmax(fake.table, dim=-1).gather(1, out.tokens.T).T  # (B, L)
    unknown = tokens == MASK
    assert torch.allclose(out.log_probs[unknown], expected[unknown], atol=1e-5)
    assert torch.allclose(out.mean_log_prob, out.log_probs.sum(1) / unknown.sum(1), atol=1e-6)


def sample_frequencies(logits: torch.Tensor, n: int, **options) -> torch.Tensor:
    """Decode n one-token grids with seeds 0..n-1 and return the frequency of each token."""
    tokens = torch.full((n, 1), MASK)
    out = decode(tokens, lambda t, p, s: logits.expand(n, 1, K), mask_token_id=MASK, seeds=torch.arange(n), **options)
    return torch.bincount(out.tokens[:, 0], minlength=K).float() / n


def test_sampled_tokens_follow_the_adjusted_distribution():
    logits = torch.randn(K, generator=torch.Generator().manual_seed(5)) * 1.5
    n = 6000
    tolerance = 0.025  # > 4 standard errors of a frequency at n = 6000

    for temperature in (1.0, 0.6, 2.0):
        probs = torch.softmax(logits / temperature, dim=0)
        assert (sample_frequencies(logits, n, temperature=temperature) - probs).abs().max() < tolerance

    top = logits.topk(5).indices
    restricted = torch.full_like(logits, float("-inf"))
    restricted[top] = logits[top]
    freq = sample_frequencies(logits, n, top_k=5)
    assert (freq - torch.softmax(restricted, dim=0)).abs().max() < tolerance
    assert freq[restricted == float("-inf")].sum() == 0

    # top-p: the smallest set of most likely tokens holding >= p of the mass.
    probs = torch.softmax(logits, dim=0)
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < 0.7).sum()) + 1
    nucleus = torch.full_like(logits, float("-inf"))
    nucleus[order[:size]] = logits[order[:size]]
    freq = sample_frequencies(logits, n, top_p=0.7)
    assert (freq - torch.softmax(nucleus, dim=0)).abs().max() < tolerance
    assert freq[nucleus == float("-inf")].sum() == 0


def test_top_p_finds_a_nucleus_wider_than_the_candidate_shortcut():
    # 512 equally likely tokens plus many unlikely ones: the nucleus outgrows the first 256 candidates.
    big_k = 1024
    logits = torch.full((big_k,), -20.0)
    logits[:512] = 0.0
    n = 4000
    tokens = torch.full((n, 1), big_k)
    out = decode(
        tokens, lambda t, p, s: logits.expand(n, 1, big_k), mask_token_id=big_k, seeds=torch.arange(n), top_p=0.9
    )
    assert bool((out.tokens < 512).all())
    assert len(torch.unique(out.tokens)) > 400


def test_commits_the_most_confident_tokens_first_without_choice_noise():
    # Row-independent peaks: position p is confident in proportion to p.
    table = torch.zeros(L, K)
    table[:, 0] = torch.arange(L, dtype=torch.float32) / 4
    tokens = torch.full((1, L), MASK)
    out = decode(tokens, lambda t, p, s: table[p], mask_token_id=MASK, seeds=torch.tensor([0]), num_steps=8,
                 top_k=1, choice_temperature=0.0, keep_intermediates=True)
    first = (out.intermediates[0] != MASK)[0].nonzero()[:, 0]
    revealed = L - num_masked(torch.tensor([L]), 8)[0, 1].item()
    assert first.tolist() == list(range(L - revealed, L))


def test_mask_token_never_sampled_and_logits_checked():
    tokens = torch.full((2, 4), MASK)
    seeds = torch.arange(2)
    with pytest.raises(ValueError, match="include mask_token_id"):
        decode(tokens, lambda t, p, s: torch.zeros(2, p.shape[1], K + 1), mask_token_id=MASK, seeds=seeds)
    with pytest.raises(ValueError, match="logits_fn must return"):
        decode(tokens, lambda t, p, s: torch.zeros(2, 4 + 1, K), mask_token_id=MASK, seeds=seeds)
    with pytest.raises(ValueError, match="NaN"):
        decode(tokens, lambda t, p, s: torch.full((2, p.shape[1], K), float("nan")), mask_token_id=MASK, seeds=seeds)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"tokens": torch.zeros(2, 4)}, "long"),
        ({"tokens": torch.zeros(8, dtype=torch.long)}, r"\(B, L\)"),
        ({"seeds": torch.arange(3)}, "seeds"),
        ({"seeds": torch.zeros(2)}, "seeds"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"choice_temperature": -1.0}, "choice_temperature"),
        ({"mask_token_id": -1}, "mask_token_id"),
        ({"schedule": "nope"}, "unknown mask schedule"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    arguments = {"tokens": torch.full((2, 4), MASK), "mask_token_id": MASK, "seeds": torch.arange(2)}
    arguments.update(change)
    tokens = arguments.pop("tokens")
    with pytest.raises(ValueError, match=message):
        decode(tokens, FakeLogits(length=4), **arguments)
