"""Classifier-free guidance, in one place: the row layout of a guided job and the mix of the two branches' logits
around any predictor (the engine's batched forward, or one model call). When guidance is on and its scale at a step
are `Guidance`'s (`muse.options`, as a sampling option; re-exported here).

A guided job of B grids has 2B context rows, [conditional; unconditional]: the B grids under their prompts, then the
same B grids under the empty (or negative) prompt. The logits are mixed as uncond + s * (cond - uncond) (Ho &
Salimans 2022; Muse section 2.7): s > 1 pushes each token's distribution away from what the empty prompt predicts.

    logits = forward_with_guidance(forward, tokens, positions, branches)  # any forward; each job its own scale
    logits = guided_logits(model, tokens, positions, context, grid, scale)  # one job, one model call

`forward_with_guidance` is DiT's `forward_with_cfg` for a batch of jobs: the engine hands it a forward that leaves
out rows it need not compute and runs the rest in chunks (`muse.engine`); the mix itself is the few lines below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from muse.options import Guidance  # the scale, the schedule and the "guidance is on" rule: a sampling option

if TYPE_CHECKING:
    from muse.engine import Context, TokenPredictor

Rows = TypeVar("Rows", Tensor, list)


# ------------------------------------------------------------------------------------------------------------------
# The row layout: [conditional; unconditional]


def with_unconditional(conditional: Rows, unconditional: Rows) -> Rows:
    """The rows of a guided job's context (prompts, token crops, ...): the B conditional rows, then the B
    unconditional ones. A list or a tensor (along its first dimension)."""
    if isinstance(conditional, Tensor):
        return torch.cat([conditional, unconditional])  # (2B, ...)
    return [*conditional, *unconditional]


def conditional_rows(batch: int) -> slice:
    """Where a guided job's conditional rows sit among its 2 * `batch` context rows (all of them when unguided)."""
    return slice(0, batch)


def unconditional_rows(batch: int) -> slice:
    """Where a guided job's unconditional rows sit among its 2 * `batch` context rows."""
    return slice(batch, 2 * batch)


# ------------------------------------------------------------------------------------------------------------------
# The mix

Mix = tuple[slice, slice, float]  # (conditional forward rows, unconditional forward rows, scale)


@dataclass(frozen=True)
class Branches:
    """Which grid rows of a forward run under the unconditional context too, and how each guided job is mixed.

    A forward over B grid rows runs R = B + G forward rows: every grid under its conditional context, then the G
    grids `repeat` names (a slice, or (G,) long indices, in the order of their unconditional context rows) under
    their unconditional one; None: no guidance. `mixes`: per guided job, its conditional and unconditional forward
    rows and its scale at this step.
    """

    repeat: Tensor | slice | None
    mixes: tuple[Mix, ...] = ()

    @staticmethod
    def single(batch: int, scale: float) -> Branches:
        """One job of `batch` grids with one scale (nothing to repeat when guidance is off)."""
        if not Guidance(scale).on:
            return Branches(None)
        return Branches(slice(0, batch), ((conditional_rows(batch), unconditional_rows(batch), scale),))


def forward_with_guidance(
    forward: Callable[[Tensor, Tensor], Tensor],
    tokens: Tensor,
    positions: Tensor,
    branches: Branches,
) -> Tensor:
    """Logits (B, M, K) for grids `tokens` (B, L) at `positions` (B, M), each guided job's branches mixed.

    forward: forward rows (R, L) and their positions (R, M) -> float32 logits (R, M, K), the rows in the order of
    the forward's context, [every grid's conditional row; the repeated grids' unconditional rows]. Its output is
    mixed in place (no copy of the logits), so it must be writable.
    """
    B = tokens.shape[0]
    if branches.repeat is not None:  # the guided grids run a second time, under their unconditional context
        tokens = torch.cat([tokens, tokens[branches.repeat]])  # (R, L)
        positions = torch.cat([positions, positions[branches.repeat]])  # (R, M)
    logits = forward(tokens, positions)  # (R, M, K)
    for cond, uncond, scale in branches.mixes:
        mix(logits[cond], logits[uncond], scale)
    return logits[:B]


def mix(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond), written into `cond` (a view of the forward's output) and returned."""
    return cond.sub_(uncond).mul_(scale).add_(uncond)


def guided_logits(
    model: TokenPredictor,
    tokens: Tensor,
    positions: Tensor,
    context: Context,
    grid: tuple[int, int],
    scale: float,
) -> Tensor:
    """Logits (B, M, K) of one model call with guidance: `context` holds B rows, or 2B ([conditional;
    unconditional]) when guidance is on at `scale`. For one forward outside the engine (parity tests, reference
    decodes); the engine batches many jobs through `forward_with_guidance` itself."""
    return forward_with_guidance(lambda t, p: model(t, context, p, grid).float(), tokens, positions,
                                 Branches.single(tokens.shape[0], scale))


__all__ = [
    "Guidance",
    "Branches",
    "Mix",
    "with_unconditional",
    "conditional_rows",
    "unconditional_rows",
    "forward_with_guidance",
    "mix",
    "guided_logits",
]
