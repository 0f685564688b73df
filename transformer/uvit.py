"""U-ViT token predictor of aMUSEd (diffusers' `UVit2DModel`): a token grid, CLIP text states, the pooled CLIP vector
and five micro-conditions -> logits over the codebook.

Parameter names equal diffusers' state dict, so the `transformer/diffusion_pytorch_model.safetensors` of an aMUSEd
directory loads strictly; `save_pretrained` writes that same layout back. The network, in order:

    tokens -> embedding (vocab_size x in_channels) -> RMSNorm -> 1x1 conv          no positional embedding: the
    [2x2 stride-2 conv]                              (when config.downsample)        depthwise convs place tokens
    num_res_blocks x (ConvNeXt block, two cross-attentions to the text)
    RMSNorm -> linear to hidden_size -> num_hidden_layers transformer layers -> RMSNorm -> linear back
    num_res_blocks x (ConvNeXt block, two cross-attentions to the text)
    [2x2 stride-2 transposed conv]                   (when config.upsample)
    1x1 conv -> RMSNorm -> 1x1 conv to codebook_size                                the head has no logit for the
                                                                                    mask or the unused ids
The output of every ConvNeXt block and every norm of the transformer layers is modulated (adaLN: x * (1 + scale) +
shift) by one conditioning vector: an MLP of [pooled text embedding; sinusoidal codes of the micro-conditions].

The text part runs once per sampling call, so decoding steps pay nothing for it:

    context = model.text_context(text.states, text.mask, text.pooled)   # keys/values and adaLN vectors, all layers
    for step in range(num_steps):
        logits = model(tokens, context, positions)                       # (B, M, K) at the still-masked positions
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persist import dataclass_from_diffusers_config
from persist.weights import DIFFUSERS_WEIGHTS_NAME, load_diffusers_component, save_component
from transformer.model import KeyValue, gather_rows, resolve_grid

DIFFUSERS_CLASS = "UVit2DModel"


@dataclass(frozen=True)
class UVit2DConfig:
    """The init arguments of diffusers' `UVit2DModel`, with its defaults (which are not those of any aMUSEd model:
    read a model's config.json with `from_diffusers_json`), plus `pixels_per_token`.

    As published (not checkable offline here): amused-256 has sample_size 16 and no down/up sampling, amused-512
    sample_size 32 with both.
    """

    hidden_size: int = 1024            # D of the transformer layers
    use_bias: bool = False             # biases of every linear/conv layer (and of the LayerNorm in the MLP's norm)
    hidden_dropout: float = 0.0
    cond_embed_dim: int = 768          # P, width of the pooled text embedding
    micro_cond_encode_dim: int = 256   # sinusoidal code width of one micro-condition
    micro_cond_embed_dim: int = 1280   # all micro-conditions' codes together: 5 x 256
    encoder_hidden_size: int = 768     # width of the text encoder's states
    vocab_size: int = 8256             # codebook + mask token, rounded up to a multiple of 64; the mask is the last
    codebook_size: int = 8192          # K
    in_channels: int = 768             # token embedding width (also the head's hidden width)
    block_out_channels: int = 768      # C of the ConvNeXt stages
    num_res_blocks: int = 3            # ConvNeXt blocks before and after the transformer layers
    downsample: bool = False           # 2x2 stride-2 conv before the first stage: the layers see a (h/2, w/2) grid
    upsample: bool = False             # 2x2 stride-2 transposed conv after the last stage
    block_num_heads: int = 12          # heads of the stages' cross-attentions
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    attention_dropout: float = 0.0     # dropout of the stages' cross-attentions
    intermediate_size: int = 2816      # GEGLU hidden width of the transformer layers
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64              # side of the token grid the model is made for
    # Not a diffusers argument: pixels per token side of the VQ the model was trained with (AmusedPipeline's
    # vae_scale_factor; 16 for both aMUSEd models). Only the default micro-conditions use it, whose image width and
    # height are in pixels. diffusers ignores the key (with a warning) when it reads a config saved here.
    pixels_per_token: int = 16

    def __post_init__(self) -> None:
        for name in ("hidden_size", "cond_embed_dim", "micro_cond_encode_dim", "micro_cond_embed_dim",
                     "encoder_hidden_size", "in_channels", "block_out_channels", "block_num_heads",
                     "num_hidden_layers", "num_attention_heads", "intermediate_size", "sample_size",
                     "pixels_per_token", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.vocab_size <= self.codebook_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed codebook_size ({self.codebook_size}): "
                             "the mask token is the last id of the vocabulary and must not be a code")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.block_out_channels % self.block_num_heads:
            raise ValueError(f"block_out_channels ({self.block_out_channels}) must be divisible by block_num_heads "
                             f"({self.block_num_heads})")
        if self.micro_cond_encode_dim % 2 or self.micro_cond_embed_dim % self.micro_cond_encode_dim:
            raise ValueError(f"micro_cond_encode_dim ({self.micro_cond_encode_dim}) must be even and divide "
                             f"micro_cond_embed_dim ({self.micro_cond_embed_dim})")
        if self.downsample != self.upsample:
            # diffusers would then return logits on a grid of another size than the tokens'.
            raise ValueError(f"downsample ({self.downsample}) and upsample ({self.upsample}) must be equal")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def mask_token_id(self) -> int:
        """The mask token: the last id of the vocabulary (8255 for aMUSEd, whose scheduler config says the same).
        The ids between the codebook and it are never used."""
        return self.vocab_size - 1

    @property
    def grid_size(self) -> int:
        """h == w of the token grid the model is made for (16 for amused-256)."""
        return self.sample_size

    @property
    def text_dim(self) -> int:
        """Width of the text states it reads (the component interface's name for encoder_hidden_size)."""
        return self.encoder_hidden_size

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector it needs (cond_embed_dim)."""
        return self.cond_embed_dim

    @property
    def num_micro_conds(self) -> int:
        return self.micro_cond_embed_dim // self.micro_cond_encode_dim

    @classmethod
    def from_diffusers_json(cls, data: dict[str, Any], where: str = "config") -> UVit2DConfig:
        """Read the content of a diffusers `config.json` of `UVit2DModel` (see
        `persist.dataclass_from_diffusers_config`: missing keys take diffusers' defaults, an unknown key or another
        `_class_name` raises ValueError)."""
        return dataclass_from_diffusers_config(cls, data, DIFFUSERS_CLASS, source=where)

    def to_diffusers_json(self) -> dict[str, Any]:
        return {"_class_name": DIFFUSERS_CLASS, **dataclasses.asdict(self)}


def micro_conditions(
    batch_size: int, width: int, height: int, crop: tuple[int, int] = (0, 0), aesthetic_score: float = 6.0
) -> Tensor:
    """(B, 5) float micro-conditions in AmusedPipeline's order: image width and height in pixels, the crop coordinates
    (its `micro_conditioning_crop_coord`), the LAION aesthetic score."""
    row = torch.tensor([width, height, crop[0], crop[1], aesthetic_score], dtype=torch.float32)
    return row.expand(batch_size, -1)


def sinusoidal_code(values: Tensor, dim: int) -> Tensor:
    """(N,) values -> (N, dim) codes [cos | sin](value * 10000^(-i / (dim/2))), i < dim/2: diffusers'
    `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`, in float32 whatever the model's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]  # (N, dim / 2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Modulation:
    """adaLN vectors of one norm: its output is norm(x) * (1 + scale) + shift."""

    scale: Tensor  # (B, D)
    shift: Tensor  # (B, D)


@dataclass(frozen=True)
class StageBlockContext:
    """What one ConvNeXt block and its two cross-attentions need: the ConvNeXt output modulation and the keys/values
    of the (mapped) text for each attention."""

    modulation: Modulation  # (B, C) each
    first: KeyValue         # (B, heads, S, C / heads) each
    second: KeyValue


@dataclass(frozen=True)
class LayerContext:
    """What one transformer layer needs: the modulations of its three norms, its cross-attention keys/values."""

    attn_norm: Modulation   # (B, D) each
    cross_norm: Modulation
    mlp_norm: Modulation
    cross: KeyValue         # (B, heads, S, D / heads) each


@dataclass(frozen=True)
class UVitContext:
    """Everything the text and the micro-conditions contribute to a forward pass, for every layer, computed once by
    `UVit2D.text_context`. Same members as `TextContext`: `batch_size`, `select`, `cat`."""

    down: tuple[StageBlockContext, ...]  # one per ConvNeXt block before the transformer layers
    layers: tuple[LayerContext, ...]     # one per transformer layer
    up: tuple[StageBlockContext, ...]    # one per ConvNeXt block after them
    # (B, 1, 1, S) additive attention bias, 0 for real text tokens and -inf for padding; None when every token is
    # real (aMUSEd's CLIP use, which attends to all 77 positions), so attention runs without a mask.
    bias: Tensor | None

    @property
    def batch_size(self) -> int:
        return self.layers[0].cross.keys.shape[0]

    @property
    def text_length(self) -> int:
        return self.layers[0].cross.keys.shape[2]

    def select(self, rows: Tensor | slice) -> UVitContext:
        """The context of the batch rows `rows`: (N,) long indices, in that order, or a slice (views, no copy)."""
        return _map_tensors(self, lambda t: t[rows])

    @staticmethod
    def cat(contexts: Sequence[UVitContext]) -> UVitContext:
        """The contexts' rows one after the other along the batch. They must come from the same model and have the
        same text length; a context without a bias gets a zero one if another has one."""
        if not contexts:
            raise ValueError("cat needs at least one context")
        first = contexts[0]
        for c in contexts[1:]:
            if (len(c.down), len(c.layers), len(c.up), c.text_length) != (
                    len(first.down), len(first.layers), len(first.up), first.text_length):
                raise ValueError("contexts of different models or text lengths cannot be concatenated")
        if all(c.bias is None for c in contexts):
            return _cat_tensors(contexts)
        like = next(c.bias for c in contexts if c.bias is not None)
        filled = [c if c.bias is not None else dataclasses.replace(
            c, bias=like.new_zeros(c.batch_size, 1, 1, c.text_length)) for c in contexts]
        return _cat_tensors(filled)


def _map_tensors(node: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply `fn` to every tensor of a tree of frozen dataclasses and tuples."""
    if node is None:
        return None
    if isinstance(node, Tensor):
        return fn(node)
    if isinstance(node, tuple):
        return tuple(_map_tensors(n, fn) for n in node)
    return type(node)(**{f.name: _map_tensors(getattr(node, f.name), fn) for f in dataclasses.fields(node)})


def _cat_tensors(nodes: Sequence[Any]) -> Any:
    """torch.cat along dim 0 of the matching tensors of trees of the same structure."""
    first = nodes[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(list(nodes), dim=0)
    if isinstance(first, tuple):
        return tuple(_cat_tensors([n[i] for n in nodes]) for i in range(len(first)))
    return type(first)(**{f.name: _cat_tensors([getattr(n, f.name) for n in nodes])
                          for f in dataclasses.fields(first)})


# ----------------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) over the last dim, computed in float32, times a learned gain (none without `affine`)."""

    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return x if self.weight is None else x * self.weight


def modulate(x: Tensor, m: Modulation) -> Tensor:
    """(B, N, D) normalised tokens -> x * (1 + scale) + shift, one (D,) scale and shift per batch row."""
    return x * (1 + m.scale[:, None, :]) + m.shift[:, None, :]


class Attention(nn.Module):
    """Multi-head attention whose keys/values are computed apart (`key_value`), so a fixed memory's are computed once.

    Named like diffusers' `Attention` (to_q, to_k, to_v, to_out.0); to_out.1 is its output dropout."""

    def __init__(self, dim: int, kv_dim: int, heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=bias), nn.Dropout(dropout)])

    def key_value(self, memory: Tensor) -> KeyValue:
        """(B, S, kv_dim) -> keys and values, each (B, heads, S, dim / heads), contiguous for the many reads."""
        B, S, _ = memory.shape
        k = self.to_k(memory).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        v = self.to_v(memory).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        return KeyValue(k.contiguous(), v.contiguous())

    def forward(self, x: Tensor, memory: KeyValue | None = None, bias: Tensor | None = None) -> Tensor:
        """(B, N, dim) queries attending to `memory` (with the (B, 1, 1, S) additive `bias`), or to themselves when
        `memory` is None -> (B, N, dim)."""
        B, N, D = x.shape
        if memory is None:
            memory = self.key_value(x)
        q = self.to_q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        y = F.scaled_dot_product_attention(q, memory.keys, memory.values, attn_mask=bias)  # (B, H, N, Dh)
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.to_out[1](self.to_out[0](y))


class AdaNorm(nn.Module):
    """A norm whose output is modulated by the conditioning vector (diffusers' `AdaLayerNormContinuous`)."""

    def __init__(self, dim: int, cond_dim: int, norm: nn.Module, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim, bias=bias)
        self.norm = norm

    def modulation(self, cond: Tensor) -> Modulation:
        scale, shift = self.linear(F.silu(cond)).chunk(2, dim=1)  # (B, D) each, scale first
        return Modulation(scale, shift)

    def forward(self, x: Tensor, m: Modulation) -> Tensor:
        return modulate(self.norm(x), m)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # the value half first, then the gate
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, dropout: float) -> None:
        super().__init__()
        # net.0 / net.1 / net.2 as in diffusers' FeedForward: GEGLU, dropout, output projection.
        self.net = nn.ModuleList([GEGLU(dim, hidden, bias), nn.Dropout(dropout), nn.Linear(hidden, dim, bias=bias)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class TransformerLayer(nn.Module):
    """Pre-norm layer: self-attention, cross-attention to the text, GEGLU MLP; each norm adaLN-modulated (RMSNorm
    before the attentions, LayerNorm before the MLP, as in diffusers' BasicTransformerBlock with
    norm_type="ada_norm_continuous")."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        D, eps, affine, bias = config.hidden_size, config.layer_norm_eps, config.ln_elementwise_affine, config.use_bias
        heads, drop = config.num_attention_heads, config.hidden_dropout
        self.norm1 = AdaNorm(D, D, RMSNorm(D, eps, affine), bias)
        self.attn1 = Attention(D, D, heads, bias, drop)
        self.norm2 = AdaNorm(D, D, RMSNorm(D, eps, affine), bias)
        self.attn2 = Attention(D, D, heads, bias, drop)
        self.norm3 = AdaNorm(D, D, nn.LayerNorm(D, eps, elementwise_affine=affine, bias=bias), bias)
        self.ff = FeedForward(D, config.intermediate_size, bias, drop)

    def context(self, memory: Tensor, cond: Tensor) -> LayerContext:
        return LayerContext(self.norm1.modulation(cond), self.norm2.modulation(cond), self.norm3.modulation(cond),
                            self.attn2.key_value(memory))

    def forward(self, x: Tensor, ctx: LayerContext, bias: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x, ctx.attn_norm))
        x = x + self.attn2(self.norm2(x, ctx.cross_norm), ctx.cross, bias)
        return x + self.ff(self.norm3(x, ctx.mlp_norm))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on (B, h, w, C): each channel scaled by its l2 norm over the grid relative to the channels'
    mean. It reads the whole grid, so nothing after it in a ConvNeXt block is per token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # (1, 1, 1, C) as in diffusers, so the shapes load strictly.
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNextBlock(nn.Module):
    """Depthwise 3x3 conv, RMSNorm, channel MLP (x4, GELU, GRN), residual, then adaLN modulation of the output."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        C, bias = config.block_out_channels, config.use_bias
        self.depthwise = nn.Conv2d(C, C, kernel_size=3, padding=1, groups=C, bias=bias)
        self.norm = RMSNorm(C, config.layer_norm_eps, config.ln_elementwise_affine)
        self.channelwise_linear_1 = nn.Linear(C, 4 * C, bias=bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(4 * C)
        self.channelwise_linear_2 = nn.Linear(4 * C, C, bias=bias)
        self.channelwise_dropout = nn.Dropout(config.hidden_dropout)
        self.cond_embeds_mapper = nn.Linear(config.hidden_size, 2 * C, bias=bias)

    def modulation(self, cond: Tensor) -> Modulation:
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # (B, C) each, scale first
        return Modulation(scale, shift)

    def forward(self, x: Tensor, m: Modulation) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        y = self.depthwise(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        y = self.channelwise_linear_1(self.norm(y))
        y = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(y)))
        y = self.channelwise_dropout(y).permute(0, 3, 1, 2)  # (B, C, h, w)
        x = x + y
        return x * (1 + m.scale[:, :, None, None]) + m.shift[:, :, None, None]


class StageAttention(nn.Module):
    """Two pre-RMSNorm cross-attentions to the text, no MLP (diffusers' SkipFFTransformerBlock: both of its attentions
    take the text as keys/values). The text is first mapped to the stage width by SiLU + linear when the widths
    differ."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        C, D, bias = config.block_out_channels, config.hidden_size, config.use_bias
        heads, drop = config.block_num_heads, config.attention_dropout
        self.kv_mapper = nn.Linear(D, C, bias=bias) if D != C else None
        # eps and the gain are fixed here in diffusers, whatever layer_norm_eps and ln_elementwise_affine say.
        self.norm1 = RMSNorm(C, 1e-6)
        self.attn1 = Attention(C, C, heads, bias, drop)
        self.norm2 = RMSNorm(C, 1e-6)
        self.attn2 = Attention(C, C, heads, bias, drop)

    def key_values(self, memory: Tensor) -> tuple[KeyValue, KeyValue]:
        """(B, S, D) projected text -> the keys/values of both attentions."""
        if self.kv_mapper is not None:
            memory = self.kv_mapper(F.silu(memory))  # (B, S, C)
        return self.attn1.key_value(memory), self.attn2.key_value(memory)

    def forward(self, x: Tensor, first: KeyValue, second: KeyValue, bias: Tensor | None) -> Tensor:
        """(B, N, C) tokens -> (B, N, C); per token (the keys are text only)."""
        x = x + self.attn1(self.norm1(x), first, bias)
        return x + self.attn2(self.norm2(x), second, bias)


class Downsample(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 conv: (B, C, h, w) -> (B, C, h/2, w/2) for even h, w.

    diffusers pads one zero row and column at the bottom/right first; for even sizes the stride-2 windows never reach
    them, and odd sizes are refused (the upsampled grid would not match), so the pad is left out."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        C = config.block_out_channels
        self.norm = RMSNorm(C, config.layer_norm_eps, config.ln_elementwise_affine)
        self.conv = nn.Conv2d(C, C, kernel_size=2, stride=2, bias=config.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class Upsample(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 transposed conv: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        C = config.block_out_channels
        self.norm = RMSNorm(C, config.layer_norm_eps, config.ln_elementwise_affine)
        self.conv = nn.ConvTranspose2d(C, C, kernel_size=2, stride=2, bias=config.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class Stage(nn.Module):
    """[Downsample,] num_res_blocks x (ConvNeXt block, StageAttention) [, Upsample] on a (B, C, h, w) grid."""

    def __init__(self, config: UVit2DConfig, downsample: bool, upsample: bool) -> None:
        super().__init__()
        self.downsample = Downsample(config) if downsample else None
        self.res_blocks = nn.ModuleList(ConvNextBlock(config) for _ in range(config.num_res_blocks))
        self.attention_blocks = nn.ModuleList(StageAttention(config) for _ in range(config.num_res_blocks))
        self.upsample = Upsample(config) if upsample else None

    def context(self, memory: Tensor, cond: Tensor) -> tuple[StageBlockContext, ...]:
        return tuple(StageBlockContext(res.modulation(cond), *attn.key_values(memory))
                     for res, attn in zip(self.res_blocks, self.attention_blocks))

    def forward(self, x: Tensor, ctx: tuple[StageBlockContext, ...], bias: Tensor | None) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        B, C, h, w = x.shape
        for res, attn, block in zip(self.res_blocks, self.attention_blocks, ctx):
            x = res(x, block.modulation)
            tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
            x = attn(tokens, block.first, block.second, bias).transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class TokenEmbedding(nn.Module):
    """Ids -> embedding -> RMSNorm -> 1x1 conv to the stage width (diffusers' UVit2DConvEmbed)."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.in_channels)
        self.layer_norm = RMSNorm(config.in_channels, config.layer_norm_eps, config.ln_elementwise_affine)
        self.conv = nn.Conv2d(config.in_channels, config.block_out_channels, kernel_size=1, bias=config.use_bias)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, L) ids on an (h, w) grid -> (B, C, h, w)."""
        B, _ = tokens.shape
        x = self.layer_norm(self.embeddings(tokens))  # (B, L, in_channels)
        x = x.transpose(1, 2).reshape(B, -1, *grid)  # (B, in_channels, h, w)
        return self.conv(x)


class ConditionEmbedding(nn.Module):
    """[pooled text; micro-condition codes] -> linear, SiLU, linear -> the conditioning vector (diffusers'
    TimestepEmbedding)."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.linear_1 = nn.Linear(config.cond_embed_dim + config.micro_cond_embed_dim, D, bias=config.use_bias)
        self.linear_2 = nn.Linear(D, D, bias=config.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class MlmHead(nn.Module):
    """1x1 conv, RMSNorm, 1x1 conv to the K codebook logits (diffusers' ConvMlmLayer).

    Every op is per token, so it runs on gathered (B, M, C) tokens: the convs are applied as linear layers (same
    weights, so the state dict keeps its (out, in, 1, 1) shapes)."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        C, E = config.block_out_channels, config.in_channels
        self.conv1 = nn.Conv2d(C, E, kernel_size=1, bias=config.use_bias)
        self.layer_norm = RMSNorm(E, config.layer_norm_eps, config.ln_elementwise_affine)
        self.conv2 = nn.Conv2d(E, config.codebook_size, kernel_size=1, bias=config.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, K)."""
        x = F.linear(x, self.conv1.weight.flatten(1), self.conv1.bias)  # (B, N, in_channels)
        return F.linear(self.layer_norm(x), self.conv2.weight.flatten(1), self.conv2.bias)  # (B, N, K)


# ------------------------------------------------------------------------------------------------------------ model


class UVit2D(nn.Module):
    """aMUSEd's U-ViT over a token grid; see the module docstring. `forward` returns logits over the K codebook ids."""

    def __init__(self, config: UVit2DConfig) -> None:
        super().__init__()
        self.config = config
        D, C, bias = config.hidden_size, config.block_out_channels, config.use_bias
        eps, affine = config.layer_norm_eps, config.ln_elementwise_affine
        self.encoder_proj = nn.Linear(config.encoder_hidden_size, D, bias=bias)
        self.encoder_proj_layer_norm = RMSNorm(D, eps, affine)
        self.embed = TokenEmbedding(config)
        self.cond_embed = ConditionEmbedding(config)
        self.down_block = Stage(config, downsample=config.downsample, upsample=False)
        self.project_to_hidden_norm = RMSNorm(C, eps, affine)
        self.project_to_hidden = nn.Linear(C, D, bias=bias)
        self.transformer_layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.project_from_hidden_norm = RMSNorm(D, eps, affine)
        self.project_from_hidden = nn.Linear(D, C, bias=bias)
        self.up_block = Stage(config, downsample=False, upsample=config.upsample)
        self.mlm_layer = MlmHead(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, 0.02) weights, zero biases, unit norm gains and zero GRN (so each ConvNeXt channel MLP starts
        without its global response term). Loading pretrained weights overwrites all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GlobalResponseNorm):
                nn.init.zeros_(m.gamma)
                nn.init.zeros_(m.beta)

    def text_context(
        self, states: Tensor, mask: Tensor, pooled: Tensor, micro_conds: Tensor | None = None
    ) -> UVitContext:
        """Everything the forward needs from the conditioning, for every layer; compute once per sampling call.

        states: (B, S, encoder_hidden_size) text states (CLIP's penultimate layer for aMUSEd). mask: (B, S) bool,
        True = real token; aMUSEd attends to every position, so its text encoder returns all True (every row needs
        at least one True). pooled: (B, cond_embed_dim) pooled text embedding. micro_conds: (B, num_micro_conds)
        (`micro_conditions`); None means AmusedPipeline's default for the model's own image size:
        `micro_conditions(B, sample_size * pixels_per_token, sample_size * pixels_per_token)`, i.e. (256, 256, 0, 0,
        6) for amused-256. Pass your own for another image size. Gradients flow when training.
        """
        cfg = self.config
        if states.ndim != 3 or states.shape[-1] != cfg.encoder_hidden_size:
            raise ValueError(f"states must be (B, S, {cfg.encoder_hidden_size}), got {tuple(states.shape)}")
        B, S, _ = states.shape
        if S == 0:
            raise ValueError("the text is empty: it needs at least one position")
        if mask.shape != (B, S) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a ({B}, {S}) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        if pooled.shape != (B, cfg.cond_embed_dim):
            raise ValueError(f"pooled must be ({B}, {cfg.cond_embed_dim}), got {tuple(pooled.shape)}")
        if micro_conds is None:
            side = cfg.sample_size * cfg.pixels_per_token
            micro_conds = micro_conditions(B, side, side)
        if micro_conds.shape != (B, cfg.num_micro_conds):
            raise ValueError(f"micro_conds must be ({B}, {cfg.num_micro_conds}), got {tuple(micro_conds.shape)}")
        dtype, device = self.encoder_proj.weight.dtype, self.encoder_proj.weight.device
        # The text encoder may run in another dtype (bf16 CLIP) than this model.
        memory = self.encoder_proj_layer_norm(self.encoder_proj(states.to(dtype)))  # (B, S, D)
        codes = sinusoidal_code(micro_conds.to(device).flatten(), cfg.micro_cond_encode_dim)  # (B * n, encode_dim)
        codes = codes.view(B, cfg.micro_cond_embed_dim)  # (B, n * encode_dim), one condition after the other
        cond = self.cond_embed(torch.cat([pooled.to(dtype), codes.to(dtype)], dim=1))  # (B, D)
        bias = None
        if not bool(mask.all()):
            if not bool(mask.any(dim=1).all()):
                raise ValueError("a text row has no real token (mask all False)")
            bias = torch.zeros(B, 1, 1, S, dtype=dtype, device=device)
            bias = bias.masked_fill(~mask.to(device)[:, None, None, :], float("-inf"))  # (B, 1, 1, S)
        return UVitContext(
            down=self.down_block.context(memory, cond),
            layers=tuple(layer.context(memory, cond) for layer in self.transformer_layers),
            up=self.up_block.context(memory, cond),
            bias=bias,
        )

    def forward(
        self,
        tokens: Tensor,
        context: UVitContext,
        positions: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits over the K codebook ids.

        tokens: (B, L) long ids in [0, vocab_size), `config.mask_token_id` for unknown ones; row-major over an (h, w)
        grid, which is `grid` or else square (even sides when the model downsamples). positions: (B, M) long indices
        into L; when given, the head (1x1 conv, RMSNorm, 1x1 conv to K, the widest layer) runs at those rows only:
        everything before it reads the whole grid (depthwise convs, global response norms). Returns (B, L, K), or
        (B, M, K) with positions.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, L), got {tuple(tokens.shape)}")
        B, L = tokens.shape
        if context.batch_size != B or len(context.layers) != len(self.transformer_layers):
            raise ValueError(
                f"context is for batch {context.batch_size} and {len(context.layers)} layers; "
                f"tokens have batch {B} and the model {len(self.transformer_layers)} layers"
            )
        if positions is not None and (positions.ndim != 2 or positions.shape[0] != B):
            raise ValueError(f"positions must be ({B}, M), got {tuple(positions.shape)}")
        h, w = resolve_grid(L, grid, self.config.grid_size)
        if self.config.downsample and (h % 2 or w % 2):
            raise ValueError(f"this model halves the grid: its sides must be even, got ({h}, {w})")
        x = self.down_block(self.embed(tokens, (h, w)), context.down, context.bias)  # (B, C, h', w')
        _, C, hl, wl = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.flatten(2).transpose(1, 2)))  # (B, h'*w', D)
        for layer, ctx in zip(self.transformer_layers, context.layers):
            x = layer(x, ctx, context.bias)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))  # (B, h'*w', C)
        x = x.transpose(1, 2).reshape(B, C, hl, wl)  # (B, C, h', w')
        x = self.up_block(x, context.up, context.bias)  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, L, C)
        if positions is not None:
            x = gather_rows(x, positions)  # (B, M, C)
        return self.mlm_layer(x)  # (B, L | M, K)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write diffusers' component layout into the directory `path`: config.json and
        diffusion_pytorch_model.safetensors (floating-point weights in `dtype` when given), which diffusers'
        `UVit2DModel.from_pretrained` reads too (it ignores, with a warning, the `weights_sha256` that config.json
        records, as ours checks it)."""
        save_component(path, self.config.to_diffusers_json(), self, dtype=dtype, weights_name=DIFFUSERS_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> UVit2D:
        """Load a diffusers `UVit2DModel` directory (e.g. the `transformer/` folder of an aMUSEd download), strictly,
        in eval mode on the CPU. The weights' SHA-256 is checked when config.json records one, and required inside a
        musegen pipeline directory; a foreign download has none and is read with safetensors (no code runs)."""
        return load_diffusers_component(path, lambda data, where: cls(UVit2DConfig.from_diffusers_json(data, where=where)))
