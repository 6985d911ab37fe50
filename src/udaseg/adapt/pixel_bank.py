"""Memory banks of pixel features: per-class FIFO queues and one FIFO with per-entry class sets.

MoCo-style external memories (He et al. 2020; Chen et al. 2020, "MoCo v2") hold detached pixel
embeddings of earlier iterations, so a contrastive loss sees more keys than one batch of 2 + 2
images offers. Two kinds are kept here:

* :class:`ClassPixelQueues`: for each class k a ring buffer of at most ``capacity`` features. A push
  takes, per class present in the batch, at most ``per_class`` pixels drawn uniformly without
  replacement; the oldest entries are overwritten first. The class mean of the occupied slots is a
  prototype (PGPC Eq. 9); entries of the other classes are negatives (PGPC Eq. 10).
* :class:`RankedPixelQueue`: one ring buffer of ``capacity`` features, each stored with the r class
  indices its teacher ranked most probable. ``excluding(c)`` marks the entries whose top-r set does
  not contain class c: the target negatives of PGPC Eq. 11.
* :class:`BatchFIFOBank`: the labelled features of the last ``batches`` pushes, one push per
  iteration (RCCR's memory bank of the last three batches). A push replaces the oldest batch whole.

Everything lives in fixed-shape buffers, so the banks travel with ``state_dict`` through
``torch.load(..., weights_only=True)`` and a resumed run continues with the same contents. Random
draws come from the generator passed in (the step's), never from the global RNG.

Multi-GPU: the rows each rank selected are gathered across ranks (in rank order) before they are
written, so every rank holds the same bank, equal to the one of the rank-0 checkpoint.

Example::

    >>> bank = ClassPixelQueues(num_classes=3, dim=4, capacity=5)
    >>> gen = torch.Generator().manual_seed(0)
    >>> bank.push(torch.rand(10, 4), torch.tensor([0, 0, 1, 1, 1, 2, 255, 2, 0, 1]), per_class=2, generator=gen)
    >>> bank.length.tolist()
    [2, 2, 2]
    >>> prototypes, valid = bank.prototypes()
    >>> prototypes.shape, valid.tolist()
    (torch.Size([3, 4]), [True, True, True])
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

IGNORE_INDEX = 255


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate ``rows`` (N x ...) of every rank in rank order; the input itself outside DDP.

    Ranks may hold different N: rows are padded to the largest N for the collective and cut back.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    largest = int(max(int(c) for c in counts))
    padded = rows.new_zeros((largest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])


def random_subset(count: int, limit: int, generator: Optional[torch.Generator]) -> Tensor:
    """``min(count, limit)`` distinct indices in ``[0, count)``, uniformly drawn (CPU int64)."""
    if count <= limit:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:limit]


def _ring_slots(start: int, count: int, capacity: int, device: torch.device) -> Tensor:
    return (torch.arange(count, device=device) + start) % capacity


class ClassPixelQueues(nn.Module):
    """Per-class FIFO queues of pixel features (K ring buffers of ``capacity`` slots each).

    Buffers: ``features`` K x L x D, ``length`` K (occupied slots), ``next`` K (the slot the next
    entry goes to). Pushing more than ``capacity`` entries of one class at once keeps the last
    ``capacity`` of them.
    """

    def __init__(self, num_classes: int, dim: int, capacity: int) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or capacity < 1:
            raise ValueError(f"num_classes, dim and capacity must be positive, got {num_classes}, {dim}, {capacity}")
        self.num_classes, self.dim, self.capacity = num_classes, dim, capacity
        self.register_buffer("features", torch.zeros(num_classes, capacity, dim))
        self.register_buffer("length", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("next", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, capacity={self.capacity}"

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor, per_class: int, generator: Optional[torch.Generator] = None,
             ignore_index: int = IGNORE_INDEX) -> None:
        """Enqueue up to ``per_class`` random pixels of every class present (features N x D, labels N)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be N x {self.dim}, got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(self.features.device, torch.long)
        invalid = (labels != ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bool(invalid.any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or equal {ignore_index}")
        features = features.detach().to(self.features.device, self.features.dtype)
        chosen_rows, chosen_labels = [], []
        for cls in range(self.num_classes):
            rows = (labels == cls).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows = rows[random_subset(rows.numel(), per_class, generator).to(rows.device)]
            chosen_rows.append(rows)
            chosen_labels.append(labels[rows])
        if chosen_rows:
            rows = torch.cat(chosen_rows)
            picked, picked_labels = features[rows], torch.cat(chosen_labels)
        else:
            picked, picked_labels = features[:0], labels[:0]
        packed = gather_rows(torch.cat([picked, picked_labels.unsqueeze(1).to(picked.dtype)], dim=1))
        self._write(packed[:, :-1], packed[:, -1].round().long())

    def _write(self, features: Tensor, labels: Tensor) -> None:
        for cls in torch.unique(labels).tolist():
            entries = features[labels == cls][-self.capacity:]
            slots = _ring_slots(int(self.next[cls]), entries.shape[0], self.capacity, self.features.device)
            self.features[cls, slots] = entries
            self.next[cls] = (int(self.next[cls]) + entries.shape[0]) % self.capacity
            self.length[cls] = min(int(self.length[cls]) + entries.shape[0], self.capacity)

    def occupied(self) -> Tensor:
        """K x L mask of the occupied slots (storage order, not queue order)."""
        slots = torch.arange(self.capacity, device=self.features.device)
        return slots.unsqueeze(0) < self.length.unsqueeze(1)

    def entries(self, cls: int) -> Tensor:
        """The queue of class ``cls``, oldest entry first: M x D."""
        length = int(self.length[cls])
        start = (int(self.next[cls]) - length) % self.capacity
        return self.features[cls, _ring_slots(start, length, self.capacity, self.features.device)]

    def prototypes(self, classes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Class means of the queues and which classes have any entry: (K x D, K bool), or only the
        rows of ``classes`` (int64 indices) when given."""
        index = torch.arange(self.num_classes, device=self.features.device) if classes is None else classes
        index = index.to(self.features.device)
        # Unoccupied slots hold zeros (slots fill in order and are only ever overwritten), so the plain
        # sum over slots is the sum over the queue.
        sums = self.features[index].sum(1)
        length = self.length[index]
        return sums / length.clamp_min(1).unsqueeze(1).to(sums.dtype), length > 0

    def sample_excluding(self, cls: int, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Up to ``count`` entries drawn uniformly without replacement from the queues of classes != cls."""
        mask = self.occupied()
        mask[cls] = False
        flat = mask.reshape(-1).nonzero().squeeze(1)
        picked = flat[random_subset(flat.numel(), count, generator).to(flat.device)]
        return self.features.reshape(-1, self.dim)[picked]


class RankedPixelQueue(nn.Module):
    """One FIFO of pixel features, each with the ``rank`` classes its teacher found most probable.

    Buffers: ``features`` L x D, ``top_classes`` L x r (int16), ``length`` and ``next`` (0-dim).
    """

    def __init__(self, dim: int, capacity: int, rank: int) -> None:
        super().__init__()
        if dim < 1 or capacity < 1 or rank < 1:
            raise ValueError(f"dim, capacity and rank must be positive, got {dim}, {capacity}, {rank}")
        self.dim, self.capacity, self.rank = dim, capacity, rank
        self.register_buffer("features", torch.zeros(capacity, dim))
        self.register_buffer("top_classes", torch.zeros(capacity, rank, dtype=torch.int16))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, capacity={self.capacity}, rank={self.rank}"

    @torch.no_grad()
    def push(self, features: Tensor, top_classes: Tensor, image_index: Tensor, per_image: int,
             generator: Optional[torch.Generator] = None) -> None:
        """Enqueue up to ``per_image`` random pixels of every image.

        Args:
            features: N x D pixel features.
            top_classes: N x r class indices (the teacher's r most probable classes of each pixel).
            image_index: N, which image each pixel comes from.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be N x {self.dim}, got {tuple(features.shape)}")
        if top_classes.shape != (features.shape[0], self.rank):
            raise ValueError(f"top_classes must be {features.shape[0]} x {self.rank}, got {tuple(top_classes.shape)}")
        device = self.features.device
        features = features.detach().to(device, self.features.dtype)
        top_classes = top_classes.to(device)
        image_index = image_index.to(device)
        rows = []
        for image in torch.unique(image_index).tolist():
            candidates = (image_index == image).nonzero().squeeze(1)
            rows.append(candidates[random_subset(candidates.numel(), per_image, generator).to(device)])
        rows = torch.cat(rows) if rows else image_index[:0].long()
        packed = torch.cat([features[rows], top_classes[rows].to(features.dtype)], dim=1)
        packed = gather_rows(packed)[-self.capacity:]
        count = packed.shape[0]
        slots = _ring_slots(int(self.next), count, self.capacity, device)
        self.features[slots] = packed[:, : self.dim]
        self.top_classes[slots] = packed[:, self.dim:].round().to(torch.int16)
        self.next.fill_((int(self.next) + count) % self.capacity)
        self.length.fill_(min(int(self.length) + count, self.capacity))

    def excluding(self, cls: int) -> Tensor:
        """L mask: occupied entries whose top-r classes do not contain ``cls`` (PGPC Eq. 11)."""
        occupied = torch.arange(self.capacity, device=self.features.device) < self.length
        return occupied & ~(self.top_classes == cls).any(1)

    def sample_excluding(self, cls: int, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Up to ``count`` entries drawn uniformly without replacement among :meth:`excluding` ``(cls)``."""
        flat = self.excluding(cls).nonzero().squeeze(1)
        picked = flat[random_subset(flat.numel(), count, generator).to(flat.device)]
        return self.features[picked]


class BatchFIFOBank(nn.Module):
    """Labelled features of the last ``batches`` pushes (one push = one iteration's batch).

    Buffers: ``features`` T x S x D and ``labels`` T x S (T = ``batches`` slots of S rows each),
    ``counts`` T (rows held by each slot), ``next`` (the slot the next push overwrites) and
    ``length`` (occupied slots). S grows to the largest push seen; a checkpoint's buffers are taken
    with their own S on load, so the bank needs no size before its first push.

    Example::

        >>> bank = BatchFIFOBank(batches=2, dim=3)
        >>> for n in (4, 5, 6):
        ...     bank.push(torch.rand(n, 3), torch.zeros(n, dtype=torch.long))
        >>> bank.entries()[0].shape  # the last two pushes, oldest first
        torch.Size([11, 3])
    """

    def __init__(self, batches: int, dim: int) -> None:
        super().__init__()
        if batches < 1 or dim < 1:
            raise ValueError(f"batches and dim must be positive, got {batches}, {dim}")
        self.batches, self.dim = batches, dim
        self.register_buffer("features", torch.zeros(batches, 0, dim))
        self.register_buffer("labels", torch.zeros(batches, 0, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(batches, dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"batches={self.batches}, dim={self.dim}"

    def _grow(self, rows: int) -> None:
        if rows <= self.features.shape[1]:
            return
        features = self.features.new_zeros(self.batches, rows, self.dim)
        labels = self.labels.new_zeros(self.batches, rows)
        features[:, : self.features.shape[1]] = self.features
        labels[:, : self.labels.shape[1]] = self.labels
        self.features, self.labels = features, labels

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Store one batch (features N x D, labels N, detached) in place of the oldest one.

        Multi-GPU: the rows of every rank are gathered (in rank order) first, so every rank holds
        the global batch.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be N x {self.dim}, got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        device = self.features.device
        packed = torch.cat([features.detach().to(device, self.features.dtype),
                            labels.to(device).unsqueeze(1).to(self.features.dtype)], dim=1)
        packed = gather_rows(packed)
        rows = packed.shape[0]
        self._grow(rows)
        slot = int(self.next)
        self.features[slot].zero_()
        self.labels[slot].fill_(IGNORE_INDEX)
        self.features[slot, :rows] = packed[:, : self.dim]
        self.labels[slot, :rows] = packed[:, self.dim].round().long()
        self.counts[slot] = rows
        self.next.fill_((slot + 1) % self.batches)
        self.length.fill_(min(int(self.length) + 1, self.batches))

    def slots(self) -> list[int]:
        """The occupied slots, oldest first."""
        length = int(self.length)
        start = (int(self.next) - length) % self.batches
        return [(start + i) % self.batches for i in range(length)]

    def entries(self) -> tuple[Tensor, Tensor]:
        """Every stored row, oldest batch first: (M x D features, M labels)."""
        slots = self.slots()
        if not slots:
            return self.features.new_zeros(0, self.dim), self.labels.new_zeros(0)
        features = torch.cat([self.features[s, : int(self.counts[s])] for s in slots])
        labels = torch.cat([self.labels[s, : int(self.counts[s])] for s in slots])
        return features, labels

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in ("features", "labels"):
            stored = state_dict.get(prefix + name)
            current = getattr(self, name)
            if stored is not None and stored.dim() == current.dim() and stored.shape[0] == current.shape[0]:
                setattr(self, name, current.new_zeros(stored.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
