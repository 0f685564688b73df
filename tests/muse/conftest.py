"""A tiny random pipeline for the pipeline, CLI and server tests: 16 px VQGAN (4 px per token, 4x4 grid, K=16),
a one-layer width-32 transformer, a one-layer T5 encoder built from a config with a word-piece vocabulary written
here (nothing is downloaded), and a one-layer super-res stage over an 8x8 grid that reuses the VQGAN at 32 px."""

from pathlib import Path

import pytest
import torch

from superres.config import SuperResConfig
from transformer.config import TextEncoderConfig, TransformerConfig
from vqgan.config import VQGANConfig

# The models (and Hugging Face) are imported inside the fixtures: this conftest is loaded for every test in
# tests/muse, most of which never build a pipeline.

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the of with and in on red green blue yellow apple dog cat face sky sunny "
    "tree house car blurry ugly"
).split()
VQGAN_CONFIG = VQGANConfig(
    resolution=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, codebook_size=16, codebook_dim=4,
    latent_channels=8, norm_groups=4, attn_at_lowest=False,
)
TEXT_DIM = 16
BASE_CONFIG = TransformerConfig(codebook_size=16, grid_size=4, width=32, depth=1, num_heads=2, mlp_ratio=2.0,
                                text_dim=TEXT_DIM)
SUPERRES_CONFIG = SuperResConfig(
    high=TransformerConfig(codebook_size=16, grid_size=8, width=32, depth=1, num_heads=2, mlp_ratio=2.0,
                           text_dim=TEXT_DIM),
    low_codebook_size=16, low_grid_size=4, low_depth=1, aligned_low=True,
)


def write_text_encoder(path: Path) -> Path:
    """A random one-layer T5 encoder and a BERT word-piece tokenizer over WORDS, saved as a Hugging Face directory."""
    from transformers import BertTokenizerFast, T5Config, T5EncoderModel

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    return path


def opinionated(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights large enough that the text and the tokens visibly move the logits (the 0.02 init of a fresh
    model gives nearly uniform logits, which would make guidance and negative prompts untestable)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return model


def build_pipeline(text_dir: Path, superres: bool):
    from muse.options import SamplingOptions
    from muse.pipeline import MusePipeline, PipelineConfig
    from superres.model import SuperResTransformer
    from transformer.model import MaskedTransformer
    from transformer.text import TextEncoder
    from vqgan.model import VQGAN

    # Few steps keep tests fast; guidance on so both branches are exercised by default.
    config = PipelineConfig(sampling=SamplingOptions(num_steps=4, guidance_scale=3.0, superres_steps=3), seam=2)
    torch.manual_seed(1)
    vqgan = VQGAN(VQGAN_CONFIG)
    transformer = opinionated(MaskedTransformer(BASE_CONFIG))
    sr = opinionated(SuperResTransformer(SUPERRES_CONFIG)) if superres else None
    text = TextEncoder(TextEncoderConfig(str(text_dir), kind="t5", max_length=8))
    return MusePipeline(vqgan, text, transformer, superres=sr, config=config)


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory) -> Path:
    return write_text_encoder(tmp_path_factory.mktemp("t5") / "encoder")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, text_encoder_dir) -> Path:
    """A saved single-stage pipeline (16 px images)."""
    path = tmp_path_factory.mktemp("pipeline") / "tiny"
    build_pipeline(text_encoder_dir, superres=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    """The single-stage pipeline, loaded from its saved directory."""
    from muse.pipeline import MusePipeline

    return MusePipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def tiny_cascade(text_encoder_dir):
    """Base 4x4 grid (16 px) -> super-res 8x8 grid (32 px), both through the same VQGAN."""
    return build_pipeline(text_encoder_dir, superres=True)
