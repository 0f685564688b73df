import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from tests.amused_fixture import tiny_clip_text_encoder, tiny_clip_tokenizer, write_clip
from transformer.config import TextEncoderConfig
from transformer.text import TextEncoder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 encoder and a byte-level tokenizer (needs no vocabulary file), saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_t5(path, **options) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(str(path), kind="t5", max_length=16), **options)


def count_encoder_runs(encoder: TextEncoder) -> list[int]:
    """Batch sizes of every forward pass of the underlying HF model."""
    runs = []
    encoder.model.register_forward_hook(lambda module, args, kwargs, out: runs.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)
    return runs


def test_t5_states_match_the_hf_encoder_and_pad_to_max_length(t5_dir):
    encoder = load_t5(t5_dir)
    assert encoder.dim == 32 and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    text = encoder(["a red apple", "", "x" * 40])
    assert text.states.shape == (3, 16, 32) and text.mask.dtype == torch.bool
    assert text.mask.sum(1).tolist() == [12, 1, 16]  # 11 bytes + </s>; "" is </s> only; truncated to max_length
    assert (text.states[~text.mask] == 0).all()
    batch = encoder.tokenizer(["a red apple"], return_tensors="pt")
    with torch.no_grad():
        reference = encoder.model(**batch).last_hidden_state[0]
    assert torch.allclose(text.states[0, :12], reference, atol=1e-5)
    # a row does not depend on the other prompts of the call, which is what makes caching rows sound
    encoder.clear_cache()
    assert torch.allclose(encoder(["a red apple"]).states[0], text.states[0], atol=1e-5)


def test_cache_serves_repeats_without_running_the_encoder(t5_dir):
    encoder = load_t5(t5_dir, cache_size=2)
    runs = count_encoder_runs(encoder)
    first = encoder(["cat", "dog", "cat"])
    assert runs == [2]  # each distinct prompt encoded once
    again = encoder(["dog", "cat"])
    assert runs == [2]
    assert torch.equal(again.states, first.states[[1, 0]]) and torch.equal(again.mask, first.mask[[1, 0]])
    encoder(["bird"])  # evicts the least recently used: "dog"
    assert runs == [2, 1]
    encoder(["cat"])
    assert runs == [2, 1]
    encoder(["dog"])
    assert runs == [2, 1, 1]


def test_cache_size_zero_always_encodes(t5_dir):
    encoder = load_t5(t5_dir, cache_size=0)
    runs = count_encoder_runs(encoder)
    encoder(["cat"])
    encoder(["cat"])
    assert runs == [1, 1]


def test_unconditional_is_the_empty_prompt_and_is_encoded_once(t5_dir):
    encoder = load_t5(t5_dir)
    runs = count_encoder_runs(encoder)
    null = encoder.unconditional(3)
    assert null.states.shape == (3, 16, 32) and runs == [1]
    assert torch.equal(null.states, encoder([""] * 3).states) and runs == [1]
    assert null.mask.any(1).all()  # the end-of-sequence token is real, so the row is not all padding


def test_embeddings_can_feed_a_trained_module(t5_dir):
    encoder = load_t5(t5_dir)
    with torch.inference_mode():  # e.g. cached by a sampling call
        encoder(["a prompt"])
    text = encoder(["a prompt"])
    projection = torch.nn.Linear(32, 4)
    projection(text.states).sum().backward()  # would fail on inference-mode tensors
    assert projection.weight.grad is not None


def test_dtype_and_to(t5_dir):
    encoder = load_t5(t5_dir, dtype=torch.bfloat16)
    assert encoder(["cat"]).states.dtype == torch.bfloat16
    runs = count_encoder_runs(encoder)
    assert encoder.to(dtype=torch.float32) is encoder
    assert encoder(["cat"]).states.dtype == torch.float32 and runs == [1]  # old-dtype rows are not served


def test_bad_prompts_raise_value_errors(t5_dir):
    encoder = load_t5(t5_dir)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string, got int"):
        encoder(["ok", 3])
    with pytest.raises(ValueError, match="must be a list of strings, got str"):
        encoder("a bare string")
    with pytest.raises(ValueError, match="prompts is empty"):
        encoder([])


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(FileNotFoundError, match="no-such-encoder"):
        TextEncoder(TextEncoderConfig(str(missing), kind="t5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*has no config.json"):
        TextEncoder(TextEncoderConfig(str(tmp_path / "empty"), kind="t5"))


def test_minilm_alias_loads_offline():
    config = TextEncoderConfig("minilm", kind="auto")
    encoder = TextEncoder(config)
    assert encoder.config.name_or_path == "minilm"  # the alias, not the machine-specific path, is what gets saved
    assert encoder.dim == 384
    text = encoder(["a red apple", ""])
    assert text.states.shape == (2, 77, 384)
    assert text.mask[1].sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(text.states).all()


def test_uncached_hub_names_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'nobody/no-such-encoder' is not in the Hugging Face cache"):
        TextEncoder(TextEncoderConfig("nobody/no-such-encoder", kind="t5"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("transformer.text._hub_reachable", lambda: False)
    with pytest.raises(OSError, match="the hub cannot be reached"):
        TextEncoder(TextEncoderConfig("nobody/no-such-encoder", kind="t5"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("tiny-clip"))


def load_clip(path, **options) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(str(path), kind="clip"), **options)


def test_clip_gives_amused_conditioning_penultimate_states_pooled_projection_no_mask(clip_dir):
    encoder = load_clip(clip_dir)
    assert (encoder.dim, encoder.pooled_dim) == (32, 16)
    prompts = ["a red apple", "", "a dog"]
    text = encoder(prompts)
    assert text.states.shape == (3, 77, 32) and text.pooled.shape == (3, 16)
    assert text.mask.all()  # aMUSEd's cross-attention reads all 77 positions: none is reported as padding
    # What AmusedPipeline computes: padded to max_length, no attention mask, hidden_states[-2] and text_embeds.
    batch = encoder.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids = batch.input_ids
    with torch.no_grad():
        reference = encoder.model(ids, return_dict=True, output_hidden_states=True)
    assert torch.equal(text.states, reference.hidden_states[-2])
    assert torch.equal(text.pooled, reference.text_embeds)
    assert not torch.allclose(text.states, reference.last_hidden_state, atol=1e-3)  # not the last layer
    # the causal CLIP makes a row independent of the padding of its batch, so cached rows are the same rows
    encoder.clear_cache()
    alone = encoder(["a dog"])
    assert torch.allclose(alone.states[0], text.states[2], atol=1e-5)
    assert torch.allclose(alone.pooled[0], text.pooled[2], atol=1e-5)


def test_clip_cache_serves_pooled_vectors_too(clip_dir):
    encoder = load_clip(clip_dir)
    runs = count_encoder_runs(encoder)
    first = encoder(["cat", "dog"])
    again = encoder(["dog", "cat", "dog"])
    assert runs == [2]
    assert torch.equal(again.pooled, first.pooled[[1, 0, 1]]) and torch.equal(again.states, first.states[[1, 0, 1]])
    null = encoder.unconditional(2)
    assert null.pooled.shape == (2, 16) and torch.equal(null.pooled[0], null.pooled[1])


def test_encoders_without_a_pooled_vector_return_none(t5_dir):
    encoder = load_t5(t5_dir)
    assert encoder.pooled_dim is None and encoder(["cat"]).pooled is None


def test_clip_loads_from_a_diffusers_pipeline_layout(tmp_path, clip_dir):
    # text_encoder/ and tokenizer/ side by side, as in an aMUSEd download
    tokenizer = tiny_clip_tokenizer()
    tiny_clip_text_encoder(tokenizer).save_pretrained(tmp_path / "pipe" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    text = load_clip(tmp_path / "pipe")(["a red apple"])
    same = load_clip(clip_dir)(["a red apple"])  # the same seed, saved in one directory
    assert torch.equal(text.states, same.states) and torch.equal(text.pooled, same.pooled)
    (tmp_path / "half" / "text_encoder").mkdir(parents=True)
    (tmp_path / "pipe" / "text_encoder" / "config.json").rename(tmp_path / "half" / "text_encoder" / "config.json")
    with pytest.raises(FileNotFoundError, match="has a text_encoder/ folder but no tokenizer/ folder"):
        load_clip(tmp_path / "half")


def test_clip_without_projection_weights_or_too_long_is_refused(tmp_path, clip_dir):
    from transformers import CLIPTextModel

    CLIPTextModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "no-projection")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "no-projection")
    with pytest.raises(ValueError, match="lacks weights of CLIPTextModelWithProjection: .*text_projection"):
        load_clip(tmp_path / "no-projection")
    with pytest.raises(ValueError, match="max_length 78 exceeds the 77 positions"):
        TextEncoder(TextEncoderConfig(str(clip_dir), kind="clip", max_length=78))
