"""Class-level feature diagnostics: class centres, CCD, PDD and cross-domain centre similarity.

Notation: ``x ∈ R^D`` a pixel feature, ``Ω_i`` the pixels labelled ``i`` in one domain, the class
centre (prototype) ``μ_i = mean_{x∈Ω_i} x``, and ``C`` the number of classes *present* in that
domain (classes without pixels have no centre and are left out of every sum; their values are NaN).

**Class centre distance** (CCD; FADA, Wang et al. 2020; SPCL Eq. 10; T2S-DA Eq. 19)::

    CCD(i) = 1/(C−1) · Σ_{j≠i} [ mean_{x∈Ω_i} ||x − μ_i||² ] / ||μ_i − μ_j||²

the spread of class ``i`` relative to its squared distance to every other centre. Lower is more
discriminative (compact classes, far apart).

**Pixel discrimination distance** (PDD; SePiCo Eq. 21, in T2S-DA's form of Eq. 20)::

    PDD(i) = 1 − mean_{x∈Ω_i} [ cos(x, μ_i) / Σ_{j≠i} cos(x, μ_j) ]

SePiCo defines the mean ratio itself (higher is better); T2S-DA reports one minus it so that, like
CCD, **lower is more discriminative**. ``form="sepico"`` returns the ratio. The ratio is unbounded
when the other cosines are near 0 (very well separated classes give large negative T2S-DA PDD), and
it is only meaningful for features whose cosines to other centres are positive, such as the
post-ReLU encoder and decoder features.

**Cross-domain similarity** of class ``i`` (per-class feature similarity of PGPC and T2S-DA Fig. 1;
the papers do not give the recipe, we use the centres)::

    sim(i) = cos(μ_i^source, μ_i^target)

1 when the two domains' class centres point the same way.

Example (two compact, distant classes)::

    feats = torch.tensor([[1.0, 0.0], [1.2, 0.0], [0.0, 1.0], [0.0, 1.2]])   # N×D
    labels = torch.tensor([0, 0, 1, 1])                                         # N
    stats = ClassFeatureStatistics(num_classes=2, dim=2)
    stats.update(feats, labels)
    class_centre_distance(stats.centres(), stats.intra_class_variance())
    # spread 0.01 / squared centre gap 2.42 -> tensor([0.0041, 0.0041])
    pixel_discrimination_distance(feats, labels, stats.centres())
    # cos to the other centre is 0 -> the ratio is infinite, PDD -inf: perfectly discriminated
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


class ClassFeatureStatistics:
    """Streaming per-class pixel count, feature sum and sum of squared norms (float64).

    Exact over any number of :meth:`update` calls, so centres and CCD cover every labelled pixel of a
    dataset without keeping the features. The sums stay on the device of the first update (a GPU
    pass moves no feature maps to the host); results are returned on the CPU.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.num_classes = num_classes
        self.dim = dim
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.squared_norms = torch.zeros(num_classes, dtype=torch.float64)
        self._placed = False

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """``features: N×D``, ``labels: N`` class indices in ``[0, K)`` (ignored pixels removed)."""
        if features.shape[0] != labels.shape[0] or features.shape[1] != self.dim:
            raise ValueError(f"features {tuple(features.shape)} do not match labels {tuple(labels.shape)} "
                             f"and dim {self.dim}")
        if not self._placed:
            device = features.device
            self.counts, self.sums, self.squared_norms = (t.to(device) for t in (self.counts, self.sums,
                                                                                  self.squared_norms))
            self._placed = True
        feats = features.detach().to(self.sums.device, torch.float64)
        index = labels.detach().to(self.sums.device, torch.int64)
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self.sums.index_add_(0, index, feats)
        self.squared_norms.index_add_(0, index, (feats * feats).sum(1))

    def pixel_counts(self) -> list[int]:
        return [int(c) for c in self.counts.tolist()]

    def centres(self) -> Tensor:
        """``K×D`` class means (CPU); NaN rows for classes without pixels."""
        counts = self.counts.cpu()
        centres = self.sums.cpu() / counts[:, None]
        centres[counts == 0] = float("nan")
        return centres

    def intra_class_variance(self) -> Tensor:
        """``K`` (CPU): mean squared distance of a class's pixels to its centre, ``q/n − ||μ||²``."""
        centres = self.centres()
        variance = self.squared_norms.cpu() / self.counts.cpu() - (centres * centres).sum(1)
        return variance.clamp_min(0.0)


def class_centre_distance(centres: Tensor, intra_class_variance: Tensor) -> Tensor:
    """CCD per class (see the module docstring): ``centres: K×D`` (NaN rows = absent), ``intra: K``.

    Returns ``K`` float64 values, NaN for absent classes and when fewer than two classes are present.
    """
    centres = centres.double()
    present = ~torch.isnan(centres).any(1)
    result = torch.full((centres.shape[0],), float("nan"), dtype=torch.float64)
    if int(present.sum()) < 2:
        return result
    mu = centres[present]
    squared_gap = torch.cdist(mu, mu).pow(2)
    others = ~torch.eye(mu.shape[0], dtype=torch.bool)
    ratio = intra_class_variance.double()[present][:, None] / squared_gap.masked_fill(~others, 1.0)
    result[present] = ratio.masked_fill(~others, 0.0).sum(1) / (mu.shape[0] - 1)
    return result


def pixel_discrimination_distance(features: Tensor, labels: Tensor, centres: Tensor,
                                  form: Literal["t2sda", "sepico"] = "t2sda") -> Tensor:
    """PDD per class (see the module docstring).

    Args:
        features: ``N×D`` pixel features (a uniform sample of each class's pixels estimates the mean).
        labels: ``N`` class indices in ``[0, K)``.
        centres: ``K×D`` class centres of the same domain (NaN rows for absent classes).
        form: ``"t2sda"`` (``1 −`` mean ratio, lower is better) or ``"sepico"`` (the mean ratio).

    Returns ``K`` float64 values; NaN where a class has no centre or no pixel in ``features``.
    """
    centres = centres.double()
    present = ~torch.isnan(centres).any(1)
    num_classes = centres.shape[0]
    result = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    if int(present.sum()) < 2 or features.shape[0] == 0:
        return result
    x = torch.nn.functional.normalize(features.double(), dim=1)
    mu = torch.nn.functional.normalize(centres[present], dim=1)
    cosine = torch.zeros(x.shape[0], num_classes, dtype=torch.float64)
    cosine[:, present] = x @ mu.T
    labels = labels.long()
    own = cosine.gather(1, labels[:, None])[:, 0]
    ratio = own / (cosine.sum(1) - own)  # absent classes contribute 0 to the sum
    for c in range(num_classes):
        mask = labels == c
        if present[c] and bool(mask.any()):
            mean_ratio = ratio[mask].mean()
            result[c] = mean_ratio if form == "sepico" else 1.0 - mean_ratio
    return result


def centre_cosine_similarity(source_centres: Tensor, target_centres: Tensor) -> Tensor:
    """``cos(μ_i^source, μ_i^target)`` per class (``K``); NaN where either domain lacks the class."""
    a, b = source_centres.double(), target_centres.double()
    similarity = torch.nn.functional.cosine_similarity(a, b, dim=1)
    similarity[torch.isnan(a).any(1) | torch.isnan(b).any(1)] = float("nan")
    return similarity
