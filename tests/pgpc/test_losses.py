"""PGPC's loss against an explicit-loop reference, and the teacher maps / selections against hand-made inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.methods.pgpc import (
    PixelPrototypeContrastLoss, TeacherPixelMaps, class_ranks, full_cells, negative_split, pixel_entropy,
    rank_within_groups, reliable_pixel_mask, sample_anchor_indices, teacher_pixel_maps,
)


# ------------------------------------------------------------------------------------------ Eq. 5
def reference_loss(anchors, groups, positives, negatives, mask, tau):
    """Eq. 5 written plainly: one anchor at a time, one negative at a time, in float64."""
    total, count = 0.0, 0
    for m in range(anchors.shape[0]):
        g = int(groups[m])
        z = anchors[m].double()
        cos = lambda a, b: float((a @ b) / (a.norm() * b.norm()))
        pos = math.exp(cos(z, positives[g].double()) / tau)
        neg = sum(math.exp(cos(z, negatives[g, n].double()) / tau)
                  for n in range(negatives.shape[1]) if bool(mask[g, n]))
        total += -math.log(pos / (pos + neg))
        count += 1
    return total / count


@pytest.mark.parametrize("tau", [0.5, 0.07, 2.0])
def test_loss_matches_explicit_loop(tau):
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(11, 6, generator=gen)  # unnormalised on purpose: cosine is taken inside
    groups = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0, 2, 1])
    positives = torch.randn(3, 6, generator=gen)
    negatives = torch.randn(3, 5, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    got = PixelPrototypeContrastLoss(tau)(anchors, groups, positives, negatives, mask)
    assert float(got) == pytest.approx(reference_loss(anchors, groups, positives, negatives, mask, tau), rel=1e-5)
    per_anchor = PixelPrototypeContrastLoss(tau, "none")(anchors, groups, positives, negatives, mask)
    for m in range(11):  # per-anchor values come back in input order
        one = reference_loss(anchors[m:m + 1], groups[m:m + 1], positives, negatives, mask, tau)
        assert float(per_anchor[m]) == pytest.approx(one, rel=1e-5, abs=1e-5)  # float32 cancellation


def test_masked_negatives_equal_dropping_them():
    gen = torch.Generator().manual_seed(1)
    anchors, positives = torch.randn(4, 8, generator=gen), torch.randn(1, 8, generator=gen)
    negatives = torch.randn(1, 6, 8, generator=gen)
    mask = torch.tensor([[True, True, False, True, False, False]])
    loss = PixelPrototypeContrastLoss(0.5)
    masked = loss(anchors, torch.zeros(4, dtype=torch.long), positives, negatives, mask)
    dropped = loss(anchors, torch.zeros(4, dtype=torch.long), positives, negatives[:, mask[0]])
    torch.testing.assert_close(masked, dropped)


def test_loss_properties():
    loss = PixelPrototypeContrastLoss(0.5)
    direction = F.normalize(torch.randn(1, 8), dim=1)
    same = direction.repeat(3, 1)
    # every similarity equal: -log(1 / (1 + N))
    value = loss(same, torch.zeros(3, dtype=torch.long), direction, direction.repeat(1, 7, 1).view(1, 7, 8))
    assert float(value) == pytest.approx(math.log(8), rel=1e-6)
    # positive aligned, negatives opposite: small and positive; anchors opposite to the positive: large
    good = loss(same, torch.zeros(3, dtype=torch.long), direction, (-direction).repeat(1, 7, 1).view(1, 7, 8))
    bad = loss(-same, torch.zeros(3, dtype=torch.long), direction, (-direction).repeat(1, 7, 1).view(1, 7, 8))
    assert 0 < float(good) < 0.2 < float(bad)
    assert float(bad) == pytest.approx(math.log(1 + 7 * math.exp(4.0)), rel=1e-5)
    assert float(good) == pytest.approx(math.log(1 + 7 * math.exp(-4.0)), rel=1e-5)


def test_gradient_reaches_only_the_anchors():
    gen = torch.Generator().manual_seed(2)
    anchors = torch.randn(5, 4, generator=gen, requires_grad=True)
    positives = torch.randn(2, 4, generator=gen, requires_grad=True)
    negatives = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    PixelPrototypeContrastLoss(0.5)(anchors, torch.tensor([0, 1, 0, 1, 1]), positives, negatives).backward()
    assert anchors.grad is not None and float(anchors.grad.abs().sum()) > 0
    assert positives.grad is None and negatives.grad is None


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        PixelPrototypeContrastLoss(0.0)
    with pytest.raises(ValueError, match="anchors must be"):
        PixelPrototypeContrastLoss()(torch.randn(3, 4), torch.zeros(2, dtype=torch.long), torch.randn(1, 4),
                                     torch.randn(1, 2, 4))


# ------------------------------------------------------------------------------ teacher pixel maps
def test_entropy_and_ranks_on_hand_made_probabilities():
    probs = torch.tensor([[0.7, 0.1, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]).T.reshape(1, 4, 1, 2)
    entropy = pixel_entropy(probs)
    expected = -sum(p * math.log(p) for p in (0.7, 0.1, 0.15, 0.05))
    assert float(entropy[0, 0, 0]) == pytest.approx(expected, rel=1e-6)
    assert float(entropy[0, 0, 1]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(pixel_entropy(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))) == 0.0  # 0 ln 0 = 0
    assert class_ranks(probs)[0, :, 0, 0].tolist() == [0, 2, 1, 3]  # rank 0 = most probable


def test_teacher_maps_average_pool_then_derive():
    # two classes on a 2 x 4 image, pooled to 1 x 2 (2 x 2 cells)
    p0 = torch.tensor([[0.9, 0.9, 0.2, 0.4], [0.9, 0.1, 0.2, 0.4]])
    probs = torch.stack([p0, 1 - p0]).unsqueeze(0)
    maps = teacher_pixel_maps(probs, (1, 2), rank=1)
    torch.testing.assert_close(maps.probs[0, 0, 0], torch.tensor([0.7, 0.3]))
    assert maps.labels[0, 0].tolist() == [0, 1]
    torch.testing.assert_close(maps.confidence[0, 0], torch.tensor([0.7, 0.7]))
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))  # entropy of the pooled probabilities
    torch.testing.assert_close(maps.entropy[0, 0], torch.tensor([h, h]))
    assert maps.top_classes.shape == (1, 1, 2, 1) and maps.top_classes[0, 0, :, 0].tolist() == [0, 1]


def test_top_classes_give_the_rank_rule_of_eq_11():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 7, 4, 4, generator=gen), 1)
    maps = teacher_pixel_maps(probs, (4, 4), rank=4)
    ranks = class_ranks(probs)
    for cls in range(7):
        in_top = (maps.top_classes == cls).any(-1)
        assert torch.equal(~in_top, ranks[:, cls] >= 4)


def test_full_cells():
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 3] = False
    assert full_cells(mask, (2, 2))[0].tolist() == [[True, False], [True, True]]


# ------------------------------------------------------------------------------ reliable selection
def maps_from(entropy, confidence, labels, num_classes=3):
    batch, h, w = entropy.shape
    return TeacherPixelMaps(torch.zeros(batch, num_classes, h, w), labels, confidence, entropy,
                            labels.unsqueeze(-1))


def test_rank_within_groups():
    ranks, counts = rank_within_groups(torch.tensor([5., 1., 3., 3., 0., 2.]), torch.tensor([1, 1, 0, 0, 1, 0]))
    assert ranks.tolist() == [2, 1, 1, 2, 0, 0] and counts.tolist() == [3, 3]  # tie: earlier position first


def test_global_entropy_selection_per_image_and_per_batch():
    entropy = torch.tensor([[[0.1, 0.9, 0.5, 0.3]], [[2.0, 1.5, 1.0, 0.2]]])
    labels = torch.zeros(2, 1, 4, dtype=torch.long)
    maps = maps_from(entropy, torch.zeros_like(entropy), labels)
    per_image = reliable_pixel_mask(maps, proportion=0.5)
    assert per_image.tolist() == [[[True, False, False, True]], [[False, False, True, True]]]
    per_batch = reliable_pixel_mask(maps, proportion=0.5, scope="batch")  # the 4 lowest of all 8
    assert per_batch.tolist() == [[[True, False, True, True]], [[False, False, False, True]]]
    # the paper's definition: a fraction eta of E_t^i lies below the threshold gamma_t
    for i in range(2):
        gamma = entropy[i][per_image[i]].max()
        assert float((entropy[i] <= gamma).float().mean()) == 0.5
    assert not reliable_pixel_mask(maps, proportion=0.0).any()
    assert reliable_pixel_mask(maps, proportion=1.0).all()


def test_selection_skips_invalid_pixels_and_counts_only_valid_ones():
    entropy = torch.tensor([[[0.0, 0.1, 0.9, 0.5, 0.3, 0.2]]])
    valid = torch.tensor([[[False, True, True, True, True, True]]])
    maps = maps_from(entropy, torch.zeros_like(entropy), torch.zeros(1, 1, 6, dtype=torch.long))
    chosen = reliable_pixel_mask(maps, valid, proportion=0.4)  # floor(0.4 * 5) = 2 of the 5 valid
    assert chosen.tolist() == [[[False, True, False, False, False, True]]]


def test_confidence_and_classwise_selections():
    labels = torch.tensor([[[0, 0, 0, 0, 1, 1]]])
    entropy = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.8, 0.9]]])
    confidence = torch.tensor([[[0.9, 0.3, 0.8, 0.4, 0.5, 0.6]]])
    maps = maps_from(entropy, confidence, labels)
    assert reliable_pixel_mask(maps, selection="global_confidence", proportion=0.5).tolist() == \
        [[[True, False, True, False, False, True]]]
    # class-wise: half of each class, so class 1 keeps a pixel despite its high entropy
    assert reliable_pixel_mask(maps, selection="classwise_entropy", proportion=0.5).tolist() == \
        [[[True, True, False, False, True, False]]]
    assert reliable_pixel_mask(maps, selection="classwise_confidence", proportion=0.5).tolist() == \
        [[[True, False, True, False, False, True]]]
    with pytest.raises(ValueError, match="selection"):
        reliable_pixel_mask(maps, selection="entropy")


# ------------------------------------------------------------------------------- anchors, negatives
def test_anchor_sampling_respects_labels_candidates_and_the_cap():
    labels = torch.tensor([[[0, 0, 0, 1], [1, 2, 2, 0]]])
    candidates = torch.tensor([[[True, True, True, True], [False, True, False, True]]])
    anchors = sample_anchor_indices(labels, candidates, 3, 2, torch.Generator().manual_seed(0))
    assert sorted(anchors) == [0, 1, 2]
    assert set(anchors[0].tolist()) < {0, 1, 2, 7} and anchors[0].numel() == 2
    assert len(set(anchors[0].tolist())) == 2  # without replacement
    assert anchors[1].tolist() == [3] and anchors[2].tolist() == [5]
    again = sample_anchor_indices(labels, candidates, 3, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(anchors[c], again[c]) for c in anchors)  # the generator decides


def test_negative_split_fills_a_short_pool_from_the_other():
    assert negative_split(512, [1000, 1000]) == [256, 256]
    assert negative_split(512, [100, 1000]) == [100, 412]
    assert negative_split(512, [0, 1000]) == [0, 512]
    assert negative_split(512, [100, 50]) == [100, 50]
    assert negative_split(7, [10, 10]) == [4, 3]
    assert negative_split(512, [600]) == [512]
