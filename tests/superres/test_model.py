import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from superres.config import SuperResConfig
from superres.model import SuperResTransformer
from transformer.config import TransformerConfig

HIGH = TransformerConfig(codebook_size=32, grid_size=8, width=32, depth=1, num_heads=4, text_dim=24)
CFG = SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=4, low_depth=1, aligned_low=True)


def make_model(seed: int = 0) -> SuperResTransformer:
    torch.manual_seed(seed)
    return SuperResTransformer(CFG).eval()


def make_inputs(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, CFG.low_codebook_size, (batch, 16), generator=g)
    high = torch.randint(0, HIGH.codebook_size, (batch, 64), generator=g)
    high = high.masked_fill(torch.rand(batch, 64, generator=g) < 0.5, CFG.mask_token_id)
    states = torch.randn(batch, 5, HIGH.text_dim, generator=g)
    mask = torch.tensor([[True, True, True, False, False]]).expand(batch, -1)
    return low, high, states, mask


def test_config_mask_id_is_the_high_res_one():
    assert CFG.mask_token_id == HIGH.mask_token_id == 32
    with pytest.raises(ValueError, match="low_depth must be >= 1"):
        SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=4, low_depth=0)


@torch.no_grad()
def test_logits_follow_the_high_res_grid():
    model = make_model()
    low, high, states, mask = make_inputs(2)
    context = model.context(low, states, mask)
    assert model(high, context).shape == (2, 64, HIGH.codebook_size)
    positions = torch.tensor([[0, 5, 63], [1, 2, 3]])
    full = model(high, context)
    # The restricted last layer multiplies matrices of other shapes, whose float32 rounding can differ by ~1e-7.
    assert torch.allclose(model(high, context, positions), full.gather(1, positions[..., None].expand(-1, -1, 32)),
                          atol=1e-6)
    # other grids: a 2x8 low-res strip conditions a 4x16 high-res strip
    strip = model.context(low[:, :16], states, mask, low_grid=(2, 8))
    assert model(high, strip, grid=(4, 16)).shape == (2, 64, HIGH.codebook_size)


@torch.no_grad()
def test_low_res_positions_matter():
    model = make_model()
    low, high, states, mask = make_inputs(2)
    logits = model(high, model.context(low, states, mask))
    flipped = low.view(2, 4, 4).flip(2).reshape(2, 16)  # same tokens, mirrored grid
    assert not torch.allclose(model(high, model.context(flipped, states, mask)), logits, atol=1e-4)


@torch.no_grad()
def test_aligned_low_res_states_sit_under_their_high_res_tokens():
    model = make_model()
    assert torch.count_nonzero(model.low_to_high.weight) == 0  # a fresh model starts as pure cross-attention
    torch.nn.init.normal_(model.low_to_high.weight)
    low, high, states, mask = make_inputs(1)
    inputs = model.context(low, states, mask).inputs.view(8, 8, -1)  # high-res (row, col, D)
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        block = inputs[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, -1)  # the 2x2 high-res tokens of low (i, j)
        assert torch.equal(block, block[:1].expand(4, -1))
    # Changing one low-res token changes the aligned inputs mostly under it (the low-res stack mixes a little).
    changed = low.clone()
    changed[0, 5] = (low[0, 5] + 1) % CFG.low_codebook_size  # low-res (1, 1)
    delta = (model.context(changed, states, mask).inputs.view(8, 8, -1) - inputs).norm(dim=-1)  # (8, 8)
    assert delta[2:4, 2:4].min() > delta.flatten().sort().values[-5]  # its 2x2 block holds the 4 largest changes
    # Without the aligned path there are no inputs, and the parameters are Muse's.
    plain = SuperResTransformer(SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=4, low_depth=1))
    assert plain.context(low, states, mask).inputs is None and plain.low_to_high is None
    with pytest.raises(ValueError, match="whole multiple"):
        SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=3, aligned_low=True)


@torch.no_grad()
def test_aligned_subpositions_give_each_covered_token_its_own_vector():
    shared = make_model()
    torch.nn.init.normal_(shared.low_to_high.weight)
    torch.nn.init.normal_(shared.low_to_high.bias)
    torch.manual_seed(0)
    model = SuperResTransformer(dataclasses.replace(CFG, aligned_subpositions=True)).eval()
    assert model.low_to_high.weight.shape == (4 * HIGH.width, HIGH.width)
    low, high, states, mask = make_inputs(1)
    # The shared projection repeated once per sub-position is the same function: a shared-path model converts exactly.
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("low_to_high.")}
    model.load_state_dict(state, strict=False)
    model.low_to_high.weight.copy_(shared.low_to_high.weight.repeat(4, 1))
    model.low_to_high.bias.copy_(shared.low_to_high.bias.repeat(4))
    assert torch.allclose(model(high, model.context(low, states, mask)), shared(high, shared.context(low, states, mask)))
    # Sub-position (dy, dx) of low-res token (i, j) is high-res token (2i + dy, 2j + dx), from its own slice.
    torch.nn.init.normal_(model.low_to_high.weight)
    inputs = model.context(low, states, mask).inputs.view(8, 8, -1)  # high-res (row, col, D)
    projected = model.low_to_high(model.low_norm(model.low_blocks[0](
        model.low_embedding(low) + model.low_positions((4, 4))))).view(4, 4, 2, 2, -1)  # (i, j, dy, dx, D)
    for i, j, dy, dx in [(0, 0, 0, 1), (1, 3, 1, 0), (3, 2, 1, 1)]:
        assert torch.allclose(inputs[2 * i + dy, 2 * j + dx], projected[i, j, dy, dx], atol=1e-6)
    assert not torch.allclose(inputs[0, 0], inputs[0, 1])
    with pytest.raises(ValueError, match="set aligned_low"):
        SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=4, aligned_subpositions=True)


@torch.no_grad()
def test_text_acts_only_through_its_keys():
    model = make_model()
    low, high, states, mask = make_inputs(2)
    no_text = torch.zeros_like(mask)
    logits = model(high, model.context(low, states, no_text))
    assert torch.allclose(model(high, model.context(low, 10 * torch.randn_like(states), no_text)), logits, atol=1e-5)
    with_text = model(high, model.context(low, states, mask))
    other_text = model(high, model.context(low, torch.randn_like(states), mask))
    assert not torch.allclose(with_text, other_text, atol=1e-4)


def test_overfits_a_low_to_high_mapping():
    model = make_model()
    model.train()
    g = torch.Generator().manual_seed(2)
    low = torch.randint(0, CFG.low_codebook_size, (4, 16), generator=g)
    high = torch.randint(0, HIGH.codebook_size, (4, 64), generator=g)
    states = torch.zeros(4, 5, HIGH.text_dim)
    no_text = torch.zeros(4, 5, dtype=torch.bool)  # the low-res tokens alone must identify the target
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(250):
        masked = torch.rand(4, 64, generator=g) < torch.rand(4, 1, generator=g).clamp(min=0.2)
        logits = model(high.masked_fill(masked, CFG.mask_token_id), model.context(low, states, no_text))
        loss = F.cross_entropy(logits[masked], high[masked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(torch.full_like(high, CFG.mask_token_id), model.context(low, states, no_text))
    assert F.cross_entropy(logits.flatten(0, 1), high.flatten()).item() < 0.05
    assert torch.equal(logits.argmax(-1), high)


@torch.no_grad()
def test_save_load_gives_identical_logits(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "sr")
    saved = json.loads((tmp_path / "sr" / "config.json").read_text())
    assert saved["high"]["codebook_size"] == 32 and saved["low_grid_size"] == 4
    loaded = SuperResTransformer.from_pretrained(tmp_path / "sr")
    assert loaded.config == CFG
    low, high, states, mask = make_inputs(2)
    assert torch.equal(loaded(high, loaded.context(low, states, mask)), model(high, model.context(low, states, mask)))
    (tmp_path / "sr" / "config.json").write_text(json.dumps({**saved, "high": {**saved["high"], "depht": 2}}))
    with pytest.raises(ValueError, match="unknown config key 'high.depht'"):
        SuperResTransformer.from_pretrained(tmp_path / "sr")
    (tmp_path / "sr" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "sr" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match the SHA-256|is corrupt or truncated"):
        SuperResTransformer.from_pretrained(tmp_path / "sr")


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = make_model()
    low, high, states, mask = make_inputs(2)
    with pytest.raises(ValueError, match="low_tokens must be"):
        model.context(low[:1], states, mask)
    with pytest.raises(ValueError, match="text_mask must be a bool tensor"):
        model.context(low, states, mask.float())
