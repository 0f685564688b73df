import json

import pytest
import torch
import torch.nn.functional as F

from transformer.config import TransformerConfig
from transformer.model import MaskedTransformer, TextContext

CFG = TransformerConfig(codebook_size=16, grid_size=4, width=32, depth=2, num_heads=4, text_dim=24)


def make_model(config: TransformerConfig = CFG, seed: int = 0) -> MaskedTransformer:
    torch.manual_seed(seed)
    return MaskedTransformer(config).eval()


def make_text(batch: int, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, CFG.text_dim, generator=g)
    lengths = torch.arange(batch) % (length - 1) + 1  # 1 .. length-1 real tokens, so every row has padding
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, S)
    return states, mask


def make_tokens(batch: int, num_tokens: int = 16, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.codebook_size, (batch, num_tokens), generator=g)
    masked = torch.rand(batch, num_tokens, generator=g) < 0.5
    return tokens.masked_fill(masked, CFG.mask_token_id)


@torch.no_grad()
def test_padded_text_positions_do_not_change_logits():
    model = make_model()
    states, mask = make_text(3)
    tokens = make_tokens(3)
    logits = model(tokens, model.text_context(states, mask))
    noisy = states.masked_fill(~mask[..., None], 0.0) + 100.0 * torch.randn_like(states) * (~mask[..., None])
    assert torch.allclose(model(tokens, model.text_context(noisy, mask)), logits, atol=1e-5)
    # while a real text position does matter
    changed = states.clone()
    changed[:, 0] += torch.randn(CFG.text_dim)
    assert not torch.allclose(model(tokens, model.text_context(changed, mask)), logits, atol=1e-3)


@torch.no_grad()
def test_all_padding_text_row_is_finite_and_ignores_the_states():
    model = make_model()
    states, mask = make_text(2)
    mask[1] = False
    tokens = make_tokens(2)
    logits = model(tokens, model.text_context(states, mask))
    assert torch.isfinite(logits).all()
    other = states.clone()
    other[1] = torch.randn_like(other[1]) * 10
    again = model(tokens, model.text_context(other, mask))
    assert torch.allclose(again[1], logits[1], atol=1e-5)
    assert torch.allclose(again[0], logits[0], atol=1e-6)  # rows do not leak into each other


@torch.no_grad()
def test_logits_at_positions_are_the_same_rows_of_the_full_logits():
    model = make_model()
    states, mask = make_text(3)
    tokens = make_tokens(3)
    context = model.text_context(states, mask)
    full = model(tokens, context)
    assert full.shape == (3, 16, CFG.codebook_size)  # no logit for the mask token
    positions = torch.stack([torch.randperm(16)[:5] for _ in range(3)])  # (B, M)
    picked = model(tokens, context, positions)
    assert picked.shape == (3, 5, CFG.codebook_size)
    assert torch.allclose(picked, full.gather(1, positions[..., None].expand(-1, -1, CFG.codebook_size)), atol=1e-6)


def test_positions_give_the_gradients_of_the_full_forward_read_at_those_rows():
    # With positions the last layer computes queries, cross-attention and MLP at those rows only; a training loss on
    # them must see the parameters' gradients of the full computation (padding repeats a position, as decode does).
    model = make_model().train()  # train mode, as a training step runs (CFG has no dropout)
    states, mask = make_text(3)
    tokens = make_tokens(3)
    positions = torch.stack([torch.randperm(16)[:6] for _ in range(3)])
    positions[:, -1] = positions[:, 0]  # a padded entry
    targets = torch.randint(0, CFG.codebook_size, positions.shape)

    def grads(restricted: bool) -> list[torch.Tensor]:
        model.zero_grad()
        context = model.text_context(states, mask)
        if restricted:
            logits = model(tokens, context, positions)
        else:
            logits = model(tokens, context).gather(1, positions[..., None].expand(-1, -1, CFG.codebook_size))
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for restricted, full in zip(grads(True), grads(False), strict=True):
        assert torch.allclose(restricted, full, atol=1e-6)


@torch.no_grad()
def test_a_context_reused_over_steps_gives_the_logits_of_a_fresh_one():
    model = make_model()
    states, mask = make_text(2)
    context = model.text_context(states, mask)
    tokens = torch.full((2, 16), CFG.mask_token_id)
    for step in range(3):  # a decode-like loop that reveals tokens between calls
        reused = model(tokens, context)
        fresh = model(tokens, model.text_context(states, mask))
        assert torch.equal(reused, fresh)
        tokens[:, step * 4 : step * 4 + 4] = reused[:, step * 4 : step * 4 + 4].argmax(-1)


@torch.no_grad()
def test_a_row_does_not_depend_on_its_batch():
    model = make_model()
    states, mask = make_text(4)
    tokens = make_tokens(4)
    batch = model(tokens, model.text_context(states, mask))
    alone = model(tokens[2:3], model.text_context(states[2:3], mask[2:3]))
    assert torch.allclose(alone[0], batch[2], atol=1e-5)


@torch.no_grad()
def test_context_cat_undoes_select():
    model = make_model()
    states, mask = make_text(3)
    context = model.text_context(states, mask)
    joined = TextContext.cat([context.select(slice(0, 1)), context.select(torch.tensor([2, 1]))])
    assert joined.batch_size == 3
    tokens = make_tokens(3)
    assert torch.equal(model(tokens, joined), model(tokens, context.select(torch.tensor([0, 2, 1]))))
    short = model.text_context(states[:1, :3], mask[:1, :3])
    with pytest.raises(ValueError, match="different models or text lengths"):
        TextContext.cat([context, short])


def test_overfits_four_grids_under_masking():
    model = make_model()
    model.train()
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, CFG.codebook_size, (4, 16), generator=g)
    states, mask = make_text(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(250):
        masked = torch.rand(4, 16, generator=g) < torch.rand(4, 1, generator=g).clamp(min=0.2)
        tokens = targets.masked_fill(masked, CFG.mask_token_id)
        logits = model(tokens, model.text_context(states, mask))
        loss = F.cross_entropy(logits[masked], targets[masked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():  # from the text alone: every token masked
        logits = model(torch.full_like(targets, CFG.mask_token_id), model.text_context(states, mask))
    assert F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item() < 0.05
    assert torch.equal(logits.argmax(-1), targets)


@torch.no_grad()
def test_positions_are_interpolated_for_other_grids():
    model = make_model()
    table = model.positions.table  # (4, 4, D)
    assert torch.equal(model.positions((4, 4)), table.reshape(16, -1))
    big = model.positions((8, 8)).reshape(8, 8, -1)
    # bilinear: every interpolated embedding lies within the per-channel range of the learned table
    assert (big >= table.amin((0, 1)) - 1e-6).all() and (big <= table.amax((0, 1)) + 1e-6).all()
    states, mask = make_text(2)
    context = model.text_context(states, mask)
    assert model(make_tokens(2, 64), context).shape == (2, 64, CFG.codebook_size)  # 8x8 inferred as square
    assert torch.isfinite(model(make_tokens(2, 32), context, grid=(4, 8))).all()
    with pytest.raises(ValueError, match="not a square grid"):
        model(make_tokens(2, 12), context)
    with pytest.raises(ValueError, match=r"grid \(4, 4\) does not hold 32 tokens"):
        model(make_tokens(2, 32), context, grid=(4, 4))


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = make_model()
    states, mask = make_text(2)
    context = model.text_context(states, mask)
    with pytest.raises(ValueError, match=r"text_states must be \(B, S, 24\)"):
        model.text_context(torch.randn(2, 6, 7), mask)
    with pytest.raises(ValueError, match="bool tensor"):
        model.text_context(states, mask.float())
    with pytest.raises(ValueError, match="context is for batch 2"):
        model(make_tokens(3), context)
    with pytest.raises(ValueError, match=r"tokens must be \(B, L\)"):
        model(make_tokens(2)[0], context)


@torch.no_grad()
def test_text_states_in_another_dtype_are_cast():
    model = make_model()
    states, mask = make_text(2)
    tokens = make_tokens(2)
    expected = model(tokens, model.text_context(states, mask))
    assert torch.allclose(model(tokens, model.text_context(states.double(), mask)), expected, atol=1e-6)
    half = model.to(torch.bfloat16)(tokens, model.text_context(states, mask))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


@torch.no_grad()
def test_save_load_gives_identical_logits(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["codebook_size"] == 16
    assert not list((tmp_path / "m").glob("*.tmp"))
    loaded = MaskedTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config == CFG and not loaded.training
    states, mask = make_text(2)
    tokens = make_tokens(2)
    assert torch.equal(loaded(tokens, loaded.text_context(states, mask)), model(tokens, model.text_context(states, mask)))


def test_loading_bad_directories_raises_clear_errors(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not match the SHA-256|is corrupt or truncated"):
        MaskedTransformer.from_pretrained(tmp_path / "m")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="does not match the SHA-256|is corrupt or truncated"):
        MaskedTransformer.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="missing"):
        MaskedTransformer.from_pretrained(tmp_path / "missing")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        MaskedTransformer.from_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "widht": 3}))
    with pytest.raises(ValueError, match="unknown config key 'widht'"):
        MaskedTransformer.from_pretrained(tmp_path / "m")
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MaskedTransformer.from_pretrained(tmp_path / "m")


def test_weights_from_another_config_are_rejected(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    other = make_model(TransformerConfig(codebook_size=16, grid_size=4, width=32, depth=1, num_heads=4, text_dim=24))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded"):  # a replaced file
        MaskedTransformer.from_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "config.json"  # the hash deleted: refused, so it cannot switch the check off
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "weights_sha256"}))
    with pytest.raises(ValueError, match="records no weights_sha256 for model.safetensors"):
        MaskedTransformer.from_pretrained(tmp_path / "m")
    other_hash = json.loads((tmp_path / "other" / "config.json").read_text())["weights_sha256"]
    config.write_text(json.dumps({**saved, "weights_sha256": other_hash}))  # the hash of the file, wrongly trusted:
    with pytest.raises(ValueError, match="does not match the config"):      # the shapes still tell
        MaskedTransformer.from_pretrained(tmp_path / "m")


@torch.no_grad()
def test_attention_matches_torch_multihead_attention():
    """Parity with nn.MultiheadAttention given the same weights: the fused projections split heads the standard way."""
    torch.manual_seed(0)
    block = make_model().blocks[0]
    x, memory = torch.randn(2, 16, 32), torch.randn(2, 6, 32)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])  # nn.MultiheadAttention: True = ignore
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    reference.in_proj_weight.copy_(block.attn.qkv.weight)
    reference.in_proj_bias.copy_(block.attn.qkv.bias)
    reference.out_proj.load_state_dict(block.attn.out.state_dict())
    assert torch.allclose(block.attn(x), reference(x, x, x, need_weights=False)[0], atol=1e-6)
    reference.in_proj_weight.copy_(torch.cat([block.cross.q.weight, block.cross.kv.weight]))
    reference.in_proj_bias.copy_(torch.cat([block.cross.q.bias, block.cross.kv.bias]))
    reference.out_proj.load_state_dict(block.cross.out.state_dict())
    expected = reference(x, memory, memory, key_padding_mask=padding, need_weights=False)[0]
    bias = torch.zeros(2, 1, 1, 6).masked_fill(padding[:, None, None, :], float("-inf"))
    assert torch.allclose(block.cross(x, block.cross.key_value(memory), bias), expected, atol=1e-6)
