import dataclasses

import pytest

from vqgan.config import VQGANConfig, VQGANLossConfig


def test_defaults_are_valid_and_factor_follows_channel_mult():
    assert VQGANConfig().downsample_factor == 8
    assert VQGANConfig(channel_mult=(1, 2, 4), resolution=16, base_channels=32).downsample_factor == 4
    assert VQGANConfig(channel_mult=(1, 1, 2, 2, 4), resolution=64).downsample_factor == 16
    VQGANLossConfig()


def test_lists_from_json_become_tuples_so_the_config_stays_hashable():
    config = VQGANConfig(channel_mult=[1, 2, 2, 4])
    assert config.channel_mult == (1, 2, 2, 4)
    hash(config)


@pytest.mark.parametrize("channel_mult", [(1, 2, 2, 4, 4, 4), (1, 2), (1,)])
def test_unsupported_downsampling_factor_is_rejected(channel_mult):
    with pytest.raises(ValueError, match="downsampling factor must be 4, 8 or 16"):
        VQGANConfig(channel_mult=channel_mult, resolution=64)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(codebook_size=1), "codebook_size must be >= 2"),
        (dict(resolution=60), "multiple of the downsampling factor 8"),
        (dict(codebook_dim=0), "codebook_dim"),
        (dict(codebook_decay=0.0), "codebook_decay"),
        (dict(dead_code_threshold=-1.0), "dead_code_threshold"),
        (dict(dropout=1.0), "dropout"),
        (dict(base_channels=24), "norm_groups=16 must divide"),
        (dict(channel_mult=(1, 0, 2, 4)), "channel_mult entries"),
        (dict(commitment_weight=-0.1), "commitment_weight"),
    ],
)
def test_bad_model_config_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(VQGANConfig(), **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(perceptual="vgg"), "perceptual must be one of"),
        (dict(perceptual="none"), "set perceptual_weight to 0"),
        (dict(adversarial_loss="wasserstein"), "adversarial_loss must be one of"),
        (dict(l1_weight=-1.0), "l1_weight must be >= 0"),
        (dict(disc_channels=12), "multiple of 8"),
        (dict(disc_layers=0), "disc_layers"),
        (dict(disc_start_step=-5), "disc_start_step"),
        (dict(lpips_net="resnet"), "lpips_net"),
    ],
)
def test_bad_loss_config_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(VQGANLossConfig(), **changes)


def test_perceptual_none_is_allowed_with_zero_weight():
    assert VQGANLossConfig(perceptual="none", perceptual_weight=0.0).perceptual == "none"
