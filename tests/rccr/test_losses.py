"""RCCR's pieces on their own: the region loss against an explicit loop, sampling, cell labels, ramp, bank."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.downsample import downscale_label_majority
from udaseg.adapt.mixing import cutmix_boxes
from udaseg.adapt.pixel_bank import BatchFIFOBank
from udaseg.methods.rccr import (
    RegionContrastLoss, cell_labels_of_target, negative_mask, random_keep, rccr_weight, square_cells,
)


def reference_loss(z, z_hat, anchors, t_mask, s_mask, bank, b_mask, tau):
    """Eqs. 4-8 written out: one anchor, one negative at a time, in float64."""
    z, z_hat, bank = (F.normalize(x.double(), dim=1) for x in (z, z_hat, bank))
    out = []
    for i, a in enumerate(anchors.tolist()):
        pos = float(z[a] @ z_hat[a]) / tau
        total = math.exp(pos)
        for n in range(z.shape[0]):
            if t_mask[i, n]:
                total += math.exp(float(z[a] @ z_hat[n]) / tau)
            if s_mask[i, n]:
                total += math.exp(float(z[a] @ z[n]) / tau)
        for m in range(bank.shape[0]):
            if b_mask[i, m]:
                total += math.exp(float(z[a] @ bank[m]) / tau)
        out.append(-pos + math.log(total))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("class_aware,sampling", [(False, None), (True, "bernoulli"), (True, "per_anchor")])
def test_region_loss_matches_an_explicit_loop(class_aware, sampling):
    gen = torch.Generator().manual_seed(0)
    cells, dim, tau = 12, 5, 0.1  # a 3 x 4 grid
    z, z_hat, bank = torch.randn(cells, dim, generator=gen), torch.randn(cells, dim, generator=gen), torch.randn(7, dim, generator=gen)
    t_labels, s_labels = torch.randint(0, 3, (cells,), generator=gen), torch.randint(0, 3, (cells,), generator=gen)
    s_labels[0] = 255
    b_labels = torch.randint(0, 3, (7,), generator=gen)
    anchors = torch.tensor([1, 2, 5, 6])
    keeps = [None if sampling is None else random_keep(n, 0.5, sampling, gen, anchors.numel()) for n in (cells, cells, 7)]
    a_labels = t_labels[anchors]
    t_mask = negative_mask(anchors, a_labels, t_labels, keeps[0], class_aware=class_aware)
    s_mask = negative_mask(anchors, a_labels, s_labels, keeps[1], class_aware=class_aware)
    b_mask = negative_mask(anchors, a_labels, b_labels, keeps[2], self_cells=False, class_aware=class_aware)
    z.requires_grad_()
    got = RegionContrastLoss(tau)(z, z_hat, anchors, t_mask, s_mask, bank, b_mask)
    expected = reference_loss(z.detach(), z_hat, anchors, t_mask, s_mask, bank, b_mask, tau)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    got.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_identical_embeddings_give_log_of_the_candidate_count():
    cells = 16
    z = F.normalize(torch.ones(cells, 4), dim=1)
    anchors = torch.arange(cells)
    mask = negative_mask(anchors, torch.zeros(cells), torch.ones(cells), class_aware=False)
    losses = RegionContrastLoss(0.1)(z, z, anchors, mask, mask)
    assert torch.allclose(losses, torch.full((cells,), math.log(2 * cells - 1)))


def test_without_sampling_every_anchor_has_2hw_minus_2_negatives_and_never_its_positive():
    h, w = 4, 5
    anchors = torch.tensor([0, 7, 19])
    labels = torch.arange(h * w)
    for kind in ("teacher", "student"):
        mask = negative_mask(anchors, labels[anchors], labels, class_aware=True)
        assert mask.sum(1).tolist() == [h * w - 1] * 3
        assert not mask[torch.arange(3), anchors].any()  # the positive cell / the anchor itself
    t_mask = negative_mask(anchors, labels[anchors], labels)
    s_mask = negative_mask(anchors, labels[anchors], labels)
    assert (t_mask.sum(1) + s_mask.sum(1)).tolist() == [2 * h * w - 2] * 3


def test_class_aware_filter_and_ignored_candidates():
    anchors = torch.tensor([0, 1])
    labels = torch.tensor([2, 1, 2, 255, 1, 0])
    mask = negative_mask(anchors, labels[anchors], labels)
    for i, a in enumerate(anchors.tolist()):
        kept = mask[i].nonzero().squeeze(1)
        assert not (labels[kept] == labels[a]).any()  # NS(C): no kept negative shares the anchor's label
        assert 3 in kept.tolist()  # 255 stays a negative by default (A15)
    dropped = negative_mask(anchors, labels[anchors], labels, drop_ignored=True)
    assert not dropped[:, 3].any()


def test_random_half_counts():
    gen = torch.Generator().manual_seed(1)
    assert int(random_keep(4096, 0.5, "exact", gen).sum()) == 2048
    assert int(random_keep(101, 0.5, "exact", gen).sum()) == 50
    share = random_keep(200_000, 0.5, "bernoulli", gen).float().mean()
    assert abs(float(share) - 0.5) < 0.005
    per_anchor = random_keep(50, 0.5, "per_anchor", gen, anchors=30)
    assert per_anchor.shape == (30, 50) and len({tuple(r.tolist()) for r in per_anchor}) > 1


def test_weight_ramp_both_readings():
    assert rccr_weight(0, 250000) == pytest.approx(0.01 * math.exp(-5))
    assert rccr_weight(250000, 250000) == pytest.approx(0.01)
    assert rccr_weight(300000, 250000) == pytest.approx(0.01)  # clamped after t_max
    printed = [rccr_weight(int(f * 1000), 1000) for f in (0.25, 0.5, 0.75, 0.9)]
    squared = [rccr_weight(int(f * 1000), 1000, exponent=2.0) for f in (0.25, 0.5, 0.75, 0.9)]
    assert printed == pytest.approx([1.3e-4, 2.9e-4, 8.2e-4, 2.1e-3], rel=0.06)  # spec §2.8 table
    assert squared == pytest.approx([6.0e-4, 2.9e-3, 7.3e-3, 9.5e-3], rel=0.06)


def test_cell_labels():
    labels = torch.full((1, 4, 4), 255)
    labels[0, 0, 1] = 3
    labels[0, 2:, 2:] = torch.tensor([[1, 1], [2, 255]])
    labels[0, 2:, :2] = torch.tensor([[0, 2], [2, 0]])  # a tie: the lower class
    assert downscale_label_majority(labels, 2, num_classes=4).tolist() == [[[3, 255], [0, 1]]]
    logits = torch.randn(2, 3, 4, 4)
    cls, conf = cell_labels_of_target(logits, torch.softmax(torch.randn(2, 3, 16, 16), 1), (4, 4), "native")
    assert torch.equal(cls, logits.argmax(1)) and torch.allclose(conf, torch.softmax(logits, 1).amax(1))
    probs = torch.softmax(torch.randn(2, 3, 16, 16), 1)
    cls, conf = cell_labels_of_target(logits, probs, (4, 4), "pooled")
    assert torch.allclose(conf, F.avg_pool2d(probs, 4).amax(1))


def test_square_lies_on_the_grid():
    masks, boxes = cutmix_boxes(4, 512, 512, 0.5, grid=8, generator=torch.Generator().manual_seed(0))
    cells = square_cells(masks, 8)
    assert cells.shape == (4, 64, 64)
    for mask, box, cell in zip(masks, boxes.tolist(), cells):
        top, left, side, _ = box
        assert side == 360 and top % 8 == 0 and left % 8 == 0
        assert int(cell.sum()) == 45 * 45  # s^2 cells, each wholly inside
        assert torch.equal(F.interpolate(cell[None, None].float(), scale_factor=8)[0, 0].bool(), mask)


def test_bank_keeps_exactly_the_last_batches_and_reloads():
    bank = BatchFIFOBank(batches=3, dim=2)
    for step in range(5):
        rows = 3 + step
        bank.push(torch.full((rows, 2), float(step)), torch.full((rows,), step))
        assert int(bank.length) == min(step + 1, 3)
    features, labels = bank.entries()
    assert labels.tolist() == [2] * 5 + [3] * 6 + [4] * 7  # pushes 2, 3, 4, oldest first
    assert torch.equal(features[:, 0], labels.float())
    fresh = BatchFIFOBank(batches=3, dim=2)  # no size yet: takes the checkpoint's
    fresh.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.entries(), bank.entries()))
    fresh.push(torch.zeros(2, 2), torch.tensor([9, 9]))
    assert fresh.entries()[1].tolist() == [3] * 6 + [4] * 7 + [9, 9]
    x = torch.ones(1, 2, requires_grad=True)
    fresh.push(x * 2, torch.tensor([1]))
    assert not fresh.features.requires_grad
    with pytest.raises(ValueError, match="features must be N x 2"):
        fresh.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_anchor_without_negatives_has_zero_loss_and_finite_gradient():
    z = torch.randn(6, 4, requires_grad=True)
    z_hat = torch.randn(6, 4)
    anchors = torch.tensor([0, 1])
    labels = torch.zeros(6, dtype=torch.long)  # one class everywhere: NS(C) removes every negative
    mask = negative_mask(anchors, labels[anchors], labels)
    mixed = mask.clone()
    mixed[1] = True
    mixed[1, 1] = False
    losses = RegionContrastLoss(0.1)(z, z_hat, anchors, mask, mixed)
    assert losses[0] == 0 and losses[1] > 0
    losses.sum().backward()
    assert torch.isfinite(z.grad).all()
