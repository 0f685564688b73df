"""MaskGIT / Muse iterative parallel decoding on a token grid, given only a callable that returns logits.

Generation, inpainting, outpainting and editing are the same call: the caller pre-fills the grid with known tokens and
`mask_token_id` where tokens are unknown. Known tokens are context and never change (MaskGIT gives them infinite
confidence; here they are simply never candidates). Each row's reveal budget follows the schedule relative to the
number of tokens unknown in that row at the start (`schedule.num_masked`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sampling import rng
from sampling.schedule import num_masked


@dataclass(frozen=True)
class DecodeStep:
    """Which step `logits_fn` is being called for: `index` in [0, num_steps), 0 first.

    Trailing steps are skipped once every row is done, so the last call may have index < num_steps - 1; schedules
    such as a guidance scale ramped over decoding should be written in terms of `progress`, not a call counter.
    """

    index: int
    num_steps: int

    @property
    def progress(self) -> float:
        """Fraction of the schedule completed before this step: 0 at the first step."""
        return self.index / self.num_steps


# (tokens (B, L) long, positions (B, M) long, step) -> logits (B, M, K) float over the K codebook entries.
LogitsFn = Callable[[Tensor, Tensor, DecodeStep], Tensor]


@dataclass
class DecodeOutput:
    tokens: Tensor  # (B, L) long, no mask token left
    log_probs: Tensor  # (B, L) float32: the model's log-probability of each committed token; 0 where it was given
    generated: Tensor  # (B, L) bool: True where decode committed the token (unknown at the start)
    intermediates: list[Tensor] | None  # (B, L) grid after each step that ran, when keep_intermediates
    num_steps_run: int  # number of logits_fn calls

    @property
    def mean_log_prob(self) -> Tensor:
        """(B,) mean log-probability over generated tokens (0 for a row with none): a score for best-of-N."""
        count = self.generated.sum(dim=1).clamp(min=1)
        return self.log_probs.sum(dim=1) / count


# no_grad rather than inference_mode: inference tensors cannot be changed in place outside inference mode, and callers
# reuse the returned grid (outpainting windows, editing). A caller may still wrap the whole call in inference_mode.
@torch.no_grad()
def decode(
    tokens: Tensor,
    logits_fn: LogitsFn,
    *,
    mask_token_id: int,
    seeds: Tensor,
    num_steps: int = 24,
    schedule: str = "cosine",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    choice_temperature: float = 4.5,
    keep_intermediates: bool = False,
) -> DecodeOutput:
    """Fill every `mask_token_id` in `tokens` (B, L) by iterative parallel decoding.

    logits_fn(tokens, positions, step) is called once per step with the current grid (B, L), the positions still
    masked in each row (B, M) -- ascending, padded to M = the largest still-masked count in the batch by repeating the
    row's first masked position (a row with nothing left masked gets position 0; padded entries' logits are ignored) --
    and a `DecodeStep`. It returns logits (B, M, K) over the codebook only (the mask token must not be a column).
    Guidance, negative prompts and text live inside logits_fn; this function knows nothing of them.

    Each step, for every still-masked position: sample a token by inverse CDF from softmax(logits / temperature),
    optionally restricted to the top_k tokens and then to the smallest set with probability >= top_p; its confidence
    is the model's log-probability of that token (untempered logits) plus Gumbel noise scaled by
    choice_temperature * (1 - (index + 1) / num_steps); the most confident tokens are committed so that each row's
    masked count follows `num_masked`. Steps after every row is done are skipped.

    seeds: (B,) integers, one per row. Every random number is a hash of (seed, step, stream, position), so a row's
    result does not depend on the batch it is in (given a logits_fn whose rows are independent).

    Returns a `DecodeOutput`. Raises ValueError for malformed inputs or logits.
    """
    _check_inputs(tokens, mask_token_id, seeds, num_steps, temperature, top_k, top_p, choice_temperature)
    batch, length = tokens.shape
    device = tokens.device
    tokens = tokens.clone()
    unknown = tokens == mask_token_id  # (B, L)
    generated = unknown.clone()
    counts = num_masked(unknown.sum(dim=1), num_steps, schedule)  # (B, T+1)
    log_probs = torch.zeros(batch, length, device=device)
    keys = rng.seed_keys(seeds.to(device))
    rows = torch.arange(batch, device=device)[:, None]
    intermediates: list[Tensor] | None = [] if keep_intermediates else None
    sampler = _Sampler(temperature, top_k, top_p)
    steps_run = 0

    for index in range(num_steps):
        remaining = counts[:, index]  # (B,) equals unknown.sum(1)
        width = int(remaining.max())
        if width == 0:
            break
        # Masked positions first, in ascending order (stable sort), then pad with the row's first masked position.
        order = torch.argsort((~unknown).to(torch.uint8), dim=1, stable=True)[:, :width]  # (B, M)
        valid = torch.arange(width, device=device) < remaining[:, None]  # (B, M)
        positions = torch.where(valid, order, order[:, :1])

        logits = logits_fn(tokens, positions, DecodeStep(index, num_steps))
        _check_logits(logits, batch, width, mask_token_id)

        u = rng.uniform_float32(rng.random_bits(keys, index, rng.TOKEN_STREAM, positions))
        sampled, log_prob = sampler(logits.float(), u)
        if not bool(torch.isfinite(log_prob).all()):
            raise ValueError("decode: logits_fn returned NaN or infinite logits")

        noise_scale = choice_temperature * (1.0 - (index + 1) / num_steps)
        confidence = log_prob
        if noise_scale > 0:
            g = rng.uniform_open_float64(rng.random_bits(keys, index, rng.CHOICE_STREAM, positions))
            confidence = log_prob + noise_scale * (-torch.log(-torch.log(g))).to(torch.float32)
        confidence = confidence.masked_fill(~valid, float("-inf"))

        # Commit the n_reveal most confident tokens of each row: rank entries by confidence, keep rank < n_reveal.
        n_reveal = remaining - counts[:, index + 1]  # (B,)
        by_confidence = torch.argsort(confidence, dim=1, descending=True, stable=True)  # (B, M)
        ranks = torch.arange(width, device=device).expand(batch, width)
        rank = torch.empty_like(by_confidence).scatter_(1, by_confidence, ranks)
        reveal = rank < n_reveal[:, None]  # (B, M), never true on padding (rank >= remaining there)

        # Boolean indexing writes each revealed (row, position) exactly once; padding duplicates are never selected.
        at_row, at_pos = rows.expand(batch, width)[reveal], positions[reveal]
        tokens[at_row, at_pos] = sampled[reveal]
        log_probs[at_row, at_pos] = log_prob[reveal]
        unknown[at_row, at_pos] = False
        steps_run += 1
        if intermediates is not None:
            intermediates.append(tokens.clone())

    return DecodeOutput(
        tokens=tokens, log_probs=log_probs, generated=generated, intermediates=intermediates, num_steps_run=steps_run
    )


class _Sampler:
    """Draws one token per (row, position) by inverse CDF and reports the model's log-probability of it.

    Works on an unnormalised CDF in original vocabulary order: exp(logits - max) (raised to 1/temperature), entries
    outside top-k / the top-p nucleus zeroed, cumsum, then one searchsorted per position -- a single exp pass, no
    softmax, and no full-vocabulary sort unless top_p without top_k meets a distribution too flat for the first
    `_NUCLEUS_CANDIDATES` tokens to hold the nucleus. Scratch buffers are allocated on the first (largest) step and
    reused, since fresh multi-hundred-MB allocations cost more in page faults than the arithmetic.
    """

    _NUCLEUS_CANDIDATES = 256

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None) -> None:
        self.scale = 1.0 / temperature
        self.top_k = top_k
        self.top_p = None if top_p == 1.0 else top_p  # the nucleus of mass 1 is the whole distribution
        self._weights = torch.empty(0)
        self._below = torch.empty(0, dtype=torch.bool)

    def __call__(self, logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """logits (B, M, K) float32, u (B, M) in [0, 1) -> (token ids (B, M) long, model log-prob (B, M) float32)."""
        shape, numel = logits.shape, logits.numel()
        if self._weights.numel() < numel or self._weights.device != logits.device:
            self._weights = torch.empty(numel, device=logits.device)
        weights = self._weights[:numel].view(shape)  # (B, M, K)
        peak = logits.amax(dim=-1, keepdim=True)  # (B, M, 1)
        truncated = (self.top_k is not None and self.top_k < shape[-1]) or self.top_p is not None
        # Normaliser of the model's own (untempered, untruncated) distribution, for the reported log-probability;
        # without temperature or truncation the CDF's total is that normaliser.
        norm = None
        if self.scale != 1.0:
            norm = torch.sub(logits, peak, out=weights).exp_().sum(dim=-1, keepdim=True)
        # exp((logits - peak) / T) in two passes: add computes -peak/T + logits/T in one.
        torch.add(peak * -self.scale, logits, alpha=self.scale, out=weights).exp_()
        if truncated and norm is None:
            norm = weights.sum(dim=-1, keepdim=True)
        if truncated:
            weights.masked_fill_(self._below_threshold(logits, weights, peak), 0.0)
        cdf = weights.cumsum_(dim=-1)
        total = cdf[..., -1:]
        # Keep the target strictly below the total, which float32 rounding of u * total could otherwise reach; then
        # the first entry above it always has non-zero weight (a flat CDF stretch is never chosen).
        target = torch.minimum(u[..., None] * total, torch.nextafter(total, torch.zeros_like(total)))
        # The clamp only matters for NaN logits, which then surface as a NaN log-probability for decode to report.
        choice = torch.searchsorted(cdf, target, right=True).clamp_(max=shape[-1] - 1)  # (B, M, 1)
        log_norm = peak + torch.log(total if norm is None else norm)
        log_prob = logits.gather(-1, choice) - log_norm
        return choice[..., 0], log_prob[..., 0]

    def _below_threshold(self, logits: Tensor, weights: Tensor, peak: Tensor) -> Tensor:
        """Bool (B, M, K): True outside top-k and outside the top-p nucleus. Tokens tied with the last kept logit
        stay, as in the usual top-k filter."""
        vocab = logits.shape[-1]
        k = vocab if self.top_k is None else min(self.top_k, vocab)
        if self.top_p is None:
            threshold = logits.topk(k, dim=-1).values[..., -1:]  # (B, M, 1)
        elif self.top_k is not None:
            threshold, _ = self._nucleus(logits.topk(k, dim=-1).values, peak, None)
        else:
            mass = weights.sum(dim=-1, keepdim=True)
            candidates = logits.topk(min(vocab, self._NUCLEUS_CANDIDATES), dim=-1).values
            threshold, reached = self._nucleus(candidates, peak, mass)
            if not bool(reached.all()):
                rows = ~reached[..., 0]  # (B, M): the nucleus is wider than the candidates
                every = logits[rows].sort(dim=-1, descending=True).values  # (R, K)
                threshold[rows] = self._nucleus(every, peak[rows], mass[rows])[0]
        if self._below.numel() < logits.numel() or self._below.device != logits.device:
            self._below = torch.empty(logits.numel(), dtype=torch.bool, device=logits.device)
        return torch.lt(logits, threshold, out=self._below[: logits.numel()].view(logits.shape))

    def _nucleus(self, values: Tensor, peak: Tensor, mass: Tensor | None) -> tuple[Tensor, Tensor]:
        """Logit of the last token of the top-p nucleus, given candidate logits (..., c) sorted descending.

        mass: total weight of the distribution being truncated (..., 1), or None when the candidates are all of it
        (top-k). Also returns whether the candidates reach top_p of the mass, i.e. whether the answer is exact.
        """
        cum = (values - peak).mul_(self.scale).exp_().cumsum_(dim=-1)  # (..., c) same weights as in __call__
        cut = self.top_p * (cum[..., -1:] if mass is None else mass)
        # The nucleus keeps candidate j while the weight before it is below the cut: j <= #(cum < cut).
        keep = (torch.searchsorted(cum, cut.contiguous()) + 1).clamp(max=values.shape[-1])
        return values.gather(-1, keep - 1), cum[..., -1:] >= cut


def _check_inputs(
    tokens: Tensor,
    mask_token_id: int,
    seeds: Tensor,
    num_steps: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    choice_temperature: float,
) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"decode: tokens must be a (B, L) long tensor, got {got}")
    if mask_token_id < 0:
        raise ValueError(f"decode: mask_token_id must be >= 0, got {mask_token_id}")
    if not isinstance(seeds, Tensor) or seeds.shape != (tokens.shape[0],) or seeds.is_floating_point():
        got = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"decode: seeds must be a ({tokens.shape[0]},) integer tensor, one per row, got {got}")
    if num_steps < 1:
        raise ValueError(f"decode: num_steps must be >= 1, got {num_steps}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"decode: temperature must be a positive finite number, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"decode: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"decode: top_p must be in (0, 1] or None, got {top_p}")
    if not choice_temperature >= 0:
        raise ValueError(f"decode: choice_temperature must be >= 0, got {choice_temperature}")


def _check_logits(logits: Tensor, batch: int, width: int, mask_token_id: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != (batch, width):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"decode: logits_fn must return ({batch}, {width}, K) logits for the positions, got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"decode: logits_fn must return floating-point logits, got {logits.dtype}")
    if mask_token_id < logits.shape[-1]:
        raise ValueError(
            f"decode: logits_fn returned K={logits.shape[-1]} logits, which include mask_token_id={mask_token_id}; "
            "return logits over the codebook only so the mask token can never be sampled"
        )
