"""Reliability of pseudo-labels: confidence of a model's prediction against its pixel accuracy.

Self-training keeps a target pixel's pseudo-label ``ŷ = argmax_k p_k`` with weight set by its
confidence ``p_max = max_k p_k`` (DACS/DAFormer: the share of pixels above ``δ = 0.968``). On a
labelled target the pseudo-labels can be checked: pixels are grouped in ``B`` equal-width
confidence bins ``[b/B, (b+1)/B)`` (the last one closed), and per bin we count pixels ``n_b``, the
mean confidence ``conf_b`` and the accuracy ``acc_b`` (share with ``ŷ = y``). A calibrated model has
``acc_b = conf_b``. The expected calibration error (Guo et al. 2017) is::

    ECE = Σ_b (n_b / N) · |acc_b − conf_b|

and at the pseudo-label threshold δ: ``coverage`` = share of pixels with ``p_max ≥ δ`` and
``precision`` = their accuracy. Ignored pixels (label 255) are not counted.

Example::

    acc = ReliabilityAccumulator(bins=10, threshold=0.9)
    acc.update(torch.tensor([[0.95, 0.55]]), torch.tensor([[True, False]]))   # confidence, correct
    acc.summary()["ece"]   # (|1 − 0.95| + |0 − 0.55|) / 2 = 0.3
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ReliabilityAccumulator:
    """Per-bin pixel counts, confidence sums and correct counts over many batches."""

    def __init__(self, bins: int = 10, threshold: float = 0.968) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.threshold = threshold
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.confidence_sums = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)
        self.above_threshold = 0
        self.correct_above_threshold = 0

    @torch.no_grad()
    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """``confidence`` in [0, 1] and boolean ``correct`` of the same shape (valid pixels only)."""
        # per-bin sums are formed on the inputs' device; only K-sized histograms reach the host.
        # The threshold test runs in the confidences' own precision, as the pseudo-label weight does.
        above = confidence.detach().reshape(-1) >= self.threshold
        conf = confidence.detach().reshape(-1).double()
        hit = correct.detach().reshape(-1).bool()
        index = (conf * self.bins).long().clamp_(0, self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins).cpu().double()
        self.confidence_sums += torch.bincount(index, weights=conf, minlength=self.bins).cpu()
        self.correct += torch.bincount(index, weights=hit.double(), minlength=self.bins).cpu()
        self.above_threshold += int(above.sum())
        self.correct_above_threshold += int((hit & above).sum())

    @torch.no_grad()
    def update_from_logits(self, logits: Tensor, labels: Tensor, ignore_index: int = 255) -> None:
        """``logits: B×K×H×W`` at the labels' size, ``labels: B×H×W``."""
        probs = logits.float().softmax(1)
        confidence, prediction = probs.max(1)
        valid = labels != ignore_index
        self.update(confidence[valid], (prediction == labels)[valid])

    def summary(self) -> dict:
        """Bins (edges, counts, mean confidence, accuracy; None for empty bins), ECE, coverage, precision."""
        total = float(self.counts.sum())
        mean_conf = (self.confidence_sums / self.counts).tolist()
        accuracy = (self.correct / self.counts).tolist()
        ece = math.nan
        if total:
            gap = (self.correct - self.confidence_sums).abs()  # n_b · |acc_b − conf_b|
            ece = float(gap.sum() / total)
        return {
            "bin_edges": [b / self.bins for b in range(self.bins + 1)],
            "counts": [int(c) for c in self.counts.tolist()],
            "confidence": [None if math.isnan(v) else v for v in mean_conf],
            "accuracy": [None if math.isnan(v) else v for v in accuracy],
            "pixels": int(total),
            "accuracy_overall": float(self.correct.sum() / total) if total else math.nan,
            "ece": ece,
            "threshold": self.threshold,
            "coverage": self.above_threshold / total if total else math.nan,
            "precision": (self.correct_above_threshold / self.above_threshold) if self.above_threshold else math.nan,
        }
