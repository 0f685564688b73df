"""Train the VQGAN tokenizer: `muse train configs/vqgan/emoji-f8.yaml [--resume]`.

One loop, top to bottom: setup -> model, EMA, discriminator -> data -> loop (generator step, discriminator step,
logging, validation, reconstruction grids, checkpoints) -> export. The exported `run_dir/vqgan/` (EMA weights when EMA
is on) is what the transformer and super-res stages load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from muse.config import ConfigError, VQGANRun
from muse.data.sources import image_dataset, stack_images, validation_items
from muse.train.batches import BatchStream
from muse.train.checkpoint import prepare_run_dir, restore, save_checkpoint, start_from_weights
from muse.train.ema import EMA, evaluation_model
from muse.train.logger import Meter, TrainLogger
from muse.train.optim import build_optimizer, build_scheduler, clip_and_step, lr_factor, step_optimizer
from muse.train.runtime import (
    Runtime,
    autocast,
    average_gradients,
    broadcast_from_main,
    evaluating,
    mean_across_ranks,
    setup,
    teardown,
    wrap_ddp,
)
from vqgan.losses import VQGANLoss
from vqgan.model import VQGAN

VAL_IMAGES = 256   # fixed held-out images for PSNR and codebook usage
GRID_IMAGES = 8    # reconstruction grid: this many originals above their reconstructions


def train(cfg: VQGANRun, resume: bool = False, keep_every: int | None = None) -> Path:
    """Train per `cfg`; with `resume`, continue exactly from the run's latest checkpoint when it exists.
    `keep_every` also keeps a checkpoint copy every that many steps. Returns the exported model directory."""
    if cfg.train.parallel != "ddp":
        # FSDP shards transformer blocks; a VQGAN (tens of millions of parameters) fits on any device whole.
        raise ConfigError(f"train.parallel={cfg.train.parallel!r}: the VQGAN stage trains with ddp")
    rt = setup(cfg.train)
    run_dir = Path(cfg.train.out_dir)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)

    # Model, EMA copy, and the discriminator, which lives in the loss (it is part of the objective, not the model).
    # DDP and the broadcast make every rank start from rank 0's weights; the EMA copy is taken after that.
    vqgan = VQGAN(cfg.model).to(rt.device)
    if cfg.train.init_from and not saved:
        start_from_weights(vqgan, cfg.train.init_from, "vqgan")
    decoder_only = cfg.trainable == "decoder"
    if decoder_only:  # frozen before DDP and the optimizer see the parameters: neither holds state for them
        vqgan.encoder.requires_grad_(False)
        vqgan.quantizer.requires_grad_(False)
    model = wrap_ddp(vqgan, rt)
    ema = EMA(vqgan, cfg.train.ema_decay) if cfg.train.ema_decay else None
    losses = VQGANLoss(cfg.loss).to(rt.device)
    discriminator = losses.discriminator
    broadcast_from_main(discriminator, rt)
    fused = rt.device.type == "cuda"
    opt_vqgan = build_optimizer(vqgan, cfg.train, fused=fused)
    opt_disc = build_optimizer(discriminator, cfg.train, fused=fused)
    sched_vqgan = build_scheduler(opt_vqgan, cfg.train)

    # Data: an endless resumable stream of training images, and a fixed held-out batch.
    train_set = image_dataset(cfg.data, train=True, seed=cfg.train.seed)
    batches = BatchStream(train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                          world_size=rt.world_size, num_workers=cfg.data.num_workers,
                          pin_memory=rt.device.type == "cuda")
    val_items = validation_items(cfg.data, limit=VAL_IMAGES) if rt.is_main else None
    val_images = stack_images(val_items) if val_items else None

    components = {"vqgan": vqgan, "discriminator": discriminator, "opt_vqgan": opt_vqgan, "opt_disc": opt_disc,
                  "sched_vqgan": sched_vqgan}
    if ema is not None:
        components["ema"] = ema
    step = restore(saved, components, batches, cfg, rt) if saved else 0

    log = TrainLogger(run_dir, cfg.train.logger, is_main=rt.is_main, total_steps=cfg.train.steps, start_step=step)
    log.info(f"vqgan: {sum(p.numel() for p in vqgan.parameters()) / 1e6:.2f}M parameters, "
             f"perceptual loss: {losses.perceptual.name if losses.perceptual is not None else 'off'}, "
             f"{'resuming at step ' + str(step) if step else 'starting'}"
             f"{' from ' + cfg.train.init_from if cfg.train.init_from and not saved else ''} on "
             f"{rt.world_size} x {rt.device}")
    if val_images is None:
        log.info("no validation images: PSNR and reconstruction grids are skipped")
    meter = Meter()
    model.train()
    while step < cfg.train.steps:
        images = next(batches)["image"].to(rt.device, non_blocking=True)

        # Generator step. The discriminator only judges here: freezing it keeps the adversarial term's gradient off
        # its weights (they are trained by their own loss below).
        discriminator.requires_grad_(False)
        with autocast(rt, cfg.train):
            out = model(images, freeze_codebook=decoder_only)
            g = losses.generator_loss(images, out, last_layer=vqgan.last_layer, step=step)
        grad_norm = step_optimizer(g.total, opt_vqgan, sched_vqgan, cfg.train.grad_clip)
        discriminator.requires_grad_(True)
        if ema is not None:
            ema.update(vqgan)
        terms = {name: value.detach() for name, value in g.terms.items()}  # read back only when logging

        # Discriminator step, from `disc_start_step` on, at the VQGAN's learning rate of this step. It is trained
        # outside DDP, so its gradients are averaged over ranks by hand.
        if losses.adversarial_active(step):
            with autocast(rt, cfg.train):
                d = losses.discriminator_loss(images, out.reconstruction)
            opt_disc.zero_grad(set_to_none=True)
            d.total.backward()
            average_gradients(discriminator, rt)
            for group in opt_disc.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(step, cfg.train)
            clip_and_step(opt_disc, cfg.train.grad_clip)
            terms.update({name: value.detach() for name, value in d.terms.items()})
        step += 1
        meter.add({**terms, "grad_norm": grad_norm}, items=images.shape[0])

        last = step == cfg.train.steps
        postfix = None
        if step % cfg.train.log_every == 0 or last:
            means, rate = meter.summary()
            means = mean_across_ranks(means, rt)
            log.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                               "train/lr": sched_vqgan.get_last_lr()[0], "train/images_per_s": rate * rt.world_size})
            postfix = {"loss": means["total"]}
        log.advance(postfix)
        validate_now, sample, save = (step % every == 0 or last for every in
                                      (cfg.train.val_every, cfg.train.sample_every, cfg.train.save_every))
        eval_model = evaluation_model(vqgan, ema, rt) if validate_now or sample or save else None  # rank 0 only
        if rt.is_main and val_images is not None and validate_now:
            log.scalars(step, validate(eval_model, val_images, rt))
        if rt.is_main and val_images is not None and sample:
            save_grid(eval_model, val_images[:GRID_IMAGES], run_dir / "samples" / f"step-{step:07d}.png", rt)
        if save:
            save_checkpoint(run_dir, step, components, batches, cfg, rt, keep_every)
            if rt.is_main:
                eval_model.save_pretrained(run_dir / "vqgan")

    log.close()
    teardown(rt)
    return run_dir / "vqgan"


@torch.no_grad()
def validate(model: VQGAN, images: torch.Tensor, rt: Runtime, batch_size: int = 32) -> dict[str, float]:
    """Reconstruction PSNR (dB, images scaled to [0, 1]) and codebook usage on the fixed held-out images."""
    psnr, ids = [], []
    with evaluating(model):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(rt.device)
            tokens = model.encode(batch)  # (B, h, w)
            recon = model.decode(tokens)
            mse = ((recon - batch) / 2).pow(2).flatten(1).mean(dim=1).clamp(min=1e-10)  # (B,) on the [0, 1] scale
            psnr.append(-10 * torch.log10(mse))
            ids.append(tokens)
    usage = model.codebook_usage(torch.cat(ids))
    return {"val/psnr": float(torch.cat(psnr).mean()), "val/codebook_used": usage.fraction_used,
            "val/codebook_perplexity": usage.perplexity}


@torch.no_grad()
def save_grid(model: VQGAN, images: torch.Tensor, path: Path, rt: Runtime) -> None:
    """Originals (top row) above their reconstructions (bottom row), as a PNG."""
    with evaluating(model):
        recon = model.decode(model.encode(images.to(rt.device))).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([images, recon]), path, nrow=len(images), normalize=True, value_range=(-1, 1))


__all__ = ["train", "validate", "save_grid"]
