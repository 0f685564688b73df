"""Counter-based random numbers: every draw is a pure function of (seed, step, stream, position).

Decoding must give row i the same result whatever batch it sits in, so no draw may depend on a shared generator's
state or on how many rows came before. Instead each number is a 32-bit integer hash of its coordinates, computed with
vectorised int64 tensor ops (values kept below 2**32 so no signed overflow ever happens).

The mixer is Chris Wellons' "lowbias32" (xor-shift / multiply, found by hash-prospector search), a bijection on
32-bit integers with low avalanche bias. Coordinates are absorbed one word at a time with a mix after each.
"""

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF

# Streams keep the different uses of randomness independent for the same (seed, step, position).
TOKEN_STREAM = 0  # inverse-CDF draw of a token
CHOICE_STREAM = 1  # Gumbel noise on the confidence used to choose which tokens to commit
EDIT_STREAM = 2  # which tokens an edit re-masks


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c mod 2**32 for x, c in [0, 2**32). The int64 product can pass 2**63, where it wraps (two's complement,
    as every torch backend's integer multiply does): its low 32 bits stay exact, and only they are kept.
    `tests/sampling/test_rng.py` checks the result against plain Python integers."""
    return (x * c) & MASK32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: Tensor) -> Tensor:
    """(B,) integer seeds -> (B,) int64 keys in [0, 2**32) that fold in both 32-bit halves of each seed."""
    s = seeds.to(torch.int64)
    lo, hi = s & MASK32, (s >> 32) & MASK32
    # The odd constant stops seed 0 from hitting mix32's fixed point at 0.
    return mix32(mix32(lo ^ 0x9E3779B9) ^ hi)


MAX_STEP = 2**24  # steps are absorbed as 24 bits beside the 8-bit stream


def random_bits(keys: Tensor, step: int | Tensor, stream: int | tuple[int, ...], positions: Tensor) -> Tensor:
    """Uniform 32-bit integers (int64 in [0, 2**32)) for each (row key, step, stream, position).

    keys: (B,) from `seed_keys`; step: one int for every row, or a (B,) integer tensor (rows at different steps; its
    values must lie in [0, MAX_STEP), which callers guarantee -- checking would cost a device sync per call);
    positions: (B, M) or (M,) integer grid positions. Returns (B, M); with a tuple of S streams, (S, B, M) -- the same
    numbers as S calls, in one pass (decoding draws two streams at every step).
    """
    streams = stream if isinstance(stream, tuple) else (stream,)
    if not all(0 <= s < 2**8 for s in streams) or (not isinstance(step, Tensor) and not 0 <= step < MAX_STEP):
        raise ValueError(f"random_bits: step must be in [0, 2**24) and stream in [0, 2**8), got {step}, {stream}")
    if isinstance(stream, tuple):
        code = torch.tensor([s << 24 for s in streams], dtype=torch.int64, device=keys.device)[:, None]  # (S, 1)
        row = mix32(keys ^ (code | step))[..., None]  # (S, B, 1)
    else:
        row = mix32(keys ^ ((stream << 24) | step))[:, None]  # (B, 1)
    # Two rounds with an independent second key: two rows whose keys differ by x would otherwise share values at
    # positions p and p ^ x.
    second = mix32(row ^ 0x5BD1E995)
    return mix32(mix32(row ^ positions.to(torch.int64)) ^ second)


def uniform_float32(bits: Tensor) -> Tensor:
    """Top 24 bits -> float32 in [0, 1), exactly representable (1 - 2**-24 at most)."""
    return (bits >> 8).to(torch.float32) * (2.0**-24)


def uniform_open_float64(bits: Tensor) -> Tensor:
    """All 32 bits -> float64 in the open interval (0, 1): safe under log(-log(u))."""
    return (bits.to(torch.float64) + 0.5) * (2.0**-32)
