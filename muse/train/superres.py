"""Train the token super-resolution stage: `muse train configs/superres/emoji-sr.yaml [--resume]`.

The loop both masked-token stages share (`muse/train/loop.py`), on pairs of token grids of one image: the low-res
grid (the image downscaled to `low_resolution`, through `vqgan_low`) conditions, the high-res grid (through
`vqgan_high`) is masked and predicted. The low-res tokens are randomly corrupted (`masking.lowres_corruption`) so the
stage learns to tolerate the base model's mistakes. Exports `run_dir/superres/` (EMA weights when EMA is on).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import save_image

from muse.config import SuperResRun
from muse.train.common import Runtime, evaluating
from muse.train.loop import MaskedStage, train_masked_stage
from muse.train.masked import corrupt_tokens, sample_tokens
from muse.train.tokens import TokenBatch
from superres.model import SuperResTransformer
from transformer.text import TextEmbedding
from vqgan.model import VQGAN

SAMPLE_STEPS = 8      # Muse decodes super-res in 8 steps
SAMPLE_GUIDANCE = 3.0


class LowToHighTokens(nn.Module):
    """The super-res model as one module, so DDP sees the low-res stream, the text path and the high-res path in a
    single forward."""

    def __init__(self, model: SuperResTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, batch: TokenBatch) -> Tensor:
        """high-res tokens (B, Lh) with mask tokens, positions (B, M) -> logits (B, M, K_high)."""
        context = self.model.context(batch.low_tokens, batch.text_states, batch.text_mask)
        return self.model(tokens, context, positions)


def train(cfg: SuperResRun, resume: bool = False, keep_every: int | None = None) -> Path:
    """Train per `cfg` with the shared masked-stage loop (`muse/train/loop.py`); with `resume`, continue exactly from
    `out_dir/checkpoints/last.pt` when it exists. Returns the exported model directory, `out_dir/superres/`."""

    def corrupt(batch: TokenBatch) -> TokenBatch:
        low = corrupt_tokens(batch.low_tokens, cfg.masking.lowres_corruption, cfg.model.low_codebook_size)
        return TokenBatch(batch.tokens, batch.text_states, batch.text_mask, low)

    stage = MaskedStage(
        name="superres",
        build=lambda: SuperResTransformer(cfg.model),
        wrap=LowToHighTokens,
        check_batch=lambda batch: check_batch(batch, cfg),
        load_decoders=lambda rt: load_decoders(cfg, rt),
        save_samples=save_samples,
        corrupt=corrupt,
    )
    return train_masked_stage(cfg, stage, resume, keep_every)


def check_batch(batch: TokenBatch, cfg: SuperResRun) -> None:
    """Fail early, with the numbers, when the data does not fit the model config."""
    if batch.low_tokens is None:
        raise ValueError("the token shards hold no low-res tokens: tokenize them with a superres config")
    for name, tokens, grid, K in (
        ("high-res", batch.tokens, cfg.model.high.grid_size, cfg.model.high.codebook_size),
        ("low-res", batch.low_tokens, cfg.model.low_grid_size, cfg.model.low_codebook_size),
    ):
        if tokens.shape[1] != grid * grid:
            raise ValueError(f"the data has {tokens.shape[1]} {name} tokens per image, the model's {name} grid is "
                             f"{grid}x{grid}; match data.resolution / low_resolution to the model config")
        if int(tokens.max()) >= K:
            raise ValueError(f"the data holds {name} token id {int(tokens.max())}, the model's {name} codebook has "
                             f"{K} entries")
    if batch.text_states.shape[-1] != cfg.model.high.text_dim:
        raise ValueError(f"the text states are {batch.text_states.shape[-1]}-d but model.high.text_dim is "
                         f"{cfg.model.high.text_dim}")


def load_decoders(cfg: SuperResRun, rt: Runtime) -> tuple[VQGAN, VQGAN] | None:
    """(low, high) VQGANs that turn token grids into the sample grid; None (no grids) when either is missing."""
    paths = (Path(cfg.vqgan_low), Path(cfg.vqgan_high))
    if not all((p / "model.safetensors").is_file() for p in paths):
        return None
    return tuple(VQGAN.from_pretrained(p).to(rt.device).eval() for p in paths)


@torch.no_grad()
def save_samples(model: SuperResTransformer, decoders: tuple[VQGAN, VQGAN], batch: TokenBatch,
                 unconditional: TextEmbedding, path: Path, rt: Runtime, seed: int) -> None:
    """Rows: the low-res input (upscaled, bicubic), super-res samples from it, and the real high-res tokens."""
    batch = batch.to(rt.device)
    with evaluating(model):
        tokens = sample_tokens(model, lambda rows: model.context(rows.low_tokens, rows.text_states, rows.text_mask),
                               batch, unconditional, num_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed)
    low_grid, high_grid = model.config.low_grid_size, model.config.high.grid_size
    low_vqgan, high_vqgan = decoders
    real = high_vqgan.decode(batch.tokens.view(-1, high_grid, high_grid))  # (B, 3, H, W)
    fake = high_vqgan.decode(tokens.view(-1, high_grid, high_grid))
    low = low_vqgan.decode(batch.low_tokens.view(-1, low_grid, low_grid))
    low = F.interpolate(low, size=real.shape[-2:], mode="bicubic").clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([low, fake, real]).cpu(), path, nrow=len(batch), normalize=True, value_range=(-1, 1))


__all__ = ["LowToHighTokens", "train", "check_batch", "save_samples"]
