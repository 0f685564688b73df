"""The decoding engine: jobs of many tasks share each tick's forward, and every task's tokens are bit-identical to its
solo run; cancellation frees rows; step events; the first-step sharing and the CPU row chunks of the forward."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import muse.engine as engine_module
from muse.engine import Cancelled, Engine, EngineFull, Finished, Job, Queued, Step, Task
from muse.pipeline import MusePipeline, guided_logits
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
        return Job(predictor, torch.full((1, 16), model.config.mask_token_id), (4, 4), context, DecodeSettings(),
                   torch.tensor([1]))

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
        results["out"] = engine.run(generate_task(tiny_pipe, "a dog", seed=1, num_steps=3))
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


def count_forwards(monkeypatch, model):
    rows = []
    real = model.forward

    def counted(tokens, *args, **kwargs):
        rows.append(tokens.shape[0])
        return real(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return rows


def test_all_masked_rows_with_the_same_prompt_share_their_first_step(tiny_pipe, monkeypatch):
    rows = count_forwards(monkeypatch, tiny_pipe.transformer)
    tiny_pipe(["a dog", "a dog", "a cat", "a dog"], seed=0, num_steps=3)
    assert rows == [3, 8, 8]  # dog, cat and the empty prompt once each; then every row under both branches
    rows.clear()
    engine = Engine()  # across tasks too: two requests for the same prompt
    a, b = engine.submit(generate_task(tiny_pipe, "a dog", seed=0, num_steps=2)), \
        engine.submit(generate_task(tiny_pipe, "a dog", seed=1, num_steps=2))
    while not (a.done() and b.done()):
        engine.tick()
    assert rows == [2, 4]


def test_rows_with_nothing_left_to_commit_leave_the_forward(tiny_pipe, picture, monkeypatch):
    small, large = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    small[:4, :4] = True  # one token (no dilation below): done after its first step
    large[:, :12] = True
    pipe = MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer,
                        config=dataclasses.replace(tiny_pipe.config, mask_dilation=0))
    alone = [pipe.inpaint("a cat", image=picture, mask=m, seed=s) for m, s in ((small, 1), (large, 2))]
    rows = count_forwards(monkeypatch, pipe.transformer)
    both = pipe.inpaint("a cat", image=[picture, picture], mask=np.stack([small, large]), seed=[1, 2])
    assert rows[0] == 4 and rows[1:] == [2] * (len(rows) - 1)  # the finished row's two branches are left out
    for i in range(2):
        assert torch.equal(both.tokens[i], alone[i].tokens[0])


def test_cpu_forwards_run_in_chunks_of_rows_with_the_same_result(tiny_pipe, monkeypatch):
    whole = tiny_pipe(["a dog", "a cat", "a red apple"], seed=[1, 2, 3], num_steps=3)
    monkeypatch.setattr(engine_module, "CPU_TOKENS_PER_FORWARD", 32)  # 2 rows of 16 tokens per forward
    rows = count_forwards(monkeypatch, tiny_pipe.transformer)
    chunked = tiny_pipe(["a dog", "a cat", "a red apple"], seed=[1, 2, 3], num_steps=3)
    assert torch.equal(chunked.tokens, whole.tokens)
    assert rows == [2, 2] + [2, 2, 2] * 2  # 4 distinct rows at the first step, then 6


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


def test_linear_guidance_ramps_from_one_to_the_scale():
    job = Job(model=None, tokens=torch.zeros(1, 4, dtype=torch.long), grid=(2, 2),
              context=type("C", (), {"batch_size": 2})(), settings=DecodeSettings(num_steps=4), seeds=torch.zeros(1),
              guidance_scale=3.0, guidance_schedule="linear")
    assert [job.scale_at(i) for i in range(4)] == [1.5, 2.0, 2.5, 3.0]


def test_a_job_checks_its_rows():
    settings = DecodeSettings()
    context = type("C", (), {"batch_size": 1})()
    with pytest.raises(ValueError, match="context has 1 rows; 1 grids need 2"):
        Job(None, torch.zeros(1, 4, dtype=torch.long), (2, 2), context, settings, torch.zeros(1), guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"\(B, h \* w\)"):
        Job(None, torch.zeros(1, 5, dtype=torch.long), (2, 2), context, settings, torch.zeros(1))


def test_an_image_result_is_the_same_through_the_sync_api(tiny_pipe, picture):
    handle = tiny_pipe.submit(tiny_pipe.request("inpaint", "a cat", image=picture, mask=hole(), seed=3))
    while not handle.done():
        tiny_pipe.engine.tick()
    direct = tiny_pipe.inpaint("a cat", image=picture, mask=hole(), seed=3)
    assert isinstance(handle.result().images[0], Image.Image)
    assert torch.equal(handle.result().tokens, direct.tokens)
