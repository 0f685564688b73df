"""Train the base masked transformer: `muse train configs/transformer/emoji-base.yaml [--resume]`.

One loop, top to bottom: setup -> model, EMA -> data (token shards, or images tokenized on the fly) -> loop
(variable-ratio masking, text dropout, loss on masked positions, logging, fixed-ratio validation, sample grids,
checkpoints) -> export to `run_dir/transformer/` (EMA weights when EMA is on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from muse.config import TransformerRun
from muse.train.batches import BatchStream
from muse.train.checkpoint import collect_state, prepare_run_dir, restore_state, write_checkpoint
from muse.train.common import (
    EMA,
    Runtime,
    autocast,
    build_optimizer,
    build_scheduler,
    evaluating,
    mean_across_ranks,
    setup,
    step_optimizer,
    teardown,
    wrap_ddp,
)
from muse.train.logger import Meter, TrainLogger
from muse.train.masked import FixedRatioValidation, masked_loss, sample_tokens, text_dropout, training_mask
from muse.train.tokens import TokenBatch, TokenSource
from transformer.model import MaskedTransformer
from transformer.text import TextEmbedding
from vqgan.model import VQGAN

VAL_ITEMS = 256       # fixed validation grids for the fixed-ratio losses
SAMPLE_ITEMS = 8      # sample grid: this many validation captions, real images above samples
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
    """Train per `cfg`; with `resume`, continue exactly from `out_dir/checkpoints/last.pt` when it exists.
    `keep_every` also keeps a checkpoint copy every that many steps. Returns the exported model directory."""
    rt = setup(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)

    # Model and EMA copy (taken after DDP has given every rank rank 0's weights).
    model = MaskedTransformer(cfg.model).to(rt.device)
    net = wrap_ddp(TextToTokens(model), rt)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    mask_id = cfg.model.mask_token_id

    # Data: token shards, or images tokenized on the fly; fixed validation grids with fixed masks.
    source = TokenSource(cfg, rt.device, cfg.train.seed)
    batches = BatchStream(source.train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                          world_size=rt.world_size, num_workers=cfg.data.num_workers)
    val_batch = source.validation(VAL_ITEMS, cfg.train.batch_size) if rt.is_main else None
    if val_batch is not None:
        check_batch(val_batch, cfg)
        validation = FixedRatioValidation(val_batch, cfg.masking.val_ratios, mask_token_id=mask_id,
                                          seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    vqgan = load_decoder(cfg.vqgan, rt) if rt.is_main and val_batch is not None else None

    components = {"transformer": model, "optimizer": optimizer, "scheduler": scheduler}
    if ema is not None:
        components["ema"] = ema
    step = restore_state(saved, components, batches, rt) if saved else 0

    log = TrainLogger(run_dir, cfg.train.logger, is_main=rt.is_main, total_steps=cfg.train.steps, start_step=step)
    log.info(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, data "
             f"{cfg.data.format} ({len(source.train_set) if hasattr(source.train_set, '__len__') else '?'} items), "
             f"{'resuming at step ' + str(step) if step else 'starting'} on {rt.world_size} x {rt.device}")
    if val_batch is None:
        log.info("no validation set: fixed-ratio validation and sample grids are skipped")
    meter = Meter()
    net.train()
    while step < cfg.train.steps:
        batch = source.batch(next(batches))
        if step == 0:
            check_batch(batch, cfg)
        batch = text_dropout(batch, source.unconditional, cfg.masking.text_dropout)
        mask = training_mask(batch, cfg.masking)
        with autocast(rt, cfg.train):
            out = masked_loss(net, batch, mask, mask_id, cfg.masking.label_smoothing)
        grad_norm = step_optimizer(out.loss, optimizer, scheduler, cfg.train.grad_clip)
        if ema is not None:
            ema.update(model)
        step += 1
        meter.add({"loss": float(out.loss.detach()), "accuracy": float(out.accuracy), "masked_fraction":
                   out.num_masked / batch.tokens.numel(), "grad_norm": grad_norm}, items=batch.tokens.numel())
        log.advance({"loss": float(out.loss.detach())})

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            means, rate = meter.summary()
            means = mean_across_ranks(means, rt)
            log.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                               "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": rate * rt.world_size})
        eval_model = ema.model if ema is not None else model
        if val_batch is not None and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
            with evaluating(eval_model):
                log.scalars(step, validation.evaluate(TextToTokens(eval_model), rt.device))
        if vqgan is not None and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
            save_samples(eval_model, vqgan, val_batch.select(slice(0, SAMPLE_ITEMS)), source.unconditional,
                         run_dir / "samples" / f"step-{step:07d}.png", rt, cfg.train.seed)
        if step % cfg.train.save_every == 0 or step == cfg.train.steps:
            write_checkpoint(run_dir, collect_state(step, components, batches, cfg, rt), keep_every)
            if rt.is_main:
                eval_model.save_pretrained(run_dir / "transformer")

    log.close()
    teardown(rt)
    return run_dir / "transformer"


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
        tokens = sample_tokens(TextToTokens(model), batch, unconditional, mask_token_id=model.config.mask_token_id,
                               num_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed)
    grid = model.config.grid_size
    real = vqgan.decode(batch.tokens.view(-1, grid, grid))  # (B, 3, H, W)
    fake = vqgan.decode(tokens.view(-1, grid, grid))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([real, fake]).cpu(), path, nrow=len(batch), normalize=True, value_range=(-1, 1))


__all__ = ["TextToTokens", "train", "check_batch", "save_samples"]
