"""`muse data tokenize` on a tiny image folder, then training from the shards (and from the images directly)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from muse.cli import main as cli
from muse.config import load_config
from muse.data.images import ImageTransform, load_rgb
from muse.data.sources import UNCONDITIONAL_FILE
from muse.data.tokens import TokenShardDataset
from muse.train import masked
from transformer.config import TextEncoderConfig
from transformer.text import TextEncoder
from vqgan.model import VQGAN

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An image folder (train + heldout), a tiny untrained VQGAN and a tiny random T5 with a byte tokenizer."""
    root = tmp_path_factory.mktemp("tokenize")
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(7):
        image = Image.new("RGB", (40, 36), ((i * 67) % 256, (i * 131 + 40) % 256, (i * 29 + 90) % 256))
        image.paste((250, 250, 250), (4 * i, 8, 4 * i + 10, 20))
        image.save(images / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"shape {i}", "split": "heldout" if i >= 5 else "train"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    VQGAN(load_config(CONFIGS / "vqgan" / "tiny.yaml").model).save_pretrained(root / "vqgan")
    tokenizer = ByT5Tokenizer()
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    return root


def common_overrides(setup):
    return ["--set", f"data.path={setup / 'images'}", "--set", f"text.name_or_path={setup / 't5'}",
            "--set", "text.kind=t5"]


def test_tokenize_then_train_from_shards(setup, tmp_path):
    out = tmp_path / "tokens"
    cli(["data", "tokenize", "--config", str(CONFIGS / "transformer" / "tiny.yaml"), "--out", str(out),
         "--batch-size", "3", *common_overrides(setup), "--set", f"vqgan={setup / 'vqgan'}",
         "--set", "model.text_dim=32"])
    train, heldout = TokenShardDataset(out / "train"), TokenShardDataset(out / "heldout")
    assert len(train) == 5 and len(heldout) == 2
    assert (out / UNCONDITIONAL_FILE).is_file()

    # Each item is what the VQGAN and the text encoder give for the center-cropped image and its caption.
    vqgan = VQGAN.from_pretrained(setup / "vqgan").eval()
    encoder = TextEncoder(TextEncoderConfig(str(setup / "t5"), kind="t5", max_length=16))
    item = heldout[1]
    image = ImageTransform(16)(load_rgb(setup / "images" / "6.png"))
    assert item["caption"] == "shape 6"
    assert torch.equal(item["tokens"], vqgan.encode(image[None])[0])
    text = encoder(["shape 6"])
    S = int(text.mask[0].sum())
    assert torch.equal(item["text_mask"][:S], text.mask[0, :S]) and not item["text_mask"][S:].any()
    torch.testing.assert_close(item["text_states"][:S], text.states[0, :S].half().float())

    cfg = load_config(CONFIGS / "transformer" / "tiny.yaml", [
        "data.format=tokens", f"data.path={out}", f"text.name_or_path={setup / 't5'}", "text.kind=t5",
        "model.text_dim=32", f"vqgan={setup / 'vqgan'}", "train.steps=2", f"train.out_dir={tmp_path / 'run'}"])
    exported = masked.train(cfg)
    assert (exported / "model.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_superres_tokenize_writes_low_and_high_grids_and_trains(setup, tmp_path):
    out = tmp_path / "tokens"
    cli(["data", "tokenize", "--config", str(CONFIGS / "superres" / "tiny.yaml"), "--out", str(out),
         *common_overrides(setup), "--set", f"vqgan_low={setup / 'vqgan'}", "--set", f"vqgan_high={setup / 'vqgan'}",
         "--set", "model.high.text_dim=32"])
    item = TokenShardDataset(out / "train")[0]
    assert item["tokens"].shape == (8, 8) and item["low_res_tokens"].shape == (4, 4)

    cfg = load_config(CONFIGS / "superres" / "tiny.yaml", [
        "data.format=tokens", f"data.path={out}", f"text.name_or_path={setup / 't5'}", "text.kind=t5",
        "model.high.text_dim=32", f"vqgan_low={setup / 'vqgan'}", f"vqgan_high={setup / 'vqgan'}",
        "train.steps=1", f"train.out_dir={tmp_path / 'run'}"])
    assert (masked.train(cfg) / "model.safetensors").is_file()


def test_transformer_trains_directly_from_images(setup, tmp_path):
    cfg = load_config(CONFIGS / "transformer" / "tiny.yaml", [
        f"data.path={setup / 'images'}", f"text.name_or_path={setup / 't5'}", "text.kind=t5", "model.text_dim=32",
        f"vqgan={setup / 'vqgan'}", "train.steps=2", "train.val_every=2", f"train.out_dir={tmp_path / 'run'}"])
    masked.train(cfg)
    names = {row.split(",")[1] for row in (tmp_path / "run" / "logs" / "scalars.csv").read_text().splitlines()[1:]}
    assert {"train/loss", "train/tokens_per_s", "val/loss@0.5"} <= names


def test_tokenize_refuses_a_vqgan_config(tmp_path):
    with pytest.raises(SystemExit, match="vqgan config"):
        cli(["data", "tokenize", "--config", str(CONFIGS / "vqgan" / "tiny.yaml"), "--out", str(tmp_path)])
