"""Masked-token training shared by the base and super-resolution stages: masking, the loss, fixed-ratio validation,
sample grids.

Both stages see their network through one callable, so nothing here knows which stage it trains:

    StageForward = (inputs (B, L) long with mask tokens, positions (B, M) long, batch: TokenBatch) -> logits (B, M, K)

Mask convention: bool, True = masked (the model must predict the token there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from muse.config import MaskingConfig
from muse.engine import Job, TokenPredictor, run_job
from muse.options import SamplingOptions
from muse.train.tokens import TokenBatch, cat_batches, drop_text
from sampling.schedule import sample_training_mask
from transformer.text import TextEmbedding

StageForward = Callable[[Tensor, Tensor, TokenBatch], Tensor]


@dataclass(frozen=True)
class MaskedLoss:
    loss: Tensor      # scalar: mean cross-entropy over masked positions (what backward is called on)
    accuracy: Tensor  # scalar, detached: fraction of masked positions whose argmax is the target
    num_masked: int   # masked positions in the batch


def training_mask(batch: TokenBatch, masking: MaskingConfig) -> Tensor:
    """(B, L) bool: per row a ratio r from the shared schedule (with cosine, Muse's arccos density) and ceil(r * L) >= 1
    positions chosen uniformly. Drawn from the global RNG, whose state every checkpoint saves."""
    B, L = batch.tokens.shape
    return sample_training_mask(B, L, schedule=masking.schedule).to(batch.tokens.device)


def text_dropout(batch: TokenBatch, unconditional: TextEmbedding, rate: float) -> TokenBatch:
    """Train a fraction `rate` of rows with the empty prompt, so the model also learns the unconditional
    distribution that classifier-free guidance contrasts against."""
    if rate <= 0:
        return batch
    drop = torch.rand(len(batch)).to(batch.tokens.device) < rate  # (B,)
    return drop_text(batch, unconditional, drop)


def corrupt_tokens(tokens: Tensor, rate: float, codebook_size: int) -> Tensor:
    """Replace each token independently with probability `rate` by a uniformly random id in [0, codebook_size).

    Super-res conditions on the base model's samples at inference time, which contain mistakes; training on slightly
    corrupted low-res grids makes the stage tolerate them.
    """
    if rate <= 0:
        return tokens
    replace = torch.rand(tokens.shape).to(tokens.device) < rate
    random_ids = torch.randint(0, codebook_size, tokens.shape).to(tokens.device)
    return torch.where(replace, random_ids, tokens)


def masked_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool mask -> positions (B, M) and valid (B, M) bool, M = the largest masked count of a row.

    Each row lists its masked positions first (ascending), then unmasked ones as filler up to M; `valid` is False on
    the filler. Computing logits only at these M positions skips the head for most visible tokens.
    """
    M = max(int(mask.sum(dim=1).max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # masked first, in position order
    positions = order[:, :M]  # (B, M)
    return positions, mask.gather(1, positions)


def masked_loss(
    forward: StageForward, batch: TokenBatch, mask: Tensor, mask_token_id: int, label_smoothing: float = 0.0
) -> MaskedLoss:
    """Cross-entropy of the stage's predictions at the masked positions only, averaged over masked tokens.

    The input grid has every masked position replaced by `mask_token_id`; targets at unmasked positions neither enter
    the input nor the loss.
    """
    inputs = batch.tokens.masked_fill(mask, mask_token_id)  # (B, L)
    positions, valid = masked_positions(mask)
    logits = forward(inputs, positions, batch)  # (B, M, K)
    targets = batch.tokens.gather(1, positions)  # (B, M)
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none", label_smoothing=label_smoothing
    )  # (B * M,)
    valid = valid.flatten()
    count = valid.sum().clamp(min=1)
    loss = (per_token * valid).sum() / count
    correct = (logits.detach().argmax(dim=-1).flatten() == targets.flatten()) & valid
    return MaskedLoss(loss=loss, accuracy=correct.sum() / count, num_masked=int(valid.sum()))


def fixed_ratio_mask(num_items: int, num_tokens: int, ratio: float, seed: int) -> Tensor:
    """(N, L) bool masks with exactly ceil(ratio * L) (>= 1) masked tokens per row, a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    count = min(max(math.ceil(ratio * num_tokens), 1), num_tokens)
    scores = torch.rand(num_items, num_tokens, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (N, L) a random permutation's ranks
    return rank < count


class FixedRatioValidation:
    """Validation loss and accuracy at fixed mask ratios, each with fixed masks drawn once from `seed`.

    The same items, ratios and masks at every evaluation, in every run with the same data and seed, so the curves are
    comparable across steps and runs. No label smoothing and no text dropout.
    """

    def __init__(self, batch: TokenBatch, ratios: tuple[float, ...], *, mask_token_id: int, seed: int,
                 batch_size: int) -> None:
        self.batch = batch
        self.ratios = ratios
        self.mask_token_id = mask_token_id
        self.batch_size = batch_size
        N, L = batch.tokens.shape
        self.masks = {r: fixed_ratio_mask(N, L, r, seed + i) for i, r in enumerate(ratios)}

    @torch.no_grad()
    def evaluate(self, forward: StageForward, device: torch.device) -> dict[str, float]:
        """{"val/loss@0.5": ..., "val/acc@0.5": ..., "val/loss": mean over ratios}; call with the model in eval mode."""
        results: dict[str, float] = {}
        for ratio, mask in self.masks.items():
            loss_sum, correct_sum, count = 0.0, 0.0, 0
            for start in range(0, len(self.batch), self.batch_size):
                rows = slice(start, start + self.batch_size)
                out = masked_loss(forward, self.batch.select(rows).to(device), mask[rows].to(device),
                                  self.mask_token_id)
                loss_sum += float(out.loss) * out.num_masked
                correct_sum += float(out.accuracy) * out.num_masked
                count += out.num_masked
            results[f"val/loss@{ratio:g}"] = loss_sum / count
            results[f"val/acc@{ratio:g}"] = correct_sum / count
        results["val/loss"] = sum(results[f"val/loss@{r:g}"] for r in self.ratios) / len(self.ratios)
        return results


@torch.no_grad()
def sample_tokens(
    model: TokenPredictor,
    context_of: Callable[[TokenBatch], Any],
    batch: TokenBatch,
    unconditional: TextEmbedding,
    *,
    num_steps: int,
    guidance_scale: float,
    seed: int,
) -> Tensor:
    """Decode a full square grid (B, L) for each row's text (and low-res tokens) through the decoding engine, as the
    pipeline does: guidance mixed by the engine, the library's default sampling options otherwise, row r with seed
    `seed + r`, so grids are comparable across training steps. `context_of(batch)` is the model's context of a batch:
    its conditional rows, then with guidance the same rows under the empty prompt."""
    B, L = batch.tokens.shape
    side = math.isqrt(L)
    device = batch.tokens.device
    options = SamplingOptions(num_steps=num_steps, guidance_scale=guidance_scale)
    rows = batch
    if options.guided:
        rows = cat_batches([batch, drop_text(batch, unconditional, torch.ones(B, dtype=torch.bool, device=device))])
    job = Job(
        model=model,
        tokens=torch.full((B, L), model.config.mask_token_id, dtype=torch.long, device=device),
        grid=(side, side),
        context=context_of(rows),
        settings=options.decode_settings(0),
        seeds=torch.arange(B, dtype=torch.int64, device=device) + seed,
        guidance_scale=options.guidance_scale,
        guidance_schedule=options.guidance_schedule,
    )
    return run_job(job).tokens


__all__ = [
    "StageForward",
    "MaskedLoss",
    "training_mask",
    "text_dropout",
    "corrupt_tokens",
    "masked_positions",
    "masked_loss",
    "fixed_ratio_mask",
    "FixedRatioValidation",
    "sample_tokens",
]
