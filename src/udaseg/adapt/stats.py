"""Online per-class feature statistics: running means, (co)variances and queues of batch centroids.

SePiCo (Xie et al., TPAMI 2023, Sec. 3.2) keeps, for each class k, statistics of the teacher's
projected source features, updated once per iteration from the batch's labelled pixels:

* batch centroid (Eq. 6), over the m_k pixels of class k in the batch:
  ``mu'_k = (1/m_k) sum_{i: y_i = k} f_i``
* exact cumulative mean (Eq. 7), with ``w_k = m_k / (n_k + m_k)`` (0 when ``m_k = 0``):
  ``mu_k <- (1 - w_k) mu_k + w_k mu'_k``,  ``n_k <- n_k + m_k``
* covariance (Eq. 10), with the batch's biased covariance ``Sigma'_k`` and the *old* mean:
  ``Sigma_k <- (1 - w_k) Sigma_k + w_k Sigma'_k + w_k (1 - w_k) (mu_k - mu'_k)(mu_k - mu'_k)^T``
  The official code keeps only its diagonal (a per-dimension variance); ``covariance="full"``
  keeps the whole A x A matrix.
* per-class queues (Eq. 9) of the last ``bank_size`` batch centroids. As in the official code every
  queue starts with one zero vector, which stays until ``bank_size`` centroids have been pushed.

These are running averages over *every* pixel seen, not moving averages. Everything is stored in
buffers (fixed shapes, plain tensors), so the state travels with ``state_dict`` through
``torch.load(..., weights_only=True)`` and is moved by ``.to(device)``.

Multi-GPU: the batch sums (counts, shifted sums, shifted second moments) are summed across ranks
*before* the update, so every rank applies the identical update and the statistics equal those of
one process seeing the global batch.

Example::

    >>> stats = OnlineClassStatistics(num_classes=3, dim=4, bank_size=5)
    >>> stats.update(torch.rand(10, 4), torch.tensor([0, 0, 1, 1, 1, 2, 255, 2, 0, 1]))
    >>> stats.mean.shape, stats.covariance.shape, stats.bank_entries(1).shape
    (torch.Size([3, 4]), torch.Size([3, 4]), torch.Size([2, 4]))
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

ReduceFn = Callable[[Tensor], Tensor]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` across the ranks of the default process group (no-op outside DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class OnlineClassStatistics(nn.Module):
    """Per-class running mean, variance or covariance and centroid queues (SePiCo Eqs. 6, 7, 9, 10).

    Args:
        num_classes: K.
        dim: feature dimension A.
        covariance: ``"diagonal"`` keeps a K x A variance (the official code), ``"full"`` a
            K x A x A covariance (the paper's Eq. 10).
        bank_size: B, the length of each class's centroid queue; 0 keeps no queues.
        reduce_fn: sums a tensor across processes in place and returns it; it receives the packed
            batch sums before each update. Default: ``torch.distributed.all_reduce`` when a process
            group with more than one rank is initialised, otherwise nothing.

    Buffers: ``mean`` K x A, ``var`` K x A or ``cov`` K x A x A, ``count`` K (int64), and with a
    bank ``bank`` K x B x A (a ring buffer), ``bank_length`` K and ``bank_next`` K (next slot).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        covariance: Literal["diagonal", "full"] = "diagonal",
        bank_size: int = 0,
        reduce_fn: Optional[ReduceFn] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {num_classes} and {dim}")
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {covariance!r}")
        if bank_size < 0:
            raise ValueError(f"bank_size must be >= 0, got {bank_size}")
        self.num_classes = num_classes
        self.dim = dim
        self.covariance_mode = covariance
        self.bank_size = bank_size
        self.reduce_fn = reduce_fn if reduce_fn is not None else all_reduce_sum

        self.register_buffer("mean", torch.zeros(num_classes, dim))
        if covariance == "diagonal":
            self.register_buffer("var", torch.zeros(num_classes, dim))
        else:
            self.register_buffer("cov", torch.zeros(num_classes, dim, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        if bank_size > 0:
            # Each queue starts holding one zero vector (slot 0), as the official deque does.
            self.register_buffer("bank", torch.zeros(num_classes, bank_size, dim))
            self.register_buffer("bank_length", torch.ones(num_classes, dtype=torch.long))
            self.register_buffer("bank_next", torch.full((num_classes,), 1 % bank_size, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"covariance={self.covariance_mode!r}, bank_size={self.bank_size}"
        )

    @property
    def covariance(self) -> Tensor:
        """The variance K x A (diagonal mode) or the covariance K x A x A (full mode)."""
        return self.var if self.covariance_mode == "diagonal" else self.cov

    # ------------------------------------------------------------------ batch sums
    def _second_moment_size(self) -> int:
        return self.dim if self.covariance_mode == "diagonal" else self.dim * self.dim

    def local_sums(self, features: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
        """This process's batch sums, packed into one K x (1 + A + A or A^2) float tensor.

        Columns: the pixel count m_k, the sum of ``f - mu_k`` and the sum of ``(f - mu_k)^2`` (or of
        the outer products), all taken about the *current* running mean. The shift is the same on
        every rank (ranks apply identical updates), so the sums add up across ranks, and it keeps
        the second moments well conditioned. Only pixels with ``labels != ignore_index`` count.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be N x {self.dim}, got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(device=self.mean.device, dtype=torch.long)
        valid = labels != ignore_index
        labels = labels[valid]
        features = features.detach().to(device=self.mean.device, dtype=self.mean.dtype)[valid]
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or equal {ignore_index}")

        shifted = features - self.mean[labels]
        k, a = self.num_classes, self.dim
        packed = features.new_zeros(k, 1 + a + self._second_moment_size())
        packed[:, 0] = torch.bincount(labels, minlength=k).to(packed.dtype)
        packed[:, 1 : 1 + a].index_add_(0, labels, shifted)
        if self.covariance_mode == "diagonal":
            packed[:, 1 + a :].index_add_(0, labels, shifted * shifted)
        else:
            for cls in torch.unique(labels).tolist():
                rows = shifted[labels == cls]
                packed[cls, 1 + a :] = (rows.T @ rows).reshape(-1)
        return packed

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, ignore_index: int = 255) -> None:
        """Fold one batch (features N x A, labels N) into the statistics (detached).

        Pixels labelled ``ignore_index`` are dropped. Across processes the sums are reduced with
        ``reduce_fn`` first, so every rank ends with the same state.
        """
        packed = self.reduce_fn(self.local_sums(features, labels, ignore_index))
        self.apply_sums(packed)

    @torch.no_grad()
    def apply_sums(self, packed: Tensor) -> None:
        """Update from packed (already reduced) batch sums as returned by :meth:`local_sums`."""
        a = self.dim
        batch_count = packed[:, 0]
        present = batch_count > 0
        if not bool(present.any()):
            return
        m = batch_count.clamp_min(1.0).unsqueeze(1)
        offset = packed[:, 1 : 1 + a] / m  # mu'_k - mu_k  (batch centroid relative to the old mean)
        second = packed[:, 1 + a :] / m  # batch second moment about the old mean

        total = self.count.to(torch.float64) + batch_count.to(torch.float64)
        w = torch.where(present, batch_count.to(torch.float64) / total.clamp_min(1.0), torch.zeros_like(total))
        w = w.to(self.mean.dtype).unsqueeze(1)

        batch_centroid = self.mean + offset
        if self.covariance_mode == "diagonal":
            batch_var = (second - offset * offset).clamp_min(0.0)
            # Eq. 10 restricted to the diagonal; (mu_old - mu')^2 = offset^2.
            self.var.copy_((1 - w) * self.var + w * batch_var + w * (1 - w) * offset * offset)
        else:
            outer = offset.unsqueeze(2) * offset.unsqueeze(1)
            batch_cov = second.reshape(-1, a, a) - outer
            w3 = w.unsqueeze(2)
            self.cov.copy_((1 - w3) * self.cov + w3 * batch_cov + w3 * (1 - w3) * outer)
        self.mean.copy_((1 - w) * self.mean + w * batch_centroid)
        self.count.add_(batch_count.round().to(torch.long))

        if self.bank_size > 0:
            self._push_centroids(batch_centroid, present)

    def _push_centroids(self, centroids: Tensor, present: Tensor) -> None:
        classes = present.nonzero().squeeze(1)
        slots = self.bank_next[classes]
        self.bank[classes, slots] = centroids[classes]
        self.bank_next[classes] = (slots + 1) % self.bank_size
        self.bank_length[classes] = (self.bank_length[classes] + 1).clamp_max(self.bank_size)

    # ------------------------------------------------------------------ bank access
    def bank_entries(self, cls: int) -> Tensor:
        """The queue of class ``cls`` as an M x A tensor, oldest entry first."""
        self._require_bank()
        length = int(self.bank_length[cls])
        start = (int(self.bank_next[cls]) - length) % self.bank_size
        order = (torch.arange(length, device=self.bank.device) + start) % self.bank_size
        return self.bank[cls, order]

    def bank_with_mask(self) -> tuple[Tensor, Tensor]:
        """All queues as the K x B x A ring buffer and a K x B mask of the occupied slots.

        Slot order is storage order, not queue order; the contrastive losses only use sums and
        means over a queue, which do not depend on the order.
        """
        self._require_bank()
        slots = torch.arange(self.bank_size, device=self.bank.device)
        return self.bank, slots.unsqueeze(0) < self.bank_length.unsqueeze(1)

    def _require_bank(self) -> None:
        if self.bank_size == 0:
            raise RuntimeError("these statistics keep no centroid queues (bank_size=0)")
