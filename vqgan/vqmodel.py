"""diffusers' `VQModel` (the aMUSEd VQ-GAN, taming-transformers layout) behind our `VQGAN` interface:
images (B, 3, H, W) in [-1, 1] <-> token ids (B, h, w) in [0, K).

    vq = VQModel.from_pretrained("amused-256/vqvae")   # config.json + diffusion_pytorch_model.safetensors
    ids = vq.encode(images)                            # (B, H/16, W/16) long
    images = vq.decode(ids)                            # (B, 3, H, W) in [-1, 1]

A separate class rather than options on `VQGAN`: parameter names equal diffusers' (the state dict loads strictly, with
no renaming table to keep right), and `VQGAN`'s training machinery (EMA codebook, dead-code re-seeding, a factorised
lookup space with its own projections, l2-normalised codes) has no counterpart here. The differences from `VQGAN`'s
layout, all read from diffusers' code: `layers_per_block` ResNet blocks per encoder level and one more per decoder
level; downsampling by a 3x3 stride-2 conv after padding one zero row/column at the bottom/right only; GroupNorm eps
1e-6 everywhere; a 1x1 `quant_conv` / `post_quant_conv` around the codebook; plain nearest-code (euclidean) lookup.

Pixel range: the aMUSEd weights were trained on images in [0, 1] (AmusedPipeline's image processor does not
normalise), ours speak [-1, 1]. The conversion sits only at the two ends of the public interface, `encode` and
`decode`; the `encoder` and `decoder` submodules work in diffusers' [0, 1], like the weights.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persist import dataclass_from_diffusers_config
from persist.weights import DIFFUSERS_WEIGHTS_NAME, load_diffusers_component, save_component
from vqgan.model import check_ids, check_images

DIFFUSERS_CLASS = "VQModel"
GROUP_NORM_EPS = 1e-6  # fixed in diffusers' Encoder/Decoder, whatever the config says


@dataclass(frozen=True)
class VQModelConfig:
    """The init arguments of diffusers' `VQModel`, with its defaults (read a model's config.json with
    `from_diffusers_json`). aMUSEd: block_out_channels (128, 256, 256, 512, 768) -> factor 16, layers_per_block 2,
    latent_channels 64, num_vq_embeddings 8192.

    Only what the diffusers code supports for the aMUSEd checkpoints is accepted: RGB in and out, SiLU, GroupNorm
    (norm_type "group"), DownEncoderBlock2D / UpDecoderBlock2D blocks. `sample_size`, `scaling_factor`,
    `lookup_from_codebook` and `force_upcast` are kept so configs round-trip but change nothing here: ids are always
    decoded through the codebook, and the model runs in whatever dtype it is moved to.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)  # one entry per resolution level; len n -> factor 2**(n-1)
    layers_per_block: int = 1                    # encoder ResNet blocks per level; the decoder has one more
    act_fn: str = "silu"
    latent_channels: int = 3                     # encoder output / decoder input width
    sample_size: int = 32
    num_vq_embeddings: int = 256                 # K
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None              # code width; None: latent_channels (diffusers' rule)
    scaling_factor: float = 0.18215
    norm_type: str = "group"
    mid_block_add_attention: bool = True         # self-attention between the two middle ResNet blocks
    lookup_from_codebook: bool = False
    force_upcast: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; the dataclass is frozen and hashable only with tuples.
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.in_channels != 3 or self.out_channels != 3:
            raise ValueError(f"only RGB models are supported, got in_channels={self.in_channels}, "
                             f"out_channels={self.out_channels}")
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn 'silu' is supported, got {self.act_fn!r}")
        if self.norm_type != "group":
            raise ValueError(f"only norm_type 'group' is supported, got {self.norm_type!r}")
        n = len(self.block_out_channels)
        if n < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be positive widths, got {self.block_out_channels}")
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"down_block_types must be {n} x 'DownEncoderBlock2D', got {self.down_block_types}")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"up_block_types must be {n} x 'UpDecoderBlock2D', got {self.up_block_types}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width; it does not "
                             f"divide {bad}")
        for name in ("layers_per_block", "latent_channels", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_vq_embeddings < 2:
            raise ValueError(f"num_vq_embeddings must be >= 2, got {self.num_vq_embeddings}")
        if self.vq_embed_dim is not None and self.vq_embed_dim < 1:
            raise ValueError(f"vq_embed_dim must be >= 1 or None, got {self.vq_embed_dim}")

    @property
    def codebook_size(self) -> int:
        return self.num_vq_embeddings

    @property
    def code_dim(self) -> int:
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_json(cls, data: dict[str, Any], where: str = "config") -> VQModelConfig:
        """Read the content of a diffusers `config.json` of `VQModel` (see `persist.dataclass_from_diffusers_config`:
        missing keys take diffusers' defaults, an unknown key or another `_class_name` raises ValueError)."""
        return dataclass_from_diffusers_config(cls, data, DIFFUSERS_CLASS, source=where)

    def to_diffusers_json(self) -> dict[str, Any]:
        return {"_class_name": DIFFUSERS_CLASS, **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in dataclasses.asdict(self).items()}}


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice; a 1x1 `conv_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a (B, C, h, w) map, with a residual; linear projections named
    like diffusers' `Attention` (group_norm, to_q, to_k, to_v, to_out.0)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        y = F.scaled_dot_product_attention(self.to_q(y)[:, None], self.to_k(y)[:, None], self.to_v(y)[:, None])
        y = self.to_out[0](y[:, 0])  # (B, h*w, C)
        # A (B, C, h, w) view with channels-last strides, added in this order, as diffusers does: the sum keeps that
        # layout, and the next conv then takes the same kernel path and rounds the same way.
        return y.transpose(1, 2).view(B, C, h, w) + x  # (B, C, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        # A ModuleList holding None when attention is off, as diffusers does: no parameters, same indices.
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups) if attention else None])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Taming's asymmetric padding: one zero column on the right and one row at the bottom, none on the top/left.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, latent_channels, H/f, W/f)."""

    def __init__(self, config: VQModelConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], width, config.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h*f, w*f) in (about) [0, 1]; layers_per_block + 1 ResNet blocks a level."""

    def __init__(self, config: VQModelConfig) -> None:
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Codebook(nn.Module):
    """K codes of width code_dim; a vector's id is that of its nearest code in euclidean distance."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    def nearest(self, z: Tensor) -> Tensor:
        """(N, code_dim) -> (N,) long ids."""
        # torch.cdist as diffusers computes it, so that near-ties resolve the same way.
        return torch.cdist(z, self.embedding.weight).argmin(dim=1)


class VQModel(nn.Module):
    """Same public interface as `VQGAN`: `encode`, `decode`, `config.codebook_size`, `config.downsample_factor`,
    `save_pretrained` / `from_pretrained`. Inference only: there is no training loss or codebook update."""

    def __init__(self, config: VQModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        self.quantize = Codebook(config.codebook_size, config.code_dim)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier convolutions and projections, zero biases, unit GroupNorms, codes uniform in +-1/K (diffusers'
        codebook init). Loading pretrained weights overwrites all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        K = self.config.codebook_size
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / K, 1.0 / K)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, H/f, W/f) long token ids."""
        check_images(images, self.config.downsample_factor)
        z = self.quant_conv(self.encoder((images + 1) / 2))  # (B, code_dim, h, w); the weights expect [0, 1]
        B, D, h, w = z.shape
        ids = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w,)
        return ids.view(B, h, w)

    def decode(self, ids: Tensor) -> Tensor:
        """(B, h, w) token ids -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        check_ids(ids, self.config.codebook_size)
        # Contiguous: a permuted (channels-last) input sends the conv to another kernel, which rounds differently.
        codes = self.quantize.embedding(ids.long()).permute(0, 3, 1, 2).contiguous()  # (B, code_dim, h, w)
        images = self.decoder(self.post_quant_conv(codes))  # (B, 3, H, W), about [0, 1]
        return (images * 2 - 1).clamp(-1.0, 1.0)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write diffusers' component layout into the directory `path`: config.json and
        diffusion_pytorch_model.safetensors (floating-point weights in `dtype` when given), which diffusers'
        `VQModel.from_pretrained` reads too (it ignores, with a warning, the `weights_sha256` that config.json
        records, as ours checks it)."""
        save_component(path, self.config.to_diffusers_json(), self, dtype=dtype, weights_name=DIFFUSERS_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VQModel:
        """Load a diffusers `VQModel` directory (e.g. the `vqvae/` folder of an aMUSEd download), strictly, in eval
        mode on the CPU. The weights' SHA-256 is checked when config.json records one, and required inside a
        musegen pipeline directory; a foreign download has none and is read with safetensors (no code runs)."""
        return load_diffusers_component(path, lambda data, where: cls(VQModelConfig.from_diffusers_json(data, where=where)))
