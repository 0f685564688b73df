"""What every stage's training loop shares, in the order a loop uses it:

1. process    `setup` (device, torchrun's process group, seeds, TF32), collectives (`mean_across_ranks`, ...)
2. model      `parallelize` (DDP, or FSDP2 `fully_shard` per block with a bf16 policy on GPU), `compile_blocks`,
              `EMA`, `evaluation_model` (the plain model rank 0 validates, samples and exports)
3. optimizer  AdamW (fused on GPU, weight decay on Linear / Conv weights only), warmup + cosine, clipping
4. precision  `autocast` (bf16 on CUDA), `evaluating`
5. data       `BatchStream`: endless, resumable batches over epochs, split over ranks, pinned on GPU
6. logging    `TrainLogger` (tqdm, TensorBoard or CSV on rank 0), `Meter` (running means without a sync per step)
7. checkpoint the run directory, `save_checkpoint` / `restore` in two formats (below)

    rt = setup(cfg.train)
    saved = prepare_run_dir(run_dir, cfg, resume, rt)
    net = parallelize(net, units, rt, cfg.train)
    optimizer, scheduler = build_optimizer(model, cfg.train, rt), build_scheduler(...)
    step = restore(saved, components, batches, cfg, rt) if saved else 0
    ...
    save_checkpoint(run_dir, step, components, batches, cfg, rt, keep_every)

Checkpoints. A run directory holds

    config.yaml                   the resolved run config
    checkpoints/last.pt           train.parallel=ddp: the whole training state, one `torch.save`d file by rank 0
    checkpoints/step-NNNNNNN/     train.parallel=fsdp: a `torch.distributed.checkpoint` directory (each rank writes
                                  its shards of the weights, EMA and optimizer state) + `trainer.pt` (step, schedulers,
                                  every rank's RNG and data position, config), found through `checkpoints/last.json`
    samples/  logs/  <component>/ grids, scalars, and the exported model (config.json + model.safetensors)

Both are written atomically: `last.pt` through a renamed temporary file; a sharded checkpoint into `step-N.tmp/`,
renamed to `step-N/` once every rank's shards and `trainer.pt` are on disk, and only then named by `last.json` (itself
replaced atomically); the previous directory is deleted after that. A crash at any point leaves the old checkpoint or
the new one. Either format resumes exactly on the same number of processes. A sharded checkpoint also resumes on any
other number (the tensors are resharded by torch.distributed.checkpoint); a `last.pt` also resumes under FSDP (each
rank takes its shard of every tensor), so a DDP run can switch to FSDP when it outgrows a GPU. On a different number
of processes the data continues from the same sample of the epoch, and the random streams are reseeded.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import pickle
import random
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from muse.config import TrainConfig, config_to_dict
from muse.options import fast_bfloat16
from transformer.saving import load_weights

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
# 2. Model: data-parallel or sharded, compiled blocks, EMA, and the plain model for evaluation


def parallelize(net: nn.Module, units: Sequence[nn.Module], rt: Runtime, train: TrainConfig) -> nn.Module:
    """`net` (the module whose forward the loss calls) ready for `train.parallel` on `rt`; `model.parameters()` of the
    modules inside stay what the optimizer and EMA see.

    ddp: DistributedDataParallel under torchrun (it broadcasts rank 0's weights at construction), `net` unchanged in
    one process. fsdp: PyTorch's FSDP2 (`fully_shard`) on each of `units` (innermost first), then on `net` for the
    parameters left over. Each unit's weights are all-gathered just before its forward and freed after, its gradients
    reduce-scattered after its backward, so a process holds 1/world_size of the weights, gradients and AdamW state
    plus one unit unsharded at a time. On CUDA with `mixed_precision` the gathered weights are bf16 (half the traffic)
    and gradients are reduced in float32. In one process fsdp is a no-op (there is nothing to shard over), but the
    checkpoints keep the sharded format so the run can grow or shrink.
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
    `full`), else `full` itself. How a whole-model checkpoint resumes under FSDP."""
    if like is None or not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def start_from_weights(model: nn.Module, path: str | Path, component: str) -> None:
    """Start `model` from the weights saved in `path` (`model.safetensors`, any float dtype): a model directory, or
    a training run directory (its exported `component/`), or a pipeline directory (its `component/`). Every tensor
    must exist with the same shape, else ValueError naming it. Only the weights are taken; optimiser, schedule and
    step start fresh, and settings without weights (dropout) come from the run's own config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"train.init_from {path} is not a directory")
    if not (path / "model.safetensors").is_file() and (path / component / "model.safetensors").is_file():
        path = path / component  # a run directory (its export) or a pipeline directory
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"train.init_from {path} holds no model.safetensors (nor {component}/ with one): "
                                "give a model directory, a run directory or a pipeline directory")
    try:
        load_weights(path, model)
    except ValueError as e:
        raise ValueError(f"train.init_from {path} does not fit this run's model ({e}); init_from needs a model of "
                         "the same architecture and size") from None


class EMA:
    """An exponential moving average of a model's weights: one float32 tensor per entry of its state dict.

    Parameters are averaged; buffers (e.g. the VQGAN's EMA codebook, norm statistics) are copied, since they are
    running statistics of the live model already. Under FSDP the tensors are shards like the model's, so the average
    costs 1/world_size of the memory too; `evaluation_model` gathers them when rank 0 needs the whole model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        live = unwrap(model)
        self.param_names = [name for name, _ in live.named_parameters()]
        self.tensors: dict[str, Tensor] = {name: t.detach().clone() for name, t in live.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = unwrap(model)
        params = dict(live.named_parameters())
        averaged = [self.tensors[name] for name in self.param_names]
        # One fused kernel per dtype group instead of one per tensor: hundreds of launches on a large model.
        torch._foreach_lerp_(averaged, [params[name].detach() for name in self.param_names], 1.0 - self.decay)
        for name, buffer in live.named_buffers():
            if name in self.tensors:
                self.tensors[name].copy_(buffer)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.tensors.keys():
            missing, unexpected = sorted(self.tensors.keys() - state.keys()), sorted(state.keys() - self.tensors.keys())
            raise CheckpointError(f"the EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(state[name])


def evaluation_model(model: nn.Module, ema: EMA | None, rt: Runtime) -> nn.Module | None:
    """The model rank 0 validates, samples and exports: the EMA weights when there is an EMA, else the live weights.
    None on the other ranks. A collective when the weights are sharded (they are gathered to rank 0)."""
    live = unwrap(model)
    state = ema.state_dict() if ema is not None else live.state_dict()
    sharded = any(is_sharded(t) for t in state.values())
    if not sharded and ema is None:
        return live if rt.is_main else None
    if sharded:
        state = {name: t.full_tensor() if is_sharded(t) else t for name, t in state.items()}  # every rank gathers
    if not rt.is_main:
        return None
    # Built on the meta device and given the tensors themselves: no init, no copy of the weights.
    with torch.device("meta"):
        plain = type(live)(live.config)
    plain.load_state_dict(state, assign=True)
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:  # a non-persistent buffer (not in the state dict): the live model's
            module_name, _, buffer_name = name.rpartition(".")
            plain.get_submodule(module_name).register_buffer(buffer_name, live.get_buffer(name).clone(),
                                                             persistent=False)
    return plain.to(rt.device).eval().requires_grad_(False)


# ====================================================================================================================
# 3. Optimizer and schedule


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


# ====================================================================================================================
# 4. Precision and modes


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


# ====================================================================================================================
# 5. Data: an endless, resumable stream of batches
#
# Map-style datasets get a deterministic order: epoch e is the permutation drawn from (seed, e), split across ranks
# (rank r takes every world_size-th index). The stream's position is (epoch, items of that epoch's order consumed by
# all ranks together): the ranks' batches always cover a prefix of the order, so a resumed run rebuilds the same
# permutation and continues on the exact next batch, and a run resumed on a different number of processes continues
# from the same item.
#
# Streaming (iterable) datasets cannot seek: on resume the batches of the epoch already consumed are read and dropped.
# That costs reading time, not correctness, as long as the dataset's order depends only on (seed, epoch), which holds
# for `WebDatasetImages` (on a different number of processes its shards split differently: the position is then
# approximate).


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's batches of one epoch, from item `start` of the epoch's order on.

    Every rank gets the same number of full batches per epoch (ranks must step in lockstep): the permutation is
    repeated as needed so that a dataset smaller than world_size * batch_size still yields one batch per rank, and the
    incomplete last batch is dropped.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        start: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("cannot batch an empty dataset")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle, self.start = shuffle, start

    @staticmethod
    def batches_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
        per_rank = max(math.ceil(num_items / world_size), batch_size)
        return per_rank // batch_size

    def _total(self) -> int:
        """Items of the (repeated) order the whole epoch covers: the same full batch count on every rank."""
        return self.batches_per_epoch(self.num_items, self.batch_size, self.world_size) * self.batch_size * \
            self.world_size

    def __len__(self) -> int:
        return max(self._total() - self.start, 0) // self.world_size // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        total = self._total()
        order = order.repeat(math.ceil(total / self.num_items))[:total]
        mine = order[self.start + self.rank :: self.world_size].tolist()
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def hash_seed(seed: int, epoch: int) -> int:
    # Mix the two so (seed 0, epoch 1) and (seed 1, epoch 0) do not share a permutation.
    return (seed * 1_000_003 + epoch * 7919 + 12345) % 2**63


class BatchStream:
    """Endless batches over epochs; `state_dict` is the position of the next batch to be returned.

    `pin_memory` (pass it on CUDA) collates into page-locked memory, so the copy to the GPU can overlap the step
    before; with `num_workers` the items are read and collated in that many worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.collate_fn = collate_fn
        self.streaming = isinstance(dataset, IterableDataset)
        self.epoch = 0
        self.batch = 0   # batches of `epoch` this stream has returned
        self.offset = 0  # items of `epoch` consumed before this stream's first batch (a resume on another world size)
        self._iterator: Iterator[Any] | None = None

    @property
    def consumed(self) -> int:
        """Items of the current epoch's order consumed by all ranks together."""
        return self.offset + self.batch * self.batch_size * self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "samples": self.batch * self.batch_size,
                "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by this rank in a run of the same number of processes."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        # Positions saved before "consumed" existed come from runs that never changed size: offset 0.
        self.offset = int(state.get("consumed", self.consumed)) - self.batch * self.batch_size * self.world_size
        self._iterator = None

    def resume_from(self, states: list[dict[str, int]]) -> None:
        """Continue from the positions of every rank of a run with `len(states)` processes (any number)."""
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        # Ranks step in lockstep, so rank 0's position is everyone's; older positions count "samples" per rank.
        first = states[0]
        self.epoch, self.batch = int(first["epoch"]), 0
        self.offset = int(first.get("consumed", int(first["samples"]) * len(states)))
        self._iterator = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        for _ in range(2):  # a fresh epoch must yield at least one batch; a second empty one means no data at all
            if self._iterator is None:
                self._iterator = self._open_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.batch, self.offset = self.epoch + 1, 0, 0
                continue
            self.batch += 1
            return batch
        raise RuntimeError(f"the dataset yielded no full batch of {self.batch_size} in an epoch")

    def _open_epoch(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        # A private generator: building the loader's iterator must not draw from the global RNG, whose state the
        # checkpoint restores; otherwise a resumed run would draw different masks than an uninterrupted one.
        generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch))
        loader_args = dict(num_workers=self.num_workers, collate_fn=self.collate_fn, generator=generator,
                           pin_memory=self.pin_memory)
        if self.streaming:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **loader_args)
            # Streams cannot seek: read and drop the batches this epoch already consumed.
            skip = self.consumed // (self.batch_size * self.world_size)
            return itertools.islice(iter(loader), skip, None)
        sampler = EpochBatchSampler(
            len(self.dataset),
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            start=self.consumed,
        )
        return iter(DataLoader(self.dataset, batch_sampler=sampler, **loader_args))


# ====================================================================================================================
# 6. Logging
#
# Training output on rank 0: a tqdm bar, scalars to TensorBoard or a CSV file, and throughput. Every method is safe to
# call on any rank; only rank 0 writes. Scalars go to `run_dir/logs/` either as TensorBoard events or as `scalars.csv`
# (one `step,name,value` row each, so new names can appear at any step). On resume the CSV is appended to after
# dropping its rows past the resumed step (an interrupted run logs beyond its last checkpoint), and TensorBoard
# discards such events itself, so curves have no duplicate stretch.


class TrainLogger:
    def __init__(self, run_dir: Path, kind: str, *, is_main: bool, total_steps: int, start_step: int) -> None:
        self.is_main = is_main
        self._bar = None
        self._writer = None
        self._csv_file = None
        if not is_main:
            return
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow and only rank 0 needs it

            self._writer = SummaryWriter(str(logs), purge_step=start_step + 1 if start_step else None)
        elif kind == "csv":
            path = logs / "scalars.csv"
            new = not path.exists()
            if not new:
                _drop_rows_after(path, start_step)
            self._csv_file = open(path, "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        else:
            raise ValueError(f"logger must be tensorboard or csv, got {kind!r}")
        self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc=run_dir.name)

    def info(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        """One step done; `postfix` (plain numbers: pass it when they have been read anyway) is shown on the bar."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        for name, value in values.items():
            if self._writer is not None:
                self._writer.add_scalar(name, value, step)
            else:
                self._csv.writerow([step, name, f"{float(value):.6g}"])
        if self._csv_file is not None:
            self._csv_file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite `path` without the rows logged after `step`; atomic, so a crash here cannot lose the log."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    tmp.replace(path)


class Meter:
    """Running means of per-step scalars and the item rate (images/s or tokens/s) since the last `summary`.

    Values may be tensors on the device: they are summed there and read once per `summary`, because reading a GPU
    number every step would make the CPU wait for the GPU and stop it queueing the next step's work.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._count = 0
        self._items = 0
        self._start = time.perf_counter()

    def add(self, values: dict[str, Tensor | float], items: int) -> None:
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1
        self._items += items

    def summary(self) -> tuple[dict[str, float], float]:
        """(mean of each scalar, items per second) over the interval, then start a new interval."""
        means = {name: float(total) / max(self._count, 1) for name, total in self._sums.items()}
        elapsed = max(time.perf_counter() - self._start, 1e-9)  # after reading the sums: the GPU work is done
        rate = self._items / elapsed
        self._reset()
        return means, rate


# ====================================================================================================================
# 7. Checkpoints

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"                  # train.parallel=ddp: the whole state in one file
LAST_SHARDED = "last.json"        # train.parallel=fsdp: names the newest complete sharded checkpoint directory
TRAINER_FILE = "trainer.pt"       # inside a sharded checkpoint: everything but the sharded tensors
KEPT_MARKER = "kept"              # inside a sharded checkpoint: never deleted (--keep-every)
SHARDED_FORMAT = "musegen-sharded/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or a run directory that cannot be resumed or started."""


@dataclass(frozen=True)
class Saved:
    """A checkpoint found in a run directory, to resume from."""

    path: Path            # checkpoints/last.pt, or a sharded checkpoint directory
    sharded: bool
    state: dict           # last.pt's whole dict, or a sharded checkpoint's trainer.pt (no tensors of the models)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a half-written file under `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows), so it is best effort there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a `torch.save`d checkpoint file (`last.pt`, or a sharded checkpoint's `trainer.pt`) onto the CPU; a
    truncated or corrupt file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the file also holds numpy / python RNG states, and it is our own file. mmap: the tensors
        # are read as they are used, and the processes of a node that all load one last.pt share its pages.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a musegen training checkpoint")
    return state


def latest_sharded(run_dir: Path) -> Path | None:
    """The sharded checkpoint directory `last.json` names, or None when there is none."""
    pointer = checkpoint_dir(run_dir) / LAST_SHARDED
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer} is corrupt ({type(error).__name__}: {error})") from None
    path = checkpoint_dir(run_dir) / name
    if not (path / TRAINER_FILE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete sharded checkpoint")
    return path


def find_checkpoint(run_dir: Path) -> tuple[Path, bool] | None:
    """(path, sharded) of the newest checkpoint in `run_dir`, or None. A run that switched between ddp and fsdp can
    hold both formats for the moment between writing the new one and removing the old one: the newer file wins."""
    full = checkpoint_dir(run_dir) / LAST
    sharded = latest_sharded(run_dir)
    found = [(p, p == sharded) for p in (full, sharded) if p is not None and p.exists()]
    if not found:
        return None
    return max(found, key=lambda item: (item[0] / TRAINER_FILE if item[1] else item[0]).stat().st_mtime)


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool, rt: Runtime) -> Saved | None:
    """Create the run directory and return the checkpoint to resume from (None = start fresh).

    Without `resume`, a directory that already holds a checkpoint is refused rather than silently overwritten. With
    `resume` and no checkpoint yet, training starts fresh, so one command serves both the first launch and every
    restart of a preemptible job. The resolved config is (re)written as `config.yaml`.
    """
    found = find_checkpoint(run_dir)
    if found is not None and not resume:
        raise CheckpointError(f"{run_dir} already holds a checkpoint ({found[0]}); pass --resume or choose another "
                              "out_dir")
    saved = None
    if found is not None:
        path, sharded = found
        saved = Saved(path, sharded, load_checkpoint(path / TRAINER_FILE if sharded else path))
    if saved is not None and rt.is_main:
        changed = changed_keys(saved.state["config"], config_to_dict(cfg))
        if changed:
            # Allowed (e.g. more steps, a new learning rate), but then the run is no longer one uninterrupted run.
            warnings.warn(f"resuming {saved.path} with a changed config: {', '.join(changed)}", stacklevel=2)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir(run_dir).glob("*.tmp"):  # a sharded save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write(run_dir / "config.yaml", lambda f: f.write(_config_yaml(cfg)))
    barrier(rt)  # no rank writes a checkpoint before the stale ones are gone
    return saved


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two plain config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [path for k in keys for path in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _config_yaml(cfg: Any) -> bytes:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # This process's device only: touching every GPU would create a context on each from every rank.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, components: dict[str, Any], batches: BatchStream, cfg: Any,
                    rt: Runtime, keep_every: int | None) -> None:
    """Save the training state after `step` steps in the format of `cfg.train.parallel`; a collective (every rank
    calls it). `components` maps names to objects with `state_dict` / `load_state_dict`: models (unwrapped from DDP),
    optimizers, schedulers and EMA. Every `keep_every` steps the checkpoint is also kept for good."""
    if cfg.train.parallel == "fsdp":
        save_sharded(run_dir, step, components, batches, cfg, rt, keep_every)
    else:
        write_checkpoint(run_dir, collect_state(step, components, batches, cfg, rt), keep_every)
    if rt.is_main:
        _remove_other_format(run_dir, sharded=cfg.train.parallel == "fsdp")


def collect_state(step: int, components: dict[str, Any], batches: BatchStream, cfg: Any, rt: Runtime) -> dict | None:
    """The whole training state after `step` steps (the `last.pt` format); a collective (every rank's RNG and data
    position are gathered), and only rank 0 gets the dict (None elsewhere)."""
    rngs = gather(rng_state(), rt)
    positions = gather(batches.state_dict(), rt)
    if not rt.is_main:
        return None
    return {
        "step": step,
        "components": {name: obj.state_dict() for name, obj in components.items()},
        "rng": rngs,
        "data": positions,
        "world_size": rt.world_size,
        "config": config_to_dict(cfg),
    }


def write_checkpoint(run_dir: Path, state: dict[str, Any] | None, keep_every: int | None) -> None:
    """Write `last.pt` (rank 0 only: other ranks pass None) and, every `keep_every` steps, a kept copy
    `step-NNNNNNN.pt` that later saves do not overwrite."""
    if state is None:
        return
    directory = checkpoint_dir(run_dir)
    atomic_write(directory / LAST, lambda f: torch.save(state, f))
    if keep_every and state["step"] % keep_every == 0:
        atomic_write(directory / f"step-{state['step']:07d}.pt", lambda f: torch.save(state, f))


def save_sharded(run_dir: Path, step: int, components: dict[str, Any], batches: BatchStream, cfg: Any,
                 rt: Runtime, keep_every: int | None) -> None:
    """Write `checkpoints/step-NNNNNNN/` with torch.distributed.checkpoint (each rank its shards) and point
    `last.json` at it; see the module docstring for why a crash cannot leave a half checkpoint behind."""
    import torch.distributed.checkpoint as dcp

    directory = checkpoint_dir(run_dir)
    name = f"step-{step:07d}"
    tmp, final = directory / f"{name}.tmp", directory / name
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    tensors, rest = _sharded_state(components)
    # Every rank writes its own shards (fsynced); rank 0 writes `.metadata` once all have finished.
    with _single_process_quietly(rt):
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not rt.distributed)
    rngs, positions = gather(rng_state(), rt), gather(batches.state_dict(), rt)
    if rt.is_main:
        trainer = {"format": SHARDED_FORMAT, "step": step, "components": rest, "rng": rngs, "data": positions,
                   "world_size": rt.world_size, "config": config_to_dict(cfg)}
        atomic_write(tmp / TRAINER_FILE, lambda f: torch.save(trainer, f))
        if keep_every and step % keep_every == 0:
            atomic_write(tmp / KEPT_MARKER, lambda f: f.write(b""))
        previous = latest_sharded(run_dir)
        # `last.json` never names `final` here: saving step N again means the run resumed from an earlier checkpoint,
        # so a `step-N/` on disk is a leftover of the interrupted attempt.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(directory)
        atomic_write(directory / LAST_SHARDED,
                     lambda f: f.write(json.dumps({"format": SHARDED_FORMAT, "step": step, "dir": name}).encode()))
        if previous is not None and previous != final and not (previous / KEPT_MARKER).exists():
            shutil.rmtree(previous)
    barrier(rt)


@contextlib.contextmanager
def _single_process_quietly(rt: Runtime) -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes one process when there is no process group, even when told
    so (`no_dist`); one process is the intent here."""
    with warnings.catch_warnings():
        if not rt.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _remove_other_format(run_dir: Path, sharded: bool) -> None:
    """After a save in one format, drop the latest checkpoint of the other (a run that switched ddp <-> fsdp), so
    resuming cannot pick the older one. Kept copies stay."""
    directory = checkpoint_dir(run_dir)
    if sharded:
        (directory / LAST).unlink(missing_ok=True)
        return
    previous = latest_sharded(run_dir) if (directory / LAST_SHARDED).exists() else None
    (directory / LAST_SHARDED).unlink(missing_ok=True)
    if previous is not None and not (previous / KEPT_MARKER).exists():
        shutil.rmtree(previous)


def _sharded_state(components: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensors torch.distributed.checkpoint saves: models, EMA and optimizers; the rest: schedulers)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors, rest = {}, {}
    for name, obj in components.items():
        if isinstance(obj, torch.optim.Optimizer):
            # Keyed by parameter name (not position), with sharded tensors under FSDP: loadable into any layout.
            tensors[name] = get_optimizer_state_dict(_owner(obj, components), obj)
        elif isinstance(obj, (nn.Module, EMA)):
            tensors[name] = obj.state_dict()
        else:
            rest[name] = obj.state_dict()
    return tensors, rest


def _owner(optimizer: torch.optim.Optimizer, components: dict[str, Any]) -> nn.Module:
    """The model among `components` whose parameters `optimizer` updates."""
    first = optimizer.param_groups[0]["params"][0]
    for obj in components.values():
        if isinstance(obj, nn.Module) and any(p is first for p in obj.parameters()):
            return obj
    raise CheckpointError("an optimizer's parameters belong to none of the checkpointed models")


def restore(saved: Saved, components: dict[str, Any], batches: BatchStream, cfg: Any, rt: Runtime) -> int:
    """Load `saved` into the components, the batch stream and this rank's RNGs; returns the step to continue from.
    Call it after every model is built and parallelized, since building draws from the RNGs being restored."""
    if saved.sharded:
        _load_sharded(saved, components, rt)
    else:
        _load_full(saved, components)
    old_world = len(saved.state["rng"])
    batches.resume_from(saved.state["data"])
    if old_world == rt.world_size:
        set_rng_state(saved.state["rng"][rt.rank])
    else:
        if rt.is_main:
            warnings.warn(f"resuming {saved.path}, saved by {old_world} process(es), on {rt.world_size}: the weights "
                          "and optimizer state are restored exactly and the data continues from the same sample, but "
                          "the random streams (masks, dropout) are reseeded, so the run is not the one it would have "
                          f"been on {old_world}", stacklevel=2)
        seed_everything(hash_seed(cfg.train.seed + rt.rank, int(saved.state["step"])))
    return int(saved.state["step"])


def _load_full(saved: Saved, components: dict[str, Any]) -> None:
    """Components from a `last.pt`; under FSDP each rank keeps its shard of every tensor."""
    stored = saved.state["components"]
    missing = sorted(set(components) - set(stored))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {missing} (saved: {sorted(stored)})")
    for name, obj in components.items():
        state = stored[name]
        if isinstance(obj, (nn.Module, EMA)):
            current = obj.state_dict()
            state = {key: shard_like(value, current.get(key)) for key, value in state.items()}
        elif isinstance(obj, torch.optim.Optimizer):
            params = [p for group in obj.param_groups for p in group["params"]]
            state = {**state, "state": {
                index: {key: shard_like(value, params[index]) if _same_shape(value, params[index]) else value
                        for key, value in entry.items()}
                for index, entry in state["state"].items()}}
        obj.load_state_dict(state)


def _same_shape(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape)


def _load_sharded(saved: Saved, components: dict[str, Any], rt: Runtime) -> None:
    """Components from a torch.distributed.checkpoint directory, resharded to this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors, _ = _sharded_state(components)  # the layout to fill: this run's (sharded or whole) tensors
    try:
        with _single_process_quietly(rt):
            dcp.load(tensors, checkpoint_id=saved.path, no_dist=not rt.distributed)
    except Exception as error:  # noqa: BLE001 - a missing or mismatched tensor: name the checkpoint
        raise CheckpointError(f"cannot load the sharded checkpoint {saved.path} into this run "
                              f"({type(error).__name__}: {error})") from None
    stored = saved.state["components"]
    for name, obj in components.items():
        if isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(obj, components), obj, tensors[name])
        elif isinstance(obj, (nn.Module, EMA)):
            obj.load_state_dict(tensors[name])
        elif name in stored:
            obj.load_state_dict(stored[name])
        else:
            raise CheckpointError(f"the checkpoint {saved.path} has no state for {name!r}")


__all__ = [
    # 1. process
    "Runtime", "setup", "teardown", "barrier", "seed_everything", "gather", "mean_across_ranks",
    "broadcast_from_main", "average_gradients",
    # 2. model
    "parallelize", "fsdp_policy", "wrap_ddp", "compile_blocks", "unwrap", "is_sharded", "shard_like",
    "start_from_weights", "EMA", "evaluation_model",
    # 3. optimizer
    "decay_and_no_decay", "build_optimizer", "lr_factor", "build_scheduler", "step_optimizer", "clip_and_step",
    # 4. precision
    "autocast", "evaluating", "frozen",
    # 5. data
    "EpochBatchSampler", "hash_seed", "BatchStream",
    # 6. logging
    "TrainLogger", "Meter",
    # 7. checkpoints
    "CheckpointError", "Saved", "checkpoint_dir", "atomic_write", "fsync_dir", "load_checkpoint", "latest_sharded",
    "find_checkpoint", "prepare_run_dir", "changed_keys", "rng_state", "set_rng_state", "save_checkpoint",
    "collect_state", "write_checkpoint", "save_sharded", "restore",
]
