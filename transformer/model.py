"""Masked token transformer (MaskGIT / Muse base model): a token grid and text states -> logits over the codebook.

The grid is flattened row-major to L = h * w tokens; any of them may be the mask token (`config.mask_token_id`).
The model is bidirectional: every token attends to every other, and every layer cross-attends to the text.

The text part is split out so that sampling pays for it once per image, not once per decoding step:

    context = model.text_context(text.states, text.mask)      # per-layer cross-attention keys/values
    for step in range(num_steps):
        logits = model(tokens, context, positions)             # (B, M, K) at the still-masked positions
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persist.weights import load_component_weights, read_component_dataclass, save_component
from transformer.config import TransformerConfig


@dataclass(frozen=True)
class KeyValue:
    """One layer's cross-attention keys and values, already split into heads."""

    keys: Tensor    # (B, heads, S, D / heads)
    values: Tensor  # (B, heads, S, D / heads)


@dataclass(frozen=True)
class TextContext:
    """What every decoding step needs from the text: per-layer cross-attention keys/values and the key padding bias.

    Built by `MaskedTransformer.text_context` (or by the super-resolution model, whose memory is low-res tokens + text).
    """

    layers: tuple[KeyValue, ...]  # one per block
    bias: Tensor                  # (B, 1, 1, S) additive attention bias: 0 for real keys, -inf for padding
    # (B, L, D) added to the token embeddings, one row per grid position, or None. The super-res model puts here the
    # state of the low-res token under each high-res token, so spatial alignment need not be learned by attention.
    inputs: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.bias.shape[0]

    def select(self, rows: Tensor | slice) -> TextContext:
        """The context of the batch rows `rows`: (N,) long indices, in that order, or a slice (views, no copy)."""
        return TextContext(
            tuple(KeyValue(kv.keys[rows], kv.values[rows]) for kv in self.layers),
            self.bias[rows],
            None if self.inputs is None else self.inputs[rows],
        )

    @staticmethod
    def cat(contexts: Sequence[TextContext]) -> TextContext:
        """The contexts' rows one after the other along the batch (same model and text length; `inputs` in all or
        none of them)."""
        if not contexts:
            raise ValueError("cat needs at least one context")
        if len({len(c.layers) for c in contexts}) > 1 or len({c.bias.shape[-1] for c in contexts}) > 1:
            raise ValueError("contexts of different models or text lengths cannot be concatenated")
        if len({c.inputs is None for c in contexts}) > 1:
            raise ValueError("either all contexts or none must have inputs")
        layers = tuple(
            KeyValue(torch.cat([c.layers[i].keys for c in contexts]), torch.cat([c.layers[i].values for c in contexts]))
            for i in range(len(contexts[0].layers))
        )
        inputs = None if contexts[0].inputs is None else torch.cat([c.inputs for c in contexts])
        return TextContext(layers, torch.cat([c.bias for c in contexts]), inputs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; no mask (the model is bidirectional)."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); with `queries` (B, M) long, the output at those rows only, (B, M, D).

        Keys and values always come from all L tokens; `queries` saves the query and output projections (and the
        score rows) of the tokens whose output nobody reads.
        """
        B, L, D = x.shape
        H = self.num_heads
        if queries is None:
            qkv = self.qkv(x).view(B, L, 3, H, D // H)  # (B, L, 3, H, Dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        else:
            # The fused weight's rows are [q; k; v]: k and v for every token, q for the M queried ones.
            kv = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:]).view(B, L, 2, H, D // H)  # (B, L, 2, H, Dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
            q = F.linear(gather_rows(x, queries), self.qkv.weight[:D], self.qkv.bias[:D])  # (B, M, D)
            q = q.view(B, -1, H, D // H).transpose(1, 2)  # (B, H, M, Dh)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, M, Dh)
        return self.out(y.transpose(1, 2).reshape(B, -1, D))  # (B, L | M, D)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """(B, L, D) and (B, M) long indices into L -> (B, M, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens to a memory whose keys/values are computed once by `key_value`."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def key_value(self, memory: Tensor) -> KeyValue:
        """(B, S, D) memory -> this layer's keys and values, each (B, H, S, D / H)."""
        B, S, D = memory.shape
        kv = self.kv(memory).view(B, S, 2, self.num_heads, D // self.num_heads)  # (B, S, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, Dh)
        # Contiguous once here, so that the many decoding steps that read them do not pay for strided access.
        return KeyValue(k.contiguous(), v.contiguous())

    def forward(self, x: Tensor, memory: KeyValue, bias: Tensor) -> Tensor:
        """(B, L, D) queries, memory keys/values, (B, 1, 1, S) additive bias -> (B, L, D)."""
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(
            q, memory.keys, memory.values, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to a memory (optional), GELU MLP.

    `Block(..., cross_attention=False)` is a plain encoder block (the super-resolution model's low-res stream).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float, cross_attention: bool = True):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(width) if cross_attention else None
        self.cross = CrossAttention(width, num_heads, dropout) if cross_attention else None
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, memory: KeyValue | None = None, bias: Tensor | None = None, queries: Tensor | None = None
    ) -> Tensor:
        """(B, L, D) -> (B, L, D), or (B, M, D) at the (B, M) `queries` rows only (every token is still attended to).
        `memory` and `bias` are required exactly when the block has cross-attention."""
        attended = self.attn(self.attn_norm(x), queries)  # (B, L | M, D)
        if queries is not None:
            x = gather_rows(x, queries)  # (B, M, D): everything after self-attention is per token
        x = x + self.drop(attended)
        if self.cross is not None:
            if memory is None or bias is None:
                raise ValueError("this block cross-attends: pass the memory keys/values and the key bias")
            x = x + self.drop(self.cross(self.cross_norm(x), memory, bias))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GridPositions(nn.Module):
    """Learned 2-D positional embeddings for a grid_size x grid_size grid, bilinearly resized for other (h, w)."""

    def __init__(self, grid_size: int, width: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(grid_size, grid_size, width))

    def forward(self, grid: tuple[int, int]) -> Tensor:
        """(h, w) -> (h * w, D) embeddings in row-major order."""
        h, w = grid
        g, _, D = self.table.shape
        if (h, w) == (g, g):
            return self.table.view(g * g, D)  # (L, D)
        table = self.table.permute(2, 0, 1).unsqueeze(0)  # (1, D, g, g)
        table = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)  # (1, D, h, w)
        return table[0].permute(1, 2, 0).reshape(h * w, D)  # (L, D)


def resolve_grid(num_tokens: int, grid: tuple[int, int] | None, grid_size: int) -> tuple[int, int]:
    """The (h, w) of a row-major grid of `num_tokens` tokens: `grid` if given (checked), else the square one."""
    if grid is not None:
        h, w = grid
        if h < 1 or w < 1 or h * w != num_tokens:
            raise ValueError(f"grid {tuple(grid)} does not hold {num_tokens} tokens")
        return h, w
    if num_tokens == grid_size * grid_size:
        return grid_size, grid_size
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(h, w)")
    return side, side


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The weight init shared by our transformers: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, GridPositions):
            nn.init.normal_(m.table, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedTransformer(nn.Module):
    """Bidirectional transformer over codebook tokens + one mask token, cross-attending to text states.

    The text path: LayerNorm + linear projection of the text states to the width, then per-layer keys/values
    (`text_context`). The token path: token + 2-D position embeddings, `depth` pre-LN blocks, final LayerNorm and a
    K-way head (no logit for the mask token).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        D = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.positions = GridPositions(config.grid_size, D)
        self.embed_drop = nn.Dropout(config.dropout)
        # Text encoders differ wildly in the scale of their states (T5 vs BERT-style); normalising first makes the
        # projection see the same range whichever encoder is plugged in.
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.text_proj = nn.Linear(config.text_dim, D)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.codebook_size)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def project_text(self, text_states: Tensor) -> Tensor:
        """(B, S, text_dim) text encoder states -> (B, S, D) cross-attention memory."""
        if text_states.ndim != 3 or text_states.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text_states must be (B, S, {self.config.text_dim}), got {tuple(text_states.shape)}"
            )
        # The text encoder may run in another dtype (bf16 T5) than this model.
        return self.text_proj(self.text_norm(text_states.to(self.text_proj.weight.dtype)))

    def memory_context(self, memory: Tensor, memory_mask: Tensor) -> TextContext:
        """Per-layer keys/values of a (B, S, D) memory whose real entries are True in the (B, S) bool `memory_mask`."""
        B, S, _ = memory.shape
        if S == 0:
            raise ValueError("the memory is empty: pad the text to at least one position")
        if memory_mask.shape != (B, S) or memory_mask.dtype != torch.bool:
            raise ValueError(
                f"the mask must be a ({B}, {S}) bool tensor, got {memory_mask.dtype} {tuple(memory_mask.shape)}"
            )
        # A row with no real key (an all-padding prompt) is softmax over nothing, which some SDPA backends turn into
        # NaN. Such rows instead attend to one key whose value is zero, so cross-attention adds only the output bias:
        # the same on every backend, and independent of the (padding) states.
        has_key = memory_mask.any(dim=1)  # (B,)
        first = torch.zeros_like(memory_mask)
        first[:, 0] = True
        mask = memory_mask | (first & ~has_key[:, None])  # (B, S)
        bias = torch.zeros(B, 1, 1, S, dtype=memory.dtype, device=memory.device)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # (B, 1, 1, S)
        keep = has_key.to(memory.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        layers = []
        for block in self.blocks:
            kv = block.cross.key_value(memory)
            layers.append(KeyValue(kv.keys, kv.values * keep))
        return TextContext(tuple(layers), bias)

    def text_context(self, text_states: Tensor, text_mask: Tensor, pooled: Tensor | None = None) -> TextContext:
        """Cross-attention keys/values of every layer from (B, S, text_dim) states and a (B, S) bool mask (True =
        real token). Compute once per batch of prompts and pass to every `forward` (gradients flow when training).
        `pooled`, a text encoder's pooled vector, is not used by this architecture (see `transformer.uvit`)."""
        return self.memory_context(self.project_text(text_states), text_mask)

    def forward(
        self,
        tokens: Tensor,
        context: TextContext,
        positions: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits over the K codebook ids.

        tokens: (B, L) long ids in [0, K], K being the mask token; row-major over a (h, w) grid, which is `grid` or
        else square. positions: (B, M) long indices into L; when given, the last layer (past its keys and values), the
        final norm and the head run at those rows only. Returns (B, L, K), or (B, M, K) with positions.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, L), got {tuple(tokens.shape)}")
        B, L = tokens.shape
        if context.batch_size != B or len(context.layers) != len(self.blocks):
            raise ValueError(
                f"context is for batch {context.batch_size} and {len(context.layers)} layers; "
                f"tokens have batch {B} and the model {len(self.blocks)} layers"
            )
        h, w = resolve_grid(L, grid, self.config.grid_size)
        x = self.token_embedding(tokens) + self.positions((h, w))  # (B, L, D)
        if context.inputs is not None:
            if context.inputs.shape != x.shape:
                raise ValueError(f"context.inputs must be {tuple(x.shape)} (one row per token), "
                                 f"got {tuple(context.inputs.shape)}")
            x = x + context.inputs
        if positions is not None and (positions.ndim != 2 or positions.shape[0] != B):
            raise ValueError(f"positions must be ({B}, M), got {tuple(positions.shape)}")
        x = self.embed_drop(x)
        last = len(self.blocks) - 1
        for i, (block, memory) in enumerate(zip(self.blocks, context.layers)):
            # Every layer but the last feeds keys and values at all L tokens to the next; the last one's output is read
            # only at `positions`, so it computes its queries, cross-attention and MLP there only.
            x = block(x, memory, context.bias, positions if i == last else None)  # (B, L, D); (B, M, D) after the last
        return self.head(self.norm(x))  # (B, L | M, K)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config.json (with the weights' SHA-256) and model.safetensors (floating-point weights in `dtype`
        when given) into `path`."""
        save_component(path, self.config, self, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MaskedTransformer:
        """Load a directory written by `save_pretrained`, in eval mode on the CPU; weights that do not match the
        SHA-256 its config.json records (or a config that records none) are refused."""
        config, digest = read_component_dataclass(path, TransformerConfig)
        model = cls(config)
        load_component_weights(path, model, digest)
        return model.eval()
