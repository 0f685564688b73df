"""Train a masked-token stage: the base transformer (`muse train configs/transformer/emoji-base.yaml`) or token
super-resolution (`muse train configs/superres/emoji-sr.yaml`), with `--resume` to continue exactly.

`train` reads top to bottom: setup -> model, EMA -> data (token shards, or images tokenized on the fly) -> loop
(variable-ratio masking, text dropout, loss on masked positions, logging, fixed-ratio validation, sample grids,
checkpoints) -> export to `run_dir/transformer/` or `run_dir/superres/` (EMA weights when EMA is on). The generic
machinery is shared with the other loops: `runtime.py` (processes, DDP / FSDP, precision), `ema.py`, `optim.py`,
`batches.py`, `logger.py` and `checkpoint.py` beside this file.

The stages differ in five places, each an explicit `if superres:` branch below:

1. the model and its conditioning: text only, or the low-res token grid and the text (`stage_context`);
2. the input corruption: super-res replaces a fraction `masking.lowres_corruption` of the low-res tokens at random,
   since at inference it conditions on the base model's samples, which contain mistakes (`train_step`);
3. the data checks (`check_batch`), 4. the VQGANs that decode sample grids (`load_decoders`), 5. the grid itself
   (`save_samples`): real images above samples for the base stage; low-res input, samples and the real high-res
   image for super-res.

Mask convention: bool, True = masked (the model must predict the token there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import save_image

from muse.config import MaskingConfig, SuperResRun, TransformerRun
from muse.data.sources import TokenBatch, TokenSource, cat_batches, drop_text
from muse.engine import Job, run_job
from muse.options import SamplingOptions
from muse.train.batches import BatchStream
from muse.train.checkpoint import prepare_run_dir, restore, save_checkpoint, start_from_weights
from muse.train.ema import EMA, evaluation_model
from muse.train.logger import Meter, TrainLogger
from muse.train.optim import build_optimizer, build_scheduler, step_optimizer
from muse.train.runtime import (
    Runtime,
    autocast,
    compile_blocks,
    evaluating,
    mean_across_ranks,
    parallelize,
    setup,
    teardown,
)
from sampling.schedule import sample_training_mask
from superres.model import SuperResTransformer
from transformer.model import MaskedTransformer, TextContext
from transformer.text import TextEmbedding
from vqgan.model import VQGAN

VAL_ITEMS = 256       # fixed validation items for the fixed-ratio losses
SAMPLE_ITEMS = 8      # sample grid: this many validation captions
SAMPLE_GUIDANCE = 3.0
SAMPLE_STEPS = {"transformer": 12, "superres": 8}  # Muse decodes super-res in 8 steps

StageModel = MaskedTransformer | SuperResTransformer


def train(cfg: TransformerRun | SuperResRun, resume: bool = False, keep_every: int | None = None) -> Path:
    """Train per `cfg`; with `resume`, continue exactly from the run's latest checkpoint when it exists. `keep_every`
    also keeps a checkpoint every that many steps. Returns the exported model directory."""
    superres = isinstance(cfg, SuperResRun)
    name = cfg.stage  # checkpoint component and export folder: "transformer" or "superres"
    rt = setup(cfg.train)
    run_dir = Path(cfg.train.out_dir)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)

    # Model (1: the class), parallelized; the EMA copy is taken after every rank holds rank 0's weights.
    model = (SuperResTransformer(cfg.model) if superres else MaskedTransformer(cfg.model)).to(rt.device)
    if cfg.train.init_from and not saved:
        start_from_weights(model, cfg.train.init_from, cfg.stage)
    if cfg.train.compile:
        compile_blocks(transformer_blocks(model))
    net = parallelize(StageNet(model), fsdp_units(model), rt, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    optimizer = build_optimizer(model, cfg.train, fused=rt.device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.train)
    mask_id = cfg.model.mask_token_id  # the high-res grid's for super-res

    # Data: token shards, or images tokenized on the fly; fixed validation items with fixed masks (rank 0).
    source = TokenSource(cfg, rt.device, cfg.train.seed)
    batches = BatchStream(source.train_set, cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                          world_size=rt.world_size, num_workers=cfg.data.num_workers,
                          pin_memory=rt.device.type == "cuda")
    val_batch = source.validation(VAL_ITEMS, cfg.train.batch_size) if rt.is_main else None
    if val_batch is not None:
        check_batch(val_batch, cfg)
        validation = FixedRatioValidation(val_batch, cfg.masking.val_ratios, mask_token_id=mask_id,
                                          seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    decoders = load_decoders(cfg, rt) if rt.is_main and val_batch is not None else None

    components = {name: model, "optimizer": optimizer, "scheduler": scheduler}
    if ema is not None:
        components["ema"] = ema
    step = restore(saved, components, batches, cfg, rt) if saved else 0

    log = TrainLogger(run_dir, cfg.train.logger, is_main=rt.is_main, total_steps=cfg.train.steps, start_step=step)
    items = len(source.train_set) if hasattr(source.train_set, "__len__") else "?"
    log.info(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, data "
             f"{cfg.data.format} ({items} items), {'resuming at step ' + str(step) if step else 'starting'}"
             f"{' from ' + cfg.train.init_from if cfg.train.init_from and not saved else ''} on "
             f"{rt.world_size} x {rt.device} ({cfg.train.parallel}{', compiled blocks' if cfg.train.compile else ''})")
    if val_batch is None:
        log.info("no validation set: fixed-ratio validation and sample grids are skipped")
    meter = Meter()
    net.train()
    checked = False
    while step < cfg.train.steps:
        batch = source.batch(next(batches))
        if not checked:
            check_batch(batch, cfg)
            checked = True
        stats = train_step(cfg, rt, net, model, optimizer, scheduler, ema, batch, source.unconditional, mask_id)
        step += 1
        meter.add(stats, items=batch.tokens.numel())

        last = step == cfg.train.steps
        postfix = None
        if step % cfg.train.log_every == 0 or last:
            means, rate = meter.summary()  # the only place the step's numbers are read back from the device
            means = mean_across_ranks(means, rt)
            log.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                               "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": rate * rt.world_size})
            postfix = {"loss": means["loss"]}
        log.advance(postfix)
        validate, sample, save = (step % every == 0 or last for every in
                                  (cfg.train.val_every, cfg.train.sample_every, cfg.train.save_every))
        if validate or sample or save:
            # The EMA (or live) weights as one plain model on rank 0; gathering them is a collective under FSDP.
            eval_model = evaluation_model(model, ema, rt)
        if validate and val_batch is not None:
            with evaluating(eval_model):
                log.scalars(step, validation.evaluate(StageNet(eval_model), rt.device))
        if sample and decoders is not None:
            save_samples(eval_model, decoders, val_batch.select(slice(0, SAMPLE_ITEMS)), source.unconditional,
                         run_dir / "samples" / f"step-{step:07d}.png", rt, cfg.train.seed)
        if save:
            save_checkpoint(run_dir, step, components, batches, cfg, rt, keep_every)
            if rt.is_main:
                eval_model.save_pretrained(run_dir / name)

    log.close()
    teardown(rt)
    return run_dir / name


def train_step(cfg: TransformerRun | SuperResRun, rt: Runtime, net: nn.Module, model: StageModel,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None,
               batch: TokenBatch, unconditional: TextEmbedding, mask_id: int) -> dict[str, Tensor]:
    """One optimizer step on `batch`: (2: super-res corruption), text dropout, a mask from the shared schedule, the
    masked loss through `net`, AdamW with clipping and the schedule, the EMA update. Returns the step's scalars as
    tensors, unread (the loop reads them when it logs). `bench/train_transformer.py` times exactly this."""
    if isinstance(cfg, SuperResRun) and cfg.masking.lowres_corruption > 0:
        low = corrupt_tokens(batch.low_tokens, cfg.masking.lowres_corruption, cfg.model.low_codebook_size)
        batch = replace(batch, low_tokens=low)
    batch = text_dropout(batch, unconditional, cfg.masking.text_dropout)
    mask = training_mask(batch, cfg.masking)
    with autocast(rt, cfg.train):
        out = masked_loss(net, batch, mask, mask_id, cfg.masking.label_smoothing)
    grad_norm = step_optimizer(out.loss, optimizer, scheduler, cfg.train.grad_clip)
    if ema is not None:
        ema.update(model)
    B, L = batch.tokens.shape
    return {"loss": out.loss.detach(), "accuracy": out.accuracy, "masked_fraction": out.num_masked / (B * L),
            "queried_fraction": out.queried / L, "grad_norm": grad_norm}


# --------------------------------------------------------------------------------------------------------------------
# The network as the loss sees it, and how it is parallelized


class StageNet(nn.Module):
    """The stage's model as one module: (tokens (B, L) with mask tokens, positions (B, M), batch) -> logits (B, M, K).

    Its forward builds the conditioning and runs the token path, so DDP sees every parameter in one forward and FSDP's
    root gathers the weights outside the blocks (embeddings, text projection, head) for the whole step."""

    def __init__(self, model: StageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, batch: TokenBatch) -> Tensor:
        return self.model(tokens, stage_context(self.model, batch), positions)


def stage_context(model: StageModel, batch: TokenBatch) -> TextContext:
    """(1) What the token path cross-attends to: per-layer keys/values of the text, or of the low-res grid + text."""
    if isinstance(model, SuperResTransformer):  # super-res: the low-res grid's encoder states, then the text
        return model.context(batch.low_tokens, batch.text_states, batch.text_mask)
    return model.text_context(batch.text_states, batch.text_mask)


def transformer_blocks(model: StageModel) -> list[nn.Module]:
    """Every transformer block, in forward order (super-res: its low-res encoder, then the high-res stack)."""
    if isinstance(model, SuperResTransformer):
        return [*model.low_blocks, *model.high.blocks]
    return list(model.blocks)


def fsdp_units(model: StageModel) -> list[nn.Module]:
    """FSDP2 units, innermost first: each block, preceded by its cross-attention key/value projection. `text_context`
    (and the super-res `context`) call that projection once per batch, outside the block's forward, so it must
    gather its own weights when it is called."""
    units: list[nn.Module] = []
    for block in transformer_blocks(model):
        if block.cross is not None:
            units.append(block.cross.kv)
        units.append(block)
    return units


# --------------------------------------------------------------------------------------------------------------------
# Masking and the loss


@dataclass(frozen=True)
class MaskedLoss:
    loss: Tensor      # scalar: mean cross-entropy over masked positions (what backward is called on)
    accuracy: Tensor  # scalar, detached: fraction of masked positions whose argmax is the target
    num_masked: int   # masked positions in the batch
    queried: int      # M: positions per row the last layer and the head ran at (the largest masked count of a row)


def training_mask(batch: TokenBatch, masking: MaskingConfig) -> Tensor:
    """(B, L) bool on the CPU: per row a ratio r from the shared schedule (with cosine, Muse's arccos density) and
    ceil(r * L) >= 1 positions chosen uniformly. Drawn from the global CPU RNG, whose state every checkpoint saves, so a
    run draws the same masks on any device; kept on the CPU so that counting them never waits for the GPU."""
    B, L = batch.tokens.shape
    return sample_training_mask(B, L, schedule=masking.schedule)


def text_dropout(batch: TokenBatch, unconditional: TextEmbedding, rate: float) -> TokenBatch:
    """Train a fraction `rate` of rows with the empty prompt, so the model also learns the unconditional
    distribution that classifier-free guidance contrasts against."""
    if rate <= 0:
        return batch
    drop = torch.rand(len(batch)).to(batch.tokens.device) < rate  # (B,)
    return drop_text(batch, unconditional, drop)


def corrupt_tokens(tokens: Tensor, rate: float, codebook_size: int) -> Tensor:
    """Replace each token independently with probability `rate` by a uniformly random id in [0, codebook_size)."""
    if rate <= 0:
        return tokens
    replace_at = torch.rand(tokens.shape).to(tokens.device) < rate
    random_ids = torch.randint(0, codebook_size, tokens.shape).to(tokens.device)
    return torch.where(replace_at, random_ids, tokens)


def masked_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) bool mask -> positions (B, M) and valid (B, M) bool, M = the largest masked count of a row.

    Each row lists its masked positions first (ascending), then unmasked ones as filler up to M; `valid` is False on
    the filler. Computing logits only at these M positions skips the head for most visible tokens.
    """
    M = max(int(mask.sum(dim=1).max()), 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # masked first, in position order
    positions = order[:, :M]  # (B, M)
    return positions, mask.gather(1, positions)


def masked_loss(net: nn.Module, batch: TokenBatch, mask: Tensor, mask_token_id: int,
                label_smoothing: float = 0.0) -> MaskedLoss:
    """Cross-entropy of `net(inputs, positions, batch)` at the masked positions only, averaged over masked tokens.

    The input grid has every masked position replaced by `mask_token_id`; targets at unmasked positions neither enter
    the input nor the loss. `mask` may be on the CPU (training: the positions are then counted without a GPU sync).
    """
    positions, valid = masked_positions(mask)  # on the mask's device
    num_masked = int(valid.sum())
    device = batch.tokens.device
    mask, positions, valid = (t.to(device, non_blocking=True) for t in (mask, positions, valid))
    inputs = batch.tokens.masked_fill(mask, mask_token_id)  # (B, L)
    logits = net(inputs, positions, batch)  # (B, M, K)
    targets = batch.tokens.gather(1, positions)  # (B, M)
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none", label_smoothing=label_smoothing
    )  # (B * M,)
    valid = valid.flatten()
    count = valid.sum().clamp(min=1)
    loss = (per_token * valid).sum() / count
    correct = (logits.detach().argmax(dim=-1).flatten() == targets.flatten()) & valid
    return MaskedLoss(loss=loss, accuracy=correct.sum() / count, num_masked=num_masked, queried=positions.shape[1])


def fixed_ratio_mask(num_items: int, num_tokens: int, ratio: float, seed: int) -> Tensor:
    """(N, L) bool masks with exactly ceil(ratio * L) (>= 1) masked tokens per row, a pure function of the seed."""
    generator = torch.Generator().manual_seed(seed)
    count = min(max(math.ceil(ratio * num_tokens), 1), num_tokens)
    scores = torch.rand(num_items, num_tokens, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (N, L) a random permutation's ranks
    return rank < count


class FixedRatioValidation:
    """Validation loss and accuracy at fixed mask ratios, each with fixed masks drawn once from `seed`.

    The same items, ratios and masks at every evaluation, in every run with the same data and seed, so the curves are
    comparable across steps and runs. No label smoothing and no text dropout.
    """

    def __init__(self, batch: TokenBatch, ratios: tuple[float, ...], *, mask_token_id: int, seed: int,
                 batch_size: int) -> None:
        self.batch = batch
        self.ratios = ratios
        self.mask_token_id = mask_token_id
        self.batch_size = batch_size
        N, L = batch.tokens.shape
        self.masks = {r: fixed_ratio_mask(N, L, r, seed + i) for i, r in enumerate(ratios)}

    @torch.no_grad()
    def evaluate(self, net: nn.Module, device: torch.device) -> dict[str, float]:
        """{"val/loss@0.5": ..., "val/acc@0.5": ..., "val/loss": mean over ratios}; call with the model in eval mode."""
        results: dict[str, float] = {}
        for ratio, mask in self.masks.items():
            loss_sum, correct_sum, count = 0.0, 0.0, 0
            for start in range(0, len(self.batch), self.batch_size):
                rows = slice(start, start + self.batch_size)
                out = masked_loss(net, self.batch.select(rows).to(device), mask[rows], self.mask_token_id)
                loss_sum += float(out.loss) * out.num_masked
                correct_sum += float(out.accuracy) * out.num_masked
                count += out.num_masked
            results[f"val/loss@{ratio:g}"] = loss_sum / count
            results[f"val/acc@{ratio:g}"] = correct_sum / count
        results["val/loss"] = sum(results[f"val/loss@{r:g}"] for r in self.ratios) / len(self.ratios)
        return results


# --------------------------------------------------------------------------------------------------------------------
# Data checks and sample grids


def check_batch(batch: TokenBatch, cfg: TransformerRun | SuperResRun) -> None:
    """(3) Fail early, with the numbers, when the data does not fit the model config."""
    if isinstance(cfg, SuperResRun):  # super-res: a high-res and a low-res grid
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
                raise ValueError(f"the data holds {name} token id {int(tokens.max())}, the model's {name} codebook "
                                 f"has {K} entries")
        text_dim, text_key = cfg.model.high.text_dim, "model.high.text_dim"
    else:
        grid = cfg.model.grid_size
        if batch.tokens.shape[1] != grid * grid:
            raise ValueError(f"the data has {batch.tokens.shape[1]} tokens per image, model.grid_size={grid} expects "
                             f"{grid * grid} ({grid}x{grid}); set data.resolution or model.grid_size to match the "
                             "VQGAN")
        if int(batch.tokens.max()) >= cfg.model.codebook_size:
            raise ValueError(f"the data holds token id {int(batch.tokens.max())} but model.codebook_size is "
                             f"{cfg.model.codebook_size}: set it to the VQGAN's codebook size")
        text_dim, text_key = cfg.model.text_dim, "model.text_dim"
    if batch.text_states.shape[-1] != text_dim:
        raise ValueError(f"the text states are {batch.text_states.shape[-1]}-d but {text_key} is {text_dim}")


def load_decoders(cfg: TransformerRun | SuperResRun, rt: Runtime) -> tuple[VQGAN, ...] | None:
    """(4) The VQGANs that decode the sample grid: (vqgan,) or (vqgan_low, vqgan_high); None (no grids) when one is
    missing."""
    paths = (Path(cfg.vqgan_low), Path(cfg.vqgan_high)) if isinstance(cfg, SuperResRun) else (Path(cfg.vqgan),)
    if not all((p / "model.safetensors").is_file() for p in paths):
        return None
    return tuple(VQGAN.from_pretrained(p).to(rt.device).eval() for p in paths)


@torch.no_grad()
def save_samples(model: StageModel, decoders: tuple[VQGAN, ...], batch: TokenBatch, unconditional: TextEmbedding,
                 path: Path, rt: Runtime, seed: int) -> None:
    """(5) The sample grid, fixed seeds. Base: validation images (top row) above samples for their captions. Super-res:
    the low-res input (upscaled, bicubic), super-res samples from it, and the real high-res tokens."""
    superres = isinstance(model, SuperResTransformer)
    batch = batch.to(rt.device)
    with evaluating(model):
        tokens = sample_tokens(model, batch, unconditional, num_steps=SAMPLE_STEPS["superres" if superres else
                               "transformer"], guidance_scale=SAMPLE_GUIDANCE, seed=seed)
    high_vqgan = decoders[-1]
    grid = model.config.high.grid_size if superres else model.config.grid_size
    real = high_vqgan.decode(batch.tokens.view(-1, grid, grid))  # (B, 3, H, W)
    fake = high_vqgan.decode(tokens.view(-1, grid, grid))
    rows = [real, fake]
    if superres:
        low_grid = model.config.low_grid_size
        low = decoders[0].decode(batch.low_tokens.view(-1, low_grid, low_grid))
        rows = [F.interpolate(low, size=real.shape[-2:], mode="bicubic").clamp(-1, 1), fake, real]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows).cpu(), path, nrow=len(batch), normalize=True, value_range=(-1, 1))


@torch.no_grad()
def sample_tokens(
    model: StageModel,
    batch: TokenBatch,
    unconditional: TextEmbedding,
    *,
    num_steps: int,
    guidance_scale: float,
    seed: int,
) -> Tensor:
    """Decode a full square grid (B, L) for each row's text (and low-res tokens) through the decoding engine, as the
    pipeline does: guidance mixed by the engine, the library's default sampling options otherwise, row r with seed
    `seed + r`, so grids are comparable across training steps. The context holds the conditional rows, then with
    guidance the same rows under the empty prompt."""
    B, L = batch.tokens.shape
    side = math.isqrt(L)
    device = batch.tokens.device
    options = SamplingOptions(num_steps=num_steps, guidance_scale=guidance_scale)
    rows = batch
    if options.guided:
        rows = cat_batches([batch, drop_text(batch, unconditional, torch.ones(B, dtype=torch.bool, device=device))])
    job = Job(
        model=model,
        tokens=torch.full((B, L), model.config.mask_token_id, dtype=torch.long, device=device),
        grid=(side, side),
        context=stage_context(model, rows),
        options=options,
        seeds=torch.arange(B, dtype=torch.int64, device=device) + seed,
    )
    return run_job(job).tokens


__all__ = [
    "VAL_ITEMS",
    "SAMPLE_ITEMS",
    "train",
    "train_step",
    "StageNet",
    "stage_context",
    "transformer_blocks",
    "fsdp_units",
    "MaskedLoss",
    "training_mask",
    "text_dropout",
    "corrupt_tokens",
    "masked_positions",
    "masked_loss",
    "fixed_ratio_mask",
    "FixedRatioValidation",
    "check_batch",
    "load_decoders",
    "save_samples",
    "sample_tokens",
]
