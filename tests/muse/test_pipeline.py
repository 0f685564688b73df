"""MusePipeline generation: seeds, batch independence, parity of the cached/guided logits with a naive computation,
forwards per step (as `engine.stats` counts them), negative prompts, the super-res cascade, and save -> load."""

import numpy as np
import pytest
import torch

from muse.engine import Engine
from muse.pipeline import MusePipeline, PipelineOutput
from sampling import decode

PROMPTS = ["a red apple", "a dog with a face", "blue sky", "a green tree", "a house", "a car", "the cat", "a sunny sky"]


def pixels(out: PipelineOutput) -> list[np.ndarray]:
    return [np.asarray(im) for im in out.images]


def test_same_seed_same_images_other_seed_other_tokens(tiny_pipe):
    a = tiny_pipe("a red apple", num_images=2, seed=7)
    b = tiny_pipe("a red apple", num_images=2, seed=7)
    c = tiny_pipe("a red apple", num_images=2, seed=8)
    assert isinstance(a, PipelineOutput) and a.seeds == [7, 8] and c.seeds == [8, 9]
    assert a.tokens.shape == (2, 4, 4) and a.tokens.dtype == torch.long
    assert torch.equal(a.tokens, b.tokens)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert a.images[0].size == (16, 16) and a.images[0].mode == "RGB"
    # seed 8 is image 1 of a and image 0 of c
    assert torch.equal(a.tokens[1], c.tokens[0]) and not torch.equal(a.tokens[0], c.tokens[0])
    assert int(a.tokens.max()) < 16  # no mask token survives


def test_an_image_does_not_depend_on_its_batch(tiny_pipe):
    """Image i (prompt, seed) at batch 1 equals the same image among 7 other prompts and seeds at batch 8."""
    seeds = [101, 5, 77, 3, 900, 42, 11, 64]
    batch = tiny_pipe(PROMPTS, seed=seeds)
    assert batch.seeds == seeds and batch.prompts == PROMPTS
    for i in (0, 3, 7):
        alone = tiny_pipe(PROMPTS[i], seed=seeds[i])
        assert torch.equal(alone.tokens[0], batch.tokens[i])
        assert np.array_equal(pixels(alone)[0], pixels(batch)[i])


def test_random_seeds_are_recorded_and_reproduce(tiny_pipe):
    out = tiny_pipe(["a dog", "a cat"], num_images=2)
    assert len(out.seeds) == 4 and out.seeds == list(range(out.seeds[0], out.seeds[0] + 4))
    again = tiny_pipe(["a dog", "a cat"], num_images=2, seed=out.seeds)
    assert torch.equal(out.tokens, again.tokens)
    assert out.prompts == ["a dog", "a dog", "a cat", "a cat"]


def naive_logits_fn(pipe, prompts, negatives, scale, schedule="constant"):
    """Reference: encode the text, build the cross-attention context and run full-grid forwards (one per branch)
    at every step, then pick the asked positions."""
    model = pipe.transformer

    def logits_fn(tokens, positions, step):
        cond_text = pipe.text_encoder(prompts)
        cond = model(tokens, model.text_context(cond_text.states, cond_text.mask))  # (B, L, K)
        uncond_text = pipe.text_encoder(negatives)
        uncond = model(tokens, model.text_context(uncond_text.states, uncond_text.mask))
        s = scale if schedule == "constant" else 1 + (scale - 1) * (step.index + 1) / step.num_steps
        full = uncond + s * (cond - uncond)
        return full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))

    return logits_fn


@pytest.mark.parametrize("schedule, negative", [("constant", None), ("linear", "blurry ugly")])
def test_cached_context_and_restricted_logits_match_a_naive_computation(tiny_pipe, schedule, negative):
    prompts, seeds, scale = ["a red apple", "a dog", "blue sky"], [3, 4, 5], 2.5
    out = tiny_pipe(prompts, seed=seeds, guidance_scale=scale, guidance_schedule=schedule, negative_prompt=negative,
                    num_steps=5)
    mask_id = tiny_pipe.transformer.config.mask_token_id
    start = torch.full((3, 16), mask_id, dtype=torch.long)
    with torch.inference_mode():
        reference = decode(
            start, naive_logits_fn(tiny_pipe, prompts, [negative or ""] * 3, scale, schedule),
            mask_token_id=mask_id, seeds=torch.tensor(seeds), num_steps=5,
            schedule=tiny_pipe.config.sampling.mask_schedule, choice_temperature=tiny_pipe.config.sampling.choice_temperature,
        )
    assert torch.equal(out.tokens.view(3, 16), reference.tokens)


def engine_work(pipe, call):
    """(ticks, rows) the pipeline's engine spent on `call()`: one tick is one batched forward (`engine.stats`)."""
    stats = pipe.engine.stats
    ticks, rows = stats.ticks, stats.rows_forwarded
    call()
    return stats.ticks - ticks, stats.rows_forwarded - rows


def test_guidance_runs_both_branches_in_one_forward_per_step(tiny_pipe):
    ticks, rows = engine_work(tiny_pipe, lambda: tiny_pipe(["a dog", "a cat"], seed=0, num_steps=4, guidance_scale=3.0))
    assert ticks == 4  # one forward per step, the unconditional rows in it
    # More than B rows per step (the unconditional branch is computed), never more than 2B.
    assert 2 * 4 < rows <= 2 * 2 * 4


@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_guidance_at_most_one_runs_no_unconditional_branch(tiny_pipe, scale):
    ticks, rows = engine_work(tiny_pipe, lambda: tiny_pipe(["a dog", "a cat"], seed=0, num_steps=4,
                                                           guidance_scale=scale))
    assert ticks == 4 and rows == 2 * 4  # B rows per step
    # scale 0 and 1 both mean "conditional logits only"
    assert torch.equal(tiny_pipe(["a dog", "a cat"], seed=0, num_steps=4, guidance_scale=scale).tokens,
                       tiny_pipe(["a dog", "a cat"], seed=0, num_steps=4, guidance_scale=1.0).tokens)


def test_text_is_encoded_once_per_call_and_cached_across_calls(tiny_pipe):
    tiny_pipe.text_encoder.clear_cache()
    batches = []  # rows of each forward of the text encoder's network (torch's forward hook: nothing replaced)
    hook = tiny_pipe.text_encoder.model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        len(kwargs["input_ids"] if "input_ids" in kwargs else args[0])), with_kwargs=True)
    try:
        tiny_pipe(["a house", "a house", "a car"], seed=0, num_steps=3)
        assert batches == [3]  # "a house", "a car" and the empty prompt of guidance, once each, in one batch
        tiny_pipe(["a house"], seed=1, num_steps=3)
        assert batches == [3]  # all cached
    finally:
        hook.remove()


def test_negative_prompt_replaces_the_unconditional_branch(tiny_pipe):
    with_negative = tiny_pipe(["a dog", "a cat"], seed=[0, 1], negative_prompt="blurry")
    without = tiny_pipe(["a dog", "a cat"], seed=[0, 1])
    assert not torch.equal(with_negative.tokens, without.tokens)
    # the empty negative prompt is what guidance uses anyway
    assert torch.equal(tiny_pipe(["a dog", "a cat"], seed=[0, 1], negative_prompt="").tokens, without.tokens)
    # one negative per prompt is paired with its prompt
    per_prompt = tiny_pipe(["a dog", "a cat"], seed=[0, 1], negative_prompt=["blurry", ""])
    assert torch.equal(per_prompt.tokens[0], with_negative.tokens[0])
    assert torch.equal(per_prompt.tokens[1], without.tokens[1])


def test_save_then_load_gives_identical_images(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")
    loaded = MusePipeline.from_pretrained(tmp_path / "copy")
    assert loaded.config == tiny_pipe.config
    a, b = tiny_pipe(PROMPTS[:3], seed=9), loaded(PROMPTS[:3], seed=9)
    assert torch.equal(a.tokens, b.tokens) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    # the copied text encoder is found relative to the pipeline directory, wherever that is moved
    (tmp_path / "copy").rename(tmp_path / "moved")
    moved = MusePipeline.from_pretrained(tmp_path / "moved")
    assert torch.equal(moved(PROMPTS[:3], seed=9).tokens, a.tokens)


def test_cascade_generates_high_res_and_stops_after_base_on_request(tiny_cascade, tmp_path):
    full = tiny_cascade(["a dog", "a cat"], seed=4)
    assert full.images[0].size == (32, 32) and full.tokens.shape == (2, 8, 8)
    assert full.low_res_tokens.shape == (2, 4, 4)
    alone = tiny_cascade("a cat", seed=5)  # the second image of the batch, on its own
    assert torch.equal(alone.tokens[0], full.tokens[1]) and np.array_equal(pixels(alone)[0], pixels(full)[1])
    base = tiny_cascade(["a dog", "a cat"], seed=4, stages=1)
    assert base.images[0].size == (16, 16) and base.low_res_tokens is None
    assert torch.equal(base.tokens, full.low_res_tokens)
    assert tiny_cascade.stride() == 8 and tiny_cascade.stride(stages=1) == 4 and tiny_cascade.resolution() == 32

    tiny_cascade.save_pretrained(tmp_path / "cascade")
    loaded = MusePipeline.from_pretrained(tmp_path / "cascade")
    assert loaded.superres is not None and loaded.superres_vqgan is None
    again = loaded(["a dog", "a cat"], seed=4)
    assert torch.equal(again.tokens, full.tokens)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(again), pixels(full)))


def test_a_pipeline_can_default_to_its_base_stage(tiny_cascade, tiny_pipe, tmp_path):

    base_first = MusePipeline(tiny_cascade.vqgan, tiny_cascade.text_encoder, tiny_cascade.transformer,
                              tiny_cascade.superres, config=tiny_cascade.config.with_sampling(stages=1))
    assert base_first.resolution() == 16 and base_first.resolution(stages=2) == 32
    assert base_first("a dog", seed=1).images[0].size == (16, 16)
    assert base_first("a dog", seed=1, stages=2).images[0].size == (32, 32)
    base_first.save_pretrained(tmp_path / "p")
    assert MusePipeline.from_pretrained(tmp_path / "p").config.sampling.stages == 1
    with pytest.raises(ValueError, match="config.sampling.stages=2 needs a super-resolution stage"):
        MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer,
                     config=tiny_pipe.config.with_sampling(stages=2))
    with pytest.raises(ValueError, match="stages must be one of 1, 2"):
        tiny_pipe.config.with_sampling(stages=3)


def test_upscale_is_the_cascades_second_stage_on_any_base_size_image(tiny_cascade, tiny_pipe, monkeypatch):
    full = tiny_cascade(["a dog", "a cat"], seed=4)
    small = pixels(tiny_cascade(["a dog", "a cat"], seed=4, stages=1))  # the base stage's own 16 px images
    small = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, 16, 16) in [-1, 1]
    up = tiny_cascade.upscale(["a dog", "a cat"], image=small, seed=4)
    assert up.images[0].size == (32, 32) and up.tokens.shape == (2, 8, 8) and up.low_res_tokens.shape == (2, 4, 4)

    # Given exactly the base stage's tokens, upscaling is the cascade's super-res stage, seed for seed.
    monkeypatch.setattr(tiny_cascade, "_encode", lambda vqgan, images: full.low_res_tokens.clone())
    same = tiny_cascade.upscale(["a dog", "a cat"], image=small, seed=4)
    assert torch.equal(same.tokens, full.tokens)
    monkeypatch.undo()

    wide = tiny_cascade.upscale("a dog", image=np.zeros((16, 40, 3), np.uint8), seed=0)  # wider than the grid
    assert wide.images[0].size == (80, 32)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_cascade.upscale("a dog", image=np.zeros((16, 18, 3), np.uint8))
    with pytest.raises(ValueError, match="no super-resolution stage"):
        tiny_pipe.upscale("a dog", image=small[0])
    with pytest.raises(ValueError, match="num_steps does not apply"):
        tiny_cascade.upscale("a dog", image=small[0], num_steps=3)
    # A pipeline whose calls stop after the base stage by default still upscales.
    base_first = MusePipeline(tiny_cascade.vqgan, tiny_cascade.text_encoder, tiny_cascade.transformer,
                              tiny_cascade.superres, config=tiny_cascade.config.with_sampling(stages=1))
    assert torch.equal(base_first.upscale(["a dog", "a cat"], image=small, seed=4).tokens, up.tokens)


def test_superres_steps_are_counted_separately(tiny_cascade):
    ticks, _ = engine_work(tiny_cascade, lambda: tiny_cascade("a dog", seed=0, num_steps=3, superres_steps=2))
    assert ticks == 3 + 2


def test_to_returns_the_pipeline_on_the_device(tiny_pipe):
    assert tiny_pipe.to("cpu", torch.float32) is tiny_pipe
    assert tiny_pipe.device == torch.device("cpu") and tiny_pipe.text_encoder.dtype == torch.float32
