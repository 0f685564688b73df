"""Configs of the VQGAN tokenizer and of its training losses.

`VQGANConfig` builds the model and is saved beside its weights; `VQGANLossConfig` only shapes training (loss weights,
perceptual backbone, discriminator) and is never needed to tokenize or decode.
"""

from __future__ import annotations

from dataclasses import dataclass

DOWNSAMPLE_FACTORS = (4, 8, 16)
PERCEPTUAL_BACKBONES = ("auto", "lpips", "efficientnet", "none")
ADVERSARIAL_LOSSES = ("hinge", "non_saturating")


@dataclass(frozen=True)
class VQGANConfig:
    """Encoder / quantizer / decoder shape.

    The defaults are the proposed `emoji-f8` preset: 64 px images -> 8x8 tokens, 3.1M parameters, small enough to
    train on a 2-core CPU in under two hours.
    """

    resolution: int = 64                    # training image size; the model is fully convolutional, so any multiple
                                            # of `downsample_factor` can be encoded
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one entry per resolution level; len n -> factor 2**(n-1)
    num_res_blocks: int = 1                 # ResNet blocks per level (encoder and decoder alike)
    codebook_size: int = 1024               # K
    codebook_dim: int = 8                   # low-dimensional (factorized) space where codes are looked up
    latent_channels: int = 128              # encoder output width, projected down to codebook_dim by the quantizer
    l2_normalize_codes: bool = True         # cosine-similarity lookup on the unit sphere (ViT-VQGAN)
    commitment_weight: float = 0.25         # applied by the quantizer: VQGANOutput.commit_loss is already scaled
    codebook_decay: float = 0.99            # EMA decay of the codebook
    dead_code_threshold: float = 0.25       # codes used less than this many times per batch (EMA) are re-seeded
                                            # from the batch; keep it well below the mean usage B*h*w/K
    attn_at_lowest: bool = True             # self-attention block at the token-grid resolution
    dropout: float = 0.0
    norm_groups: int = 16                   # GroupNorm groups; every width base_channels * mult must divide by it
    # How the decoder's output convolution (features -> pixels) pads: "zeros" (the usual), or "replicate", which
    # extends the border's own features. Why: with zeros each corner pixel is computed from five padded zeros of nine,
    # a position the decoder can tell apart and tint; the GAN-trained emoji decoder drew a green top-left pixel in
    # every image. Only the output convolution: at the 8x8 token grid most positions touch a border, and replicating
    # there (tried) cost a trained decoder 5 dB that a short fine-tune did not win back.
    output_padding: str = "zeros"

    def __post_init__(self) -> None:
        # YAML/JSON give lists; the dataclass is frozen and hashable only with a tuple.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.downsample_factor not in DOWNSAMPLE_FACTORS:
            raise ValueError(
                f"downsampling factor must be 4, 8 or 16 (channel_mult of length 3, 4 or 5); "
                f"channel_mult={self.channel_mult} gives factor {self.downsample_factor}"
            )
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {self.channel_mult}")
        if self.resolution < 1 or self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution must be a positive multiple of the downsampling factor {self.downsample_factor}, "
                f"got {self.resolution}"
            )
        if self.output_padding not in ("zeros", "replicate"):
            raise ValueError(f"output_padding must be zeros or replicate, got {self.output_padding!r}")
        if self.base_channels < 1 or self.num_res_blocks < 1 or self.latent_channels < 1:
            raise ValueError("base_channels, num_res_blocks and latent_channels must be >= 1")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {self.codebook_dim}")
        if self.commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {self.commitment_weight}")
        if not 0.0 < self.codebook_decay <= 1.0:
            raise ValueError(f"codebook_decay must be in (0, 1], got {self.codebook_decay}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.norm_groups]
        if self.norm_groups < 1 or bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide every width base_channels * channel_mult; "
                f"it does not divide {bad}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class VQGANLossConfig:
    """Weights and parts of the generator-side loss, and the discriminator shape.

    The commitment loss has no weight here: the quantizer applies `VQGANConfig.commitment_weight` itself, so
    `VQGANOutput.commit_loss` enters the total as is.
    """

    l1_weight: float = 1.0
    # L1 at pixels within `border_width` of the image's edge weighs (1 + border_weight) times. Why: a corner pixel
    # carries 1/4096 of a 64 px image's L1, so a decoder can leave a constant tint there (zero padding makes the
    # corners easy to tell apart) at no visible cost to the loss -- the emoji decoder drew a green top-left pixel.
    border_weight: float = 0.0
    border_width: int = 2
    perceptual_weight: float = 1.0
    perceptual: str = "auto"                # auto: LPIPS if its backbone loads offline, else EfficientNet-Lite0
    lpips_net: str = "vgg"                  # LPIPS backbone: vgg | alex | squeeze
    adversarial_weight: float = 0.1         # multiplied by the adaptive (gradient-norm ratio) weight
    adversarial_loss: str = "hinge"         # hinge | non_saturating
    disc_start_step: int = 2000             # the adversarial term and discriminator updates begin at this step
    disc_channels: int = 32                 # width of the first discriminator layer, doubled per layer (max x8)
    disc_layers: int = 3                    # stride-2 layers of the PatchGAN discriminator
    adaptive_weight_max: float = 1e4        # clamp of the adaptive weight (Taming)

    def __post_init__(self) -> None:
        if self.border_width < 1:
            raise ValueError(f"border_width must be >= 1, got {self.border_width}")
        for name in ("l1_weight", "border_weight", "perceptual_weight", "adversarial_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.perceptual not in PERCEPTUAL_BACKBONES:
            raise ValueError(f"perceptual must be one of {PERCEPTUAL_BACKBONES}, got {self.perceptual!r}")
        if self.perceptual == "none" and self.perceptual_weight > 0:
            raise ValueError(
                f"perceptual='none' but perceptual_weight={self.perceptual_weight}; set perceptual_weight to 0 "
                "to train without a perceptual loss"
            )
        if self.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ValueError(f"lpips_net must be vgg, alex or squeeze, got {self.lpips_net!r}")
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial_loss must be one of {ADVERSARIAL_LOSSES}, got {self.adversarial_loss!r}")
        if self.disc_start_step < 0:
            raise ValueError(f"disc_start_step must be >= 0, got {self.disc_start_step}")
        if self.disc_channels < 8 or self.disc_channels % 8:
            raise ValueError(f"disc_channels must be a positive multiple of 8 (GroupNorm groups), got "
                             f"{self.disc_channels}")
        if self.disc_layers < 1:
            raise ValueError(f"disc_layers must be >= 1, got {self.disc_layers}")
        if self.adaptive_weight_max <= 0:
            raise ValueError(f"adaptive_weight_max must be > 0, got {self.adaptive_weight_max}")
