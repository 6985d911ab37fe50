"""Class-balanced uniform sampling of pixel features from a stream of images.

:class:`ClassBalancedReservoir` keeps, for every class, a uniform random sample without
replacement of at most ``capacity`` of the pixels seen so far (all of them while a class has fewer).
Every pixel draws a priority ``u ~ U(0, 1)`` from the reservoir's own generator and each class keeps
its ``capacity`` lowest priorities, so the sample does not depend on how the stream is batched, and
the ``m`` lowest priorities of a class (:meth:`sample` with ``per_class=m``) are again a uniform
sample of it: t-SNE takes 256 pixels per class (T2S-DA Fig. 8) from the larger sample that
estimates PDD.

Example::

    reservoir = ClassBalancedReservoir(num_classes=19, dim=256, capacity=2000, seed=0)
    reservoir.add(features, labels)            # N×D, N (ignored pixels removed), once per image
    feats, labels = reservoir.sample(per_class=256)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class ClassBalancedReservoir:
    def __init__(self, num_classes: int, dim: int, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_classes = num_classes
        self.dim = dim
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.features = [torch.zeros(0, dim) for _ in range(num_classes)]
        self.priorities = [torch.zeros(0, dtype=torch.float64) for _ in range(num_classes)]
        self.seen = [0] * num_classes

    @torch.no_grad()
    def add(self, features: Tensor, labels: Tensor) -> None:
        """``features: N×D`` and ``labels: N`` in ``[0, K)``, on any device; only the at most
        ``capacity`` candidates per class that can enter the sample are copied to the host."""
        feats = features.detach()
        labels = labels.detach().to(torch.int64)
        priority = torch.rand(labels.shape[0], generator=self.generator, dtype=torch.float64).to(labels.device)
        for c in labels.unique().tolist():
            index = torch.nonzero(labels == c)[:, 0]
            self.seen[c] += int(index.numel())
            if index.numel() > self.capacity:
                index = index[priority[index].topk(self.capacity, largest=False).indices]
            keys = torch.cat([self.priorities[c], priority[index].cpu()])
            values = torch.cat([self.features[c], feats[index].to("cpu", torch.float32)])
            if keys.numel() > self.capacity:
                keep = keys.topk(self.capacity, largest=False).indices
                keys, values = keys[keep], values[keep]
            self.priorities[c], self.features[c] = keys, values

    def counts(self) -> list[int]:
        """Pixels held per class."""
        return [int(p.numel()) for p in self.priorities]

    def sample(self, per_class: Optional[int] = None, classes: Optional[list[int]] = None) -> tuple[Tensor, Tensor]:
        """The held pixels (or the ``per_class`` lowest-priority ones of each class) of ``classes``:
        ``features: M×D`` and ``labels: M``, grouped by class in increasing priority."""
        chosen = range(self.num_classes) if classes is None else classes
        feats, labels = [], []
        for c in chosen:
            order = self.priorities[c].argsort()
            if per_class is not None:
                order = order[:per_class]
            feats.append(self.features[c][order])
            labels.append(torch.full((order.numel(),), c, dtype=torch.int64))
        if not feats:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        return torch.cat(feats), torch.cat(labels)
