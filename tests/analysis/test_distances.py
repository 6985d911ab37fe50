"""CCD, PDD and the cross-domain centre similarity on synthetic embeddings with known answers,
against plain-loop references, and their invariances."""

import math

import pytest
import torch

from udaseg.analysis.distances import (
    ClassFeatureStatistics,
    centre_cosine_similarity,
    class_centre_distance,
    pixel_discrimination_distance,
)


def statistics(features, labels, num_classes):
    stats = ClassFeatureStatistics(num_classes, features.shape[1])
    stats.update(features, labels)
    return stats


def ccd_of(features, labels, num_classes):
    stats = statistics(features, labels, num_classes)
    return class_centre_distance(stats.centres(), stats.intra_class_variance())


def ccd_reference(features, labels, num_classes):
    """Eq. 19 written out with loops over classes and pixels."""
    feats = features.double()
    present = [c for c in range(num_classes) if (labels == c).any()]
    centre = {c: feats[labels == c].mean(0) for c in present}
    out = []
    for i in range(num_classes):
        if i not in present:
            out.append(math.nan)
            continue
        pixels = feats[labels == i]
        spread = sum(float(((x - centre[i]) ** 2).sum()) for x in pixels) / len(pixels)
        out.append(sum(spread / float(((centre[i] - centre[j]) ** 2).sum()) for j in present if j != i)
                   / (len(present) - 1))
    return torch.tensor(out, dtype=torch.float64)


def pdd_reference(features, labels, centres):
    """Eq. 20 with loops: 1 − mean_x cos(x, μ_i) / Σ_{j≠i} cos(x, μ_j) over present classes."""
    num_classes = centres.shape[0]
    present = [c for c in range(num_classes) if not torch.isnan(centres[c]).any()]
    cos = lambda a, b: float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))  # noqa: E731
    out = []
    for i in range(num_classes):
        pixels = features[labels == i]
        if i not in present or len(pixels) == 0:
            out.append(math.nan)
            continue
        ratios = [cos(x, centres[i]) / sum(cos(x, centres[j]) for j in present if j != i) for x in pixels]
        out.append(1.0 - sum(ratios) / len(ratios))
    return torch.tensor(out, dtype=torch.float64)


def simplex_clusters(spread: float, gap: float, dim: int = 3):
    """Three classes, centres gap·e_k (pairwise distance gap·√2), two pixels each at μ ± spread·e_(k+1)."""
    feats, labels = [], []
    for k in range(3):
        centre = torch.zeros(dim)
        centre[k] = gap
        offset = torch.zeros(dim)
        offset[(k + 1) % dim] = spread
        feats += [centre + offset, centre - offset]
        labels += [k, k]
    return torch.stack(feats), torch.tensor(labels)


@pytest.mark.parametrize("spread, gap", [(0.1, 10.0), (5.0, 1.0)])
def test_ccd_known_answer_for_separated_and_overlapping_clusters(spread, gap):
    feats, labels = simplex_clusters(spread, gap)
    expected = spread**2 / (2 * gap**2)  # spread² over the squared centre gap (gap·√2)²
    assert torch.allclose(ccd_of(feats, labels, 3), torch.full((3,), expected, dtype=torch.float64))


def test_ccd_orders_separated_below_overlapping():
    separated = ccd_of(*simplex_clusters(0.1, 10.0), 3)
    overlapping = ccd_of(*simplex_clusters(5.0, 1.0), 3)
    assert (separated < 1e-3).all() and (overlapping > 1.0).all()


def test_ccd_matches_loop_reference_with_an_absent_class_and_streaming():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 8, generator=gen) + torch.arange(8.0)
    labels = torch.randint(0, 4, (300,), generator=gen)
    labels[labels == 2] = 3  # class 2 absent, 4 never used -> NaN
    reference = ccd_reference(feats, labels, 5)
    stats = ClassFeatureStatistics(5, 8)
    for chunk in torch.arange(300).split(37):  # streaming in uneven batches = one pass
        stats.update(feats[chunk], labels[chunk])
    streamed = class_centre_distance(stats.centres(), stats.intra_class_variance())
    assert torch.isnan(streamed[[2, 4]]).all()
    assert torch.allclose(streamed, reference, equal_nan=True, rtol=1e-9)


def test_ccd_is_invariant_to_translation_and_scale():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 5, generator=gen)
    labels = torch.randint(0, 3, (200,), generator=gen)
    feats = feats + labels[:, None].float() * 2
    base = ccd_of(feats, labels, 3)
    assert torch.allclose(ccd_of(3.5 * feats + 7.0, labels, 3), base, rtol=1e-9)


def test_ccd_needs_two_classes():
    assert torch.isnan(ccd_of(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), 2)).all()


def positive_centres(overlap: float):
    """μ_k = e_k + overlap·1 in R³: cos(μ_i, μ_j) = (2a + 3a²) / (1 + 2a + 3a²) for i ≠ j."""
    return torch.eye(3, dtype=torch.float64) + overlap


@pytest.mark.parametrize("overlap", [0.05, 2.0])
def test_pdd_known_answer_for_pixels_at_their_centres(overlap):
    centres = positive_centres(overlap)
    a = overlap
    cos_other = (2 * a + 3 * a * a) / (1 + 2 * a + 3 * a * a)
    expected = 1.0 - 1.0 / (2 * cos_other)  # own cosine 1, two other classes
    labels = torch.tensor([0, 0, 1, 2])
    feats = centres[labels] * torch.tensor([[1.0], [3.0], [0.5], [2.0]], dtype=torch.float64)  # scale does not change cosines
    pdd = pixel_discrimination_distance(feats, labels, centres.double())
    assert torch.allclose(pdd, torch.full((3,), expected, dtype=torch.float64), rtol=1e-9)


def test_pdd_orders_separated_below_overlapping_and_sepico_form_is_one_minus():
    labels = torch.tensor([0, 1, 2])
    separated = pixel_discrimination_distance(positive_centres(0.05)[labels], labels, positive_centres(0.05))
    overlapping = pixel_discrimination_distance(positive_centres(2.0)[labels], labels, positive_centres(2.0))
    assert (separated < overlapping).all()
    ratio = pixel_discrimination_distance(positive_centres(2.0)[labels], labels, positive_centres(2.0), form="sepico")
    assert torch.allclose(ratio, 1.0 - overlapping)


def test_pdd_matches_loop_reference_on_noisy_positive_features():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (120,), generator=gen)
    labels[labels == 3] = 1  # class 3 absent
    feats = (torch.rand(120, 6, generator=gen) + 2.0 * torch.nn.functional.one_hot(labels, 6)).relu()
    stats = statistics(feats, labels, 5)
    pdd = pixel_discrimination_distance(feats, labels, stats.centres())
    assert torch.allclose(pdd, pdd_reference(feats, labels, stats.centres()), equal_nan=True, rtol=1e-9)
    assert torch.isnan(pdd[[3, 4]]).all()


def test_centre_similarity_identical_orthogonal_opposite_and_absent():
    source = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[3.0, 0.0], [2.0, 0.0], [-1.0, -1.0], [math.nan, math.nan]], dtype=torch.float64)
    sim = centre_cosine_similarity(source, target)
    assert sim[:3].tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert math.isnan(sim[3])


def test_centre_similarity_of_shifted_target_clusters():
    """Same clusters in both domains: 1; target clusters moved to other classes' places: lower."""
    feats, labels = simplex_clusters(0.1, 10.0)
    src = statistics(feats, labels, 3).centres()
    same = centre_cosine_similarity(src, statistics(feats * 2, labels, 3).centres())
    swapped = centre_cosine_similarity(src, statistics(feats, (labels + 1) % 3, 3).centres())
    assert torch.allclose(same, torch.ones(3, dtype=torch.float64))
    assert (swapped.abs() < 0.01).all()
