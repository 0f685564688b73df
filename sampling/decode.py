"""MaskGIT / Muse iterative parallel decoding on a token grid, given only a callable that returns logits.

Generation, inpainting, outpainting and editing are the same call: the caller pre-fills the grid with known tokens and
`mask_token_id` where tokens are unknown. Known tokens are context and never change (MaskGIT gives them infinite
confidence; here they are simply never candidates). Each row's reveal budget follows the schedule relative to the
number of tokens unknown in that row at the start (`schedule.num_masked`).

Two ways in:

* `decode(tokens, logits_fn, ...)`: the whole loop, for people writing their own pipelines.
* `DecodeState`: the same decode one step at a time, resumable. `decode` is a loop over it:

      state = DecodeState.start(tokens, mask_token_id=K, seeds=seeds, settings=DecodeSettings(num_steps=24))
      while not state.finished:
          positions = state.positions()                    # (B, M) still-masked positions, padded
          state.advance(positions, model_logits(state.tokens, positions))

  Every row carries its own step index and its own `DecodeSettings`, so states of different decodes can be
  concatenated (`DecodeState.cat`), advanced together by one batched forward, and split again (`select`): a row's
  result never depends on the rows beside it. That is what `muse.engine` does with concurrent requests.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sampling import rng
from sampling.schedule import SCHEDULES, num_masked

MIN_TEMPERATURE = 1e-4  # below it 1 / temperature overflows float32 logits; use top_k=1 for greedy decoding
MAX_STEPS = rng.MAX_STEP - 1  # the step index is 24 bits of the random-number coordinates


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


@dataclass(frozen=True)
class DecodeSettings:
    """How one row is decoded.

    Each step, for every still-masked position: sample a token by inverse CDF from softmax(logits / temperature),
    optionally restricted to the top_k tokens and then to the smallest set with probability >= top_p; its confidence
    is the model's log-probability of that token (untempered logits) plus Gumbel noise scaled by
    choice_temperature * (1 - (index + 1) / num_steps); the most confident tokens are committed so that the row's
    masked count follows `num_masked(…, num_steps, schedule)`.
    """

    num_steps: int = 24
    schedule: str = "cosine"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, numbers.Integral) \
                or not 1 <= self.num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be an integer in [1, {MAX_STEPS}], got {self.num_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown mask schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        # 1 / temperature scales float32 logits: 5e-324 overflowed to a grid of one token, 1e-300 to a torch error.
        if not MIN_TEMPERATURE <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a positive finite number >= {MIN_TEMPERATURE} (top_k=1 gives "
                             f"greedy decoding), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if not 0 <= self.choice_temperature < float("inf"):
            raise ValueError(f"choice_temperature must be >= 0 and finite, got {self.choice_temperature}")

    @property
    def _sampler_key(self) -> tuple:
        return (self.temperature, self.top_k, self.top_p)


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


class NonFiniteLogits(ValueError):
    """The logits of some rows hold NaN or infinity; `rows` lists them. Raised before the state changes."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__("decode: logits_fn returned NaN or infinite logits")
        self.rows = rows


class DecodeState:
    """One decode, resumable: the grid, what is still unknown, each row's schedule counts, log-probabilities, random
    keys, step index and settings. Rows may be at different steps and have different settings.

    Attributes (B rows, L tokens): tokens (B, L) long, `mask_token_id` where unknown; unknown (B, L) bool; generated
    (B, L) bool, unknown at the start; log_probs (B, L) float32 of the committed tokens; counts (B, T + 1) long, the
    tokens still masked after each step of the row's plan (T the largest num_steps, shorter plans padded with 0);
    keys (B,) random keys; step (B,) long, the row's next step; settings, one `DecodeSettings` per row.
    """

    def __init__(
        self,
        *,
        tokens: Tensor,
        unknown: Tensor,
        generated: Tensor,
        log_probs: Tensor,
        counts: Tensor,
        keys: Tensor,
        step: Tensor,
        settings: tuple[DecodeSettings, ...],
        mask_token_id: int,
    ) -> None:
        self.tokens, self.unknown, self.generated, self.log_probs = tokens, unknown, generated, log_probs
        self.counts, self.keys, self.step, self.settings = counts, keys, step, settings
        self.mask_token_id = mask_token_id
        device = tokens.device
        self._num_steps = torch.tensor([s.num_steps for s in settings], dtype=torch.long, device=device)  # (B,)
        self._choice = torch.tensor([s.choice_temperature for s in settings], dtype=torch.float64, device=device)
        # Rows that share a sampler (temperature, top_k, top_p): all of them in the usual case, then no indexing.
        rows_of: dict[tuple, list[int]] = {}
        for row, s in enumerate(settings):
            rows_of.setdefault(s._sampler_key, []).append(row)
        self._groups = [(key, None if len(rows) == len(settings) else torch.tensor(rows, device=device))
                        for key, rows in rows_of.items()]
        self._samplers: dict[tuple, _Sampler] = {}
        self._proposal: tuple[Tensor, Tensor] | None = None  # positions and tokens sampled at the last step

    @classmethod
    def start(
        cls,
        tokens: Tensor,
        *,
        mask_token_id: int,
        seeds: Tensor,
        settings: DecodeSettings | Sequence[DecodeSettings],
    ) -> DecodeState:
        """The state before the first step of decoding `tokens` (B, L) long, `mask_token_id` where unknown.

        seeds: (B,) integers, one per row. Every random number is a hash of (seed, step, stream, position), so a
        row's result does not depend on the rows beside it. settings: one for every row, or one per row.
        """
        _check_inputs(tokens, mask_token_id, seeds)
        batch, length = tokens.shape
        device = tokens.device
        if isinstance(settings, DecodeSettings):
            settings = (settings,) * batch
        settings = tuple(settings)
        if len(settings) != batch or not all(isinstance(s, DecodeSettings) for s in settings):
            raise ValueError(f"decode: settings must be one DecodeSettings or one per row ({batch})")
        tokens = tokens.clone()
        unknown = tokens == mask_token_id  # (B, L)
        width = max(s.num_steps for s in settings) + 1 if settings else 1
        counts = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, T + 1)
        plans: dict[tuple[int, str], list[int]] = {}
        for row, s in enumerate(settings):
            plans.setdefault((s.num_steps, s.schedule), []).append(row)
        for (num_steps, schedule), rows in plans.items():
            index = torch.tensor(rows, device=device)
            counts[index, : num_steps + 1] = num_masked(unknown[index].sum(dim=1), num_steps, schedule)
        return cls(
            tokens=tokens, unknown=unknown, generated=unknown.clone(),
            log_probs=torch.zeros(batch, length, device=device), counts=counts, keys=rng.seed_keys(seeds.to(device)),
            step=torch.zeros(batch, dtype=torch.long, device=device), settings=settings, mask_token_id=mask_token_id,
        )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def remaining(self) -> Tensor:
        """(B,) tokens each row still has masked (its plan's count at its step)."""
        at = self.step.clamp(max=self.counts.shape[1] - 1)[:, None]
        return self.counts.gather(1, at)[:, 0]

    @property
    def done(self) -> Tensor:
        """(B,) bool: the row has nothing left to decode."""
        return self.remaining == 0

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def positions(self) -> Tensor:
        """(B, M) the positions each row still has masked, ascending, padded to M = the largest count by repeating
        the row's first masked position (a row with nothing masked gets position 0; padded entries are ignored)."""
        remaining = self.remaining
        width = int(remaining.max()) if self.batch_size else 0
        # Masked positions first, in ascending order (stable sort), then pad with the row's first masked position.
        order = torch.argsort((~self.unknown).to(torch.uint8), dim=1, stable=True)[:, :width]  # (B, M)
        valid = torch.arange(width, device=order.device) < remaining[:, None]  # (B, M)
        return torch.where(valid, order, order[:, :1])

    def advance(self, positions: Tensor, logits: Tensor) -> None:
        """Move every row one step: sample at `positions` (B, M) from `logits` (B, M, K) over the codebook, commit
        each row's most confident tokens so that its masked count follows its plan, and count the step.

        Raises `NonFiniteLogits` (naming the rows) before changing anything if any row's logits are not finite.
        """
        batch, width = positions.shape
        _check_logits(logits, batch, width, self.mask_token_id)
        device = positions.device
        remaining = self.remaining  # (B,) equals unknown.sum(1)
        valid = torch.arange(width, device=device) < remaining[:, None]  # (B, M)

        token_bits, choice_bits = rng.random_bits(self.keys, self.step, (rng.TOKEN_STREAM, rng.CHOICE_STREAM),
                                                  positions)  # each (B, M)
        u = rng.uniform_float32(token_bits)
        sampled, log_prob = self._sample(logits.float(), u)
        finite = torch.isfinite(log_prob).all(dim=1)  # (B,)
        if not bool(finite.all()):
            raise NonFiniteLogits((~finite).nonzero()[:, 0].tolist())

        # Float64 as a Python scalar would be: the same numbers whatever the batch.
        noise_scale = self._choice * (1.0 - (self.step + 1).double() / self._num_steps.double())  # (B,)
        confidence = log_prob
        noisy = noise_scale > 0
        if bool(noisy.any()):
            g = rng.uniform_open_float64(choice_bits)
            gumbel = (-torch.log(-torch.log(g))).to(torch.float32)
            noisy_confidence = log_prob + noise_scale.to(torch.float32)[:, None] * gumbel
            confidence = torch.where(noisy[:, None], noisy_confidence, log_prob)
        confidence = confidence.masked_fill(~valid, float("-inf"))

        # Commit the n_reveal most confident tokens of each row: rank entries by confidence, keep rank < n_reveal.
        after = (self.step + 1).clamp(max=self.counts.shape[1] - 1)[:, None]
        n_reveal = remaining - self.counts.gather(1, after)[:, 0]  # (B,)
        by_confidence = torch.argsort(confidence, dim=1, descending=True, stable=True)  # (B, M)
        ranks = torch.arange(width, device=device).expand(batch, width)
        rank = torch.empty_like(by_confidence).scatter_(1, by_confidence, ranks)
        reveal = rank < n_reveal[:, None]  # (B, M), never true on padding (rank >= remaining there)

        # Boolean indexing writes each revealed (row, position) exactly once; padding duplicates are never selected.
        rows = torch.arange(batch, device=device)[:, None].expand(batch, width)
        at_row, at_pos = rows[reveal], positions[reveal]
        self.tokens[at_row, at_pos] = sampled[reveal]
        self.log_probs[at_row, at_pos] = log_prob[reveal]
        self.unknown[at_row, at_pos] = False
        self.step += 1
        self._proposal = (positions, sampled)

    def preview(self) -> Tensor:
        """(B, L) a guess of the finished grid, for live previews: the committed tokens, and at each still-masked
        position the token the last step sampled there (`mask_token_id` before the first step)."""
        guess = self.tokens.clone()
        if self._proposal is not None:
            positions, sampled = self._proposal
            still = self.unknown.gather(1, positions)
            guess.scatter_(1, positions, torch.where(still, sampled, guess.gather(1, positions)))
        return guess

    def output(self, num_steps_run: int = 0, intermediates: list[Tensor] | None = None) -> DecodeOutput:
        return DecodeOutput(tokens=self.tokens, log_probs=self.log_probs, generated=self.generated,
                            intermediates=intermediates, num_steps_run=num_steps_run)

    def select(self, rows: Tensor) -> DecodeState:
        """The state of the rows `rows` ((N,) long indices, in that order)."""
        index = rows.tolist()
        return DecodeState(
            tokens=self.tokens[rows], unknown=self.unknown[rows], generated=self.generated[rows],
            log_probs=self.log_probs[rows], counts=self.counts[rows], keys=self.keys[rows], step=self.step[rows],
            settings=tuple(self.settings[i] for i in index), mask_token_id=self.mask_token_id,
        )

    @staticmethod
    def cat(states: Sequence[DecodeState]) -> DecodeState:
        """The rows of `states`, one after another; they must share the grid length and the mask token."""
        if not states:
            raise ValueError("DecodeState.cat needs at least one state")
        first = states[0]
        if any(s.mask_token_id != first.mask_token_id or s.tokens.shape[1] != first.tokens.shape[1] for s in states):
            raise ValueError("DecodeState.cat: the states must share the grid length and the mask token id")
        width = max(s.counts.shape[1] for s in states)
        counts = [torch.nn.functional.pad(s.counts, (0, width - s.counts.shape[1])) for s in states]
        merged = DecodeState(
            tokens=torch.cat([s.tokens for s in states]), unknown=torch.cat([s.unknown for s in states]),
            generated=torch.cat([s.generated for s in states]), log_probs=torch.cat([s.log_probs for s in states]),
            counts=torch.cat(counts), keys=torch.cat([s.keys for s in states]),
            step=torch.cat([s.step for s in states]), settings=tuple(x for s in states for x in s.settings),
            mask_token_id=first.mask_token_id,
        )
        for s in states:  # keep the samplers' scratch buffers
            for key, sampler in s._samplers.items():
                merged._samplers.setdefault(key, sampler)
        return merged

    def _sample(self, logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """logits (B, M, K) float32, u (B, M) -> token ids (B, M), log-probs (B, M), each row with its sampler."""
        if len(self._groups) == 1:
            return self._sampler(self._groups[0][0])(logits, u)
        sampled = torch.empty(u.shape, dtype=torch.long, device=u.device)
        log_prob = torch.empty(u.shape, dtype=torch.float32, device=u.device)
        for key, rows in self._groups:
            sampled[rows], log_prob[rows] = self._sampler(key)(logits[rows], u[rows])
        return sampled, log_prob

    def _sampler(self, key: tuple) -> _Sampler:
        if key not in self._samplers:
            self._samplers[key] = _Sampler(*key)
        return self._samplers[key]


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
    masked in each row (B, M) -- see `DecodeState.positions` -- and a `DecodeStep`. It returns logits (B, M, K) over
    the codebook only (the mask token must not be a column). Guidance, negative prompts and text live inside
    logits_fn; this function knows nothing of them. The options are those of `DecodeSettings`, which describes a step;
    steps after every row is done are skipped.

    seeds: (B,) integers, one per row. Every random number is a hash of (seed, step, stream, position), so a row's
    result does not depend on the batch it is in (given a logits_fn whose rows are independent).

    Returns a `DecodeOutput`. Raises ValueError for malformed inputs or logits.
    """
    settings = DecodeSettings(num_steps=num_steps, schedule=schedule, temperature=temperature, top_k=top_k,
                              top_p=top_p, choice_temperature=choice_temperature)
    state = DecodeState.start(tokens, mask_token_id=mask_token_id, seeds=seeds, settings=settings)
    intermediates: list[Tensor] | None = [] if keep_intermediates else None
    steps_run = 0
    while not state.finished:
        positions = state.positions()
        logits = logits_fn(state.tokens, positions, DecodeStep(steps_run, num_steps))
        state.advance(positions, logits)
        steps_run += 1
        if intermediates is not None:
            intermediates.append(state.tokens.clone())
    return state.output(steps_run, intermediates)


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


def _check_inputs(tokens: Tensor, mask_token_id: int, seeds: Tensor) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"decode: tokens must be a (B, L) long tensor, got {got}")
    if mask_token_id < 0:
        raise ValueError(f"decode: mask_token_id must be >= 0, got {mask_token_id}")
    if not isinstance(seeds, Tensor) or seeds.shape != (tokens.shape[0],) or seeds.is_floating_point():
        got = f"{tuple(seeds.shape)} {seeds.dtype}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"decode: seeds must be a ({tokens.shape[0]},) integer tensor, one per row, got {got}")


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
