"""SPCL's losses, prototype update and thresholds against explicit-loop references."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.adversarial import FCDiscriminator, adversarial_losses
from udaseg.adapt.prototypes import PrototypeMemory
from udaseg.adapt.thresholds import ClassConfidenceHistogram, exact_class_thresholds
from udaseg.methods.spcl import PrototypeContrastLoss, source_contrast_mask, spcl_cross_entropy


def _bce(x, y):  # one BCE-with-logits term, written out
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_adversarial_losses_match_an_explicit_loop():
    torch.manual_seed(0)
    disc = FCDiscriminator(3, width=2)
    source = torch.rand(2, 3, 64, 64).softmax(1)
    target = torch.rand(2, 3, 64, 64).softmax(1)
    g, d = adversarial_losses(disc, source, target)
    with torch.no_grad():
        ds, dt = disc(source).flatten().tolist(), disc(target).flatten().tolist()
    assert disc(source).shape == (2, 1, 2, 2)  # 1/32 of the input
    g_ref = sum(_bce(x, 0.0) for x in dt) / len(dt)
    d_ref = 0.5 * sum(_bce(x, 0.0) for x in ds) / len(ds) + 0.5 * sum(_bce(x, 1.0) for x in dt) / len(dt)
    assert g.item() == pytest.approx(g_ref, rel=1e-5)
    assert d.item() == pytest.approx(d_ref, rel=1e-5)


def test_generator_loss_reaches_the_segmentor_only_and_discriminator_loss_the_discriminator_only():
    torch.manual_seed(0)
    disc = FCDiscriminator(3, width=2)
    seg = torch.nn.Conv2d(3, 3, 1)
    image_s, image_t = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    g, d = adversarial_losses(disc, seg(image_s).softmax(1), seg(image_t).softmax(1))
    g.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())
    assert seg.weight.grad is not None and seg.weight.grad.abs().sum() > 0
    seg.zero_grad(set_to_none=True)
    d.backward()
    assert seg.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_contrast_loss_matches_an_explicit_loop_over_pixels():
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, 4, requires_grad=True)
    mask = torch.randint(0, 4, (2, 3, 4))
    mask[0, 0, :2] = 255
    prototypes = torch.randn(4, 5)
    for tau in (100.0, 0.1):
        loss = PrototypeContrastLoss(tau)(features, mask, prototypes)
        terms = []
        for b in range(2):
            for i in range(3):
                for j in range(4):
                    y = int(mask[b, i, j])
                    if y == 255:
                        continue
                    f = features[b, :, i, j].detach()
                    f = f / f.norm()
                    z = [float(f @ prototypes[k]) / tau for k in range(4)]
                    terms.append(-z[y] + math.log(sum(math.exp(v) for v in z)))
        assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    loss.backward()
    assert features.grad.abs().sum() > 0


def test_contrast_loss_at_the_code_temperature_is_nearly_log_k_and_empty_masks_give_zero():
    torch.manual_seed(0)
    features = torch.rand(1, 8, 4, 4)
    prototypes = F.normalize(torch.rand(19, 8), dim=1)
    loss = PrototypeContrastLoss(100.0)(features, torch.randint(0, 19, (1, 4, 4)), prototypes)
    assert loss.item() == pytest.approx(math.log(19), abs=0.01)
    empty = PrototypeContrastLoss(100.0)(features.requires_grad_(), torch.full((1, 4, 4), 255), prototypes)
    assert empty.item() == 0.0 and empty.requires_grad


def _reference_update(prototypes, features, labels, alpha, absent):
    """μ_k ← α μ_k + (1 − α) m_k, with m_k the mean of every k-pixel of the batch."""
    out = prototypes.clone()
    for k in range(prototypes.shape[0]):
        pixels = [features[b, :, i, j] for b in range(features.shape[0]) for i in range(features.shape[2])
                  for j in range(features.shape[3]) if labels[b, i, j] == k]
        if pixels:
            out[k] = alpha * prototypes[k] + (1 - alpha) * torch.stack(pixels).mean(0)
        elif absent == "decay":
            out[k] = alpha * prototypes[k]
    return out


@pytest.mark.parametrize("absent", ["decay", "keep"])
def test_prototype_update_pools_the_batch_and_follows_the_absent_class_rule(absent):
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    features = torch.randn(2, 3, 2, 3)
    labels = torch.tensor([[[0, 0, 1], [255, 1, 1]], [[0, 255, 255], [1, 1, 255]]])  # classes 2, 3 absent
    memory = PrototypeMemory(start, alpha=0.1, absent=absent)
    present = memory.update(features, labels)
    assert present.tolist() == [True, True, False, False]
    torch.testing.assert_close(memory.prototypes, _reference_update(start, features, labels, 0.1, absent))
    if absent == "decay":
        assert torch.allclose(memory.prototypes[2:], 0.1 * start[2:])
    else:
        assert torch.equal(memory.prototypes[2:], start[2:])
    fixed = PrototypeMemory(start, alpha=1.0)
    fixed.update(features, labels)
    assert torch.equal(fixed.prototypes, start)


def test_source_mask_keeps_pixels_whose_label_equals_the_prediction():
    labels = torch.tensor([[[1, 1], [0, 2]]])
    logits = F.one_hot(torch.tensor([[[1, 0], [0, 2]]]), 3).permute(0, 3, 1, 2).float()
    assert source_contrast_mask(labels, logits, (2, 2), "label_and_prediction").tolist() == [[[1, 255], [0, 2]]]
    assert source_contrast_mask(labels, logits, (2, 2), "label").tolist() == [[[1, 1], [0, 2]]]
    big = torch.arange(16).reshape(1, 4, 4) % 3  # legacy nearest: the top-left pixel of each 2x2 cell
    assert source_contrast_mask(big, torch.zeros(1, 3, 2, 2), (2, 2), "label").tolist() == [[[0, 2], [2, 1]]]


def test_cross_entropy_divides_by_the_temperature_and_averages_over_valid_pixels():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # 1x2x1x1, upsampled to 2x2
    labels = torch.tensor([[[0, 1], [255, 255]]])
    p0 = math.exp(2 / 1.8) / (math.exp(2 / 1.8) + 1)
    expected = (-math.log(p0) - math.log(1 - p0)) / 2
    assert spcl_cross_entropy(logits, labels, 1.8).item() == pytest.approx(expected, rel=1e-6)
    assert spcl_cross_entropy(logits, torch.full((1, 2, 2), 255)).item() == 0.0


def test_thresholds_equal_the_per_class_median_rule_on_a_hand_made_map():
    # class 0: 4 pixels (sorted .2 .5 .6 .8, index round(2) = 2 -> .6); class 1: 3 pixels, index
    # round(1.5) = 2 -> .97, capped at .9; class 2: 1 pixel -> .3; class 3: never predicted -> 0
    confidence = torch.tensor([[0.5, 0.2, 0.8, 0.6], [0.95, 0.4, 0.97, 0.3]])
    labels = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 2]])
    expected = torch.tensor([0.6, 0.9, 0.3, 0.0])
    torch.testing.assert_close(exact_class_thresholds(confidence, labels, 4), expected)
    histogram = ClassConfidenceHistogram(4, bins=1000)
    histogram.add(confidence[:1], labels[:1])  # two images, accumulated
    histogram.add(confidence[1:], labels[1:])
    thresholds = histogram.thresholds(0.5, 0.9)
    assert torch.all(thresholds <= expected) and torch.all(expected - thresholds <= 1e-3 + 1e-6)
    torch.manual_seed(0)
    many, classes = torch.rand(5000), torch.randint(0, 4, (5000,))
    exact = exact_class_thresholds(many, classes, 4, cap=1.0)
    approx = ClassConfidenceHistogram(4, bins=10000)
    approx.add(many, classes)
    assert torch.all((exact - approx.thresholds(0.5, 1.0)).abs() <= 1e-4 + 1e-6)
