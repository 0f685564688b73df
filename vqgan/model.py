"""VQGAN image tokenizer: images (B, 3, H, W) in [-1, 1] <-> token ids (B, h, w) in [0, K).

Encoder and decoder are convolutional ResNets (GroupNorm + SiLU) with one self-attention block at the token-grid
resolution; the quantizer is `vector_quantize_pytorch.VectorQuantize` with an EMA codebook, a low-dimensional
(factorized) lookup space, optional l2-normalised codes and dead-code re-seeding.

    model = VQGAN(VQGANConfig())
    ids = model.encode(images)          # (B, h, w) long, h = H / model.config.downsample_factor
    images = model.decode(ids)          # (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from persist.weights import load_component_weights, read_component_dataclass, save_component

from .config import VQGANConfig


@dataclass
class VQGANOutput:
    reconstruction: Tensor  # (B, 3, H, W), not clamped, so that losses see the decoder's real output
    ids: Tensor             # (B, h, w) long
    commit_loss: Tensor     # scalar, already scaled by config.commitment_weight; zero in eval mode (the quantizer
                            # computes it only while training)


@dataclass
class CodebookUsage:
    counts: Tensor          # (K,) long, how often each code occurs
    num_used: int           # codes that occur at least once
    fraction_used: float    # num_used / K
    perplexity: float       # exp(entropy) of the code histogram: K when uniform, 1 when one code is used


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a (B, D, h, w) feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "B (n D) h w -> n B (h w) D", n=3)  # 3 x (B, h*w, D)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "B (h w) D -> B D h w", h=height, w=width)  # (B, D, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, config: VQGANConfig) -> nn.Sequential:
    attn = AttnBlock(channels, config.norm_groups) if config.attn_at_lowest else nn.Identity()
    return nn.Sequential(
        ResBlock(channels, channels, config.norm_groups, config.dropout),
        attn,
        ResBlock(channels, channels, config.norm_groups, config.dropout),
    )


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, latent_channels, H/f, W/f); one stride-2 step between consecutive levels."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(channels, width, config.norm_groups, config.dropout))
                channels = width
            if level < len(widths) - 1:
                layers.append(Downsample(channels))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(channels, config)
        self.norm_out = nn.GroupNorm(config.norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h*f, w*f); mirrors the encoder."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
        self.mid = _middle(channels, config)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(channels, widths[level], config.norm_groups, config.dropout))
                channels = widths[level]
            if level > 0:
                layers.append(Upsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(config.norm_groups, channels)
        # The weights are the same whatever the padding: a saved decoder can switch and be fine-tuned.
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1, padding_mode=config.output_padding)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def check_images(images: Tensor, factor: int) -> None:
    """Refuse what no tokenizer encodes: not (B, 3, H, W), not floating point, or H and W not positive multiples of
    the downsampling `factor`. Shared by every tokenizer kind (this VQGAN and aMUSEd's VQModel)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    height, width = images.shape[-2:]
    if height % factor or width % factor or height == 0 or width == 0:
        raise ValueError(f"image height and width must be positive multiples of the downsampling factor {factor}, "
                         f"got {height}x{width}")


def check_ids(ids: Tensor, codebook_size: int) -> None:
    """Refuse token ids no tokenizer decodes: not (B, h, w), not integers, or outside [0, codebook_size)."""
    if ids.ndim != 3:
        raise ValueError(f"ids must have shape (B, h, w), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    K = codebook_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= K):
        raise ValueError(f"ids must lie in [0, {K}), got values in [{int(ids.min())}, {int(ids.max())}]")


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantize(
            dim=config.latent_channels,
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            use_cosine_sim=config.l2_normalize_codes,
            decay=config.codebook_decay,
            commitment_weight=config.commitment_weight,
            threshold_ema_dead_code=config.dead_code_threshold,
        )
        self.decoder = Decoder(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier convolutions and projections, zero biases, and a zero last layer in every residual branch so each
        block starts as the identity (stable early training without normalisation tricks). The codebook itself is a
        buffer that the quantizer initialises (random unit vectors when codes are l2-normalised) and updates by EMA."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, AttnBlock):
                nn.init.zeros_(module.proj.weight)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output convolution: the adaptive GAN weight compares gradient norms here."""
        return self.decoder.conv_out.weight

    def _quantize(self, z: Tensor, freeze_codebook: bool) -> tuple[Tensor, Tensor, Tensor]:
        height, width = z.shape[-2:]
        z = rearrange(z, "B D h w -> B (h w) D")  # (B, L, D)
        quantized, ids, commit_loss = self.quantizer(z, freeze_codebook=freeze_codebook)
        quantized = rearrange(quantized, "B (h w) D -> B D h w", h=height, w=width)  # (B, D, h, w)
        ids = rearrange(ids, "B (h w) -> B h w", h=height, w=width)  # (B, h, w)
        return quantized, ids, commit_loss

    def forward(self, images: Tensor, freeze_codebook: bool = False) -> VQGANOutput:
        """Reconstruct (B, 3, H, W) images through the codebook. In training mode this also updates the EMA codebook
        and re-seeds dead codes, unless `freeze_codebook` (fine-tuning the decoder alone, so that every token id keeps
        its meaning); gradients reach the encoder through the straight-through estimator."""
        check_images(images, self.config.downsample_factor)
        quantized, ids, commit_loss = self._quantize(self.encoder(images), freeze_codebook=freeze_codebook)
        return VQGANOutput(reconstruction=self.decoder(quantized), ids=ids, commit_loss=commit_loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, H/f, W/f) long token ids. Never changes the codebook."""
        check_images(images, self.config.downsample_factor)
        _, ids, _ = self._quantize(self.encoder(images), freeze_codebook=True)
        return ids

    def decode(self, ids: Tensor) -> Tensor:
        """(B, h, w) token ids -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        check_ids(ids, self.config.codebook_size)
        height, width = ids.shape[-2:]
        codes = self.quantizer.get_output_from_indices(rearrange(ids.long(), "B h w -> B (h w)"))  # (B, L, D)
        codes = rearrange(codes, "B (h w) D -> B D h w", h=height, w=width)  # (B, D, h, w)
        return self.decoder(codes).clamp(-1.0, 1.0)

    def codebook_usage(self, ids: Tensor) -> CodebookUsage:
        """Statistics of the codes in `ids` (any shape, values in [0, K)), e.g. the ids of a validation set."""
        K = self.config.codebook_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= K):
            raise ValueError(f"ids must lie in [0, {K}), got values in [{int(ids.min())}, {int(ids.max())}]")
        counts = torch.bincount(ids.flatten().long().cpu(), minlength=K)
        probs = counts.double() / counts.sum().clamp(min=1)
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        num_used = int((counts > 0).sum())
        return CodebookUsage(counts=counts, num_used=num_used, fraction_used=num_used / K,
                             perplexity=float(entropy.exp()))

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write `config.json` and `model.safetensors` into the directory `path` (created if needed), atomically;
        floating-point weights in `dtype` when given. config.json records the weights file's SHA-256, checked on
        load, so a damaged copy is an error instead of silently different images."""
        save_component(path, self.config, self, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VQGAN:
        """Load a directory written by `save_pretrained`; reads only its config.json and model.safetensors, and
        refuses weights that do not match the SHA-256 the config records (or a config that records none)."""
        config, digest = read_component_dataclass(path, VQGANConfig)
        model = cls(config)
        load_component_weights(path, model, digest)
        return model
