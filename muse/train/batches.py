"""An endless, resumable stream of batches over epochs, split over the ranks (`BatchStream`, `EpochBatchSampler`).

Map-style datasets get a deterministic order: epoch e is the permutation drawn from (seed, e), split across ranks
(rank r takes every world_size-th index). The stream's position is (epoch, items of that epoch's order consumed by
all ranks together): the ranks' batches always cover a prefix of the order, so a resumed run rebuilds the same
permutation and continues on the exact next batch, and a run resumed on a different number of processes continues
from the same item.

Streaming (iterable) datasets cannot seek: on resume the batches of the epoch already consumed are read and dropped.
That costs reading time, not correctness, as long as the dataset's order depends only on (seed, epoch), which holds
for `WebDatasetImages` (on a different number of processes its shards split differently: the position is then
approximate).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from muse.train.runtime import hash_seed



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


__all__ = ["EpochBatchSampler", "BatchStream"]
