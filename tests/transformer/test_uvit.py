import json

import pytest
import torch
from diffusers import AmusedPipeline, UVit2DModel

from tests.amused_fixture import MASK_TOKEN_ID, TRANSFORMER, randomize_, write_amused_directory
from transformer.config import TextEncoderConfig
from transformer.text import TextEncoder
from persist.weights import load_state_dict_strict as load_strict
from transformer.uvit import UVit2D, UVit2DConfig, UVitContext, micro_conditions

B, S = 3, 7
VARIANTS = {
    "amused-256": {},  # no down/up sampling, no biases
    "amused-512": {"downsample": True, "upsample": True},
    "biases, no norm gains": {"use_bias": True, "ln_elementwise_affine": False},
}


def reference(changes: dict, seed: int = 0) -> UVit2DModel:
    torch.manual_seed(seed)
    return randomize_(UVit2DModel(**{**TRANSFORMER, **changes}), seed).eval()


def ours_from(ref: UVit2DModel) -> UVit2D:
    model = UVit2D(UVit2DConfig.from_diffusers_json(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def conditioning(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, S, TRANSFORMER["encoder_hidden_size"], generator=g)
    pooled = torch.randn(B, TRANSFORMER["cond_embed_dim"], generator=g)
    micro = torch.tensor([[64.0, 48.0, 3.0, 5.0, 6.0], [64.0, 64.0, 0.0, 0.0, 6.0], [32.0, 64.0, 1.0, 0.0, 4.5]])
    return states, pooled, micro


def grid_tokens(seed: int = 2, side: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TRANSFORMER["codebook_size"], (B, side, side), generator=g)
    return tokens.masked_fill(torch.rand(B, side, side, generator=g) < 0.5, MASK_TOKEN_ID)  # (B, h, w)


ALL_REAL = torch.ones(B, S, dtype=torch.bool)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_logits_equal_diffusers(variant):
    ref = reference(VARIANTS[variant])
    model = ours_from(ref)
    # the other direction too: our state dict is exactly diffusers' key set and shapes
    UVit2DModel(**{**TRANSFORMER, **VARIANTS[variant]}).load_state_dict(model.state_dict(), strict=True)
    states, pooled, micro = conditioning()
    tokens = grid_tokens()
    expected = ref(tokens, states, pooled, micro)  # (B, K, h, w)
    expected = expected.flatten(2).transpose(1, 2)  # (B, L, K)
    logits = model(tokens.flatten(1), model.text_context(states, ALL_REAL, pooled, micro))
    assert logits.shape == (B, 16, TRANSFORMER["codebook_size"])  # the codebook only: no mask or unused-id logit
    assert (logits - expected).abs().max() < 1e-5  # measured 0.0 on CPU, float32


@pytest.mark.parametrize("variant", ["amused-256", "amused-512"])
@torch.no_grad()
def test_logits_at_positions_are_the_full_logits_gathered(variant):
    model = ours_from(reference(VARIANTS[variant]))
    states, pooled, micro = conditioning()
    context = model.text_context(states, ALL_REAL, pooled, micro)
    tokens = grid_tokens().flatten(1)
    full = model(tokens, context)
    positions = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:5] for i in range(B)])
    picked = model(tokens, context, positions)
    assert picked.shape == (B, 5, TRANSFORMER["codebook_size"])
    assert torch.allclose(picked, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])), atol=1e-6)


@torch.no_grad()
def test_default_micro_conditions_are_amused_pipelines():
    model = ours_from(reference({}))
    states, pooled, _ = conditioning()
    side = TRANSFORMER["sample_size"] * 16  # AmusedPipeline's default image size: sample_size * the VQ factor 16
    default = model.text_context(states, ALL_REAL, pooled)
    explicit = model.text_context(states, ALL_REAL, pooled, micro_conditions(B, side, side, (0, 0), 6.0))
    tokens = grid_tokens().flatten(1)
    assert torch.equal(model(tokens, default), model(tokens, explicit))
    other = model.text_context(states, ALL_REAL, pooled, micro_conditions(B, side, side, (0, 0), 2.0))
    assert not torch.allclose(model(tokens, other), model(tokens, default), atol=1e-4)


@torch.no_grad()
def test_context_select_and_cat_round_trip():
    model = ours_from(reference({}))
    states, pooled, micro = conditioning()
    context = model.text_context(states, ALL_REAL, pooled, micro)
    assert context.batch_size == B and context.bias is None  # all real: attention runs without a mask
    head = context.select(slice(0, 1))
    assert head.layers[0].cross.keys.data_ptr() == context.layers[0].cross.keys.data_ptr()  # a view
    again = UVitContext.cat([head, context.select(torch.tensor([2, 1]))])
    reordered = context.select(torch.tensor([0, 2, 1]))
    tokens = grid_tokens().flatten(1)
    assert torch.equal(model(tokens, again), model(tokens, reordered))
    assert torch.allclose(model(tokens[[0, 2, 1]], reordered), model(tokens, context)[[0, 2, 1]], atol=1e-6)
    # rows are independent: the context of row 2 alone gives row 2's logits of the batch
    assert torch.allclose(model(tokens[2:], context.select(slice(2, 3))), model(tokens, context)[2:], atol=1e-6)


@torch.no_grad()
def test_padding_mask_hides_the_padded_text_and_cat_mixes_masked_and_unmasked_contexts():
    model = ours_from(reference({}))
    states, pooled, micro = conditioning()
    mask = ALL_REAL.clone()
    mask[:, 4:] = False
    tokens = grid_tokens().flatten(1)
    masked = model.text_context(states, mask, pooled, micro)
    noisy = states.clone()
    noisy[:, 4:] += 10 * torch.randn(B, S - 4, states.shape[-1])
    assert torch.allclose(model(tokens, model.text_context(noisy, mask, pooled, micro)), model(tokens, masked),
                          atol=1e-5)
    plain = model.text_context(states, ALL_REAL, pooled, micro)
    mixed = UVitContext.cat([plain.select(slice(0, 1)), masked.select(slice(1, 3))])
    assert mixed.bias is not None and torch.equal(mixed.bias[0], torch.zeros(1, 1, S))
    logits = model(tokens, mixed)
    assert torch.allclose(logits[:1], model(tokens, plain)[:1], atol=1e-6)
    assert torch.allclose(logits[1:], model(tokens, masked)[1:], atol=1e-6)


def test_config_reads_diffusers_json_and_names_unknown_keys():
    data = {"_class_name": "UVit2DModel", "_diffusers_version": "0.25.0", **TRANSFORMER}
    config = UVit2DConfig.from_diffusers_json(data)
    assert (config.mask_token_id, config.codebook_size, config.grid_size) == (39, 32, 4)
    assert UVit2DConfig.from_diffusers_json({}) == UVit2DConfig()  # missing keys take diffusers' defaults
    assert UVit2DConfig().mask_token_id == 8255
    with pytest.raises(ValueError, match="unknown config key 'hidden_sise'"):
        UVit2DConfig.from_diffusers_json({**data, "hidden_sise": 3})
    with pytest.raises(ValueError, match="_class_name is 'VQModel'"):
        UVit2DConfig.from_diffusers_json({**data, "_class_name": "VQModel"})
    with pytest.raises(ValueError, match=r"vocab_size \(32\) must exceed codebook_size \(32\)"):
        UVit2DConfig.from_diffusers_json({**data, "vocab_size": 32})
    with pytest.raises(ValueError, match="downsample .* and upsample .* must be equal"):
        UVit2DConfig(downsample=True)


@torch.no_grad()
def test_save_pretrained_is_a_diffusers_component_and_round_trips(tmp_path):
    model = ours_from(reference(VARIANTS["amused-512"]))
    model.save_pretrained(tmp_path / "transformer")
    loaded = UVit2D.from_pretrained(tmp_path / "transformer")
    assert loaded.config == model.config and not loaded.training
    states, pooled, micro = conditioning()
    tokens = grid_tokens()
    logits = loaded(tokens.flatten(1), loaded.text_context(states, ALL_REAL, pooled, micro))
    assert torch.equal(logits, model(tokens.flatten(1), model.text_context(states, ALL_REAL, pooled, micro)))
    diffusers_model = UVit2DModel.from_pretrained(tmp_path / "transformer").eval()
    expected = diffusers_model(tokens, states, pooled, micro).flatten(2).transpose(1, 2)
    assert (logits - expected).abs().max() < 1e-5


def test_wrong_weights_raise_errors_naming_the_key(tmp_path):
    model = ours_from(reference({}))
    state = model.state_dict()
    bad = {**state, "mlm_layer.conv2.weight": torch.zeros(31, 16, 1, 1)}
    with pytest.raises(ValueError, match=r"'mlm_layer.conv2.weight' has shape \(31, 16, 1, 1\), the config needs "
                                         r"\(32, 16, 1, 1\)"):
        load_strict(model, bad, "test")
    with pytest.raises(RuntimeError, match="size mismatch for mlm_layer.conv2.weight"):
        model.load_state_dict(bad, strict=True)  # torch's own strict load names it too
    missing = {k: v for k, v in state.items() if k != "embed.conv.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['embed.conv.weight'\]"):
        load_strict(model, missing, "test")
    model.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "codebook_size": 31, "vocab_size": 40}))
    with pytest.raises(ValueError, match="mlm_layer.conv2.weight"):
        UVit2D.from_pretrained(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="saved model directory not found: .*nowhere"):
        UVit2D.from_pretrained(tmp_path / "nowhere")


@torch.no_grad()
def test_bad_inputs_raise_value_errors():
    model = ours_from(reference(VARIANTS["amused-512"]))
    states, pooled, micro = conditioning()
    context = model.text_context(states, ALL_REAL, pooled, micro)
    with pytest.raises(ValueError, match=r"tokens must be \(B, L\)"):
        model(grid_tokens(), context)
    with pytest.raises(ValueError, match="context is for batch 3"):
        model(grid_tokens().flatten(1)[:2], context)
    with pytest.raises(ValueError, match="sides must be even"):
        model(torch.zeros(B, 15, dtype=torch.long), context, grid=(3, 5))
    with pytest.raises(ValueError, match=r"states must be \(B, S, 32\)"):
        model.text_context(states[..., :8], ALL_REAL, pooled, micro)
    with pytest.raises(ValueError, match=r"pooled must be \(3, 16\)"):
        model.text_context(states, ALL_REAL, pooled[:, :4], micro)
    with pytest.raises(ValueError, match=r"micro_conds must be \(3, 5\)"):
        model.text_context(states, ALL_REAL, pooled, micro[:, :4])
    with pytest.raises(ValueError, match="a text row has no real token"):
        model.text_context(states, torch.zeros(B, S, dtype=torch.bool), pooled, micro)


@pytest.fixture(scope="module")
def amused_dir(tmp_path_factory):
    return write_amused_directory(tmp_path_factory.mktemp("amused") / "amused-256")


@torch.no_grad()
def test_the_fixture_is_an_amused_directory_and_our_parts_reproduce_its_logits(amused_dir):
    pipe = AmusedPipeline.from_pretrained(amused_dir)
    out = pipe(["a red apple"], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)  # 4x4 tokens, VQ factor 16
    assert pipe.scheduler.config.mask_token_id == MASK_TOKEN_ID

    model = UVit2D.from_pretrained(amused_dir / "transformer")
    assert model.config.mask_token_id == pipe.scheduler.config.mask_token_id
    encoder = TextEncoder(TextEncoderConfig(str(amused_dir), kind="clip"))
    text = encoder(["a red apple", ""])
    # the conditioning exactly as AmusedPipeline computes it
    ids = pipe.tokenizer(["a red apple", ""], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    clip = pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]).expand(2, -1)  # (width, height, crop, crop, score)
    tokens = grid_tokens()[:2]
    expected = pipe.transformer(tokens, micro_conds=micro, pooled_text_emb=clip.text_embeds,
                                encoder_hidden_states=clip.hidden_states[-2])
    logits = model(tokens.flatten(1), model.text_context(text.states, text.mask, text.pooled))
    assert (logits - expected.flatten(2).transpose(1, 2)).abs().max() < 1e-5
