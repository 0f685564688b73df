"""Where a training process runs and how the model is spread over the processes; every loop starts here:

1. process    `setup` (device, torchrun's process group, seeds, TF32), `teardown`, collectives (`barrier`, `gather`,
              `mean_across_ranks`, `broadcast_from_main`, `average_gradients`), `seed_everything`, `hash_seed`
2. parallel   `parallelize` (DDP, or FSDP2 `fully_shard` per block with a bf16 policy on GPU), `wrap_ddp`,
              `compile_blocks`, and the sharded-tensor helpers (`unwrap`, `is_sharded`, `shard_like`)
3. precision  `autocast` (bf16 on CUDA and on CPUs that multiply bf16 fast), `evaluating`, `frozen`

The rest of what the loops share, in the order a loop uses it (setup -> model/EMA -> data -> loop -> checkpoint):
`checkpoint.py` (the run directory: `prepare_run_dir`, `start_from_weights`, `restore`, `save_checkpoint`), `ema.py`
(`EMA`, `evaluation_model`), `optim.py` (AdamW, warmup + cosine, clipping), `batches.py` (`BatchStream`: endless,
resumable batches split over ranks), `logger.py` (`TrainLogger`, `Meter`).

    rt = setup(cfg.train)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)                     # checkpoint.py
    net = parallelize(net, units, rt, cfg.train)
    ema = EMA(model, cfg.train.ema_decay)                                 # ema.py
    optimizer, scheduler = build_optimizer(model, cfg.train), build_scheduler(...)   # optim.py
    batches = BatchStream(dataset, cfg.train.batch_size, ...)             # batches.py
    step = restore(saved, components, batches, cfg, rt) if saved else 0   # checkpoint.py
    ...
    save_checkpoint(run_dir, step, components, batches, cfg, rt, keep_every)
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from muse.config import TrainConfig
from muse.options import fast_bfloat16

# ====================================================================================================================
# 1. Process


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place among the torchrun processes (rank 0 of 1 without)."""

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


def setup(train: TrainConfig) -> Runtime:
    """Pick the device, join the process group when launched by torchrun, seed this rank, and on CUDA allow TF32.

    Each rank is seeded with `train.seed + rank`, so ranks draw different masks and dropout but a run is reproducible.
    NCCL on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if train.tf32:
            # Only the float32 matmuls outside autocast (and every one with mixed_precision off) are affected; TF32
            # keeps float32's range with a 10-bit mantissa, which training tolerates and which is ~8x faster.
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=30))
    seed_everything(train.seed + rank)
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


def hash_seed(seed: int, epoch: int) -> int:
    """A seed derived from two numbers (a run's seed and an epoch or a step): the batch order of an epoch, and the
    streams of a run resumed on another number of processes."""
    # Mix the two so (seed 0, epoch 1) and (seed 1, epoch 0) do not share a permutation.
    return (seed * 1_000_003 + epoch * 7919 + 12345) % 2**63


def gather(obj: Any, rt: Runtime) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], rt: Runtime) -> dict[str, float]:
    """Average logged scalars over all ranks (a collective: every rank must call it at the same step)."""
    if not rt.distributed or not values:
        return values
    names = sorted(values)
    stacked = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=rt.device)
    dist.all_reduce(stacked)
    return {n: v / rt.world_size for n, v in zip(names, stacked.tolist())}


@torch.no_grad()
def broadcast_from_main(module: nn.Module, rt: Runtime) -> None:
    """Copy rank 0's parameters and buffers to every rank: for a module trained outside DDP (which would do this at
    construction), and for a model about to be sharded, since each rank initialised it from its own seed."""
    if not rt.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


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


# ====================================================================================================================
# 2. Parallel: data-parallel or sharded, compiled blocks, and what the other modules ask of a sharded tensor


def parallelize(net: nn.Module, units: Sequence[nn.Module], rt: Runtime, train: TrainConfig) -> nn.Module:
    """`net` (the module whose forward the loss calls) ready for `train.parallel` on `rt`; `model.parameters()` of the
    modules inside stay what the optimizer and EMA see.

    ddp: DistributedDataParallel under torchrun (it broadcasts rank 0's weights at construction), `net` unchanged in
    one process. fsdp: PyTorch's FSDP2 (`fully_shard`) on each of `units` (innermost first), then on `net` for the
    parameters left over. Each unit's weights are all-gathered just before its forward and freed after, its gradients
    reduce-scattered after its backward, so a process holds 1/world_size of the weights, gradients and AdamW state
    plus one unit unsharded at a time. On CUDA with `mixed_precision` the gathered weights are bf16 (half the traffic)
    and gradients are reduced in float32. In one process fsdp is a no-op (there is nothing to shard over); the
    checkpoint format is the same in every mode and on any number of processes, so a run can grow or shrink.
    """
    if train.parallel == "ddp":
        return wrap_ddp(net, rt)
    if not rt.distributed:
        return net
    from torch.distributed.fsdp import fully_shard

    # Unlike DDP, FSDP does not broadcast: without this each rank would shard its own random init.
    broadcast_from_main(net, rt)
    policy = fsdp_policy(rt, train)
    # FSDP2 warns at every forward whose output is a view, in case an in-place op on it skips its backward hook. Our
    # logits are one (Linear reshapes its 2-D product); the loss only reads them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    return net


def fsdp_policy(rt: Runtime, train: TrainConfig) -> Any:
    """FSDP2's MixedPrecisionPolicy: on CUDA with `mixed_precision`, weights all-gathered in bf16 and gradients
    reduce-scattered in float32 (a sum of many bf16 gradients would lose their low bits); float32 throughout else."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError as error:  # torch < 2.6
        raise RuntimeError(f"train.parallel=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {error}")
    if rt.device.type == "cuda" and train.mixed_precision:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model as DistributedDataParallel under torchrun, unchanged otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction, so replicas start identical even if they were
    initialised differently.
    """
    if not rt.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def compile_blocks(blocks: Sequence[nn.Module]) -> None:
    """`torch.compile` each block's forward in place (lazily: compiling happens at the first call).

    The forward, not the module: parameter names, state dicts and the FSDP / DDP hooks, which run around `forward`,
    stay as they are. Per block rather than the whole model, so each distinct block shape compiles once and the
    variable parts (text length, the last layer's query count) stay outside or become dynamic dimensions.
    """
    for block in blocks:
        block.forward = torch.compile(block.forward)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (a shard of a tensor spread over the processes, as FSDP2 keeps them)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot have sharded anything
        return False
    return isinstance(tensor, DTensor)


def shard_like(full: Tensor, like: Tensor | None) -> Tensor:
    """`full` as this rank's shard of `like`'s layout when `like` is sharded (no communication: every rank holds
    `full`), else `full` itself. How a whole-model checkpoint (a legacy `last.pt`) resumes under FSDP."""
    if like is None or not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


# ====================================================================================================================
# 3. Precision and modes


def autocast(rt: Runtime, train: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast when `mixed_precision` is on, on CUDA (as FSDP's bf16 policy) and on CPUs that multiply bf16
    fast, with AMX or AVX512-BF16 (`fast_bfloat16`); a no-op on AVX2-only CPUs, where bf16 matmuls are hundreds of
    times slower.

    Also under FSDP's bf16 policy: the weights then arrive in bf16 already, and autocast keeps the ops it lists as
    float32 (LayerNorm, softmax, the loss) in float32."""
    if train.mixed_precision and (rt.device.type == "cuda" or (rt.device.type == "cpu" and fast_bfloat16(rt.device))):
        return torch.autocast(rt.device.type, dtype=torch.bfloat16)
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
    # 1. process
    "Runtime", "setup", "teardown", "barrier", "seed_everything", "hash_seed", "gather", "mean_across_ranks",
    "broadcast_from_main", "average_gradients",
    # 2. parallel
    "parallelize", "fsdp_policy", "wrap_ddp", "compile_blocks", "unwrap", "is_sharded", "shard_like",
    # 3. precision
    "autocast", "evaluating", "frozen",
]
