"""Reproducible, resumable, shardable data streams for iteration-based training.

Every item is loaded under its own seed, derived from (run seed, stream, epoch, position), so its
random crop and flip do not depend on the number of loader workers or on where a run was resumed.
A stream's position is a single integer (items consumed), which is all a checkpoint needs.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK = (1 << 62) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 62-bit hash of integers (splitmix64 steps)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & _MASK


class SeededItems(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` loads ``index`` with torch seeded by ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also queue seeds for every
            # accelerator backend, which costs more than loading a small item.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class ShuffledStreamSampler(Sampler):
    """An endless stream of (index, seed): a fresh permutation per epoch, sharded over ranks.

    Global position ``p`` (counted in items over all ranks) belongs to rank ``p % world_size``, so a
    run on N ranks sees the same items per global batch as a single-process run.
    """

    def __init__(self, size: int, seed: int, stream: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.seed = seed
        self.stream = stream
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, epoch))
        return torch.randperm(self.size, generator=gen)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        # Advance to this rank's first position at or after start.
        position += (self.rank - position) % self.world_size
        epoch, perm = -1, None
        while True:
            e = position // self.size
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            index = int(perm[position % self.size])
            yield index, mix_seed(self.seed, self.stream, position)
            position += self.world_size

    def __len__(self) -> int:  # DataLoader asks for it only for progress; the stream is endless
        return 2**62


class DataStream:
    """An endless iterator of collated batches that knows how many items it has delivered."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, stream: int, workers: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size  # per rank
        self.seed = seed
        self.stream = stream
        self.workers = workers
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.position = start  # global items consumed
        self._iterator = None

    def _make_iterator(self):
        sampler = ShuffledStreamSampler(len(self.dataset), self.seed, self.stream, self.position, self.rank,
                                        self.world_size)
        # A private generator: creating the loader's iterator must not draw from the global RNG,
        # or a resumed run (which creates a fresh iterator) would leave the straight trajectory.
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, self.rank))
        loader = DataLoader(SeededItems(self.dataset), batch_size=self.batch_size, sampler=sampler,
                            num_workers=self.workers, pin_memory=self.pin_memory, drop_last=True,
                            persistent_workers=self.workers > 0, generator=generator)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self.position += self.batch_size * self.world_size
        return batch
