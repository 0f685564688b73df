"""Best-of-N in `MusePipeline.__call__`: the kept image is the candidate with the highest score under a custom scorer
or, by default, under the model's own mean token log-probability; candidates' seeds are reproducible; bad counts and
bad scorers raise; a pipeline directory's `scorer/` is the lazily loaded default and is saved with the pipeline."""

import numpy as np
import pytest
import torch

from muse.guidance import guided_logits
from muse.pipeline import SCORER_DIR, MusePipeline
from muse.scorer import PromptScorer, ScorerConfig, ScorerHeads
from sampling import decode
from persist.weights import save_component


def brightness(images, prompts):
    return torch.tensor([float(np.asarray(im, dtype=np.float64).mean()) for im in images])


def test_keeps_the_candidate_with_the_highest_custom_score(tiny_pipe):
    out = tiny_pipe(["a red apple", "a dog"], num_images=2, seed=10, num_candidates=3, scorer=brightness)
    assert len(out.images) == 4 and out.tokens.shape == (4, 4, 4) and out.prompts == ["a red apple"] * 2 + ["a dog"] * 2
    for b, image_seed in enumerate(range(10, 14)):
        seeds = [image_seed * 3 + j for j in range(3)]  # the documented candidate seeds
        prompt = out.prompts[b]
        candidates = tiny_pipe([prompt] * 3, seed=seeds)
        scores = brightness(candidates.images, None)
        best = int(scores.argmax())
        assert out.seeds[b] == image_seed and out.candidate_seeds[b] == seeds[best]
        assert out.scores[b] == pytest.approx(float(scores[best]))
        assert torch.equal(out.tokens[b], candidates.tokens[best])
        assert np.array_equal(np.asarray(out.images[b]), np.asarray(candidates.images[best]))
    # the chosen candidate's seed reproduces the kept image with a plain call
    again = tiny_pipe(out.prompts[0], seed=out.candidate_seeds[0])
    assert torch.equal(again.tokens[0], out.tokens[0])


def test_default_scorer_is_the_models_mean_log_probability(tiny_pipe):
    assert tiny_pipe.scorer is None  # the tiny pipeline directory has no scorer/
    out = tiny_pipe("a green tree", seed=4, num_candidates=4)
    seeds = [4 * 4 + j for j in range(4)]
    pipe, scale = tiny_pipe, tiny_pipe.config.sampling.guidance_scale
    text = pipe.text_encoder(["a green tree"] * 4 + [""] * 4)
    context = pipe.transformer.text_context(text.states, text.mask)
    mask_id = pipe.transformer.config.mask_token_id
    with torch.inference_mode():
        reference = decode(
            torch.full((4, 16), mask_id, dtype=torch.long),
            lambda tokens, positions, step: guided_logits(pipe.transformer, tokens, positions, context, (4, 4), scale),
            mask_token_id=mask_id, seeds=torch.tensor(seeds), num_steps=pipe.config.sampling.num_steps,
            schedule=pipe.config.sampling.mask_schedule, choice_temperature=pipe.config.sampling.choice_temperature,
        )
    best = int(reference.mean_log_prob.argmax())
    assert out.seeds == [4] and out.candidate_seeds == [seeds[best]]
    assert out.scores[0] == pytest.approx(float(reference.mean_log_prob[best]), abs=1e-5)
    assert torch.equal(out.tokens[0].flatten(), reference.tokens[best])


def test_one_candidate_is_plain_generation(tiny_pipe):
    plain = tiny_pipe(["a cat", "a car"], seed=3)
    one = tiny_pipe(["a cat", "a car"], seed=3, num_candidates=1, scorer=brightness)
    assert torch.equal(plain.tokens, one.tokens) and one.seeds == plain.seeds == [3, 4]
    assert one.scores is None and plain.scores is None and one.candidate_seeds is None


def test_a_pipeline_can_pick_the_best_of_n_by_default(tiny_pipe, tmp_path):

    picky = MusePipeline(tiny_pipe.vqgan, tiny_pipe.text_encoder, tiny_pipe.transformer,
                         config=tiny_pipe.config.with_sampling(num_candidates=3))
    explicit = tiny_pipe("a cat", seed=2, num_candidates=3)
    default = picky("a cat", seed=2)
    assert torch.equal(default.tokens, explicit.tokens) and default.scores == explicit.scores
    assert picky("a cat", seed=2, num_candidates=1).scores is None  # a call can still turn it off
    picky.save_pretrained(tmp_path / "p")
    assert MusePipeline.from_pretrained(tmp_path / "p").config.sampling.num_candidates == 3
    with pytest.raises(ValueError, match="num_candidates must be >= 1"):
        tiny_pipe.config.with_sampling(num_candidates=0)


def test_super_res_cascade_keeps_matching_low_res_tokens(tiny_cascade):
    out = tiny_cascade("a sunny sky", seed=1, num_candidates=2, scorer=brightness)
    plain = tiny_cascade("a sunny sky", seed=out.candidate_seeds[0])
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.low_res_tokens, plain.low_res_tokens)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_num_candidates_must_be_a_positive_integer(tiny_pipe, bad, error):
    with pytest.raises(error, match="num_candidates"):
        tiny_pipe("a dog", num_candidates=bad)


def test_a_scorer_must_return_one_finite_score_per_candidate(tiny_pipe):
    with pytest.raises(ValueError, match="one score per image"):
        tiny_pipe("a dog", seed=0, num_candidates=2, scorer=lambda images, prompts: torch.zeros(1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny_pipe("a dog", seed=0, num_candidates=2, scorer=lambda images, prompts: torch.full((2,), float("nan")))


def test_a_saved_scorer_is_the_lazily_loaded_default_and_is_saved_along(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    config = ScorerConfig(image_size=32)
    save_component(tmp_path / "pipe" / SCORER_DIR, config, ScorerHeads(384, 1280, config))  # untrained heads
    pipe = MusePipeline.from_pretrained(tmp_path / "pipe")
    assert pipe._scorer is None  # not loaded until best-of-N needs it
    pipe.save_pretrained(tmp_path / "copy")  # copies the files without loading the towers
    assert pipe._scorer is None
    assert sorted(p.name for p in (tmp_path / "copy" / SCORER_DIR).iterdir()) == ["config.json", "model.safetensors"]

    assert isinstance(pipe.scorer, PromptScorer)
    out = pipe("a red apple", seed=2, num_candidates=2)
    candidates = pipe(["a red apple"] * 2, seed=[4, 5])
    scores = pipe.scorer.score(candidates.images, candidates.prompts)
    assert out.candidate_seeds == [[4, 5][int(scores.argmax())]]
    assert out.scores[0] == pytest.approx(float(scores.max()), abs=1e-5)
