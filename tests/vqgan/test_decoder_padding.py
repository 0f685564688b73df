"""`output_padding`: how the decoder's output convolution pads. With "replicate" a corner pixel is computed from its
own features extended, not from padded zeros, so a decoder cannot single the corners out there; saved and loaded
with the rest, and the encoder (so every token id) is untouched."""

import pytest
import torch
import torch.nn.functional as F

from vqgan.config import VQGANConfig
from vqgan.model import VQGAN

TINY = dict(resolution=16, base_channels=16, channel_mult=(1, 2, 2), latent_channels=16, norm_groups=8,
            codebook_size=16, codebook_dim=4)


def test_replicate_output_padding_computes_the_corners_from_the_borders_features():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY, output_padding="replicate")).eval()
    conv = model.decoder.conv_out
    features = torch.randn(1, conv.in_channels, 6, 6)
    expected = F.conv2d(F.pad(features, (1, 1, 1, 1), mode="replicate"), conv.weight, conv.bias)
    assert torch.allclose(conv(features), expected, atol=1e-6)
    flat = torch.ones(1, conv.in_channels, 6, 6)
    assert torch.allclose(conv(flat), conv(flat)[..., 3:4, 3:4].expand(-1, -1, 6, 6), atol=1e-6)  # no corner tint


def test_output_padding_is_saved_and_checked(tmp_path):
    model = VQGAN(VQGANConfig(**TINY, output_padding="replicate"))
    model.save_pretrained(tmp_path / "vqgan")
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan")
    assert loaded.config.output_padding == "replicate" and loaded.decoder.conv_out.padding_mode == "replicate"
    assert all(m.padding_mode == "zeros" for m in loaded.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="output_padding must be zeros or replicate"):
        VQGANConfig(**TINY, output_padding="reflect")
