"""Config of the token super-resolution transformer."""

from __future__ import annotations

from dataclasses import dataclass

from transformer.config import TransformerConfig


@dataclass(frozen=True)
class SuperResConfig:
    """A low-res token stream (self-attention only) feeding the cross-attention memory of a high-res masked transformer.

    `high` is the high-res masked transformer, complete: its codebook, grid, width, depth, heads and text_dim. The
    low-res stream shares its width, heads, MLP ratio and dropout. Muse: 16 low-res layers, 32 high-res layers.
    """

    high: TransformerConfig
    low_codebook_size: int    # K of the low-res tokenizer
    low_grid_size: int        # h == w of the low-res grid its positions are learned for (interpolated for other sizes)
    low_depth: int = 16

    def __post_init__(self) -> None:
        for name in ("low_codebook_size", "low_grid_size", "low_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def mask_token_id(self) -> int:
        """The high-res mask token id, as defined by the high-res TransformerConfig."""
        return self.high.mask_token_id
