"""The decoding engine: every sampling call of musegen, from one image to many concurrent requests, runs through here.

A *task* (generation, inpainting, outpainting, editing, upscaling: `MusePipeline` builds them) is a generator that
yields *jobs* and receives each job's result; a `Job` is one parallel decode on one stage -- a starting grid of B
rows, their context, sampling options and seeds -- and returns its `DecodeOutput`; a `ScoreJob` asks for the guided
log-probability of every token of complete grids (editing's confidence mode) and returns them. The engine runs many
tasks at once, one *tick* at a time, in three phases (as vLLM's `schedule` -> `execute_model` -> `update_from_output`):

    schedule  `_schedule`: admit waiting jobs (up to max_rows), pick the group whose turn it is -- the jobs of one
              kind that share a model and a grid shape -- and plan its forward (`_TickPlan`): the rows' positions,
              which rows run a second time for guidance and at what scale, which rows the model must compute
    execute   `_execute`: ONE forward over the group's rows, guidance mixed per job (`muse.guidance`)
    update    `_update`: advance every row one step (or read the scores), emit step events, hand finished jobs'
              outputs back to their tasks, which yield their next job (or finish)

    engine = Engine()
    handle = engine.submit(task, on_event=print)   # from any thread; events: Queued, Step, Finished, Failed
    engine.run(task)                               # or: submit and drive the ticks here until it is done
    engine.start()                                 # or: a background thread drives them
    engine.drive()                                 # or: this thread drives them until stop() (`muse serve`)

Which thread drives matters on the CPU: torch's OpenMP keeps a pool of worker threads for each thread that runs a
parallel op, and a second pool oversubscribes the cores. Measured here on 2 cores, a generation ran 85-90 ms on the
thread that loaded the model and 170-200 ms on another thread afterwards. So a server loads the model, warms it up
and drives the engine on one thread (its main thread, with `drive`), and serves HTTP from another.

Rows never influence each other: decoding randomness is counter-based per row (`sampling.rng`) and the forward is
row-independent, so on the CPU a job's tokens are bit-identical whether it runs alone or joins others mid-way.

What a forward saves (`_Group.compute`, counted in `EngineStats`): the text keys/values are computed once per job (by
the task, before it yields); the last layer and the logits run only at still-masked positions; rows whose grid has
nothing left to commit are left out; at a job's first step, rows of an all-masked grid with the same prompt are
computed once (a prompt's candidates, the unconditional branch); on the CPU the rows go through the model
`chunk_tokens` tokens at a time into a reused logits buffer.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from muse.guidance import Branches, conditional_rows, forward_with_guidance, unconditional_rows
from muse.options import Guidance, SamplingOptions
from sampling import DecodeOutput, DecodeSettings, DecodeState, NonFiniteLogits

log = logging.getLogger(__name__)

# On the CPU, at most this many tokens go through the model in one call (the default of `Engine(chunk_tokens=...)`).
# glibc hands allocations above 32 MiB straight to the OS and takes them back on free, so a many-row forward
# page-faults its layer activations afresh at every decoding step (bench-256, 16 rows: ~130k minor faults per forward,
# about 10% of its time); calls of 1024 tokens keep the largest activation, the MLP's, at 8 MiB for width 512, which
# the heap reuses (~38k faults).
CPU_TOKENS_PER_FORWARD = 1024
# A tick leaves out rows that need no forward (finished rows, first-step duplicates) only when they are at least this
# share of its rows; below it, computing them is cheaper than re-cutting the others' context (see `_Group._row_plan`).
MIN_ROWS_SAVED = 0.25


class Context(Protocol):
    """What a token predictor needs from the text (and, for super-resolution, the low-res tokens), per row."""

    @property
    def batch_size(self) -> int: ...

    def select(self, rows: Tensor | slice) -> Context: ...

    @staticmethod
    def cat(contexts: list[Context]) -> Context: ...


class TokenPredictor(Protocol):
    """A model the engine decodes with: `MaskedTransformer`, `SuperResTransformer`, or any other architecture with
    `config.mask_token_id` and this forward: tokens (N, L) long, context of N rows, positions (N, M) long, grid (h, w)
    -> logits (N, M, K) over the K codebook ids at those positions."""

    def __call__(self, tokens: Tensor, context: Any, positions: Tensor, grid: tuple[int, int]) -> Tensor: ...


@dataclass(frozen=True)
class _GridJob:
    """What every job is: grids (B, L) of `model` over `grid`, their context rows, and the options whole."""

    model: TokenPredictor
    tokens: Tensor
    grid: tuple[int, int]
    context: Context
    options: SamplingOptions

    def __post_init__(self) -> None:
        _check_rows(self)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def guidance(self) -> Guidance:
        return self.options.guidance

    @property
    def context_rows(self) -> int:
        """Rows this job adds to a forward (what `Engine(max_rows=...)` counts): its grids, twice when guided."""
        return self.context.batch_size


@dataclass(frozen=True)
class Job(_GridJob):
    """One parallel decode on one stage, with the sampling options whole (as a request carries them).

    tokens: (B, L) long starting grid, row-major over `grid` = (h, w), the model's mask id where unknown. context: B
    rows, or 2B when `options` guide ([conditional; unconditional], `muse.guidance`). stage: which stage of a cascade
    the job decodes (0 base, 1 super-resolution): it picks the stage's decode settings from `options` and is
    reported in the job's events. row_keys: optionally one key per context row, equal keys meaning equal context
    rows (a prompt); rows of an all-masked grid with equal keys then compute their first step once.
    """

    seeds: Tensor
    stage: int = 0
    row_keys: tuple[Hashable, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.row_keys is not None and len(self.row_keys) != self.context.batch_size:
            raise ValueError(f"row_keys must have one key per context row ({self.context.batch_size}), got "
                             f"{len(self.row_keys)}")

    @functools.cached_property
    def settings(self) -> DecodeSettings:
        """The decode settings of the job's stage."""
        return self.options.decode_settings(self.stage)

    def scale_at(self, step: int) -> float:
        """Guidance scale at step `step` (0 first) of the stage's steps (`Guidance.scale_at`)."""
        return self.guidance.scale_at(step, self.settings.num_steps)


@dataclass(frozen=True)
class ScoreJob(_GridJob):
    """Score complete grids instead of decoding them: the result is (B, L) float32, the guided log-probability of
    each token of `tokens` (B, L) under its context (B rows, or 2B when `options` guide), read in one forward.

    Editing's confidence mode re-masks the tokens the model believes least; asking the engine (rather than calling
    the model beside it) batches the scoring with every other job in flight, within `max_rows`, and guides it as the
    options say. A complete grid is what a decode's last step leaves, so it is scored at the last step's scale of
    stage `stage`'s steps (for both schedules that is `guidance_scale`, where the linear ramp ends).
    """

    stage: int = 0

    @property
    def scale(self) -> float:
        """The guidance scale of a complete grid: the stage's last step's."""
        num_steps = self.options.decode_settings(self.stage).num_steps
        return self.guidance.scale_at(num_steps - 1, num_steps)


def _check_rows(job: _GridJob) -> None:
    """A job's grids and context rows agree (one context row per grid, two when guided)."""
    B = job.tokens.shape[0]
    if job.tokens.ndim != 2 or job.tokens.shape[1] != job.grid[0] * job.grid[1]:
        raise ValueError(f"job tokens must be (B, h * w) for grid {job.grid}, got {tuple(job.tokens.shape)}")
    if not isinstance(job.options, SamplingOptions):
        raise TypeError(f"a job's options must be SamplingOptions, got {type(job.options).__name__}")
    need = job.options.guidance.context_rows(B)
    if job.context.batch_size != need:
        raise ValueError(f"the job's context has {job.context.batch_size} rows; {B} grids need {need} "
                         f"(conditional, then unconditional when guided)")


# A task: yields jobs, receives each one's result (a Job's DecodeOutput, a ScoreJob's (B, L) scores), returns its own.
TaskSteps = Generator["Job | ScoreJob", "DecodeOutput | Tensor", Any]


@dataclass
class Task:
    """A unit of work for the engine: `steps` yields one job at a time. `kind` names it in metrics and logs."""

    steps: TaskSteps
    kind: str = "task"


def single_job(job: Job) -> Task:
    """A task of one job, whose result is that job's DecodeOutput."""

    def steps() -> TaskSteps:
        return (yield job)

    return Task(steps(), "job")


def run_job(job: Job) -> DecodeOutput:
    """Decode one job on an engine of its own (training sample grids, scripts)."""
    return Engine().run(single_job(job))


# ------------------------------------------------------------------------------------------------------------------
# Events and handles


@dataclass(frozen=True)
class Queued:
    """The task waits behind `position` others (0: next)."""

    position: int


@dataclass(frozen=True)
class Step:
    """A job of the task has run one decoding step. `preview()` returns (B, L) tokens: committed tokens and, where
    still masked, the tokens just sampled (valid only during the event callback, which runs on the engine's thread)."""

    job: int          # which job of the task, 0 first (a cascade's second stage, a later outpainting window, ...)
    index: int        # steps the job has run, 1 after its first
    num_steps: int
    masked: int       # tokens still masked over the job's rows
    grid: tuple[int, int]
    stage: int        # the job's `stage`
    preview: Callable[[], Tensor]


@dataclass(frozen=True)
class Finished:
    result: Any


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Queued | Step | Finished | Failed


class Cancelled(Exception):
    """The task was cancelled before it finished."""


class EngineFull(RuntimeError):
    """The engine's queue holds `max_queued` tasks already; try again later."""


class TaskHandle:
    """A submitted task: wait for it, cancel it, read its result. Safe to use from any thread."""

    def __init__(self, engine: Engine, task: Task, on_event: Callable[[Event], None] | None) -> None:
        self.kind = task.kind
        self._engine = engine
        self._task = task
        self._on_event = on_event
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.submitted = time.monotonic()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task has finished, failed or been cancelled; False on timeout."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The task's result; raises its error, `Cancelled`, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError("the task is still running")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Cancel the task; its rows are freed at the next tick. A finished task is left as it is."""
        self._engine._post(("cancel", self))

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("an event listener of a %s task failed", self.kind)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()
        self._emit(Failed(error) if error is not None else Finished(result))


# ------------------------------------------------------------------------------------------------------------------
# The forward in chunks


def forward_chunks(
    model: TokenPredictor,
    tokens: Tensor,
    positions: Tensor,
    chunks: Sequence[tuple[slice, Context]],
    grid: tuple[int, int],
    buffer: list[Tensor],
    widths: Sequence[int] | None = None,
) -> Tensor:
    """The model over rows `tokens` (N, L) at `positions` (N, M), one call per chunk of rows with its context ->
    float32 logits (N, M, K). With several chunks the logits land in `buffer[0]`, grown when too small and reused.

    widths: optionally, per chunk, how many leading positions its rows need (their largest still-masked count; the
    rest is padding, see `DecodeState.positions`). A chunk of rows near the end of their decode then pays for its
    own few positions in the last layer and the head, not for the widest row of the tick; its padding entries keep
    whatever finite values the buffer holds (never read).
    """
    if len(chunks) == 1:
        return model(tokens, chunks[0][1], positions, grid).float()
    N, M = positions.shape
    out = None
    for c, (rows, context) in enumerate(chunks):
        width = M if widths is None else max(1, min(M, widths[c]))
        logits = model(tokens[rows], context, positions[rows, :width], grid)  # (n, width, K)
        if out is None:
            size = N * M * logits.shape[-1]
            if buffer[0].numel() < size or buffer[0].device != logits.device:
                # Zeros, not empty: padding entries a narrower chunk never writes must be finite.
                buffer[0] = torch.zeros(size, dtype=torch.float32, device=logits.device)
            out = buffer[0][:size].view(N, M, logits.shape[-1])
        out[rows, :width] = logits
    return out


def chunk_context(context: Context, rows_per_chunk: int) -> list[tuple[slice, Context]]:
    """Chunks of at most `rows_per_chunk` rows, each with its context (views)."""
    R = context.batch_size
    if rows_per_chunk >= R:
        return [(slice(0, R), context)]
    return [(slice(s, s + rows_per_chunk), context.select(slice(s, s + rows_per_chunk)))
            for s in range(0, R, rows_per_chunk)]


def rows_per_chunk(device: torch.device, num_tokens: int, rows: int, chunk_tokens: int = CPU_TOKENS_PER_FORWARD) -> int:
    """How many rows of `num_tokens` tokens one model call takes: all on an accelerator, `chunk_tokens` worth on the
    CPU (see `CPU_TOKENS_PER_FORWARD`)."""
    return max(1, chunk_tokens // num_tokens) if device.type == "cpu" else max(1, rows)


# ------------------------------------------------------------------------------------------------------------------
# Inside the engine


class _Running:
    """A task inside the engine: its generator, its handle, and the job it is waiting on."""

    def __init__(self, handle: TaskHandle) -> None:
        self.handle = handle
        self.steps = handle._task.steps
        self.started = False
        self.decodes_started = 0  # its decode jobs so far: `Step.job` numbers them (scoring jobs emit no steps)
        self.current: _ActiveJob | None = None


class _ActiveJob:
    """A job the engine holds (waiting for rows, or admitted into a group): the job as yielded (`job`), its task,
    its decode state while the group's state is not merged, its steps run and where its rows sit in its group."""

    def __init__(self, job: Job | ScoreJob, task: _Running) -> None:
        self.job = job
        self.task = task
        self.steps_run = 0
        self.start = 0  # its grids in the group's rows: [start, start + B)
        self.uncond_start = 0  # its unconditional rows in the group's unconditional block, when guided
        self.scoring = isinstance(job, ScoreJob)
        mask_id = job.model.config.mask_token_id
        if self.scoring:
            if bool((job.tokens == mask_id).any()):
                raise ValueError("a ScoreJob's grids must be complete: its tokens hold the mask id")
            self.index = -1  # emits no Step events
            self.state: DecodeState | None = None
            self.fresh_start = False
        else:
            self.index = task.decodes_started  # which decode job of its task
            self.state = DecodeState.start(job.tokens, mask_token_id=mask_id, seeds=job.seeds, settings=job.settings)
            # An all-masked start: every row's first forward sees the same grid, so equal context rows are computed
            # once.
            self.fresh_start = bool(self.state.unknown.all())

    @property
    def rows(self) -> slice:
        """Its grid rows in the group."""
        return slice(self.start, self.start + self.job.batch_size)

    def scale(self) -> float:
        """Its guidance scale for this tick: a decode's at its step, a scoring job's at the last step."""
        return self.job.scale if self.scoring else self.job.scale_at(self.steps_run)


@dataclass(frozen=True)
class _RowPlan:
    """Which of a forward's R rows the model computes: `compute` (N,) of them (None: all R), and per forward row the
    computed row it copies (`source` (R,), N for "none": its grid has nothing left to commit); `chunks` of the
    computed rows with their context; rows left out because they share a computed row (`shared`) or have nothing
    left to commit (`idle`)."""

    compute: Tensor | None
    source: Tensor | None
    chunks: list[tuple[slice, Context]]
    shared: int = 0
    idle: int = 0

    @property
    def num_rows(self) -> int:
        """The forward rows computed (the chunks cover them all)."""
        return sum(rows.stop - rows.start for rows, _ in self.chunks)


@dataclass(frozen=True)
class _TickPlan:
    """What one tick runs, the schedule phase's answer: one group's B grid rows at `positions` (B, M); which of them
    run a second time for guidance and each job's scale at its step (`branches`); which forward rows the model
    computes, in which chunks (`rows`), each chunk as wide as `widths` says."""

    group: _Group
    positions: Tensor
    branches: Branches
    rows: _RowPlan
    widths: list[int] | None


class _Group:
    """The admitted jobs of one kind (decode or score) that share a model and a grid shape: one forward per tick over
    all their rows. Decode jobs' states are merged into one `state` until a job joins or leaves; scoring jobs'
    complete grids are simply stacked."""

    def __init__(self, model: TokenPredictor, grid: tuple[int, int], scoring: bool, chunk_tokens: int) -> None:
        self.model = model
        self.grid = grid
        self.scoring = scoring
        self.chunk_tokens = chunk_tokens
        self.jobs: list[_ActiveJob] = []
        self.state: DecodeState | None = None
        self.tokens: Tensor | None = None  # (B, L): the merged state's, or the scoring jobs' grids
        self.dirty = True
        self.buffer = [torch.empty(0)]

    # -- membership -------------------------------------------------------------------------------------------------

    def add(self, active: _ActiveJob) -> None:
        self._split()
        self.jobs.append(active)
        self.dirty = True

    def remove(self, leaving: list[_ActiveJob]) -> None:
        """Take jobs out; the others take their rows back out of the merged state, merged again before the next
        forward."""
        self.jobs = [active for active in self.jobs if active not in leaving]
        self._split()
        self.dirty = True

    def _split(self) -> None:
        """Give every job its own rows of the merged state back (so that the group can be laid out anew)."""
        if self.state is not None:
            device = self.state.tokens.device
            for active in self.jobs:
                active.state = self.state.select(torch.arange(active.start, active.start + active.job.batch_size,
                                                              device=device))
        self.state = None

    # -- layout -----------------------------------------------------------------------------------------------------

    def rebuild(self) -> None:
        """Lay the rows out after jobs joined or left: merge the jobs' grids, and build the forward's context --
        every grid's conditional row, then the guided grids' unconditional rows (`Branches.repeat`)."""
        self._split()
        if not self.scoring:
            # Widest first: contiguous row chunks then hold rows with similar still-masked counts, and each chunk's
            # last layer and head run at its own rows' width (`forward_chunks(widths=...)`), not the widest row's.
            self.jobs.sort(key=lambda active: -int(active.state.remaining.max()))
        start = uncond = 0
        for active in self.jobs:
            active.start = start
            start += active.job.batch_size
            if active.job.guidance.on:
                active.uncond_start = uncond
                uncond += active.job.batch_size
        if self.scoring:
            self.tokens = torch.cat([active.job.tokens for active in self.jobs])  # (B, L)
        else:
            self.state = DecodeState.cat([active.state for active in self.jobs])
            self.tokens = self.state.tokens
            for active in self.jobs:
                active.state = None  # the merged state holds its rows from now on
        B = self.tokens.shape[0]
        device = self.tokens.device
        guided = [active for active in self.jobs if active.job.guidance.on]
        uncond_grid_rows = [r for active in guided for r in range(active.start, active.start + active.job.batch_size)]
        self.grid_rows = list(range(B)) + uncond_grid_rows  # the grid row of each forward row
        if len(guided) == len(self.jobs):
            self.repeat: Tensor | slice | None = slice(0, B)
        elif not guided:
            self.repeat = None
        else:
            self.repeat = torch.tensor(uncond_grid_rows, dtype=torch.long, device=device)
        contexts = [active.job.context.select(conditional_rows(active.job.batch_size)) if active.job.guidance.on
                    else active.job.context for active in self.jobs]
        contexts += [active.job.context.select(unconditional_rows(active.job.batch_size)) for active in guided]
        self.context = type(contexts[0]).cat(contexts)
        # The key of each forward row, in the same order (scoring jobs have none: their grids differ).
        self.keys: list[Hashable | None] = []
        for active in self.jobs:
            self.keys += _keys(active.job, conditional_rows(active.job.batch_size))
        for active in guided:
            self.keys += _keys(active.job, unconditional_rows(active.job.batch_size))
        self.rows_per_chunk = rows_per_chunk(device, self.grid[0] * self.grid[1], self.context.batch_size,
                                             self.chunk_tokens)
        self.all_rows = _RowPlan(None, None, chunk_context(self.context, self.rows_per_chunk))
        self._plan_key: tuple | None = None
        self._plan_value = self.all_rows
        self.dirty = False

    # -- the tick's plan --------------------------------------------------------------------------------------------

    def positions(self) -> Tensor:
        """(B, M) the positions each row needs logits at: its still-masked ones (a decode), or all (a score)."""
        if self.scoring:
            B, L = self.tokens.shape
            return torch.arange(L, device=self.tokens.device).expand(B, L)
        return self.state.positions()

    def branches(self) -> Branches:
        """Which rows run under the unconditional context too, and each guided job's scale at this tick."""
        B = self.tokens.shape[0]
        mixes = tuple((active.rows, slice(B + active.uncond_start, B + active.uncond_start + active.job.batch_size),
                       active.scale()) for active in self.jobs if active.job.guidance.on)
        return Branches(self.repeat, mixes)

    def row_plan(self) -> _RowPlan:
        """Which forward rows to compute this tick. Two kinds of rows are left out: rows whose grid has nothing left
        to commit (a small hole finishes before the others), and, at the first step of all-masked jobs, rows whose
        key an earlier row shares -- they see the same grid and context, so the same logits. The plan changes only
        when a row finishes or a job takes its first step, so it is cached."""
        if self.scoring:
            return self.all_rows
        done = self.state.done.tolist()
        fresh = [False] * self.state.batch_size
        for active in self.jobs:
            if active.fresh_start and active.steps_run == 0:
                fresh[active.rows] = [True] * active.job.batch_size
        key = (tuple(done), tuple(fresh))
        if key != self._plan_key:
            self._plan_key, self._plan_value = key, self._row_plan(done, fresh)
        return self._plan_value

    def _row_plan(self, done: list[bool], fresh: list[bool]) -> _RowPlan:
        first: dict[Hashable, int] = {}  # key -> index among the computed rows
        compute: list[int] = []
        source: list[int] = []
        for row, (g, name) in enumerate(zip(self.grid_rows, self.keys)):
            shared = fresh[g] and name is not None
            if done[g] or (shared and name in first):
                source.append(-1 if done[g] else first[name])
                continue
            if shared:
                first[name] = len(compute)
            source.append(len(compute))
            compute.append(row)
        # Leaving rows out costs a copy of the other rows' context (and of their logits) whenever the plan changes,
        # which with requests arriving every tick is every tick: worth it only for a large share of the rows.
        if len(compute) > (1 - MIN_ROWS_SAVED) * len(self.grid_rows):
            return self.all_rows
        device = self.tokens.device
        rows = torch.tensor(compute, dtype=torch.long, device=device)
        index = torch.tensor([len(compute) if s < 0 else s for s in source], dtype=torch.long, device=device)
        chunks = chunk_context(self.context.select(rows), self.rows_per_chunk) if compute else []
        idle = sum(1 for s in source if s < 0)
        return _RowPlan(rows, index, chunks, shared=len(source) - len(compute) - idle, idle=idle)

    def widths(self, rows: _RowPlan) -> list[int] | None:
        """Per chunk, the largest still-masked count of its rows (a score reads every position: None)."""
        if self.scoring:
            return None
        remaining = self.state.remaining.tolist()
        grid_rows = self.grid_rows if rows.compute is None else [self.grid_rows[r] for r in rows.compute.tolist()]
        return [max(remaining[g] for g in grid_rows[c]) for c, _ in rows.chunks]

    # -- the forward ------------------------------------------------------------------------------------------------

    def compute(self, tokens: Tensor, positions: Tensor, rows: _RowPlan, widths: list[int] | None) -> Tensor:
        """The forward rows `tokens` (R, L) at `positions` (R, M) -> logits (R, M, K), computing only `rows`: rows
        that share a computed row copy it; rows with nothing left to commit get zeros, never read."""
        if rows.compute is None:
            return forward_chunks(self.model, tokens, positions, rows.chunks, self.grid, self.buffer, widths)
        some = forward_chunks(self.model, tokens[rows.compute], positions[rows.compute], rows.chunks, self.grid,
                              self.buffer, widths)  # (N, M, K)
        return torch.cat([some, some.new_zeros(1, *some.shape[1:])])[rows.source]  # (R, M, K)

    # -- results ----------------------------------------------------------------------------------------------------

    def scores(self, logits: Tensor) -> Tensor:
        """(B, L) float32: each token's log-probability under the guided logits (B, L, K) read at every position."""
        log_probs = logits.log_softmax(dim=-1).gather(-1, self.tokens[..., None])[..., 0]  # (B, L)
        finite = torch.isfinite(log_probs).all(dim=1)
        if not bool(finite.all()):
            raise NonFiniteLogits((~finite).nonzero()[:, 0].tolist())
        return log_probs

    def output(self, active: _ActiveJob) -> DecodeOutput:
        rows = torch.arange(active.start, active.start + active.job.batch_size, device=self.tokens.device)
        return self.state.select(rows).output(active.steps_run)


def _keys(job: Job | ScoreJob, rows: slice) -> list[Hashable | None]:
    keys = job.row_keys if isinstance(job, Job) else None
    return list(keys[rows]) if keys is not None else [None] * job.batch_size


@dataclass
class EngineStats:
    """Counters since the engine was made (read them for metrics, benchmarks and tests). A tick runs one forward
    over one group's rows, in one model call per chunk of rows (several on the CPU, see `Engine(chunk_tokens=...)`);
    each guided grid is two rows of it."""

    ticks: int = 0
    model_calls: int = 0  # calls of a model, summed over ticks
    rows_forwarded: int = 0  # forward rows computed, summed over ticks
    rows_shared: int = 0  # forward rows not computed because an identical row was (first step of all-masked grids)
    rows_idle: int = 0  # forward rows not computed because their grid had nothing left to commit
    tasks_finished: int = 0
    tasks_failed: int = 0
    tasks_cancelled: int = 0
    busy_seconds: float = 0.0
    last_rows: int = 0  # rows of the last tick's forward

    @property
    def rows_per_forward(self) -> float:
        """Mean forward rows computed per tick."""
        return self.rows_forwarded / self.ticks if self.ticks else 0.0

class Engine:
    """Runs tasks, batching the decoding steps of every job in flight (see the module docstring).

    max_rows: forward rows in flight (`Job.context_rows`: a guided grid counts twice); a job that does not fit waits
    in the queue, but a job alone is always admitted. max_queued: tasks waiting beyond which `submit` raises
    `EngineFull`. chunk_tokens: on the CPU, at most this many tokens go through a model in one call (see
    `CPU_TOKENS_PER_FORWARD`); the results do not depend on it.
    """

    def __init__(self, *, max_rows: int | None = None, max_queued: int | None = None,
                 chunk_tokens: int = CPU_TOKENS_PER_FORWARD) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.chunk_tokens = chunk_tokens
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[str, TaskHandle]] = []
        self._queued_tasks = 0  # submitted, not yet started (under _lock)
        self._tasks: dict[TaskHandle, _Running] = {}
        self._pending: deque[_ActiveJob] = deque()  # yielded jobs not yet admitted, in order
        self._groups: dict[tuple[int, tuple[int, int], bool], _Group] = {}  # by (model, grid, scoring)
        self._turn = 0
        self._drive = threading.Lock()
        self._thread: threading.Thread | None = None  # the thread driving the ticks (start's, or drive's caller)
        self._spawned = False  # whether start() made that thread (so stop() joins it)
        self._stop = False

    # -- public -------------------------------------------------------------------------------------------------

    def submit(self, task: Task, on_event: Callable[[Event], None] | None = None) -> TaskHandle:
        """Queue a task; it starts at the next tick. Thread-safe. Raises EngineFull past `max_queued`."""
        handle = TaskHandle(self, task, on_event)
        with self._lock:
            # Waiting work is both: tasks not started yet, and started tasks whose next job waits for rows.
            waiting = self._queued_tasks + len(self._pending)
            if self.max_queued is not None and waiting >= self.max_queued:
                raise EngineFull(f"the engine's queue is full ({waiting} tasks waiting, max_queued="
                                 f"{self.max_queued})")
            self._queued_tasks += 1
            position = waiting
            self._inbox.append(("submit", handle))
            self._wake.notify()
        handle._emit(Queued(position))
        return handle

    def run(self, task: Task, on_event: Callable[[Event], None] | None = None) -> Any:
        """Submit `task` and return its result, driving the ticks on this thread unless a background thread does."""
        handle = self.submit(task, on_event)
        while not handle.done():
            if self._thread is not None:  # a driver thread runs the ticks (re-checked: it may stop)
                handle.wait(timeout=0.5)
                continue
            with self._drive:  # one tick at a time, whoever drives
                if self._thread is None and not handle.done():
                    self.tick()
        return handle.result()

    def start(self) -> None:
        """Drive the ticks on a background thread until `stop()`; nothing to do when a thread drives them already
        (`drive`). See the module docstring for why a server should rather `drive` on the thread that loaded the
        model."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="muse-engine", daemon=True)
            self._spawned = True
        self._thread.start()

    def drive(self, until: Callable[[], bool] | None = None) -> None:
        """Drive the ticks on the calling thread until `stop()` is called (from another thread) or `until()` is
        true (checked between ticks, and at least every half second when idle). Meanwhile `submit` and `run` from
        other threads hand their tasks to this one."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the engine is driven by another thread already")
            self._stop = False
            self._thread, self._spawned = threading.current_thread(), False
        try:
            self._loop(until)
        finally:
            with self._lock:
                self._thread = None

    def stop(self) -> None:
        """End `start`'s thread (joining it) or `drive`'s loop (which returns after its current tick)."""
        with self._lock:
            thread, spawned = self._thread, self._spawned
            if thread is None:
                return
            self._stop = True
            self._wake.notify()
        if spawned and thread is not threading.current_thread():
            thread.join()
            with self._lock:
                self._thread, self._spawned = None, False

    @property
    def driven(self) -> bool:
        """Whether a thread drives the ticks (`start`'s or `drive`'s); `run` then waits instead of ticking."""
        return self._thread is not None

    @property
    def rows_in_flight(self) -> int:
        return sum(active.job.context_rows for group in self._groups.values() for active in group.jobs)

    @property
    def queued(self) -> int:
        """Tasks submitted and not started, plus jobs waiting for rows."""
        with self._lock:
            return self._queued_tasks + len(self._pending)

    @property
    def active(self) -> int:
        """Tasks started and not finished."""
        return len(self._tasks)

    def tick(self) -> bool:
        """One tick: take new tasks and cancellations, then schedule -> execute -> update one group. False when
        idle."""
        with torch.inference_mode():
            self._take_inbox()
            plan = self._schedule()
            if plan is None:
                return False
            t0 = time.perf_counter()
            try:
                logits = self._execute(plan)
            except Exception as e:  # a failed forward (out of memory, a bug) fails every job that was in it
                log.exception("a forward over %d jobs failed", len(plan.group.jobs))
                self._fail_jobs(plan.group, list(plan.group.jobs), e)
            else:
                self._update(plan, logits)
            self.stats.busy_seconds += time.perf_counter() - t0
            return True

    # -- the three phases of a tick -------------------------------------------------------------------------------

    def _schedule(self) -> _TickPlan | None:
        """Admit waiting jobs, pick the group whose turn it is, and plan its forward; None when nothing is in
        flight."""
        self._admit()
        group = self._next_group()
        if group is None:
            return None
        if group.dirty:
            group.rebuild()
        rows = group.row_plan()
        return _TickPlan(group, group.positions(), group.branches(), rows, group.widths(rows))

    def _execute(self, plan: _TickPlan) -> Tensor:
        """One forward over the group's rows (a model call per chunk), guidance mixed -> logits (B, M, K)."""
        group = plan.group

        def forward(tokens: Tensor, positions: Tensor) -> Tensor:  # (R, L), (R, M) -> (R, M, K)
            return group.compute(tokens, positions, plan.rows, plan.widths)

        return forward_with_guidance(forward, group.tokens, plan.positions, plan.branches)

    def _update(self, plan: _TickPlan, logits: Tensor) -> None:
        """Advance every row one step (or read the scores), count the tick, emit step events, and hand the finished
        jobs' results to their tasks, which go on to their next job."""
        group = plan.group
        try:
            if group.scoring:
                scores = group.scores(logits)
            else:
                group.state.advance(plan.positions, logits)
        except NonFiniteLogits as e:
            bad = [active for active in group.jobs
                   if any(active.start <= r < active.start + active.job.batch_size for r in e.rows)]
            self._fail_jobs(group, bad, ValueError(f"the model returned NaN or infinite logits ({e})"))
            return
        except Exception as e:
            log.exception("advancing %d jobs failed", len(group.jobs))
            self._fail_jobs(group, list(group.jobs), e)
            return
        self._count(plan)
        if group.scoring:
            results = [(active, scores[active.rows]) for active in group.jobs]
        else:
            finished = self._report_steps(group)
            results = [(active, group.output(active)) for active in finished]
        if results:
            self._leave(group, [active for active, _ in results])
            for active, result in results:
                active.task.current = None
                self._resume(active.task, result)

    # -- the phases' parts --------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Move waiting jobs into their groups, in order, while their rows fit under `max_rows`."""
        admitted = False
        while self._pending:
            active = self._pending[0]
            in_flight = self.rows_in_flight
            if self.max_rows is not None and in_flight and in_flight + active.job.context_rows > self.max_rows:
                break
            self._pending.popleft()
            job = active.job
            key = (id(job.model), job.grid, active.scoring)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(job.model, job.grid, active.scoring, self.chunk_tokens)
            group.add(active)
            admitted = True
        if admitted:
            for position, active in enumerate(self._pending):
                active.task.handle._emit(Queued(position))

    def _next_group(self) -> _Group | None:
        """The groups take turns, so a stage or grid shape never starves the others."""
        if not self._groups:
            return None
        groups = list(self._groups.values())
        self._turn = (self._turn + 1) % len(groups)
        return groups[self._turn]

    def _count(self, plan: _TickPlan) -> None:
        computed = plan.rows.num_rows
        self.stats.ticks += 1
        self.stats.model_calls += len(plan.rows.chunks)
        self.stats.rows_forwarded += computed
        self.stats.rows_shared += plan.rows.shared
        self.stats.rows_idle += plan.rows.idle
        self.stats.last_rows = computed

    def _report_steps(self, group: _Group) -> list[_ActiveJob]:
        """Count a step for every decode job of the group, emit its Step event; the jobs now finished."""
        remaining = group.state.remaining.tolist()
        finished = []
        for active in group.jobs:
            active.steps_run += 1
            masked = sum(remaining[active.rows])
            if active.task.handle._on_event is not None:
                rows, state, job = active.rows, group.state, active.job
                active.task.handle._emit(Step(job=active.index, index=active.steps_run,
                                              num_steps=job.settings.num_steps, masked=masked, grid=job.grid,
                                              stage=job.stage,
                                              preview=lambda state=state, rows=rows: state.preview()[rows]))
            if masked == 0:
                finished.append(active)
        return finished

    # -- tasks --------------------------------------------------------------------------------------------------

    def _post(self, message: tuple[str, TaskHandle]) -> None:
        with self._lock:
            self._inbox.append(message)
            self._wake.notify()

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
            if until is not None and until():
                return
            try:
                with self._drive:  # a caller of run() may be ticking until this thread took over
                    busy = self.tick()
            except Exception:  # never let one bad tick take the server down
                log.exception("engine tick failed")
                busy = False
            if not busy:
                with self._lock:
                    if not self._inbox and not self._stop:
                        self._wake.wait(timeout=0.5)

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, handle in inbox:
            if kind == "submit":
                with self._lock:
                    self._queued_tasks -= 1
                if handle.done():  # cancelled before it started
                    continue
                task = _Running(handle)
                self._tasks[handle] = task
                self._resume(task, None)
            elif kind == "cancel":
                self._cancel(handle)

    def _resume(self, task: _Running, result: DecodeOutput | Tensor | None) -> None:
        """Run the task's code up to its next job (queued at the front: a task in progress goes first) or its end."""
        try:
            job = next(task.steps) if not task.started else task.steps.send(result)
            task.started = True
        except StopIteration as stop:
            self._end(task, result=stop.value)
            return
        except Exception as e:
            self._end(task, error=e)
            return
        if not isinstance(job, (Job, ScoreJob)):
            self._end(task, error=TypeError(f"a task must yield Job or ScoreJob objects, got {type(job).__name__}"))
            return
        try:
            active = _ActiveJob(job, task)
        except Exception as e:
            self._end(task, error=e)
            return
        if not active.scoring:
            task.decodes_started += 1
        task.current = active
        if result is None:
            self._pending.append(active)
        else:
            self._pending.appendleft(active)

    def _end(self, task: _Running, result: Any = None, error: BaseException | None = None) -> None:
        self._tasks.pop(task.handle, None)
        task.current = None
        if error is None:
            self.stats.tasks_finished += 1
        elif isinstance(error, Cancelled):
            self.stats.tasks_cancelled += 1
        else:
            self.stats.tasks_failed += 1
        task.handle._finish(result, error)

    def _cancel(self, handle: TaskHandle) -> None:
        task = self._tasks.get(handle)
        if task is None:
            if not handle.done():  # still in the inbox: it will be skipped when taken
                handle._finish(error=Cancelled("cancelled before it started"))
                self.stats.tasks_cancelled += 1
            return
        active = task.current
        if active is not None:
            if active in self._pending:
                self._pending.remove(active)
            else:
                self._leave(self._group_of(active), [active])
        task.steps.close()
        self._end(task, error=Cancelled("cancelled"))

    def _group_of(self, active: _ActiveJob) -> _Group:
        return self._groups[(id(active.job.model), active.job.grid, active.scoring)]

    def _leave(self, group: _Group, leaving: list[_ActiveJob]) -> None:
        """Take jobs out of their group (dropped with its last job)."""
        group.remove(leaving)
        if not group.jobs:
            del self._groups[(id(group.model), group.grid, group.scoring)]

    def _fail_jobs(self, group: _Group, jobs: list[_ActiveJob], error: BaseException) -> None:
        self._leave(group, jobs)
        for active in jobs:
            active.task.steps.close()
            self._end(active.task, error=error)
