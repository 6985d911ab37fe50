"""Data streams: reproducible per item, independent of workers, resumable, sharded like one process."""

import itertools

import torch
from torch.utils.data import Dataset

from udaseg.engine.loader import DataStream, ShuffledStreamSampler


class RandomCrops(Dataset):
    """Each item draws a random number from torch's RNG, like a random crop would."""

    def __len__(self):
        return 7

    def __getitem__(self, index):
        return {"index": torch.tensor(index), "crop": torch.randint(0, 10**6, (1,))}


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_same_seed_same_stream_and_workers_do_not_matter():
    a = _take(DataStream(RandomCrops(), 2, seed=3, stream=0, workers=0), 6)
    b = _take(DataStream(RandomCrops(), 2, seed=3, stream=0, workers=2), 6)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["crop"], y["crop"])
    c = _take(DataStream(RandomCrops(), 2, seed=4, stream=0), 6)
    assert any(not torch.equal(x["crop"], y["crop"]) for x, y in zip(a, c))


def test_resume_from_position_continues_the_stream():
    straight = _take(DataStream(RandomCrops(), 2, seed=1, stream=0), 8)
    first = DataStream(RandomCrops(), 2, seed=1, stream=0)
    _take(first, 3)
    resumed = _take(DataStream(RandomCrops(), 2, seed=1, stream=0, start=first.position), 5)
    for x, y in zip(straight[3:], resumed):
        assert torch.equal(x["crop"], y["crop"])


def test_epochs_are_permutations():
    sampler = ShuffledStreamSampler(7, seed=0, stream=0)
    items = [i for i, _ in itertools.islice(iter(sampler), 14)]
    assert sorted(items[:7]) == list(range(7)) and sorted(items[7:]) == list(range(7))


def test_two_ranks_cover_the_single_process_batch():
    single = list(itertools.islice(iter(ShuffledStreamSampler(7, 5, 0)), 8))
    r0 = list(itertools.islice(iter(ShuffledStreamSampler(7, 5, 0, rank=0, world_size=2)), 4))
    r1 = list(itertools.islice(iter(ShuffledStreamSampler(7, 5, 0, rank=1, world_size=2)), 4))
    assert single[0::2] == r0 and single[1::2] == r1
