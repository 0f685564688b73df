"""What every stage's loop shares: process setup (device, DDP, seeds), AdamW + warmup/cosine, EMA, mixed precision.

    rt = setup(cfg.train.seed)                     # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK when present
    optimizer = build_optimizer(model, cfg.train)  # weight decay on Linear / Conv weights only
    scheduler = build_scheduler(optimizer, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    with autocast(rt, cfg.train):
        loss = ...
    step_optimizer(loss, model, optimizer, scheduler, cfg.train.grad_clip)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from muse.config import TrainConfig
from transformer.saving import load_weights


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place among the DDP processes (rank 0 of 1 without torchrun)."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(seed: int) -> Runtime:
    """Pick the device, join the process group when launched by torchrun, and seed this rank.

    Each rank is seeded with `seed + rank`, so ranks draw different masks and dropout but a run is reproducible.
    NCCL on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    seed_everything(seed + rank)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def mean_across_ranks(values: dict[str, float], rt: Runtime) -> dict[str, float]:
    """Average logged scalars over all ranks (a collective: every rank must call it at the same step)."""
    if not rt.distributed or not values:
        return values
    names = sorted(values)
    stacked = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=rt.device)
    dist.all_reduce(stacked)
    return {n: v / rt.world_size for n, v in zip(names, stacked.tolist())}


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model as DistributedDataParallel under torchrun, unchanged otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction, so replicas start identical even if they were
    initialised differently.
    """
    if not rt.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


@torch.no_grad()
def broadcast_from_main(module: nn.Module, rt: Runtime) -> None:
    """Copy rank 0's parameters and buffers to every rank, for a module trained outside DDP (which would do this at
    construction), since each rank initialised it from its own seed."""
    if not rt.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def start_from_weights(model: nn.Module, path: str | Path) -> None:
    """Start `model` from the weights saved in the directory `path` (`model.safetensors`, any float dtype): every
    tensor must exist with the same shape, else ValueError naming it. Only the weights are taken; optimiser, schedule
    and step start fresh, and settings without weights (dropout) come from the run's own config."""
    load_weights(path, model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def decay_and_no_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters: only the weight matrices of Linear and Conv layers are decayed.

    Everything else — biases, norm scales, token and positional embeddings, codebooks, mask/learned tokens — is left
    undecayed, because pulling those towards zero changes what they represent rather than regularising.
    """
    decayed: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and module.weight.requires_grad:
            decayed.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if id(param) in decayed else no_decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = decay_and_no_decay(model)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas)


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of `train.lr` at `step`: linear warmup from 0, then cosine down to `min_lr_ratio`."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))


def step_optimizer(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float | None,
) -> float:
    """Backward, clip, step, advance the schedule; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_and_step(optimizer, grad_clip)
    scheduler.step()
    return norm


def clip_and_step(optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float:
    """Clip the gradients of the optimizer's parameters to `grad_clip` (None = no clipping), then step."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    optimizer.step()
    return float(norm)


def average_gradients(module: nn.Module, rt: Runtime) -> None:
    """Average the gradients of a module trained outside DDP (the VQGAN's discriminator) over all ranks, so its
    replicas take identical steps."""
    if not rt.distributed:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= rt.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class EMA:
    """An exponential moving average of a model's weights, kept as a full frozen copy of the model.

    Buffers (e.g. the VQGAN's EMA codebook, norm statistics) are copied, not averaged: they are already running
    statistics of the live model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = unwrap(model)
        for ema_param, param in zip(self.model.parameters(), live.parameters()):
            ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), live.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def autocast(rt: Runtime, train: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `mixed_precision` is on; a no-op on CPU, where bf16 matmuls are slower than fp32."""
    if train.mixed_precision and rt.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration; each model's previous train/eval mode is restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def frozen(module: nn.Module) -> nn.Module:
    """A model used only for inference inside training (tokenizer, text encoder, perceptual net)."""
    return module.eval().requires_grad_(False)


__all__ = [
    "Runtime",
    "setup",
    "teardown",
    "barrier",
    "seed_everything",
    "mean_across_ranks",
    "wrap_ddp",
    "broadcast_from_main",
    "unwrap",
    "decay_and_no_decay",
    "build_optimizer",
    "lr_factor",
    "build_scheduler",
    "step_optimizer",
    "clip_and_step",
    "average_gradients",
    "EMA",
    "autocast",
    "evaluating",
    "frozen",
]
