"""The one training loop of the masked-token stages (base transformer and super-res), top to bottom:

setup -> model, EMA -> data (token shards, or images tokenized on the fly) -> loop (variable-ratio masking, text
dropout, loss on masked positions, logging, fixed-ratio validation, sample grids, checkpoints) -> export to
`run_dir/<stage name>/` (EMA weights when EMA is on).

What differs between the stages is described by a `MaskedStage` (built by `muse/train/transformer.py` and
`muse/train/superres.py`); nothing here knows which stage it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from muse.config import SuperResRun, TransformerRun
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
    start_from_weights,
    step_optimizer,
    teardown,
    wrap_ddp,
)
from muse.train.logger import Meter, TrainLogger
from muse.train.masked import (
    FixedRatioValidation,
    masked_loss,
    text_dropout,
    training_mask,
)
from muse.train.tokens import TokenBatch, TokenSource
from transformer.text import TextEmbedding

VAL_ITEMS = 256       # fixed validation items for the fixed-ratio losses
SAMPLE_ITEMS = 8      # sample grid: this many validation captions


@dataclass(frozen=True)
class MaskedStage:
    """What a masked-token stage brings to `train_masked_stage`."""

    name: str                                                 # checkpoint component and export folder
    build: Callable[[], nn.Module]                            # the model (MaskedTransformer, SuperResTransformer)
    wrap: Callable[[nn.Module], nn.Module]                    # model -> module (tokens, positions, batch) -> logits
    check_batch: Callable[[TokenBatch], None]                 # fail early, with numbers, when the data does not fit
    load_decoders: Callable[[Runtime], Any | None]            # VQGAN(s) for the sample grids; None: no grids
    # (eval model, decoders, batch, unconditional text, png path, runtime, seed) -> writes the sample grid
    save_samples: Callable[[nn.Module, Any, TokenBatch, TextEmbedding, Path, Runtime, int], None]
    corrupt: Callable[[TokenBatch], TokenBatch] = lambda batch: batch  # per-step input corruption (low-res tokens)


def train_masked_stage(cfg: TransformerRun | SuperResRun, stage: MaskedStage, resume: bool = False,
                       keep_every: int | None = None) -> Path:
    """Train `stage` per `cfg`; with `resume`, continue exactly from `out_dir/checkpoints/last.pt` when it exists.
    `keep_every` also keeps a checkpoint copy every that many steps. Returns the exported model directory."""
    rt = setup(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)

    # Model and EMA copy (taken after DDP has given every rank rank 0's weights).
    model = stage.build().to(rt.device)
    if cfg.train.init_from and not saved:
        start_from_weights(model, cfg.train.init_from)
    net = wrap_ddp(stage.wrap(model), rt)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    mask_id = cfg.model.mask_token_id

    # Data: token shards, or images tokenized on the fly; fixed validation items with fixed masks.
    source = TokenSource(cfg, rt.device, cfg.train.seed)
    batches = BatchStream(source.train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                          world_size=rt.world_size, num_workers=cfg.data.num_workers)
    val_batch = source.validation(VAL_ITEMS, cfg.train.batch_size) if rt.is_main else None
    if val_batch is not None:
        stage.check_batch(val_batch)
        validation = FixedRatioValidation(val_batch, cfg.masking.val_ratios, mask_token_id=mask_id,
                                          seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    decoders = stage.load_decoders(rt) if rt.is_main and val_batch is not None else None

    components = {stage.name: model, "optimizer": optimizer, "scheduler": scheduler}
    if ema is not None:
        components["ema"] = ema
    step = restore_state(saved, components, batches, rt) if saved else 0

    log = TrainLogger(run_dir, cfg.train.logger, is_main=rt.is_main, total_steps=cfg.train.steps, start_step=step)
    items = len(source.train_set) if hasattr(source.train_set, "__len__") else "?"
    log.info(f"{stage.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, data "
             f"{cfg.data.format} ({items} items), {'resuming at step ' + str(step) if step else 'starting'}"
             f"{' from ' + cfg.train.init_from if cfg.train.init_from and not saved else ''} on "
             f"{rt.world_size} x {rt.device}")
    if val_batch is None:
        log.info("no validation set: fixed-ratio validation and sample grids are skipped")
    meter = Meter()
    net.train()
    while step < cfg.train.steps:
        batch = source.batch(next(batches))
        if step == 0:
            stage.check_batch(batch)
        batch = text_dropout(stage.corrupt(batch), source.unconditional, cfg.masking.text_dropout)
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
                log.scalars(step, validation.evaluate(stage.wrap(eval_model), rt.device))
        if decoders is not None and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
            stage.save_samples(eval_model, decoders, val_batch.select(slice(0, SAMPLE_ITEMS)), source.unconditional,
                               run_dir / "samples" / f"step-{step:07d}.png", rt, cfg.train.seed)
        if step % cfg.train.save_every == 0 or step == cfg.train.steps:
            write_checkpoint(run_dir, collect_state(step, components, batches, cfg, rt), keep_every)
            if rt.is_main:
                eval_model.save_pretrained(run_dir / stage.name)

    log.close()
    teardown(rt)
    return run_dir / stage.name


__all__ = ["MaskedStage", "train_masked_stage", "VAL_ITEMS", "SAMPLE_ITEMS"]
