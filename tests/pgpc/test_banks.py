"""The pixel memory banks: FIFO order, enqueue limits, prototypes, negative pools, state round trip."""

import io

import pytest
import torch

from udaseg.adapt.pixel_bank import ClassPixelQueues, RankedPixelQueue, random_subset


def numbered(n, dim=3, start=0):
    """Features whose first coordinate identifies them."""
    features = torch.zeros(n, dim)
    features[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return features


def test_class_queues_are_fifo_per_class_and_cap_each_push():
    bank = ClassPixelQueues(num_classes=2, dim=3, capacity=4)
    gen = torch.Generator().manual_seed(0)
    bank.push(numbered(3), torch.tensor([0, 0, 1]), per_class=10, generator=gen)
    assert bank.length.tolist() == [2, 1]
    assert bank.entries(0)[:, 0].tolist() == [0, 1] and bank.entries(1)[:, 0].tolist() == [2]
    bank.push(numbered(3, start=10), torch.tensor([0, 0, 0]), per_class=10, generator=gen)
    assert bank.length.tolist() == [4, 1]
    assert bank.entries(0)[:, 0].tolist() == [1, 10, 11, 12]  # the oldest (0) was overwritten
    bank.push(numbered(6, start=20), torch.zeros(6, dtype=torch.long), per_class=2, generator=gen)
    newest = bank.entries(0)[-2:, 0].tolist()
    assert bank.length[0] == 4 and len(set(newest)) == 2 and set(newest) <= set(range(20, 26))
    assert bank.entries(0)[:2, 0].tolist() == [11, 12]


def test_ignored_pixels_are_never_enqueued_and_bad_labels_are_rejected():
    bank = ClassPixelQueues(2, 3, 5)
    bank.push(numbered(3), torch.tensor([255, 1, 255]), per_class=5)
    assert bank.length.tolist() == [0, 1] and bank.entries(1)[0, 0] == 1
    with pytest.raises(ValueError, match="labels must lie"):
        bank.push(numbered(1), torch.tensor([2]), per_class=5)


def test_prototypes_are_the_means_of_the_queues():
    bank = ClassPixelQueues(3, 2, capacity=3)
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0], [0.0, 1.0]])
    bank.push(features, torch.tensor([0, 0, 0, 0, 1]), per_class=10)
    prototypes, valid = bank.prototypes()
    assert valid.tolist() == [True, True, False]
    torch.testing.assert_close(prototypes[0], torch.tensor([5.0, 4.0]))  # mean of the last 3
    torch.testing.assert_close(prototypes[1], torch.tensor([0.0, 1.0]))


def test_source_negatives_never_come_from_the_own_class():
    bank = ClassPixelQueues(3, 3, capacity=10)
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 5)
    features = numbered(15)
    bank.push(features, labels, per_class=10)
    gen = torch.Generator().manual_seed(0)
    negatives = bank.sample_excluding(0, 6, gen)
    assert negatives.shape == (6, 3) and set(negatives[:, 0].tolist()) <= set(range(6, 15))
    assert len(set(negatives[:, 0].tolist())) == 6
    assert bank.sample_excluding(1, 100, gen).shape[0] == 11  # all there are


def test_ranked_queue_selects_entries_whose_top_r_excludes_the_class():
    queue = RankedPixelQueue(dim=3, capacity=5, rank=2)
    top = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 1]])
    queue.push(numbered(4), top, torch.zeros(4, dtype=torch.long), per_image=10)
    assert queue.excluding(0).tolist() == [False, True, False, True, False]
    assert queue.excluding(1).tolist() == [False, False, True, False, False]
    negatives = queue.sample_excluding(3, 10, torch.Generator().manual_seed(0))
    assert sorted(negatives[:, 0].tolist()) == [0, 1, 2]
    queue.push(numbered(3, start=10), torch.tensor([[3, 0], [3, 0], [3, 0]]), torch.zeros(3, dtype=torch.long), 10)
    assert int(queue.length) == 5  # wrapped around: slots 0 and 1 hold entries 11 and 12
    assert queue.features[:, 0].tolist() == [11, 12, 2, 3, 10]
    assert queue.excluding(3).tolist() == [False, False, True, False, False]


def test_ranked_queue_enqueues_at_most_per_image_from_each_image():
    queue = RankedPixelQueue(dim=3, capacity=100, rank=1)
    images = torch.tensor([0] * 10 + [1] * 3)
    queue.push(numbered(13), torch.zeros(13, 1, dtype=torch.long), images, per_image=4,
               generator=torch.Generator().manual_seed(0))
    stored = queue.features[: int(queue.length), 0].tolist()
    assert len(stored) == 7 and sum(v < 10 for v in stored) == 4 and {10, 11, 12} <= set(stored)


def test_random_subset():
    assert random_subset(3, 5, None).tolist() == [0, 1, 2]
    picked = random_subset(10, 4, torch.Generator().manual_seed(0))
    assert picked.numel() == 4 and len(set(picked.tolist())) == 4


def test_banks_round_trip_through_a_weights_only_checkpoint():
    gen = torch.Generator().manual_seed(0)
    source, target = ClassPixelQueues(3, 4, 6), RankedPixelQueue(4, 9, 2)
    source.push(torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen), 3, gen)
    target.push(torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20, 2), generator=gen),
                torch.arange(20) % 2, 5, gen)
    buffer = io.BytesIO()
    torch.save({"s": source.state_dict(), "t": target.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    source2, target2 = ClassPixelQueues(3, 4, 6), RankedPixelQueue(4, 9, 2)
    source2.load_state_dict(state["s"])
    target2.load_state_dict(state["t"])
    for a, b in zip(list(source.buffers()) + list(target.buffers()), list(source2.buffers()) + list(target2.buffers())):
        assert torch.equal(a, b)
    # the restored banks continue identically
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(source.sample_excluding(1, 4, g1), source2.sample_excluding(1, 4, g2))
    assert torch.equal(target.sample_excluding(0, 4, g1), target2.sample_excluding(0, 4, g2))
