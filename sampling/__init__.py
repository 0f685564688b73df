"""Mask schedules, parallel decoding and editing masks. Knows nothing of networks or text."""

from sampling.decode import DecodeOutput, DecodeSettings, DecodeState, DecodeStep, LogitsFn, NonFiniteLogits, decode
from sampling.masks import (
    TokenCanvas,
    Window,
    composite,
    dilate_token_mask,
    edit_mask,
    feathered_composite_weights,
    masked_grid,
    outpaint_canvas,
    pixel_to_token_mask,
    plan_windows,
    token_padding,
)
from sampling.schedule import SCHEDULES, mask_ratio, num_masked, sample_mask_ratio, sample_training_mask

__all__ = [
    "SCHEDULES",
    "DecodeOutput",
    "DecodeSettings",
    "DecodeState",
    "DecodeStep",
    "LogitsFn",
    "NonFiniteLogits",
    "TokenCanvas",
    "Window",
    "composite",
    "decode",
    "dilate_token_mask",
    "edit_mask",
    "feathered_composite_weights",
    "mask_ratio",
    "masked_grid",
    "num_masked",
    "outpaint_canvas",
    "pixel_to_token_mask",
    "plan_windows",
    "sample_mask_ratio",
    "sample_training_mask",
    "token_padding",
]
