import hashlib
import json

import pytest
import torch

from vqgan.model import VQGAN


@pytest.mark.parametrize("channel_mult, factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_encode_decode_shapes_dtypes_and_ranges(make_config, make_images, channel_mult, factor):
    model = VQGAN(make_config(channel_mult=channel_mult, resolution=32)).eval()
    assert model.config.downsample_factor == factor
    images = make_images(2, 32)
    ids = model.encode(images)
    assert ids.shape == (2, 32 // factor, 32 // factor) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < model.config.codebook_size
    decoded = model.decode(ids)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_fully_convolutional_other_sizes_and_non_square(tiny_config, make_images):
    model = VQGAN(tiny_config).eval()
    images = torch.nn.functional.interpolate(make_images(1, 32), size=(24, 40))
    ids = model.encode(images)
    assert ids.shape == (1, 6, 10)
    assert model.decode(ids).shape == (1, 3, 24, 40)


def test_forward_output_matches_encode_decode_in_eval(tiny_config, make_images):
    model = VQGAN(tiny_config).eval()
    images = make_images(3, 16)
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out.ids, model.encode(images))
        torch.testing.assert_close(out.reconstruction.clamp(-1, 1), model.decode(out.ids))
    assert out.commit_loss.ndim == 0


def test_training_forward_gives_commit_loss_and_gradients_reach_encoder(tiny_config, make_images):
    model = VQGAN(tiny_config).train()
    out = model(make_images(2, 16))
    assert out.commit_loss.ndim == 0 and out.commit_loss.item() > 0
    (out.reconstruction.abs().mean() + out.commit_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.last_layer is model.decoder.conv_out.weight and model.last_layer.grad is not None


def test_encode_never_changes_the_codebook_even_in_training_mode(tiny_config, make_images):
    model = VQGAN(tiny_config).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = model.encode(make_images(4, 16))
    assert not ids.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_training_forward_reseeds_dead_codes_from_the_batch(tiny_config, make_images):
    # All EMA usages start at 0, below the threshold: the first training batch re-seeds codes onto encoder outputs.
    model = VQGAN(tiny_config).train()
    codebook = model.quantizer.codebook.clone()
    model(make_images(4, 16))
    assert not torch.equal(codebook, model.quantizer.codebook)
    if tiny_config.l2_normalize_codes:
        torch.testing.assert_close(model.quantizer.codebook.norm(dim=-1), torch.ones(tiny_config.codebook_size))


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 18, 16), "multiples of the downsampling factor 4"), ((2, 3, 16, 2), "multiples"),
     ((2, 1, 16, 16), r"\(B, 3, H, W\)"), ((3, 16, 16), r"\(B, 3, H, W\)")],
)
def test_encode_rejects_bad_image_shapes(tiny_config, shape, message):
    model = VQGAN(tiny_config)
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_encode_rejects_integer_images(tiny_config):
    with pytest.raises(ValueError, match="floating point"):
        VQGAN(tiny_config).encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [-1, 32])
def test_decode_rejects_ids_outside_the_codebook(tiny_config, bad):
    ids = torch.zeros(1, 4, 4, dtype=torch.long)
    ids[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 32\)"):
        VQGAN(tiny_config).decode(ids)


def test_decode_rejects_bad_id_shapes_and_dtypes(tiny_config):
    model = VQGAN(tiny_config)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 4, 4))


def test_codebook_usage_statistics(tiny_config):
    model = VQGAN(tiny_config)
    K = tiny_config.codebook_size
    uniform = model.codebook_usage(torch.arange(K).view(1, 4, 8))
    assert uniform.num_used == K and uniform.fraction_used == 1.0
    assert uniform.perplexity == pytest.approx(K)
    assert torch.equal(uniform.counts, torch.ones(K, dtype=torch.long))
    two = model.codebook_usage(torch.tensor([[[3, 3], [5, 5]]]))
    assert two.num_used == 2 and two.fraction_used == 2 / K and two.perplexity == pytest.approx(2.0)
    assert two.counts[3] == 2 and two.counts.sum() == 4
    with pytest.raises(ValueError, match="ids must lie"):
        model.codebook_usage(torch.tensor([K]))


def test_overfits_one_batch(tiny_config, make_images):
    torch.manual_seed(0)
    model = VQGAN(tiny_config)
    images = make_images(4, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(100):
        out = model(images)
        l1 = (out.reconstruction - images).abs().mean()
        if step == 0:
            first = l1.item()
        optimizer.zero_grad()
        (l1 + out.commit_loss).backward()
        optimizer.step()
    model.eval()
    final = (model.decode(model.encode(images)) - images).abs().mean().item()
    assert final < 0.3 * first, (first, final)


def test_save_load_round_trip_gives_identical_outputs(tiny_config, make_images, tmp_path):
    model = VQGAN(tiny_config)
    model.train()
    model(make_images(4, 16))  # moves the EMA codebook away from its initialisation
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQGAN.from_pretrained(tmp_path / "vq").eval()
    assert loaded.config == model.config
    images = make_images(2, 16, seed=1)
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    saved = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert saved["channel_mult"] == list(tiny_config.channel_mult)


def test_truncated_weights_raise_value_error_naming_the_file(tiny_config, tmp_path):
    VQGAN(tiny_config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the SHA-256"):
        VQGAN.from_pretrained(tmp_path)
    config = tmp_path / "config.json"  # the hash deleted (or saved before weights carried it): refused, not skipped
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "weights_sha256"}))
    with pytest.raises(ValueError, match=r"config\.json records no weights_sha256 .* re-save the model"):
        VQGAN.from_pretrained(tmp_path)
    # The hash of the damaged file itself (a user trusting it): then safetensors' own check names it.
    config.write_text(json.dumps({**saved, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        VQGAN.from_pretrained(tmp_path)


def test_garbage_weights_raise_value_error(tiny_config, tmp_path):
    VQGAN(tiny_config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="does not match the SHA-256|corrupt or truncated"):
        VQGAN.from_pretrained(tmp_path)


def test_missing_directory_or_files_raise_file_not_found(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VQGAN.from_pretrained(tmp_path / "nowhere")
    VQGAN(tiny_config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VQGAN.from_pretrained(tmp_path)


def test_bad_config_json_raises_value_error_naming_the_key(tiny_config, tmp_path):
    VQGAN(tiny_config).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "codebook_sise": 7}))
    with pytest.raises(ValueError, match="unknown config key 'codebook_sise'"):
        VQGAN.from_pretrained(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        VQGAN.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**data, "channel_mult": [1, 2, 2, 2, 2, 2]}))
    with pytest.raises(ValueError, match="downsampling factor"):
        VQGAN.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_raise_value_error(tiny_config, make_config, tmp_path):
    VQGAN(tiny_config).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "codebook_size": 64}))
    with pytest.raises(ValueError, match="does not match"):
        VQGAN.from_pretrained(tmp_path)


def test_save_overwrites_atomically_and_leaves_no_temporary_files(tiny_config, make_images, tmp_path):
    first, second = VQGAN(tiny_config), VQGAN(tiny_config)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    ids = torch.randint(0, tiny_config.codebook_size, (1, 4, 4))
    assert torch.equal(VQGAN.from_pretrained(tmp_path).decode(ids), second.decode(ids))
