"""A tiny random aMUSEd directory, written offline by diffusers' and transformers' own `save_pretrained`, for tests.

    from tests.amused_fixture import write_amused_directory
    root = write_amused_directory(tmp_path / "amused")   # model_index.json, transformer/, vqvae/, text_encoder/,
                                                         # tokenizer/, scheduler/ as in amused/amused-256
The layout is aMUSEd's (VQ factor 16, a U-ViT over a 4x4 grid, so 64 px images; CLIP text encoder with projection;
the mask token is the last vocabulary id, not the codebook size) at widths of 8 to 32, so every test runs on CPU in
seconds. Its pieces are also exposed one by one (`tiny_clip_tokenizer`, `TRANSFORMER`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_LENGTH = 77  # CLIP's context length, which AmusedPipeline pads every prompt to

# vq_embed_dim stays None (codes as wide as the latents), as in aMUSEd: AmusedPipeline decodes ids with a shape of
# latent_channels and fails otherwise.
VQVAE: dict[str, Any] = dict(
    block_out_channels=[8, 8, 8, 8, 16], down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5, layers_per_block=1, latent_channels=8, num_vq_embeddings=32,
    norm_num_groups=4, vq_embed_dim=None, mid_block_add_attention=True, lookup_from_codebook=True, force_upcast=False,
)
CLIP_WIDTH, POOLED_WIDTH = 32, 16
TRANSFORMER: dict[str, Any] = dict(
    hidden_size=32, cond_embed_dim=POOLED_WIDTH, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
    encoder_hidden_size=CLIP_WIDTH, vocab_size=40, codebook_size=32, in_channels=16, block_out_channels=16,
    num_res_blocks=1, downsample=False, upsample=False, block_num_heads=2, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=48, sample_size=4,
)
MASK_TOKEN_ID = TRANSFORMER["vocab_size"] - 1


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single letters and digits (no merges), built in memory: nothing is downloaded.
    Other characters become <|endoftext|>, so keep test prompts to lower-case letters, digits and spaces."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:  # every piece exists alone and as the end of a word ("</w>"), so any word splits into pieces
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)


def tiny_clip_text_encoder(tokenizer, seed: int = 0):
    """A random two-layer CLIPTextModelWithProjection (two layers, so the penultimate state is a real layer's)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=POOLED_WIDTH, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def write_clip(path: Path, seed: int = 0) -> Path:
    """The tiny CLIP text encoder and its tokenizer saved together, like a hub checkpoint."""
    tokenizer = tiny_clip_tokenizer()
    tiny_clip_text_encoder(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm gains about 1), so that no part of a parity test is an identity or a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            gain = name.endswith("weight") and "norm" in name and p.ndim == 1
            p.copy_(noise + 1.0 if gain else noise)
    return module


def write_amused_directory(path: Path, *, downsample: bool = False, seed: int = 0) -> Path:
    """Save a tiny random aMUSEd pipeline (AmusedPipeline.save_pretrained) into `path` and return `path`.
    `downsample` turns on the U-ViT's 2x2 down/up sampling, as in amused-512."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, seed)
    torch.manual_seed(seed)
    vqvae = randomize_(VQModel(**VQVAE), seed + 1, std=0.1).eval()
    transformer = randomize_(UVit2DModel(**{**TRANSFORMER, "downsample": downsample, "upsample": downsample}),
                             seed + 2).eval()
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                          scheduler=AmusedScheduler(mask_token_id=MASK_TOKEN_ID))
    pipe.save_pretrained(path)
    return path
