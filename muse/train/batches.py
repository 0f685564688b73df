"""An endless, resumable stream of training batches.

Map-style datasets get a deterministic order: epoch e is the permutation drawn from (seed, e), split across ranks
(rank r takes every world_size-th index). The stream's position is (epoch, batches consumed in that epoch), so a
resumed run rebuilds the same permutation and continues on the exact next batch.

Streaming (iterable) datasets cannot seek: on resume the first `batch` batches of the epoch are read and dropped.
That costs reading time, not correctness, as long as the dataset's order depends only on (seed, epoch), which holds
for `WebDatasetImages`.

    batches = BatchStream(dataset, batch_size=32, seed=0, rank=rt.rank, world_size=rt.world_size)
    batches.load_state_dict(saved)   # on resume
    batch = next(batches)
    saved = batches.state_dict()     # {"epoch": 3, "batch": 17}
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's batches of one epoch, starting at batch `start`.

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

    def __len__(self) -> int:
        return self.batches_per_epoch(self.num_items, self.batch_size, self.world_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        count = self.batches_per_epoch(self.num_items, self.batch_size, self.world_size) * self.batch_size
        total = count * self.world_size
        order = order.repeat(math.ceil(total / self.num_items))[:total]
        mine = order[self.rank :: self.world_size].tolist()
        for b in range(self.start, count // self.batch_size):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def hash_seed(seed: int, epoch: int) -> int:
    # Mix the two so (seed 0, epoch 1) and (seed 1, epoch 0) do not share a permutation.
    return (seed * 1_000_003 + epoch * 7919 + 12345) % 2**63


class BatchStream:
    """Endless batches over epochs; `state_dict` is the position of the next batch to be returned."""

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
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.streaming = isinstance(dataset, IterableDataset)
        self.epoch = 0
        self.batch = 0  # batches of `epoch` already returned
        self._iterator: Iterator[Any] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "samples": self.batch * self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
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
                self.epoch, self.batch = self.epoch + 1, 0
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
        if self.streaming:
            loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                drop_last=True,
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                generator=generator,
            )
            # Streams cannot seek: read and drop the batches this epoch already consumed.
            return itertools.islice(iter(loader), self.batch, None)
        sampler = EpochBatchSampler(
            len(self.dataset),
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            start=self.batch,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            generator=generator,
        )
        return iter(loader)


__all__ = ["EpochBatchSampler", "BatchStream"]
