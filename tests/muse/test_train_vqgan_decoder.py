"""Fine-tuning the VQGAN decoder alone (`trainable: decoder`): the encoder and the codebook stay bit for bit, so every
token id keeps its meaning and the transformer stages trained on them stay valid; the decoder learns."""

from pathlib import Path

import pytest
import torch

from muse.config import ConfigError, load_config
from muse.train import vqgan as vqgan_trainer
from vqgan.model import VQGAN

REPO = Path(__file__).resolve().parents[2]


def cfg(data: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "vqgan" / "tiny.yaml",
                       [f"data.path={data}", f"train.out_dir={out}", "train.log_every=1", *extra])


def test_decoder_only_keeps_the_encoder_and_codebook_and_trains_the_decoder(tmp_path):
    from tests.muse.test_train import write_image_folder

    data = write_image_folder(tmp_path / "data")
    base = vqgan_trainer.train(cfg(data, tmp_path / "base", "train.steps=2"))
    tuned = vqgan_trainer.train(cfg(data, tmp_path / "tuned", "train.steps=3", f"train.init_from={base}",
                                    "trainable=decoder", "train.lr=1e-3", "train.warmup_steps=0"))
    before, after = VQGAN.from_pretrained(base).state_dict(), VQGAN.from_pretrained(tuned).state_dict()
    frozen = [k for k in before if not k.startswith("decoder.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "encoder or codebook changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder.")), "decoder unchanged"


def test_trainable_is_checked(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="trainable must be all or decoder"):
        cfg(tmp_path, tmp_path / "out", "trainable=encoder")
