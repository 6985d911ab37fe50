"""Per-class confidence thresholds for offline pseudo-labels (CBST / SPCL style), from histograms.

For every pixel of a whole split the model's softmax gives a confidence ``c_p = max_k P_pk`` and a
class ``ŷ_p = argmax_k P_pk``. SPCL's official code sorts, per class k, the confidences of the
``n_k`` pixels predicted as k and takes the element at index ``round(q · n_k)`` (``q = 0.5``: the
median; rounding half to even, as NumPy), then caps it::

    σ_k = min(sorted({c_p : ŷ_p = k})[round(q · n_k)], cap),   σ_k = 0 when n_k = 0

A pixel keeps its pseudo-label when ``c_p ≥ σ_{ŷ_p}`` and becomes 255 otherwise.

Storing every confidence of Cityscapes train takes ~19 GB; :class:`ClassConfidenceHistogram`
counts them in ``bins`` equal bins on [0, 1] per class instead (K × bins integers) and returns the
**lower edge** of the bin that holds the selected element, so the threshold lies at most
``1 / bins`` below the exact one and the selected pixel itself is always kept.

Example::

    >>> hist = ClassConfidenceHistogram(num_classes=2, bins=10)
    >>> hist.add(torch.tensor([0.95, 0.55, 0.75, 0.65, 0.35]), torch.tensor([0, 0, 0, 0, 1]))
    >>> hist.thresholds(quantile=0.5, cap=0.9)
    tensor([0.7000, 0.3000])
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantile_index(count: int, quantile: float) -> int:
    """The 0-based index ``round(quantile · count)`` (half to even), kept inside ``[0, count − 1]``."""
    return min(max(int(round(quantile * count)), 0), max(count - 1, 0))


def exact_class_thresholds(confidence: Tensor, labels: Tensor, num_classes: int, quantile: float = 0.5,
                           cap: float = 0.9) -> Tensor:
    """The rule of the module docstring computed by sorting (small inputs; the reference)."""
    confidence, labels = confidence.reshape(-1).float(), labels.reshape(-1).long()
    out = torch.zeros(num_classes)
    for k in range(num_classes):
        values = torch.sort(confidence[labels == k]).values
        if values.numel():
            out[k] = min(float(values[quantile_index(values.numel(), quantile)]), cap)
    return out


class ClassConfidenceHistogram:
    """Per-class histograms of confidences on [0, 1] (module docstring)."""

    def __init__(self, num_classes: int, bins: int = 10000) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.num_classes = num_classes
        self.bins = bins
        self.counts = torch.zeros(num_classes, bins, dtype=torch.int64)

    def add(self, confidence: Tensor, labels: Tensor) -> None:
        """Count the pixels of ``confidence`` (any shape, values in [0, 1]) with classes ``labels``."""
        confidence = confidence.detach().reshape(-1).float().cpu()
        labels = labels.detach().reshape(-1).long().cpu()
        valid = (labels >= 0) & (labels < self.num_classes)
        index = (confidence[valid] * self.bins).long().clamp_(0, self.bins - 1)
        flat = labels[valid] * self.bins + index
        self.counts += torch.bincount(flat, minlength=self.num_classes * self.bins).view(self.num_classes, self.bins)

    def thresholds(self, quantile: float = 0.5, cap: float = 0.9) -> Tensor:
        """``σ`` (K floats): the lower edge of the bin holding element ``round(q · n_k)``, capped."""
        out = torch.zeros(self.num_classes)
        cumulative = self.counts.cumsum(dim=1)
        for k in range(self.num_classes):
            total = int(cumulative[k, -1])
            if total == 0:
                continue
            index = quantile_index(total, quantile)
            bin_index = int(torch.searchsorted(cumulative[k], torch.tensor(index), right=True))
            out[k] = min(bin_index / self.bins, cap)
        return out

    def state_dict(self) -> dict:
        return {"counts": self.counts, "bins": self.bins}
