"""The decoding engine, through its public contract: jobs of many tasks share each tick's forward, and every task's
tokens are bit-identical to its solo run; cancellation frees rows; step events; scoring jobs; what a forward saves
(first-step sharing, finished rows, CPU chunks) as `engine.stats` counts it, with results equal to solo runs."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from muse.engine import Cancelled, Engine, EngineFull, Finished, Job, Queued, ScoreJob, Step, Task, run_job, single_job
from muse.guidance import Guidance, guided_logits
from muse.options import SamplingOptions
from muse.pipeline import MusePipeline
from sampling import DecodeSettings


@pytest.fixture
def picture(tiny_pipe):
    return tiny_pipe("a red apple", seed=3).images[0]


def hole() -> np.ndarray:
    mask = np.zeros((16, 16), bool)
    mask[4:12, 8:16] = True
    return mask


def generate_task(pipe, prompt, **arguments):
    """`pipe(prompt, **arguments)` as an engine task, not run: what these tests submit to engines of their own."""
    return pipe.task(pipe.request("generate", prompt, **arguments))


def inpaint_task(pipe, prompt, **arguments):
    return pipe.task(pipe.request("inpaint", prompt, **arguments))


def outpaint_task(pipe, prompt, **arguments):
    return pipe.task(pipe.request("outpaint", prompt, **arguments))


def edit_task(pipe, prompt, **arguments):
    return pipe.task(pipe.request("edit", prompt, **arguments))


def requests(pipe, picture):
    """Builders of a mix of tasks: different prompts, step counts, guidance scales and schedules, a negative prompt,
    top-k and temperature, best-of-N, no guidance, and an inpainting edit."""
    return {
        "apple": lambda: generate_task(pipe, ["a red apple", "a dog"], seed=1, num_steps=4),
        "long": lambda: generate_task(pipe, "blue sky", seed=7, num_steps=7, guidance_scale=2.0,
                                            guidance_schedule="linear"),
        "negative": lambda: generate_task(pipe, "a house", seed=2, num_images=2, negative_prompt="blurry",
                                                temperature=0.8, top_k=6),
        "unguided": lambda: generate_task(pipe, "a car", seed=4, guidance_scale=1.0, num_steps=3),
        "best": lambda: generate_task(pipe, "a cat", seed=5, num_candidates=3),
        "inpaint": lambda: inpaint_task(pipe, "a green tree", image=picture, mask=hole(), seed=9, num_steps=5),
    }


def run_alone(pipe, build):
    return pipe.engine.run(build())


def test_every_task_gives_its_solo_tokens_in_a_mix_that_changes_every_tick(tiny_pipe, picture):
    builders = requests(tiny_pipe, picture)
    alone = {name: run_alone(tiny_pipe, build) for name, build in builders.items()}
    engine = Engine()
    handles = {name: engine.submit(builders[name]()) for name in ("apple", "long", "negative", "unguided", "best")}
    cancelled = engine.submit(generate_task(tiny_pipe, "a sunny sky", seed=11, num_steps=6))
    for _ in range(3):
        engine.tick()
    handles["inpaint"] = engine.submit(builders["inpaint"]())  # arrives at tick 3
    engine.tick()
    cancelled.cancel()
    while not all(h.done() for h in handles.values()):
        assert engine.tick()
    assert not engine.tick()  # idle: nothing left in flight
    assert engine.stats.rows_per_forward > 4  # the jobs really did share forwards
    for name, handle in handles.items():
        out = handle.result()
        assert torch.equal(out.tokens, alone[name].tokens), name
        assert out.seeds == alone[name].seeds and out.scores == alone[name].scores
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, alone[name].images)), name
    with pytest.raises(Cancelled):
        cancelled.result()


def test_the_cascade_and_outpainting_windows_join_the_mix_exactly(tiny_cascade, tiny_pipe, picture):
    wide = outpaint_task(tiny_cascade, "a sunny sky", image=picture.resize((32, 32)), pad=(0, 0, 32, 0), seed=3)
    cascade = generate_task(tiny_cascade, ["a dog", "a cat"], seed=6)
    edit = edit_task(tiny_cascade, "a golden apple", image=picture.resize((32, 32)), strength=0.5, seed=2,
                                   mode="confidence")
    alone = [tiny_cascade.engine.run(t) for t in (
        outpaint_task(tiny_cascade, "a sunny sky", image=picture.resize((32, 32)), pad=(0, 0, 32, 0), seed=3),
        generate_task(tiny_cascade, ["a dog", "a cat"], seed=6),
        edit_task(tiny_cascade, "a golden apple", image=picture.resize((32, 32)), strength=0.5, seed=2,
                                mode="confidence"))]
    engine = Engine()
    handles = [engine.submit(wide), engine.submit(cascade)]
    engine.tick()
    handles.append(engine.submit(edit))
    while not all(h.done() for h in handles):
        engine.tick()
    for handle, solo in zip(handles, alone):
        out = handle.result()
        assert torch.equal(out.tokens, solo.tokens) and torch.equal(out.low_res_tokens, solo.low_res_tokens)


def test_a_cancelled_job_frees_its_rows_at_the_next_tick_and_leaves_the_others_alone(tiny_pipe):
    engine = Engine()
    keep = engine.submit(generate_task(tiny_pipe, "a dog", seed=1, num_steps=6))
    drop = engine.submit(generate_task(tiny_pipe, ["a cat"] * 3, seed=2, num_steps=6))
    engine.tick()
    assert engine.rows_in_flight == 8  # (1 + 3) grids, each guided
    drop.cancel()
    assert not drop.done()  # takes effect at the tick boundary
    engine.tick()
    assert engine.rows_in_flight == 2 and drop.done() and engine.stats.last_rows == 2
    while not keep.done():
        engine.tick()
    assert torch.equal(keep.result().tokens, tiny_pipe("a dog", seed=1, num_steps=6).tokens)
    with pytest.raises(Cancelled):
        drop.result()
    assert engine.stats.tasks_cancelled == 1 and engine.stats.tasks_finished == 1


def test_a_task_cancelled_before_it_starts_never_runs(tiny_pipe):
    engine = Engine()
    handle = engine.submit(generate_task(tiny_pipe, "a dog", seed=1))
    handle.cancel()
    assert not engine.tick() and handle.done()
    with pytest.raises(Cancelled):
        handle.result()


def test_step_events_report_progress_and_previews(tiny_pipe):
    events = []
    previews = []

    def listen(event):
        events.append(event)
        if isinstance(event, Step):
            previews.append(event.preview().clone())

    out = tiny_pipe.engine.run(generate_task(tiny_pipe, "a red apple", seed=4, num_steps=4), on_event=listen)
    assert isinstance(events[0], Queued) and isinstance(events[-1], Finished) and events[-1].result is out
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.index for s in steps] == [1, 2, 3, 4] and all(s.num_steps == 4 and s.grid == (4, 4) for s in steps)
    masked = [s.masked for s in steps]
    assert masked[-1] == 0 and all(a > b for a, b in zip(masked, masked[1:]))
    mask_id = tiny_pipe.transformer.config.mask_token_id
    assert all(int(p.max()) < mask_id for p in previews)  # a full guess at every step
    assert torch.equal(previews[-1], out.tokens.view(1, 16))
    assert tiny_pipe.decode_preview(previews[0], (4, 4), 0)[0].size == (16, 16)


def test_max_rows_queues_jobs_until_rows_free_up(tiny_pipe):
    engine = Engine(max_rows=4)
    first = engine.submit(generate_task(tiny_pipe, ["a dog", "a cat"], seed=1, num_steps=3))
    positions = []
    second = engine.submit(generate_task(tiny_pipe, "a car", seed=2, num_steps=3),
                           on_event=lambda e: positions.append(e.position) if isinstance(e, Queued) else None)
    engine.tick()
    assert engine.rows_in_flight == 4 and engine.queued == 1 and positions[-1] == 0
    while not first.done():
        engine.tick()
    while not second.done():
        engine.tick()
    assert torch.equal(second.result().tokens, tiny_pipe("a car", seed=2, num_steps=3).tokens)


def test_a_full_queue_refuses_new_tasks(tiny_pipe):
    engine = Engine(max_queued=1)
    engine.submit(generate_task(tiny_pipe, "a dog", seed=1))
    with pytest.raises(EngineFull, match="queue is full"):
        engine.submit(generate_task(tiny_pipe, "a cat", seed=1))
    # Started tasks whose jobs wait for rows count as waiting too.
    engine = Engine(max_rows=2, max_queued=1)
    running = engine.submit(generate_task(tiny_pipe, "a dog", seed=1, num_steps=8))
    engine.tick()
    waiting = engine.submit(generate_task(tiny_pipe, "a cat", seed=2, num_steps=8))
    engine.tick()  # started, but its job waits for the first one's rows
    assert engine.rows_in_flight == 2 and engine.queued == 1
    with pytest.raises(EngineFull, match="1 tasks waiting, max_queued=1"):
        engine.submit(generate_task(tiny_pipe, "a car", seed=3))
    while not (running.done() and waiting.done()):
        engine.tick()


def test_a_task_error_fails_that_task_only(tiny_pipe):
    def broken():
        raise RuntimeError("boom")
        yield  # a generator

    engine = Engine()
    bad = engine.submit(Task(broken()))
    good = engine.submit(generate_task(tiny_pipe, "a dog", seed=1, num_steps=2))
    while not good.done():
        engine.tick()
    with pytest.raises(RuntimeError, match="boom"):
        bad.result()
    assert good.result().tokens.shape == (1, 4, 4)


def test_non_finite_logits_fail_only_the_job_that_produced_them(tiny_pipe):
    model = tiny_pipe.transformer

    class Poisoned(torch.nn.Module):
        config = model.config

        def forward(self, tokens, context, positions, grid):
            return torch.full((tokens.shape[0], positions.shape[1], model.config.codebook_size), float("nan"))

    def job(predictor):
        text = tiny_pipe.text_encoder(["a dog"])
        context = model.text_context(text.states, text.mask)
        return Job(predictor, torch.full((1, 16), model.config.mask_token_id), (4, 4), context,
                   SamplingOptions(guidance_scale=1.0), torch.tensor([1]))

    def one(predictor):
        out = yield job(predictor)
        return out.tokens

    engine = Engine()
    bad, good = engine.submit(Task(one(Poisoned()))), engine.submit(Task(one(model)))
    while not (bad.done() and good.done()):
        engine.tick()
    with pytest.raises(ValueError, match="NaN or infinite"):
        bad.result()
    assert int(good.result().max()) < model.config.mask_token_id


def test_a_background_thread_serves_many_callers(tiny_pipe):
    engine = Engine()
    engine.start()
    try:
        results = {}

        def call(i):
            results[i] = engine.run(generate_task(tiny_pipe, f"a dog {i}", seed=i, num_steps=3))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.stop()
    for i in range(4):
        assert torch.equal(results[i].tokens, tiny_pipe(f"a dog {i}", seed=i, num_steps=3).tokens)


def test_drive_serves_other_threads_on_the_calling_one_until_stopped(tiny_pipe):
    """`muse serve`'s arrangement: the thread that loaded the model drives the ticks, others submit."""
    engine = Engine()
    driver, results = [], {}

    def client():
        task = generate_task(tiny_pipe, "a dog", seed=1, num_steps=3)
        while not engine.driven:  # as a server's clients do: a run() before drive() would tick on this thread
            time.sleep(0.001)
        results["out"] = engine.run(task)
        engine.start()  # a thread drives already: nothing to start
        engine.stop()   # ends drive() after its tick

    def record_ticks():
        driver.append(threading.current_thread())
        return original()

    original, engine.tick = engine.tick, record_ticks
    thread = threading.Thread(target=client)
    thread.start()
    engine.drive()
    thread.join(timeout=60)
    assert torch.equal(results["out"].tokens, tiny_pipe("a dog", seed=1, num_steps=3).tokens)
    assert set(driver) == {threading.main_thread()}
    engine.drive(until=lambda: True)  # ends at once; the engine can be driven again after a stop

    # Callers of run() that came first tick on their own threads until drive() takes over: one tick at a time.
    outputs = {}

    def caller(i):
        outputs[i] = engine.run(generate_task(tiny_pipe, f"a cat {i}", seed=i, num_steps=4))

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for t in callers:
        t.start()
    engine.drive(until=lambda: not any(t.is_alive() for t in callers))
    for i in range(3):
        assert torch.equal(outputs[i].tokens, tiny_pipe(f"a cat {i}", seed=i, num_steps=4).tokens)
    with pytest.raises(RuntimeError, match="driven by another thread"):
        engine.start()
        try:
            engine.drive()
        finally:
            engine.stop()


def test_all_masked_rows_with_the_same_prompt_share_their_first_step(tiny_pipe):
    engine = Engine()
    shared = engine.run(generate_task(tiny_pipe, ["a dog", "a dog", "a cat", "a dog"], seed=0, num_steps=3))
    # 8 rows at each of 3 steps (4 grids under both branches); at the first, dog, cat and the empty prompt once each.
    assert engine.stats.rows_shared == 8 - 3 and engine.stats.rows_forwarded == 3 * 8 - engine.stats.rows_shared
    for row, prompt in enumerate(["a dog", "a dog", "a cat", "a dog"]):  # exactly what each computes alone
        assert torch.equal(shared.tokens[row], tiny_pipe(prompt, seed=row, num_steps=3).tokens[0])
    engine = Engine()  # across tasks too: two requests for the same prompt
    a, b = engine.submit(generate_task(tiny_pipe, "a dog", seed=0, num_steps=2)), \
        engine.submit(generate_task(tiny_pipe, "a dog", seed=1, num_steps=2))
    while not (a.done() and b.done()):
        engine.tick()
    assert engine.stats.rows_shared == 4 - 2
    assert torch.equal(b.result().tokens, tiny_pipe("a dog", seed=1, num_steps=2).tokens)


def test_rows_with_nothing_left_to_commit_leave_the_forward(tiny_pipe, picture):
    small, large = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    small[:4, :4] = True  # one token (no dilation below): done after its first step
    large[:, :12] = True
    pipe = MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer,
                        config=dataclasses.replace(tiny_pipe.config, mask_dilation=0))
    alone = [pipe.inpaint("a cat", image=picture, mask=m, seed=s) for m, s in ((small, 1), (large, 2))]
    engine = pipe.engine = Engine()
    both = pipe.inpaint("a cat", image=[picture, picture], mask=np.stack([small, large]), seed=[1, 2])
    steps = engine.stats.ticks
    assert steps > 1 and engine.stats.rows_idle == 2 * (steps - 1)  # the finished row's two branches, every later step
    assert engine.stats.rows_forwarded == 4 + 2 * (steps - 1)
    for i in range(2):
        assert torch.equal(both.tokens[i], alone[i].tokens[0])


def test_cpu_forwards_run_in_chunks_of_rows_with_the_same_result(tiny_pipe):
    prompts, seeds = ["a dog", "a cat", "a red apple"], [1, 2, 3]
    whole, chunked = Engine(), Engine(chunk_tokens=32)  # 2 rows of 16 tokens per model call
    a = whole.run(generate_task(tiny_pipe, prompts, seed=seeds, num_steps=3))
    b = chunked.run(generate_task(tiny_pipe, prompts, seed=seeds, num_steps=3))
    assert torch.equal(a.tokens, b.tokens)
    assert whole.stats.model_calls == whole.stats.ticks == 3
    assert chunked.stats.ticks == 3 and chunked.stats.model_calls == 2 + 3 + 3  # 4 distinct rows first, then 6
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        Engine(chunk_tokens=0)


class Recording(torch.nn.Module):
    """A token predictor (the engine's public protocol) that records how wide each call's positions are."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.widths = model, model.config, []

    def forward(self, tokens, context, positions, grid):
        self.widths.append(positions.shape[1])
        return self.model(tokens, context, positions, grid)


def job(pipe, model, prompts, options, seed=0):
    text = pipe.text_encoder(prompts + ([""] * len(prompts) if options.guided else []))
    context = pipe.transformer.text_context(text.states, text.mask)
    tokens = torch.full((len(prompts), 16), pipe.transformer.config.mask_token_id)
    return Job(model, tokens, (4, 4), context, options, torch.arange(len(prompts)) + seed)


def test_the_model_is_asked_only_for_still_masked_positions(tiny_pipe):
    model = Recording(tiny_pipe.transformer)
    out = run_job(job(tiny_pipe, model, ["a dog", "a cat"], SamplingOptions(num_steps=4, guidance_scale=3.0)))
    assert model.widths[0] == 16 and all(a > b for a, b in zip(model.widths, model.widths[1:]))
    assert len(model.widths) == out.num_steps_run == 4
    assert int(out.tokens.max()) < tiny_pipe.transformer.config.mask_token_id


def test_a_score_job_returns_guided_log_probabilities_batched_with_decodes(tiny_pipe):
    model = tiny_pipe.transformer
    options = SamplingOptions(num_steps=4, guidance_scale=3.0, guidance_schedule="linear")
    tokens = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0))
    text = tiny_pipe.text_encoder(["a dog", "a cat", "", ""])
    context = model.text_context(text.states, text.mask)

    def score(rows):
        return (yield ScoreJob(model, tokens[rows], (4, 4), context.select(torch.tensor(rows + [r + 2 for r in rows])),
                               options))

    engine, steps = Engine(), []
    decoding = engine.submit(single_job(job(tiny_pipe, model, ["a car"], options)), on_event=steps.append)
    first, second = engine.submit(Task(score([0]))), engine.submit(Task(score([1])))
    engine.tick()
    engine.tick()  # the groups take turns: the decode's rows, then both scores' rows in one forward
    assert first.done() and second.done() and engine.stats.ticks == 2
    assert len([e for e in steps if isinstance(e, Step)]) == 1
    with torch.inference_mode():
        logits = guided_logits(model, tokens, torch.arange(16).expand(2, 16), context, (4, 4), 3.0)  # the last step's
    expected = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.equal(torch.cat([first.result(), second.result()]), expected)
    while not decoding.done():
        engine.tick()
    assert torch.equal(decoding.result().tokens, run_job(job(tiny_pipe, model, ["a car"], options)).tokens)
    with pytest.raises(ValueError, match="grids must be complete"):
        engine.run(Task(iter([ScoreJob(model, torch.full((2, 16), model.config.mask_token_id), (4, 4), context,
                                       options)])))


def test_edit_confidence_scores_its_tokens_through_the_engine(tiny_pipe, picture, monkeypatch):
    ticks = {}
    for mode in ("random", "confidence"):
        engine = Engine()
        monkeypatch.setattr(tiny_pipe, "engine", engine)
        tiny_pipe.edit("a green apple", image=picture, strength=0.5, iterations=2, mode=mode, seed=2, num_images=2)
        ticks[mode] = engine.stats.ticks
    assert ticks["confidence"] == ticks["random"] + 2  # one scoring forward per round, both images in it


def test_guided_logits_mix_the_branches_on_the_logits(tiny_pipe):
    model = tiny_pipe.transformer
    text = tiny_pipe.text_encoder(["a dog", ""])
    context = model.text_context(text.states, text.mask)
    tokens = torch.randint(0, 16, (1, 16))
    positions = torch.arange(16)[None]
    with torch.inference_mode():
        cond = model(tokens, context.select(slice(0, 1)), positions, (4, 4))
        uncond = model(tokens, context.select(slice(1, 2)), positions, (4, 4))
        mixed = guided_logits(model, tokens, positions, context, (4, 4), 3.0)
    assert torch.allclose(mixed, uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_guidance_is_on_above_one_and_linear_guidance_ramps_from_one_to_the_scale():
    assert [Guidance(s).on for s in (0.0, 1.0, 1.5)] == [False, False, True]
    assert [Guidance(3.0, "linear").scale_at(i, 4) for i in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert SamplingOptions(guidance_scale=3.0, guidance_schedule="linear").guidance == Guidance(3.0, "linear")
    assert not SamplingOptions(guidance_scale=1.0).guided


def test_a_job_checks_its_rows():
    options = SamplingOptions(guidance_scale=2.0)
    context = type("C", (), {"batch_size": 1})()
    with pytest.raises(ValueError, match="context has 1 rows; 1 grids need 2"):
        Job(None, torch.zeros(1, 4, dtype=torch.long), (2, 2), context, options, torch.zeros(1))
    with pytest.raises(ValueError, match=r"\(B, h \* w\)"):
        Job(None, torch.zeros(1, 5, dtype=torch.long), (2, 2), context, options, torch.zeros(1))
    with pytest.raises(TypeError, match="options must be SamplingOptions"):
        Job(None, torch.zeros(1, 4, dtype=torch.long), (2, 2), context, DecodeSettings(), torch.zeros(1))


def test_an_image_result_is_the_same_through_the_sync_api(tiny_pipe, picture):
    handle = tiny_pipe.submit(tiny_pipe.request("inpaint", "a cat", image=picture, mask=hole(), seed=3))
    while not handle.done():
        tiny_pipe.engine.tick()
    direct = tiny_pipe.inpaint("a cat", image=picture, mask=hole(), seed=3)
    assert isinstance(handle.result().images[0], Image.Image)
    assert torch.equal(handle.result().tokens, direct.tokens)
