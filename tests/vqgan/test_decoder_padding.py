"""`decoder_padding`: with "replicate", the decoder has no way to tell a border pixel from an inner one, so a grid of
one token decodes to one flat colour; with "zeros" (the usual) the borders differ. Saved and loaded with the rest."""

import pytest
import torch

from vqgan.config import VQGANConfig
from vqgan.model import VQGAN

TINY = dict(resolution=16, base_channels=16, channel_mult=(1, 2, 2), latent_channels=16, norm_groups=8,
            codebook_size=16, codebook_dim=4)


def flat_image_spread(model: VQGAN) -> float:
    with torch.no_grad():
        image = model.decode(torch.full((1, 4, 4), 3, dtype=torch.long))  # (1, 3, 16, 16)
    return float((image - image.mean(dim=(2, 3), keepdim=True)).abs().max())


def random_weights(model: VQGAN) -> VQGAN:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.decoder.parameters():  # the init zeroes residual branches; make every conv count
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_replicate_padding_decodes_one_token_to_one_flat_colour():
    torch.manual_seed(0)
    zeros = random_weights(VQGAN(VQGANConfig(**TINY)))
    replicate = VQGAN(VQGANConfig(**TINY, decoder_padding="replicate")).eval()
    replicate.load_state_dict(zeros.state_dict())  # the same weights: only the padding differs
    assert flat_image_spread(replicate) < 1e-5
    assert flat_image_spread(zeros) > 1e-3  # the borders give themselves away


def test_decoder_padding_is_saved_and_checked(tmp_path):
    model = VQGAN(VQGANConfig(**TINY, decoder_padding="replicate"))
    model.save_pretrained(tmp_path / "vqgan")
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan")
    assert loaded.config.decoder_padding == "replicate" and loaded.decoder.conv_out.padding_mode == "replicate"
    assert loaded.encoder.conv_out.padding_mode == "zeros"  # the encoder (and so every token id) is untouched
    with pytest.raises(ValueError, match="decoder_padding must be zeros or replicate"):
        VQGANConfig(**TINY, decoder_padding="reflect")
