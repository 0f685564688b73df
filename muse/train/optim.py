"""How the weights move: AdamW (fused on GPU, weight decay on Linear / Conv weights only), linear warmup then cosine
decay, gradient clipping (over every shard under FSDP), and one call for a whole step (`step_optimizer`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from muse.config import TrainConfig
from muse.train.runtime import is_sharded



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


def build_optimizer(model: nn.Module, train: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters in two groups (decayed, not decayed). `fused` (pass it on CUDA) updates every
    parameter in a few kernels instead of several per tensor; the CPU keeps the reference implementation."""
    decay, no_decay = decay_and_no_decay(model)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True if fused else None)


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
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float | None,
) -> Tensor:
    """Backward, clip, step, advance the schedule; returns the gradient norm before clipping (a tensor: reading it
    would wait for the GPU, so the loop only does so when it logs)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip_and_step(optimizer, grad_clip)
    scheduler.step()
    return norm


def clip_and_step(optimizer: torch.optim.Optimizer, grad_clip: float | None) -> Tensor:
    """Clip the gradients of the optimizer's parameters to `grad_clip` (None = no clipping), then step. Under FSDP the
    norm is over every shard of every rank (the DTensor gradients reduce it), as it would be unsharded."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    optimizer.step()
    return norm.full_tensor() if is_sharded(norm) else norm


__all__ = ["decay_and_no_decay", "build_optimizer", "lr_factor", "build_scheduler", "step_optimizer", "clip_and_step"]
