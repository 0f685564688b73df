import dataclasses

import pytest
import torch

from vqgan.config import VQGANLossConfig
from vqgan.losses import (
    PatchDiscriminator,
    VQGANLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from vqgan.model import VQGAN

# 2 discriminator layers accept 16 px images; LPIPS or EfficientNet, whichever loads here.
LOSS = VQGANLossConfig(disc_channels=16, disc_layers=2, disc_start_step=10)


@pytest.fixture(scope="module")
def loss_module():
    return VQGANLoss(LOSS)


@pytest.fixture(scope="module", params=["hinge", "non_saturating"])
def each_adversarial_loss(request):
    return VQGANLoss(dataclasses.replace(LOSS, adversarial_loss=request.param))


def test_every_generator_term_is_finite_and_differentiable(tiny_config, make_images, each_adversarial_loss):
    loss_module = each_adversarial_loss
    model = VQGAN(tiny_config).train()
    images = make_images(2, 16)
    out = model(images)
    g = loss_module.generator_loss(images, out, last_layer=model.last_layer, step=LOSS.disc_start_step)
    assert set(g.terms) == {"l1", "perceptual", "commit", "g_adv", "adaptive_weight", "total"}
    for name, value in g.terms.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        assert not value.requires_grad, name
    assert g.terms["adaptive_weight"] > 0
    # Each term alone sends gradient to the encoder (through the straight-through estimator for the decoder terms).
    recon = out.reconstruction
    for name, term in [
        ("l1", (images - recon).abs().mean()),
        ("perceptual", loss_module.perceptual(images, recon)),
        ("commit", out.commit_loss),
        ("g_adv", loss_module.discriminator(recon).mean()),
    ]:
        model.zero_grad()
        term.backward(retain_graph=True)
        grad = model.encoder.conv_in.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.zero_grad()
    g.total.backward()
    assert torch.isfinite(model.encoder.conv_in.weight.grad).all()


def test_adversarial_term_waits_for_the_discriminator_start(tiny_config, make_images, loss_module):
    model = VQGAN(tiny_config).train()
    images = make_images(2, 16)
    out = model(images)
    assert not loss_module.adversarial_active(LOSS.disc_start_step - 1)
    assert loss_module.adversarial_active(LOSS.disc_start_step)
    early = loss_module.generator_loss(images, out, model.last_layer, step=LOSS.disc_start_step - 1)
    assert "g_adv" not in early.terms
    expected = LOSS.l1_weight * early.terms["l1"] + LOSS.perceptual_weight * early.terms["perceptual"]
    torch.testing.assert_close(early.terms["total"], expected + early.terms["commit"])


def test_zero_adversarial_weight_never_activates_the_discriminator():
    loss = VQGANLoss(VQGANLossConfig(adversarial_weight=0.0, perceptual="none", perceptual_weight=0.0,
                                     disc_start_step=0))
    assert loss.perceptual is None and not loss.adversarial_active(10**6)


def test_generator_loss_without_grad_reports_zero_adaptive_weight(tiny_config, make_images, loss_module):
    model = VQGAN(tiny_config).eval()
    images = make_images(2, 16)
    with torch.no_grad():
        g = loss_module.generator_loss(images, model(images), model.last_layer, step=LOSS.disc_start_step)
    assert g.terms["adaptive_weight"] == 0 and torch.isfinite(g.terms["total"])


def test_discriminator_loss_trains_only_the_discriminator(tiny_config, make_images, loss_module):
    model = VQGAN(tiny_config).train()
    images = make_images(2, 16)
    out = model(images)
    d = loss_module.discriminator_loss(images, out.reconstruction)
    assert set(d.terms) == {"d_loss", "logits_real", "logits_fake"} and torch.isfinite(d.total)
    loss_module.discriminator.zero_grad()
    d.total.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in loss_module.discriminator.parameters())


def test_adversarial_losses_known_values():
    real, fake = torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -2.0)
    assert hinge_d_loss(real, fake) == 0  # both beyond the margin
    assert hinge_d_loss(-real, -fake) == pytest.approx(0.5 * (2.5 + 3.0))
    assert hinge_g_loss(fake) == pytest.approx(2.0)
    logit = torch.zeros(1, 1, 2, 2)
    assert non_saturating_d_loss(logit, logit) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert non_saturating_g_loss(logit) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert non_saturating_g_loss(torch.full((1,), 10.0)) < non_saturating_g_loss(torch.full((1,), -10.0))


def test_adaptive_weight_is_the_gradient_norm_ratio_and_clamped():
    last_layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (3.0 * last_layer).sum()          # gradient norm 3 * sqrt(2)
    g_loss = (0.5 * last_layer).sum()       # gradient norm 0.5 * sqrt(2)
    weight = adaptive_weight(nll, g_loss, last_layer)
    assert not weight.requires_grad and weight.item() == pytest.approx(6.0, rel=1e-3)
    assert adaptive_weight(nll, g_loss, last_layer, max_weight=2.0).item() == 2.0
    flat = (0.0 * last_layer).sum()         # a zero adversarial gradient gives a large but finite weight
    assert torch.isfinite(adaptive_weight(nll, flat, last_layer, max_weight=1e4))


@pytest.mark.parametrize("layers, size, out", [(1, 16, 6), (2, 16, 2), (3, 64, 6)])
def test_patch_discriminator_shapes(layers, size, out):
    disc = PatchDiscriminator(channels=8, layers=layers)
    assert disc(torch.zeros(2, 3, size, size)).shape == (2, 1, out, out)


def test_patch_discriminator_rejects_too_small_images():
    with pytest.raises(ValueError, match="H, W >= 24"):
        PatchDiscriminator(channels=8, layers=3)(torch.zeros(1, 3, 16, 16))
