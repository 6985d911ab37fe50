"""Class prototypes kept as an exponential moving average of batch class means.

SPCL (Xie et al., Eq. 3 and its official code) keeps one prototype per class, ``μ_k`` (a
C-dimensional vector of L2-normalised features), updated once per iteration from the batch's
labelled pixels:

* batch class mean, pooled over every valid pixel of the batch (not per image)::

      m_k = (1 / |Φ_k|) Σ_{p ∈ Φ_k} f̂_p,    Φ_k = {p : y_p = k}

* moving average, ``α`` weighting the **old** prototype (α = 1: fixed; α = 0: the batch mean)::

      μ_k ← α μ_k + (1 − α) m_k

Classes absent from the batch (``Φ_k = ∅``) follow ``absent``:

* ``"decay"`` (the official code): ``m_k = 0``, so ``μ_k ← α μ_k``; a class missing for many
  iterations shrinks towards the zero vector;
* ``"keep"`` (Eq. 3 read literally): ``μ_k`` is left unchanged.

``sync=True`` sums the per-class pixel sums and counts across ranks before the update, so every
rank holds the prototypes of the global batch (the official code keeps one set per process).

The prototypes are a buffer (K×C), so they are saved with the owning module's state.

Example::

    >>> memory = PrototypeMemory(torch.zeros(3, 4), alpha=0.1)
    >>> memory.update(torch.ones(1, 4, 2, 2), torch.tensor([[[0, 0], [1, 255]]]))
    >>> memory.prototypes[:, 0]
    tensor([0.9000, 0.9000, 0.0000])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from udaseg.adapt.stats import all_reduce_sum

AbsentRule = Literal["decay", "keep"]


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums ``K×C`` and pixel counts ``K`` of ``features`` (B×C×h×w) over ``labels`` (B×h×w);
    labels outside ``[0, K)`` (255) are ignored."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    labels = labels.reshape(-1).long()
    valid = (labels >= 0) & (labels < num_classes)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels[valid], flat[valid])
    counts = torch.bincount(labels[valid], minlength=num_classes).to(features.dtype)
    return sums, counts


class PrototypeMemory(nn.Module):
    """EMA class prototypes (module docstring); ``prototypes`` is K×C, row k = class k."""

    def __init__(self, prototypes: Tensor, alpha: float = 0.1, absent: AbsentRule = "decay",
                 sync: bool = False) -> None:
        super().__init__()
        if absent not in ("decay", "keep"):
            raise ValueError(f"absent must be 'decay' or 'keep', got {absent!r}")
        self.alpha = float(alpha)
        self.absent = absent
        self.sync = sync
        self.register_buffer("prototypes", prototypes.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> Tensor:
        """One update from normalised ``features`` (B×C×h×w) and ``labels`` (B×h×w); returns the
        boolean mask of the classes present in the batch."""
        sums, counts = class_sums(features.detach().float(), labels, self.num_classes)
        if self.sync:
            sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        present = counts > 0
        means = sums / counts.clamp_min(1)[:, None]  # zero rows where absent
        updated = self.alpha * self.prototypes + (1.0 - self.alpha) * means
        if self.absent == "keep":
            updated = torch.where(present[:, None], updated, self.prototypes)
        self.prototypes.copy_(updated)
        return present
