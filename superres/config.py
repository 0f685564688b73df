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
    # Also add each low-res token's state, through a zero-initialised projection, to the input of the high-res tokens
    # above it (not in Muse, which relies on cross-attention alone). Cross-attention must *learn* which low-res token
    # lies under a high-res one; this wiring gives it for free, and small budgets do not learn it otherwise. Our
    # presets turn it on; the default stays off so that a config saved without the key keeps its architecture.
    aligned_low: bool = False
    # With aligned_low: project each low-res state to r x r vectors, one for each high-res token it covers (a learned
    # pixel shuffle), instead of one vector shared by all r x r. Shared, only the position embeddings tell the four
    # tokens of a block apart, and the layers must learn "which quarter of this low-res patch am I" for every patch
    # content; per sub-position, the projection hands each token its own quarter directly.
    aligned_subpositions: bool = False

    def __post_init__(self) -> None:
        for name in ("low_codebook_size", "low_grid_size", "low_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.aligned_low and self.high.grid_size % self.low_grid_size:
            raise ValueError(f"aligned_low needs the high-res grid ({self.high.grid_size}) to be a whole multiple of "
                             f"the low-res grid ({self.low_grid_size})")
        if self.aligned_subpositions and not self.aligned_low:
            raise ValueError("aligned_subpositions refines the aligned_low path; set aligned_low: true as well")

    @property
    def scale(self) -> int:
        """High-res tokens per low-res token along each side."""
        return self.high.grid_size // self.low_grid_size

    @property
    def mask_token_id(self) -> int:
        """The high-res mask token id, as defined by the high-res TransformerConfig."""
        return self.high.mask_token_id
