"""Token super-resolution (Muse): high-res token logits given the low-res tokens and the text.

The low-res grid is embedded with its own 2-D positions and run through its own self-attention stack; its output,
concatenated along the sequence with the projected text states, is the cross-attention memory of a masked transformer
over the high-res grid. With `aligned_low` (our presets), each low-res state is also projected and added to the input
of the r x r high-res tokens above it (with `aligned_subpositions`, through a different projection for each of the
r x r). The memory and the aligned inputs are computed once per sampling call:

    context = model.context(low_tokens, text.states, text.mask)
    for step in range(num_steps):
        logits = model(high_tokens, context, positions)       # (B, M, K_high)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from persist.weights import load_component_weights, read_component_dataclass, save_component
from superres.config import SuperResConfig
from transformer.model import Block, GridPositions, MaskedTransformer, TextContext, init_weights, resolve_grid


class SuperResTransformer(nn.Module):
    def __init__(self, config: SuperResConfig) -> None:
        super().__init__()
        self.config = config
        high = config.high
        self.low_embedding = nn.Embedding(config.low_codebook_size, high.width)
        self.low_positions = GridPositions(config.low_grid_size, high.width)
        self.low_drop = nn.Dropout(high.dropout)
        self.low_blocks = nn.ModuleList(
            Block(high.width, high.num_heads, high.mlp_ratio, high.dropout, cross_attention=False)
            for _ in range(config.low_depth)
        )
        self.low_norm = nn.LayerNorm(high.width)
        # One output vector per covered high-res token with aligned_subpositions, else one shared by the r x r block.
        per_low = config.scale**2 if config.aligned_subpositions else 1
        self.low_to_high = nn.Linear(high.width, per_low * high.width) if config.aligned_low else None
        self.high = MaskedTransformer(high)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)
        if self.low_to_high is not None:
            # Zero: a fresh model starts as pure cross-attention and learns how much of the aligned path to use.
            nn.init.zeros_(self.low_to_high.weight)

    def context(
        self,
        low_tokens: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        low_grid: tuple[int, int] | None = None,
    ) -> TextContext:
        """Cross-attention memory of the high-res transformer, for every layer.

        low_tokens: (B, Ll) long ids of the low-res grid, row-major over `low_grid` (else square); text_states
        (B, S, text_dim) and text_mask (B, S) bool (True = real token). Memory: Ll low-res entries, then S text ones.
        """
        B = text_states.shape[0]
        if low_tokens.ndim != 2 or low_tokens.shape[0] != B:
            raise ValueError(f"low_tokens must be (B, Ll) with the text's batch {B}, got {tuple(low_tokens.shape)}")
        if text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be a bool tensor (True = real token), got {text_mask.dtype}")
        Ll = low_tokens.shape[1]
        grid = resolve_grid(Ll, low_grid, self.config.low_grid_size)
        x = self.low_drop(self.low_embedding(low_tokens) + self.low_positions(grid))  # (B, Ll, D)
        for block in self.low_blocks:
            x = block(x)
        low = self.low_norm(x)  # (B, Ll, D)
        memory = torch.cat([low, self.high.project_text(text_states)], dim=1)  # (B, Ll + S, D)
        low_mask = torch.ones(B, Ll, dtype=torch.bool, device=low_tokens.device)
        context = self.high.memory_context(memory, torch.cat([low_mask, text_mask], dim=1))
        if self.low_to_high is None:
            return context
        # Each low-res state under the r x r high-res tokens it covers, row-major over the (h*r, w*r) high-res grid.
        r, (h, w), D = self.config.scale, grid, low.shape[-1]
        k = r if self.config.aligned_subpositions else 1  # k x k distinct vectors per low-res token
        aligned = self.low_to_high(low).view(B, h, w, k, k, D).expand(B, h, w, r, r, D)  # (B, h, w, dy, dx, D)
        aligned = aligned.permute(0, 1, 3, 2, 4, 5)  # (B, h, dy, w, dx, D): high-res row h*r+dy, column w*r+dx
        return dataclasses.replace(context, inputs=aligned.reshape(B, h * r * w * r, D))  # (B, Lh, D)

    def forward(
        self,
        high_tokens: Tensor,
        context: TextContext,
        positions: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """(B, Lh) high-res ids (mask token = config.mask_token_id) -> logits (B, Lh, K_high), or (B, M, K_high) at
        the (B, M) `positions`. `grid` is the high-res (h, w), square by default."""
        return self.high(high_tokens, context, positions, grid)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json (with the weights' SHA-256) and model.safetensors (floating-point weights in `dtype`
        when given) into `path`."""
        save_component(path, self.config, self, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SuperResTransformer:
        """Load a directory written by `save_pretrained`, in eval mode on the CPU; weights that do not match the
        SHA-256 its config.json records (or a config that records none) are refused."""
        config, digest = read_component_dataclass(path, SuperResConfig)
        model = cls(config)
        load_component_weights(path, model, digest)
        return model.eval()
