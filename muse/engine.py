"""The decoding engine: every sampling call of musegen, from one image to many concurrent requests, runs through here.

A *task* (generation, inpainting, outpainting, editing, upscaling: `MusePipeline` builds them) is a generator that
yields *jobs* and receives each job's `DecodeOutput`; a job is one parallel decode on one stage -- a starting grid of
B rows, their text context, settings and seeds. The engine runs many tasks at once, one *tick* at a time:

    tick:  admit queued jobs (up to max_rows)  ->  pick the jobs that share a model and grid shape  ->
           ONE batched forward over all their rows (every guided row twice, conditional and unconditional)  ->
           mix guidance per job, with its own scale at its own step  ->  advance each row by one step  ->
           hand finished jobs' outputs back to their tasks, which yield their next job (or finish)

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

What a forward saves (`forward_rows`): the text keys/values are computed once per job (by the task, before it
yields); the last layer and the logits run only at still-masked positions; at a job's first step, rows of an
all-masked grid with the same prompt are computed once (a prompt's candidates, the unconditional branch); on the CPU
the rows go through the model `CPU_TOKENS_PER_FORWARD` tokens at a time into a reused logits buffer.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sampling import DecodeOutput, DecodeSettings, DecodeState, NonFiniteLogits

log = logging.getLogger(__name__)

# On the CPU, at most this many tokens go through the model in one forward. glibc hands allocations above 32 MiB
# straight to the OS and takes them back on free, so a many-row forward page-faults its layer activations afresh at
# every decoding step (bench-256, 16 rows: ~130k minor faults per forward, about 10% of its time); forwards of 1024
# tokens keep the largest activation, the MLP's, at 8 MiB for width 512, which the heap reuses (~38k faults).
CPU_TOKENS_PER_FORWARD = 1024
# A tick leaves out rows that need no forward (finished rows, first-step duplicates) only when they are at least this
# share of its rows; below it, computing them is cheaper than re-cutting the others' context (see `_Group._plan`).
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
class Job:
    """One parallel decode on one stage.

    tokens: (B, L) long starting grid, row-major over `grid` = (h, w), the model's mask id where unknown. context: B
    rows, or 2B with guidance (guidance_scale > 1): the B conditional rows, then the B unconditional ones.
    row_keys: optionally one key per context row, equal keys meaning equal context rows (a prompt); rows of an
    all-masked grid with equal keys then compute their first step once. stage: which stage of a cascade the job
    decodes (0 base, 1 super-resolution), reported in its events.
    """

    model: TokenPredictor
    tokens: Tensor
    grid: tuple[int, int]
    context: Context
    settings: DecodeSettings
    seeds: Tensor
    guidance_scale: float = 1.0
    guidance_schedule: str = "constant"
    row_keys: tuple[Hashable, ...] | None = None
    stage: int = 0

    def __post_init__(self) -> None:
        B = self.tokens.shape[0]
        if self.tokens.ndim != 2 or self.tokens.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"job tokens must be (B, h * w) for grid {self.grid}, got {tuple(self.tokens.shape)}")
        if self.context.batch_size != B * (2 if self.guided else 1):
            raise ValueError(f"the job's context has {self.context.batch_size} rows; {B} grids need "
                             f"{B * (2 if self.guided else 1)} (conditional, then unconditional when guided)")
        if self.row_keys is not None and len(self.row_keys) != self.context.batch_size:
            raise ValueError(f"row_keys must have one key per context row ({self.context.batch_size}), got "
                             f"{len(self.row_keys)}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def forward_rows(self) -> int:
        """Rows this job adds to a forward: its grids, twice with guidance."""
        return self.batch_size * (2 if self.guided else 1)

    def scale_at(self, step: int) -> float:
        """Guidance scale at step `step` of `settings.num_steps`: constant, or ramped from 1 to guidance_scale,
        reached at the last step (Muse). Written in terms of progress: trailing steps may be skipped."""
        if self.guidance_schedule == "linear":
            return 1.0 + (self.guidance_scale - 1.0) * (step + 1) / self.settings.num_steps
        return self.guidance_scale


# A task: yields jobs, receives each one's DecodeOutput, returns its result.
TaskSteps = Generator[Job, DecodeOutput, Any]


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
# The forward


def forward_rows(
    model: TokenPredictor,
    tokens: Tensor,
    positions: Tensor,
    chunks: Sequence[tuple[slice, Context]],
    grid: tuple[int, int],
    buffer: list[Tensor],
    widths: Sequence[int] | None = None,
) -> Tensor:
    """The model over rows `tokens` (N, L) at `positions` (N, M), one forward per chunk of rows with its context ->
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


def split_rows(context: Context, rows_per_forward: int) -> list[tuple[slice, Context]]:
    """Chunks of at most `rows_per_forward` rows, each with its context (views)."""
    R = context.batch_size
    if rows_per_forward >= R:
        return [(slice(0, R), context)]
    return [(slice(s, s + rows_per_forward), context.select(slice(s, s + rows_per_forward)))
            for s in range(0, R, rows_per_forward)]


def rows_per_forward(device: torch.device, num_tokens: int, rows: int) -> int:
    """How many rows of `num_tokens` tokens one forward takes: all on an accelerator, CPU_TOKENS_PER_FORWARD worth on
    the CPU (see there)."""
    return max(1, CPU_TOKENS_PER_FORWARD // num_tokens) if device.type == "cpu" else max(1, rows)


# ------------------------------------------------------------------------------------------------------------------
# Inside the engine


class _Running:
    """A task inside the engine: its generator, its handle, and the job it is waiting on."""

    def __init__(self, handle: TaskHandle) -> None:
        self.handle = handle
        self.steps = handle._task.steps
        self.jobs_started = 0
        self.job: _ActiveJob | None = None
        self.started = False


class _ActiveJob:
    def __init__(self, job: Job, task: _Running, index: int) -> None:
        self.job = job
        self.task = task
        self.index = index  # which job of its task
        self.state = DecodeState.start(job.tokens, mask_token_id=job.model.config.mask_token_id, seeds=job.seeds,
                                       settings=job.settings)
        self.steps_run = 0
        # An all-masked start: every row's first forward sees the same grid, so equal context rows are computed once.
        self.fresh_start = bool(self.state.unknown.all())
        self.start = 0  # its rows in the group's merged state: [start, start + B)
        self.uncond_start = 0  # its unconditional rows in the group's unconditional block, when guided

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.job.batch_size)


class _Group:
    """The admitted jobs that share a model and a grid shape: one merged decode state, one forward per tick."""

    def __init__(self, model: TokenPredictor, grid: tuple[int, int]) -> None:
        self.model = model
        self.grid = grid
        self.jobs: list[_ActiveJob] = []
        self.state: DecodeState | None = None
        self.dirty = True
        self.buffer = [torch.empty(0)]

    def rebuild(self) -> None:
        """Merge the jobs' states and contexts after jobs joined or left."""
        # Widest first: contiguous row chunks then hold rows with similar still-masked counts, and each chunk's last
        # layer and head run at its own rows' width (`forward_rows(widths=...)`), not the widest row of the tick.
        self.jobs.sort(key=lambda job: -int(job.state.remaining.max()))
        states = [job.state for job in self.jobs]  # each job holds its own rows while the group is not merged
        start = uncond = 0
        for job in self.jobs:
            job.start = start
            start += job.job.batch_size
            if job.job.guided:
                job.uncond_start = uncond
                uncond += job.job.batch_size
        self.state = DecodeState.cat(states)
        for job in self.jobs:
            job.state = None  # the merged state holds its rows from now on
        B = self.state.batch_size
        device = self.state.tokens.device
        guided = [j for j in self.jobs if j.job.guided]
        # Forward rows: every grid under its conditional context, then the guided grids under their unconditional one.
        uncond_grid_rows = [r for j in guided for r in range(j.start, j.start + j.job.batch_size)]
        self.grid_rows = list(range(B)) + uncond_grid_rows  # the grid row of each forward row
        if len(guided) == len(self.jobs):
            self.uncond_rows: Tensor | slice | None = slice(0, B)
        elif not guided:
            self.uncond_rows = None
        else:
            self.uncond_rows = torch.tensor(uncond_grid_rows, dtype=torch.long, device=device)
        contexts = [j.job.context.select(slice(0, j.job.batch_size)) if j.job.guided else j.job.context
                    for j in self.jobs]
        contexts += [j.job.context.select(slice(j.job.batch_size, None)) for j in guided]
        self.context = type(contexts[0]).cat(contexts)
        self.keys: list[Hashable | None] = []
        for j in self.jobs:
            keys = j.job.row_keys
            self.keys += list(keys[: j.job.batch_size]) if keys is not None else [None] * j.job.batch_size
        for j in guided:
            keys = j.job.row_keys
            self.keys += list(keys[j.job.batch_size :]) if keys is not None else [None] * j.job.batch_size
        self.per_forward = rows_per_forward(device, self.grid[0] * self.grid[1], self.context.batch_size)
        self.chunks = split_rows(self.context, self.per_forward)
        self._plan_key: tuple | None = None
        self._plan_value: tuple = (None, None, None)
        self.dirty = False

    def forward(self, positions: Tensor) -> tuple[Tensor, int]:
        """Logits (B, M, K) for the merged state's rows at `positions`, guidance mixed; and the rows forwarded."""
        state = self.state
        B = state.batch_size
        tokens = state.tokens
        if self.uncond_rows is not None:
            tokens = torch.cat([tokens, tokens[self.uncond_rows]])  # (R, L)
            positions = torch.cat([positions, positions[self.uncond_rows]])  # (R, M)
        rows, source, chunks = self._plan()
        remaining = state.remaining.tolist()
        if rows is None:
            widths = [max(remaining[g] for g in self.grid_rows[c]) for c, _ in self.chunks]
            logits = forward_rows(self.model, tokens, positions, self.chunks, self.grid, self.buffer,
                                  widths)  # (R, M, K)
            computed = tokens.shape[0]
        else:
            grid_rows = [self.grid_rows[r] for r in rows.tolist()]
            widths = [max(remaining[g] for g in grid_rows[c]) for c, _ in chunks]
            some = forward_rows(self.model, tokens[rows], positions[rows], chunks, self.grid, self.buffer, widths)
            computed = rows.shape[0]
            # Rows that share a computed row copy it; rows with nothing left to commit get zeros, never read.
            logits = torch.cat([some, some.new_zeros(1, *some.shape[1:])])[source]  # (R, M, K)
        for j in self.jobs:
            if j.job.guided:
                # uncond + s * (cond - uncond), in place in the forward's output, each job with its own scale.
                cond = logits[j.rows]
                uncond = logits[B + j.uncond_start : B + j.uncond_start + j.job.batch_size]
                cond.sub_(uncond).mul_(j.job.scale_at(j.steps_run)).add_(uncond)
        return logits[:B], computed

    def _plan(self) -> tuple[Tensor | None, Tensor | None, list[tuple[slice, Context]] | None]:
        """Which forward rows to compute this tick: (rows (N,), each forward row's source among them or N for "none"
        (R,), their chunks), or Nones when it is all of them. Two kinds of rows are left out: rows whose grid has
        nothing left to commit (a small hole finishes before the others), and, at the first step of all-masked
        jobs, rows whose key an earlier row shares -- they see the same grid and context, so the same logits.
        The plan changes only when a row finishes or a job takes its first step, so it is cached."""
        done = self.state.done.tolist()
        fresh = [False] * self.state.batch_size
        for j in self.jobs:
            if j.fresh_start and j.steps_run == 0:
                fresh[j.rows] = [True] * j.job.batch_size
        key = (tuple(done), tuple(fresh))
        if key == self._plan_key:
            return self._plan_value
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
            plan = (None, None, None)
        else:
            device = self.state.tokens.device
            rows = torch.tensor(compute, dtype=torch.long, device=device)
            index = torch.tensor([len(compute) if s < 0 else s for s in source], dtype=torch.long, device=device)
            plan = (rows, index, split_rows(self.context.select(rows), self.per_forward) if compute else [])
        self._plan_key, self._plan_value = key, plan
        return plan


@dataclass
class EngineStats:
    """Counters since the engine was made (read them for metrics and benchmarks)."""

    ticks: int = 0
    rows_forwarded: int = 0  # context rows run through a model, summed over ticks
    tasks_finished: int = 0
    tasks_failed: int = 0
    tasks_cancelled: int = 0
    busy_seconds: float = 0.0
    last_rows: int = 0  # rows of the last tick's forward

    @property
    def rows_per_forward(self) -> float:
        return self.rows_forwarded / self.ticks if self.ticks else 0.0


class Engine:
    """Runs tasks, batching the decoding steps of every job in flight (see the module docstring).

    max_rows: forward rows in flight (a guided row counts twice); a job that does not fit waits in the queue, but a
    job alone is always admitted. max_queued: tasks waiting beyond which `submit` raises `EngineFull`.
    """

    def __init__(self, *, max_rows: int | None = None, max_queued: int | None = None) -> None:
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[str, TaskHandle]] = []
        self._queued_tasks = 0  # submitted, not yet started (under _lock)
        self._tasks: dict[TaskHandle, _Running] = {}
        self._pending: deque[_ActiveJob] = deque()  # yielded jobs not yet admitted, in order
        self._groups: dict[tuple[int, tuple[int, int]], _Group] = {}
        self._order = itertools.count()
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
        return sum(j.job.forward_rows for g in self._groups.values() for j in g.jobs)

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
        """One step of the engine: admit, then run one group's forward and advance it. False when idle."""
        with torch.inference_mode():
            self._take_inbox()
            self._admit()
            group = self._next_group()
            if group is None:
                return False
            t0 = time.perf_counter()
            self._step(group)
            self.stats.busy_seconds += time.perf_counter() - t0
            return True

    # -- internals ----------------------------------------------------------------------------------------------

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
                running = _Running(handle)
                self._tasks[handle] = running
                self._resume(running, None)
            elif kind == "cancel":
                self._cancel(handle)

    def _resume(self, task: _Running, output: DecodeOutput | None) -> None:
        """Run the task's code up to its next job (queued at the front: a task in progress goes first) or its end."""
        try:
            job = next(task.steps) if not task.started else task.steps.send(output)
            task.started = True
        except StopIteration as stop:
            self._end(task, result=stop.value)
            return
        except Exception as e:
            self._end(task, error=e)
            return
        if not isinstance(job, Job):
            self._end(task, error=TypeError(f"a task must yield Job objects, got {type(job).__name__}"))
            return
        try:
            active = _ActiveJob(job, task, task.jobs_started)
        except Exception as e:
            self._end(task, error=e)
            return
        task.jobs_started += 1
        task.job = active
        if output is None:
            self._pending.append(active)
        else:
            self._pending.appendleft(active)

    def _end(self, task: _Running, result: Any = None, error: BaseException | None = None) -> None:
        self._tasks.pop(task.handle, None)
        task.job = None
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
        job = task.job
        if job is not None:
            if job in self._pending:
                self._pending.remove(job)
            else:
                self._remove(job)
        task.steps.close()
        self._end(task, error=Cancelled("cancelled"))

    def _remove(self, job: _ActiveJob) -> None:
        """Take a job out of its group; the group is merged again before its next forward."""
        group = self._groups[(id(job.job.model), job.job.grid)]
        self._detach(group, [job])

    def _detach(self, group: _Group, leaving: list[_ActiveJob]) -> None:
        keep = [j for j in group.jobs if j not in leaving]
        if group.state is not None and keep:
            device = group.state.tokens.device
            for j in keep:  # each survivor takes its rows back out of the merged state
                j.state = group.state.select(torch.arange(j.start, j.start + j.job.batch_size, device=device))
        group.jobs = keep
        group.state = None
        group.dirty = True
        if not keep:
            del self._groups[(id(group.model), group.grid)]

    def _admit(self) -> None:
        admitted = False
        while self._pending:
            job = self._pending[0]
            in_flight = self.rows_in_flight
            if self.max_rows is not None and in_flight and in_flight + job.job.forward_rows > self.max_rows:
                break
            self._pending.popleft()
            key = (id(job.job.model), job.job.grid)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(job.job.model, job.job.grid)
            elif group.state is not None:
                self._detach_all(group)
            group.jobs.append(job)
            group.dirty = True
            admitted = True
        if admitted:
            for position, job in enumerate(self._pending):
                job.task.handle._emit(Queued(position))

    def _detach_all(self, group: _Group) -> None:
        """Give every job of a merged group its own state back, so that the group can be merged with newcomers."""
        device = group.state.tokens.device
        for j in group.jobs:
            j.state = group.state.select(torch.arange(j.start, j.start + j.job.batch_size, device=device))
        group.state = None

    def _next_group(self) -> _Group | None:
        """The groups take turns, so a stage or grid shape never starves the others."""
        if not self._groups:
            return None
        groups = list(self._groups.values())
        self._turn = (self._turn + 1) % len(groups)
        return groups[self._turn]

    def _step(self, group: _Group) -> None:
        if group.dirty:
            if group.state is not None:
                self._detach_all(group)
            group.rebuild()
        positions = group.state.positions()  # (B, M)
        try:
            logits, computed = group.forward(positions)
            group.state.advance(positions, logits)
        except NonFiniteLogits as e:
            bad = [j for j in group.jobs if any(j.start <= r < j.start + j.job.batch_size for r in e.rows)]
            self._fail_jobs(group, bad, ValueError(f"the model returned NaN or infinite logits ({e})"))
            return
        except Exception as e:  # a failed forward (out of memory, a bug) fails every job that was in it
            log.exception("a forward over %d jobs failed", len(group.jobs))
            self._fail_jobs(group, list(group.jobs), e)
            return
        self.stats.ticks += 1
        self.stats.rows_forwarded += computed
        self.stats.last_rows = computed
        remaining = group.state.remaining.tolist()
        finished = []
        for j in group.jobs:
            j.steps_run += 1
            masked = sum(remaining[j.rows])
            if j.task.handle._on_event is not None:
                rows = j.rows
                state = group.state
                j.task.handle._emit(Step(job=j.index, index=j.steps_run, num_steps=j.job.settings.num_steps,
                                         masked=masked, grid=j.job.grid, stage=j.job.stage,
                                         preview=lambda state=state, rows=rows: state.preview()[rows]))
            if masked == 0:
                finished.append(j)
        if finished:
            device = group.state.tokens.device
            outputs = []
            for j in finished:
                rows = torch.arange(j.start, j.start + j.job.batch_size, device=device)
                outputs.append(group.state.select(rows).output(j.steps_run))
            self._detach(group, finished)
            for j, output in zip(finished, outputs):
                j.task.job = None
                self._resume(j.task, output)

    def _fail_jobs(self, group: _Group, jobs: list[_ActiveJob], error: BaseException) -> None:
        self._detach(group, jobs)
        for j in jobs:
            j.task.steps.close()
            self._end(j.task, error=error)
