"""Train the token super-resolution stage: `muse train configs/superres/emoji-sr.yaml [--resume]`.

The same loop as the base stage (`muse/train/transformer.py`), on pairs of token grids of one image: the low-res
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
from muse.train.masked import (
    FixedRatioValidation,
    corrupt_tokens,
    masked_loss,
    sample_tokens,
    text_dropout,
    training_mask,
)
from muse.train.tokens import TokenBatch, TokenSource
from superres.model import SuperResTransformer
from transformer.text import TextEmbedding
from vqgan.model import VQGAN

VAL_ITEMS = 256       # fixed validation pairs for the fixed-ratio losses
SAMPLE_ITEMS = 8      # sample grid columns
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
    """Train per `cfg`; with `resume`, continue exactly from `out_dir/checkpoints/last.pt` when it exists.
    `keep_every` also keeps a checkpoint copy every that many steps. Returns the exported model directory."""
    rt = setup(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)

    # Model and EMA copy (taken after DDP has given every rank rank 0's weights).
    model = SuperResTransformer(cfg.model).to(rt.device)
    net = wrap_ddp(LowToHighTokens(model), rt)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    mask_id = cfg.model.mask_token_id

    # Data: (low, high) token pairs from shards, or images tokenized on the fly at both resolutions.
    source = TokenSource(cfg, rt.device, cfg.train.seed)
    batches = BatchStream(source.train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                          world_size=rt.world_size, num_workers=cfg.data.num_workers)
    val_batch = source.validation(VAL_ITEMS, cfg.train.batch_size) if rt.is_main else None
    if val_batch is not None:
        check_batch(val_batch, cfg)
        validation = FixedRatioValidation(val_batch, cfg.masking.val_ratios, mask_token_id=mask_id,
                                          seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    decoders = load_decoders(cfg, rt) if rt.is_main and val_batch is not None else None

    components = {"superres": model, "optimizer": optimizer, "scheduler": scheduler}
    if ema is not None:
        components["ema"] = ema
    step = restore_state(saved, components, batches, rt) if saved else 0

    log = TrainLogger(run_dir, cfg.train.logger, is_main=rt.is_main, total_steps=cfg.train.steps, start_step=step)
    log.info(f"superres: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, data "
             f"{cfg.data.format}, {'resuming at step ' + str(step) if step else 'starting'} on "
             f"{rt.world_size} x {rt.device}")
    if val_batch is None:
        log.info("no validation set: fixed-ratio validation and sample grids are skipped")
    meter = Meter()
    net.train()
    while step < cfg.train.steps:
        batch = source.batch(next(batches))
        if step == 0:
            check_batch(batch, cfg)
        low = corrupt_tokens(batch.low_tokens, cfg.masking.lowres_corruption, cfg.model.low_codebook_size)
        batch = text_dropout(TokenBatch(batch.tokens, batch.text_states, batch.text_mask, low),
                             source.unconditional, cfg.masking.text_dropout)
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
                log.scalars(step, validation.evaluate(LowToHighTokens(eval_model), rt.device))
        if decoders is not None and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
            save_samples(eval_model, decoders, val_batch.select(slice(0, SAMPLE_ITEMS)), source.unconditional,
                         run_dir / "samples" / f"step-{step:07d}.png", rt, cfg.train.seed)
        if step % cfg.train.save_every == 0 or step == cfg.train.steps:
            write_checkpoint(run_dir, collect_state(step, components, batches, cfg, rt), keep_every)
            if rt.is_main:
                eval_model.save_pretrained(run_dir / "superres")

    log.close()
    teardown(rt)
    return run_dir / "superres"


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
        tokens = sample_tokens(LowToHighTokens(model), batch, unconditional, mask_token_id=model.config.mask_token_id,
                               num_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed)
    low_grid, high_grid = model.config.low_grid_size, model.config.high.grid_size
    low_vqgan, high_vqgan = decoders
    real = high_vqgan.decode(batch.tokens.view(-1, high_grid, high_grid))  # (B, 3, H, W)
    fake = high_vqgan.decode(tokens.view(-1, high_grid, high_grid))
    low = low_vqgan.decode(batch.low_tokens.view(-1, low_grid, low_grid))
    low = F.interpolate(low, size=real.shape[-2:], mode="bicubic").clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([low, fake, real]).cpu(), path, nrow=len(batch), normalize=True, value_range=(-1, 1))


__all__ = ["LowToHighTokens", "train", "check_batch", "save_samples"]
