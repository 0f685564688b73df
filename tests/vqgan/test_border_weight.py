"""`loss.border_weight`: L1 within `border_width` pixels of the edge weighs (1 + border_weight) times, so a decoder
cannot leave its borders wrong for the price of a few pixels; 0 leaves the L1 as it was."""

import pytest
import torch

from vqgan.config import VQGANLossConfig
from vqgan.losses import border_weights


def test_border_weights_frame_the_image():
    images = torch.zeros(2, 3, 8, 6)
    weights = border_weights(images, border_weight=9.0, width=2)
    assert weights.shape == (1, 1, 8, 6)
    assert torch.all(weights[..., 2:6, 2:4] == 1.0)
    frame = torch.ones(8, 6, dtype=torch.bool)
    frame[2:6, 2:4] = False
    assert torch.all(weights[0, 0][frame] == 10.0)
    assert border_weights(images, border_weight=0.0, width=2) == 1.0  # the plain L1, no tensor made


def test_a_wrong_pixel_costs_more_at_the_border():
    images = torch.zeros(1, 3, 8, 8)
    corner, centre = images.clone(), images.clone()
    corner[..., 0, 0], centre[..., 4, 4] = 1.0, 1.0
    w = border_weights(images, border_weight=20.0, width=1)
    assert ((corner - images).abs() * w).mean() == 21 * ((centre - images).abs() * w).mean()


def test_border_settings_are_checked():
    with pytest.raises(ValueError, match="border_width must be >= 1"):
        VQGANLossConfig(border_width=0)
    with pytest.raises(ValueError, match="border_weight must be >= 0"):
        VQGANLossConfig(border_weight=-1.0)
