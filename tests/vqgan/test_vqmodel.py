import json

import pytest
import torch
from diffusers import VQModel as DiffusersVQModel

from tests.amused_fixture import VQVAE, randomize_, write_amused_directory
from persist.weights import load_state_dict_strict as load_strict
from vqgan.vqmodel import VQModel, VQModelConfig

# aMUSEd's layout (five levels: factor 16, a decoder block more per level) at widths 8-16, and one with narrower codes
# than latents, two blocks per level and no middle attention, which the diffusers class allows too.
VARIANTS = {
    "amused": {},
    # AmusedPipeline cannot decode narrower codes (it passes a latent_channels-wide shape), hence no lookup here
    "narrow codes, no middle attention": {"vq_embed_dim": 6, "mid_block_add_attention": False, "layers_per_block": 2,
                                          "lookup_from_codebook": False},
}


def reference(changes: dict, seed: int = 0) -> DiffusersVQModel:
    torch.manual_seed(seed)
    return randomize_(DiffusersVQModel(**{**VQVAE, **changes}), seed, std=0.1).eval()


def ours_from(ref: DiffusersVQModel) -> VQModel:
    model = VQModel(VQModelConfig.from_diffusers_json(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def images(batch: int = 2, height: int = 64, width: int = 96, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(batch, 3, 4, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_ids_and_pixels_equal_diffusers(variant):
    ref = reference(VARIANTS[variant])
    model = ours_from(ref)
    DiffusersVQModel(**{**VQVAE, **VARIANTS[variant]}).load_state_dict(model.state_dict(), strict=True)
    x = images()
    # diffusers' VQModel works on [0, 1] images, ours on [-1, 1]
    latents = ref.encode((x + 1) / 2).latents
    _, _, (_, _, expected_ids) = ref.quantize(latents)
    ids = model.encode(x)
    assert ids.shape == (2, 4, 6) and ids.dtype == torch.long
    assert torch.equal(ids, expected_ids.view(2, 4, 6))
    assert ids.unique().numel() > 4  # the comparison covers many codes, not one
    shape = (2, 4, 6, model.config.code_dim)
    if ref.config.lookup_from_codebook:  # AmusedPipeline's decode of token ids
        expected = ref.decode(ids, force_not_quantize=True, shape=shape).sample
    else:  # the codes looked up first, then decoded as they are
        expected = ref.decode(ref.quantize.get_codebook_entry(ids, shape), force_not_quantize=True).sample
    expected = expected.clip(0, 1)  # as AmusedPipeline clips
    decoded = model.decode(ids)
    assert decoded.shape == x.shape and decoded.min() >= -1 and decoded.max() <= 1
    assert (decoded - (expected * 2 - 1)).abs().max() < 1e-5  # measured 0.0 on CPU, float32


def test_config_reads_diffusers_json_and_refuses_what_it_cannot_build():
    data = {"_class_name": "VQModel", "_diffusers_version": "0.25.0", **VQVAE}
    config = VQModelConfig.from_diffusers_json(data)
    assert (config.codebook_size, config.downsample_factor, config.code_dim) == (32, 16, 8)
    assert config.block_out_channels == (8, 8, 8, 8, 16)  # JSON lists become tuples
    assert VQModelConfig.from_diffusers_json(config.to_diffusers_json()) == config
    with pytest.raises(ValueError, match="unknown config key 'latent_chanels'"):
        VQModelConfig.from_diffusers_json({**data, "latent_chanels": 4})
    with pytest.raises(ValueError, match="_class_name is 'UVit2DModel'"):
        VQModelConfig.from_diffusers_json({**data, "_class_name": "UVit2DModel"})
    with pytest.raises(ValueError, match="only norm_type 'group' is supported, got 'spatial'"):
        VQModelConfig.from_diffusers_json({**data, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="down_block_types must be 5 x 'DownEncoderBlock2D'"):
        VQModelConfig.from_diffusers_json({**data, "down_block_types": ["DownEncoderBlock2D"]})


@torch.no_grad()
def test_save_pretrained_is_a_diffusers_component_and_round_trips(tmp_path):
    model = ours_from(reference({}))
    model.save_pretrained(tmp_path / "vqvae")
    loaded = VQModel.from_pretrained(tmp_path / "vqvae")
    ids = model.encode(images())
    assert torch.equal(loaded.encode(images()), ids) and torch.equal(loaded.decode(ids), model.decode(ids))
    theirs = DiffusersVQModel.from_pretrained(tmp_path / "vqvae")
    assert torch.equal(theirs.state_dict()["quantize.embedding.weight"], model.quantize.embedding.weight)


def test_wrong_weights_raise_errors_naming_the_key(tmp_path):
    model = ours_from(reference({}))
    bad = {**model.state_dict(), "quant_conv.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(ValueError, match=r"'quant_conv.weight' has shape \(8, 8, 3, 3\), the config needs "
                                         r"\(8, 8, 1, 1\)"):
        load_strict(model, bad, "test")
    model.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    (tmp_path / "vq" / "config.json").write_text(json.dumps({**config, "mid_block_add_attention": False}))
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.mid_block.attentions.0.group_norm.bias'"):
        VQModel.from_pretrained(tmp_path / "vq")
    with pytest.raises(FileNotFoundError, match="saved model directory not found: .*nowhere"):
        VQModel.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("shape, message", [((2, 3, 64, 40), "multiples of the downsampling factor 16"),
                                            ((2, 1, 64, 64), r"\(B, 3, H, W\)")])
def test_bad_images_and_ids_raise_value_errors(shape, message):
    model = VQModel(VQModelConfig(**{**VQVAE, "block_out_channels": tuple(VQVAE["block_out_channels"])}))
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 32\)"):
        model.decode(torch.full((1, 2, 2), 32))


def test_loads_the_vqvae_of_an_amused_directory(tmp_path):
    root = write_amused_directory(tmp_path / "amused")
    model = VQModel.from_pretrained(root / "vqvae")
    ref = DiffusersVQModel.from_pretrained(root / "vqvae").eval()
    with torch.no_grad():
        _, _, (_, _, expected) = ref.quantize(ref.encode((images() + 1) / 2).latents)
    assert torch.equal(model.encode(images()), expected.view(2, 4, 6))
