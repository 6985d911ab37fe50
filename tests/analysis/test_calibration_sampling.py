"""Reliability bins and ECE against a hand count; the class-balanced reservoir."""

import math

import pytest
import torch

from udaseg.analysis.calibration import ReliabilityAccumulator
from udaseg.analysis.sampling import ClassBalancedReservoir


def test_reliability_against_a_hand_count():
    acc = ReliabilityAccumulator(bins=4, threshold=0.9)
    confidence = torch.tensor([0.1, 0.3, 0.3, 0.6, 0.95, 1.0, 0.9])
    correct = torch.tensor([False, True, False, True, True, False, True])
    acc.update(confidence[:3], correct[:3])
    acc.update(confidence[3:], correct[3:])
    s = acc.summary()
    # bins [0,.25): 0.1 | [.25,.5): 0.3, 0.3 | [.5,.75): 0.6 | [.75,1]: 0.95, 1.0 (last bin closed), 0.9
    assert s["counts"] == [1, 2, 1, 3]
    assert s["confidence"] == pytest.approx([0.1, 0.3, 0.6, (0.95 + 1.0 + 0.9) / 3])
    assert s["accuracy"] == pytest.approx([0.0, 0.5, 1.0, 2 / 3])
    gaps = [1 * 0.1, 2 * 0.2, 1 * 0.4, 3 * abs(2 / 3 - 2.85 / 3)]
    assert s["ece"] == pytest.approx(sum(gaps) / 7)
    assert s["coverage"] == pytest.approx(3 / 7) and s["precision"] == pytest.approx(2 / 3)
    assert s["pixels"] == 7 and s["accuracy_overall"] == pytest.approx(4 / 7)


def test_reliability_from_logits_skips_ignored_pixels_and_empty_bins_are_none():
    logits = torch.tensor([[[[10.0, 0.0]], [[0.0, 0.0]]]])  # B=1, K=2, 1×2: confident 0, then 50/50
    labels = torch.tensor([[[0, 255]]])
    acc = ReliabilityAccumulator(bins=10, threshold=0.968)
    acc.update_from_logits(logits, labels)
    s = acc.summary()
    assert s["pixels"] == 1 and s["counts"][9] == 1 and s["accuracy"][9] == 1.0
    assert s["accuracy"][0] is None and s["ece"] == pytest.approx(1 - torch.tensor([10.0, 0.0]).softmax(0)[0].item())


def test_reliability_of_nothing_is_nan():
    s = ReliabilityAccumulator().summary()
    assert math.isnan(s["ece"]) and math.isnan(s["coverage"]) and math.isnan(s["precision"])


def test_reservoir_keeps_everything_under_capacity_and_caps_each_class():
    reservoir = ClassBalancedReservoir(num_classes=3, dim=2, capacity=5, seed=0)
    labels = torch.tensor([0] * 12 + [1] * 3)
    feats = torch.stack([torch.arange(15.0), torch.zeros(15)], 1)
    reservoir.add(feats, labels)
    assert reservoir.counts() == [5, 3, 0]
    f, l = reservoir.sample()
    assert l.tolist() == [0] * 5 + [1] * 3
    assert sorted(f[l == 1, 0].tolist()) == [12.0, 13.0, 14.0]
    assert set(f[l == 0, 0].tolist()) <= set(range(12))


def test_reservoir_keeps_the_lowest_priorities_whatever_the_batching():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (500,), generator=gen)
    feats = torch.arange(500.0)[:, None].repeat(1, 2)
    whole = ClassBalancedReservoir(4, 2, capacity=20, seed=7)
    whole.add(feats, labels)
    batched = ClassBalancedReservoir(4, 2, capacity=20, seed=7)
    for chunk in torch.arange(500).split(33):
        batched.add(feats[chunk], labels[chunk])
    # the reference: the same priorities drawn by hand, the 20 lowest of each class
    priority = torch.rand(500, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for c in range(4):
        idx = torch.nonzero(labels == c)[:, 0]
        expected = idx[priority[idx].argsort()[:20]].float()
        for reservoir in (whole, batched):
            f, _ = reservoir.sample(classes=[c])
            assert f[:, 0].tolist() == expected.tolist()
    # a smaller per-class sample is the prefix in priority order
    small, _ = whole.sample(per_class=5, classes=[1])
    full, _ = whole.sample(classes=[1])
    assert torch.equal(small, full[:5])
