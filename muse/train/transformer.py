"""Train the base masked transformer: `muse train configs/transformer/emoji-base.yaml [--resume]`.

The loop is the one both masked-token stages share (`muse/train/loop.py`); this file says what is particular to the
base stage: the model, its text-only conditioning, the data checks and the sample grid (real images above samples).
Exports `run_dir/transformer/` (EMA weights when EMA is on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from muse.config import TransformerRun
from muse.train.common import Runtime, evaluating
from muse.train.loop import MaskedStage, train_masked_stage
from muse.train.masked import sample_tokens
from muse.train.tokens import TokenBatch
from transformer.model import MaskedTransformer
from transformer.text import TextEmbedding
from vqgan.model import VQGAN

SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 3.0


class TextToTokens(nn.Module):
    """The base model as one module, so DDP sees the text projection and the token path in a single forward."""

    def __init__(self, model: MaskedTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, batch: TokenBatch) -> Tensor:
        """tokens (B, L) with mask tokens, positions (B, M) -> logits (B, M, K)."""
        context = self.model.text_context(batch.text_states, batch.text_mask)
        return self.model(tokens, context, positions)


def train(cfg: TransformerRun, resume: bool = False, keep_every: int | None = None) -> Path:
    """Train per `cfg` with the shared masked-stage loop (`muse/train/loop.py`); with `resume`, continue exactly from
    `out_dir/checkpoints/last.pt` when it exists. Returns the exported model directory, `out_dir/transformer/`."""
    stage = MaskedStage(
        name="transformer",
        build=lambda: MaskedTransformer(cfg.model),
        wrap=TextToTokens,
        check_batch=lambda batch: check_batch(batch, cfg),
        load_decoders=lambda rt: load_decoder(cfg.vqgan, rt),
        save_samples=save_samples,
    )
    return train_masked_stage(cfg, stage, resume, keep_every)


def check_batch(batch: TokenBatch, cfg: TransformerRun) -> None:
    """Fail early, with the numbers, when the data does not fit the model config."""
    grid = cfg.model.grid_size
    if batch.tokens.shape[1] != grid * grid:
        raise ValueError(f"the data has {batch.tokens.shape[1]} tokens per image, model.grid_size={grid} expects "
                         f"{grid * grid} ({grid}x{grid}); set data.resolution or model.grid_size to match the VQGAN")
    if int(batch.tokens.max()) >= cfg.model.codebook_size:
        raise ValueError(f"the data holds token id {int(batch.tokens.max())} but model.codebook_size is "
                         f"{cfg.model.codebook_size}: set it to the VQGAN's codebook size")
    if batch.text_states.shape[-1] != cfg.model.text_dim:
        raise ValueError(f"the text states are {batch.text_states.shape[-1]}-d but model.text_dim is "
                         f"{cfg.model.text_dim}")


def load_decoder(path: str, rt: Runtime) -> VQGAN | None:
    """The VQGAN that turns sampled tokens into the sample grid; None (no grids) when it is not there."""
    if not (Path(path) / "model.safetensors").is_file():
        return None
    return VQGAN.from_pretrained(path).to(rt.device).eval()


@torch.no_grad()
def save_samples(model: MaskedTransformer, vqgan: VQGAN, batch: TokenBatch, unconditional: TextEmbedding,
                 path: Path, rt: Runtime, seed: int) -> None:
    """Validation images (top row) above samples for their captions (bottom row), fixed seeds."""
    batch = batch.to(rt.device)
    with evaluating(model):
        tokens = sample_tokens(model, lambda rows: model.text_context(rows.text_states, rows.text_mask), batch,
                               unconditional, num_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed)
    grid = model.config.grid_size
    real = vqgan.decode(batch.tokens.view(-1, grid, grid))  # (B, 3, H, W)
    fake = vqgan.decode(tokens.view(-1, grid, grid))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([real, fake]).cpu(), path, nrow=len(batch), normalize=True, value_range=(-1, 1))


__all__ = ["TextToTokens", "train", "check_batch", "save_samples"]
