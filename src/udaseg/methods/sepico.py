"""SePiCo: semantic-guided pixel contrast (Xie et al., TPAMI 2023).

Every labelled pixel's projected feature q (unit norm, A-dim) is contrasted against per-class
statistics of the teacher's source features (``udaseg.adapt.stats.OnlineClassStatistics``):

* ProtoCL (Eq. 14): the K running class means as one positive and K-1 negatives.
* BankCL (Eq. 15): queues of recent batch centroids, every queue entry of the own class a positive.
* DistCL (Eq. 19): the closed-form upper bound of the contrastive loss with infinitely many
  positives and negatives drawn from per-class Gaussians N(mu_k, Sigma_k).
* L_reg (Eq. 13): a log-softmax of the batch-mean feature against the class means.

Defaults follow the official code (temperature 100 as a divisor, diagonal covariance, cumulative
statistics, L_reg without a minus sign, exp of the mean negative logit in BankCL); see
``docs/methods/sepico.md``.

The file holds, in order: the loss modules, ``sepico_pixel_loss`` (one domain's contrastive term from
a feature map, a label map and the statistics), class-balanced cropping (Alg. 1), the
Cityscapes -> Dark Zurich helpers (day/night pseudo-label fusion, class re-weighting) and the
objectives that plug all of it into the shared training step (``build_sepico``, method ``sepico``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.adapt.downsample import downscale_label_ratio
from udaseg.adapt.geometry import CropBox as GeometryBox
from udaseg.adapt.pseudo_label import pseudo_labels
from udaseg.adapt.stats import OnlineClassStatistics
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import ITERATION_COUNT, Config, SelfTrainingConfig
from udaseg.errors import UserError
from udaseg.methods import Method, register_method
from udaseg.methods.dacs import (MONITOR, PSEUDO_VALID, PseudoLabelSelfTraining, monitor_label, pseudo_valid_region,
                                 store_pseudo_labels, strong_view, teacher_pseudo_labels)


@dataclass
class SePiCoConfig:
    """SePiCo (Xie et al., TPAMI 2023). Defaults are the official code's."""

    variant: Literal["proto", "bank", "dist"] = "dist"
    temperature: float = 100.0
    weight: float = 1.0  # lambda_cl
    reg_weight: float = 1.0  # relative weight of L_reg (effective lambda_reg = weight * reg_weight)
    warmup_iters: int = field(default=3000, metadata=ITERATION_COUNT)  # L_w: contrastive terms start here (0-based)
    proj_dim: int = 512
    feature: str = "auto"  # encoder tap the projection head reads: auto | enc4 | enc_fused | encN
    bank_size: int = 200
    bank_negatives: Literal["exp_of_mean", "mean_of_exp"] = "exp_of_mean"
    covariance: Literal["diagonal", "full"] = "diagonal"
    label_min_ratio: float = 0.75
    class_balanced_crop: bool = True
    crop_candidates: int = 10
    crop_cat_max_ratio: float = 0.75
    target_crop_size: Optional[list[int]] = None  # [h, w]; None: the source crop size
    source_loss: bool = True
    target_loss: bool = True
    dark: bool = False  # Cityscapes -> Dark Zurich day/night fusion and class re-weighting
    dark_train_scale: float = 0.05
    dark_test_scale: float = 0.16

IGNORE_INDEX = 255


def _zero_loss(features: Tensor) -> Tensor:
    """A 0 that stays connected to ``features`` (so backward and DDP see every parameter)."""
    return features.sum() * 0.0


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def _check_queries(features: Tensor, labels: Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be N x A, got shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")


# =====================================================================================  losses
class ProtoContrastiveLoss(nn.Module):
    r"""ProtoCL, SePiCo Eq. 14: cross-entropy of a query against the K class prototypes.

    .. math::
        \ell_q = -\log \frac{e^{q^\top \mu^{y}/\tau}}{\sum_{k=1}^{K} e^{q^\top \mu^{k}/\tau}}

    Every class takes part, including classes never seen (prototype 0, logit 0).

    Args:
        temperature: tau, a divisor of the logits (official code: 100).
        reduction: ``"mean"`` (over queries), ``"sum"`` or ``"none"``.

    Inputs: ``features`` N x A (queries, valid pixels only), ``labels`` N in [0, K),
    ``mean`` K x A (detached inside). Output: a scalar, or N losses with ``reduction="none"``.

    Example::

        >>> loss = ProtoContrastiveLoss(temperature=0.1)
        >>> q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        >>> mu = F.normalize(torch.randn(4, 8), dim=1)
        >>> out = loss(q, torch.tensor([0, 1, 2, 3, 0, 1]), mu)
        >>> out.backward()
    """

    def __init__(self, temperature: float = 100.0, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = _check_reduction(reduction)

    def forward(self, features: Tensor, labels: Tensor, mean: Tensor) -> Tensor:
        _check_queries(features, labels)
        if features.shape[0] == 0:
            return _zero_loss(features)
        logits = features @ mean.detach().to(features.dtype).T / self.temperature
        return _reduce(F.cross_entropy(logits, labels, reduction="none"), self.reduction)


class BankContrastiveLoss(nn.Module):
    r"""BankCL, SePiCo Eq. 15: contrast against per-class queues of batch centroids.

    For a query q of class c, with queue entries :math:`b^c_j` (j = 1..M_c) and, for each other
    class k, a negative score :math:`\bar s_k`:

    .. math::
        \ell_q = -\frac{1}{M_c} \sum_{j=1}^{M_c}
            \log \frac{e^{q^\top b^c_j/\tau}}{e^{q^\top b^c_j/\tau} + \sum_{k \ne c} e^{\bar s_k}}

    * ``negatives="exp_of_mean"`` (official code): :math:`\bar s_k = \frac{1}{M_k}\sum_j q^\top b^k_j/\tau`,
      i.e. the exponential of the mean logit.
    * ``negatives="mean_of_exp"`` (the paper's Eq. 15):
      :math:`\bar s_k = \log \frac{1}{M_k}\sum_j e^{q^\top b^k_j/\tau}`.

    By Jensen the official negative term is the smaller, so its loss is never larger. The code
    evaluates :math:`-\log\frac{e^s}{e^s + e^L} = \operatorname{softplus}(L - s)` with
    :math:`L = \operatorname{logsumexp}_{k\ne c} \bar s_k`, which equals the official expression
    and stays finite at small temperatures.

    Inputs: ``features`` N x A, ``labels`` N in [0, K), ``bank`` K x B x A (detached inside) and
    ``bank_mask`` K x B (occupied slots; every class needs at least one). Output: a scalar, or N
    losses (in the order of the queries) with ``reduction="none"``.

    Example::

        >>> loss = BankContrastiveLoss(temperature=0.1)
        >>> q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        >>> bank = torch.randn(4, 5, 8)
        >>> out = loss(q, torch.tensor([0, 1, 2, 3, 0, 1]), bank)
        >>> out.backward()
    """

    def __init__(
        self,
        temperature: float = 100.0,
        negatives: Literal["exp_of_mean", "mean_of_exp"] = "exp_of_mean",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if negatives not in ("exp_of_mean", "mean_of_exp"):
            raise ValueError(f"negatives must be 'exp_of_mean' or 'mean_of_exp', got {negatives!r}")
        self.temperature = _check_temperature(temperature)
        self.negatives = negatives
        self.reduction = _check_reduction(reduction)

    def forward(
        self, features: Tensor, labels: Tensor, bank: Tensor, bank_mask: Optional[Tensor] = None
    ) -> Tensor:
        _check_queries(features, labels)
        if features.shape[0] == 0:
            return _zero_loss(features)
        num_classes, slots, _ = bank.shape
        bank = bank.detach().to(features.dtype)
        if bank_mask is None:
            bank_mask = torch.ones(num_classes, slots, dtype=torch.bool, device=bank.device)
        lengths = bank_mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every class needs at least one queue entry")

        if self.negatives == "exp_of_mean":
            # mean_j q.b_j / tau = q.(mean_j b_j) / tau: one N x K product gives every negative score.
            bank_means = (bank * bank_mask.unsqueeze(2)).sum(1) / lengths.unsqueeze(1).to(bank.dtype)
            class_scores = features @ bank_means.T / self.temperature
        else:
            class_scores = None

        per_class, query_rows = [], []
        for cls in torch.unique(labels).tolist():
            rows = (labels == cls).nonzero().squeeze(1)
            queries = features[rows]
            positives = queries @ bank[cls, bank_mask[cls]].T / self.temperature  # Nc x Mc
            if class_scores is not None:
                scores = class_scores[rows]
            else:
                scores = self._mean_of_exp_scores(queries, bank, bank_mask, lengths)
            others = torch.arange(num_classes, device=scores.device) != cls
            negative = torch.logsumexp(scores[:, others], dim=1, keepdim=True)  # Nc x 1
            per_class.append(F.softplus(negative - positives).mean(1))
            query_rows.append(rows)
        # back to the order of the queries
        losses = torch.cat(per_class)[torch.argsort(torch.cat(query_rows))]
        return _reduce(losses, self.reduction)

    def _mean_of_exp_scores(self, queries: Tensor, bank: Tensor, mask: Tensor, lengths: Tensor) -> Tensor:
        """log((1/M_k) sum_j exp(q.b_j/tau)) for every class k: Nc x K."""
        logits = torch.einsum("na,kma->nkm", queries, bank) / self.temperature
        logits = logits.masked_fill(~mask.unsqueeze(0), float("-inf"))
        return torch.logsumexp(logits, dim=2) - lengths.to(logits.dtype).log().unsqueeze(0)


class DistContrastiveLoss(nn.Module):
    r"""DistCL, SePiCo Eqs. 16-19: closed-form upper bound for Gaussian class distributions.

    With :math:`q^k \sim \mathcal N(\mu^k, \Sigma^k)` and infinitely many positives and negatives,
    Jensen's inequality and the Gaussian moment-generating function give

    .. math::
        \ell_q = \log \sum_{k=1}^{K} \exp\Big(\frac{q^\top\mu^k}{\tau}
                 + \frac{q^\top \Sigma^k q}{2\tau^2}\Big) - \frac{q^\top \mu^{y}}{\tau}

    computed as :math:`\mathrm{CE}(z, y) + q^\top\Sigma^{y}q/(2\tau^2)` with
    :math:`z_k = q^\top\mu^k/\tau + q^\top\Sigma^k q/(2\tau^2)` (the official code's form). With a
    K x A variance (``diag(Sigma_k)``, the official choice) :math:`q^\top\Sigma^k q = \sum_a q_a^2
    \sigma^2_{k,a}`; with a K x A x A covariance it is the full quadratic form.

    Inputs: ``features`` N x A, ``labels`` N, ``mean`` K x A, ``covariance`` K x A or K x A x A
    (both detached inside). Output: a scalar, or N losses with ``reduction="none"``.

    Example::

        >>> loss = DistContrastiveLoss(temperature=0.1)
        >>> q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        >>> out = loss(q, torch.tensor([0, 1, 2, 3, 0, 1]), torch.randn(4, 8), 0.01 * torch.rand(4, 8))
        >>> out.backward()
    """

    def __init__(self, temperature: float = 100.0, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction = _check_reduction(reduction)

    def forward(self, features: Tensor, labels: Tensor, mean: Tensor, covariance: Tensor) -> Tensor:
        _check_queries(features, labels)
        if features.shape[0] == 0:
            return _zero_loss(features)
        mean = mean.detach().to(features.dtype)
        covariance = covariance.detach().to(features.dtype)
        quad = quadratic_forms(features, covariance)  # N x K: q^T Sigma_k q
        tau = self.temperature
        logits = features @ mean.T / tau + quad / (2 * tau * tau)
        positive_quad = quad.gather(1, labels.unsqueeze(1)).squeeze(1)
        loss = F.cross_entropy(logits, labels, reduction="none") + positive_quad / (2 * tau * tau)
        return _reduce(loss, self.reduction)


def quadratic_forms(features: Tensor, covariance: Tensor) -> Tensor:
    """q_n^T Sigma_k q_n for every query n and class k: N x K.

    ``covariance`` is K x A (a diagonal, one product) or K x A x A (one N x A product per class,
    so no N x K x A tensor is built).
    """
    if covariance.dim() == 2:
        return (features * features) @ covariance.T
    if covariance.dim() == 3:
        return torch.stack([((features @ cov) * features).sum(1) for cov in covariance], dim=1)
    raise ValueError(f"covariance must be K x A or K x A x A, got shape {tuple(covariance.shape)}")


class ContrastRegularizer(nn.Module):
    r"""L_reg, SePiCo Eq. 13, as the official code computes it.

    .. math::
        L_{reg} = \frac{1}{K \ln K} \sum_{k=1}^{K} \log
            \frac{e^{Q^\top\mu^k/\tau}}{\sum_{l} e^{Q^\top\mu^l/\tau}},
        \qquad Q = \frac{1}{N}\sum_{i} q_i

    Q is the mean feature over all given (valid) pixels of the batch. The term is minimised as
    written, without a minus sign (the paper's and the code's form).

    Example::

        >>> reg = ContrastRegularizer(temperature=100.0)
        >>> q = F.normalize(torch.rand(6, 8), dim=1).requires_grad_()
        >>> value = reg(q, F.normalize(torch.rand(4, 8), dim=1))  # close to -1 at tau = 100
        >>> value.backward()
    """

    def __init__(self, temperature: float = 100.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, features: Tensor, mean: Tensor) -> Tensor:
        num_classes = mean.shape[0]
        if num_classes < 2:
            raise ValueError("L_reg needs at least 2 classes (it divides by K ln K)")
        if features.shape[0] == 0:
            return _zero_loss(features)
        batch_mean = features.mean(0, keepdim=True)
        logits = batch_mean @ mean.detach().to(features.dtype).T / self.temperature
        return F.log_softmax(logits, dim=1).sum() / (num_classes * math.log(num_classes))


# =====================================================================  one domain's contrastive term
def _downscale_labels(labels: Tensor, feature_size: Sequence[int], min_ratio: float, num_classes: int) -> Tensor:
    """B x H x W labels -> B x h x w with the 75%-majority rule (scale = W // w)."""
    height, width = labels.shape[-2:]
    h, w = feature_size
    scale = width // w
    if scale < 1 or height != h * scale or width != w * scale:
        raise UserError(
            f"label size {height}x{width} is not an integer multiple of the feature size {h}x{w}; "
            "use a crop size divisible by the feature stride"
        )
    if scale == 1:
        return labels.clone()
    return downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index=IGNORE_INDEX)


def flatten_valid(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """B x A x h x w features and B x h x w labels -> (N x A, N) over the pixels not labelled 255."""
    dim = features.shape[1]
    flat_features = features.permute(0, 2, 3, 1).reshape(-1, dim)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE_INDEX
    return flat_features[valid], flat_labels[valid]


def sepico_pixel_loss(
    features: Tensor,
    labels: Tensor,
    stats: OnlineClassStatistics,
    variant: Literal["proto", "bank", "dist"] = "dist",
    temperature: float = 100.0,
    weight: float = 1.0,
    reg_weight: float = 1.0,
    label_min_ratio: float = 0.75,
    bank_negatives: Literal["exp_of_mean", "mean_of_exp"] = "exp_of_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """One domain's SePiCo term: ``weight * (l_cl + reg_weight * L_reg)``.

    Args:
        features: B x A x h x w student projections (unit norm per pixel).
        labels: B x H x W trainIds (255 = ignore) at a multiple s = W // w of the feature size;
            they are downsampled with the 75%-majority rule (``label_min_ratio``).
        stats: an ``OnlineClassStatistics`` (``mean``, ``covariance`` and, for BankCL, the bank).
        variant, temperature, weight, reg_weight, bank_negatives: see ``SePiCoConfig``.

    Returns:
        The loss (a grad-safe 0 when no pixel is valid) and detached metrics: ``cl`` (l_cl),
        ``reg`` (L_reg) and ``pixels`` (valid feature pixels).
    """
    if features.dim() != 4 or labels.dim() != 3 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected features B x A x h x w and labels B x H x W, got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    num_classes = stats.mean.shape[0]
    small = _downscale_labels(labels.long(), features.shape[-2:], label_min_ratio, num_classes)
    queries, targets = flatten_valid(features.float(), small.to(features.device))
    pixels = torch.tensor(float(queries.shape[0]), device=features.device)
    if queries.shape[0] == 0:
        zero = _zero_loss(features)
        return zero, {"cl": zero.detach(), "reg": zero.detach(), "pixels": pixels}

    mean = stats.mean
    if variant == "proto":
        contrast = ProtoContrastiveLoss(temperature)(queries, targets, mean)
    elif variant == "dist":
        contrast = DistContrastiveLoss(temperature)(queries, targets, mean, stats.covariance)
    elif variant == "bank":
        if getattr(stats, "bank_size", 0) == 0:
            raise UserError("method.sepico.variant=bank needs method.sepico.bank_size > 0")
        bank, mask = stats.bank_with_mask()
        contrast = BankContrastiveLoss(temperature, negatives=bank_negatives)(queries, targets, bank, mask)
    else:
        raise UserError(f"method.sepico.variant must be one of proto, bank, dist, got {variant!r}")

    loss = contrast
    reg = torch.zeros((), device=queries.device)
    if reg_weight != 0:
        reg = ContrastRegularizer(temperature)(queries, mean)
        loss = loss + reg_weight * reg
    metrics = {"cl": contrast.detach(), "reg": reg.detach(), "pixels": pixels}
    return weight * loss, metrics


# =============================================================================  class-balanced cropping
CropBox = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def random_crop_box(
    image_size: Sequence[int], crop_size: Sequence[int], generator: Optional[torch.Generator] = None
) -> CropBox:
    """A uniform random box (y1, y2, x1, x2); offsets in [0, H - h] x [0, W - w] (0 if negative)."""
    margin_h = max(int(image_size[0]) - int(crop_size[0]), 0)
    margin_w = max(int(image_size[1]) - int(crop_size[1]), 0)
    y1 = int(torch.randint(0, margin_h + 1, (1,), generator=generator))
    x1 = int(torch.randint(0, margin_w + 1, (1,), generator=generator))
    return y1, y1 + int(crop_size[0]), x1, x1 + int(crop_size[1])


def crop_box_score(label_crop: Tensor, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> float:
    """The CBC score of one cropped pseudo-label (official code's rule).

    Count pixels per class (ignoring ``ignore_index``). With at least 2 classes and the largest
    class's share below ``cat_max_ratio`` the score is sum(ln count) over classes with count > 1;
    otherwise 0.
    """
    return float(_box_scores(label_crop.reshape(1, -1), cat_max_ratio, ignore_index)[0])


def _box_scores(flat_crops: Tensor, cat_max_ratio: float, ignore_index: int) -> Tensor:
    """Scores of C flattened crops (C x P labels) in float64."""
    flat_crops = flat_crops.long()
    candidates = flat_crops.shape[0]
    bins = max(int(flat_crops.max()) + 1, ignore_index + 1) if flat_crops.numel() else ignore_index + 1
    offsets = torch.arange(candidates, device=flat_crops.device).unsqueeze(1) * bins
    counts = torch.bincount((flat_crops + offsets).reshape(-1), minlength=candidates * bins)
    counts = counts.reshape(candidates, bins).double()
    counts[:, ignore_index] = 0
    present = (counts > 0).sum(1)
    total = counts.sum(1)
    share = counts.max(1).values / total.clamp_min(1.0)
    log_counts = torch.where(counts > 1, counts.clamp_min(1.0).log(), torch.zeros_like(counts))
    eligible = (present >= 2) & (share < cat_max_ratio)
    return torch.where(eligible, log_counts.sum(1), torch.zeros_like(total))


def class_balanced_crop_box(
    pseudo_label: Tensor,
    crop_size: Sequence[int],
    candidates: int = 10,
    cat_max_ratio: float = 0.75,
    generator: Optional[torch.Generator] = None,
    ignore_index: int = IGNORE_INDEX,
) -> CropBox:
    """Class-balanced cropping (SePiCo Alg. 1, as the official code does it).

    Draw ``candidates`` uniform boxes of ``crop_size`` (h, w) over the H x W pseudo-label
    (offsets drawn y then x, box by box, from ``generator``), score each with
    :func:`crop_box_score` and keep the first box with the highest score (the official loop starts
    from best = -1 and replaces only on a strictly greater score).

    Example::

        >>> label = torch.zeros(8, 16, dtype=torch.long); label[:, 10:] = 1
        >>> y1, y2, x1, x2 = class_balanced_crop_box(label, (8, 8), generator=torch.Generator().manual_seed(0))
    """
    if pseudo_label.dim() != 2:
        raise ValueError(f"pseudo_label must be H x W, got shape {tuple(pseudo_label.shape)}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    boxes = [random_crop_box(pseudo_label.shape, crop_size, generator) for _ in range(candidates)]
    crops = torch.stack([pseudo_label[y1:y2, x1:x2].reshape(-1) for y1, y2, x1, x2 in boxes])
    scores = _box_scores(crops, cat_max_ratio, ignore_index)
    return boxes[int(torch.argmax(scores))]  # argmax returns the first of equal maxima


def class_balanced_crop_boxes(
    pseudo_labels: Tensor,
    crop_size: Sequence[int],
    candidates: int = 10,
    cat_max_ratio: float = 0.75,
    generator: Optional[torch.Generator] = None,
    ignore_index: int = IGNORE_INDEX,
) -> list[CropBox]:
    """:func:`class_balanced_crop_box` for each of B pseudo-labels (B x H x W)."""
    return [
        class_balanced_crop_box(label, crop_size, candidates, cat_max_ratio, generator, ignore_index)
        for label in pseudo_labels
    ]


def crop_batch(tensor: Tensor, boxes: Sequence[CropBox]) -> Tensor:
    """Crop each item of a B x ... x H x W tensor with its own box (all boxes the same size)."""
    if len(boxes) != tensor.shape[0]:
        raise ValueError(f"need one box per item: {len(boxes)} boxes for a batch of {tensor.shape[0]}")
    return torch.stack([item[..., y1:y2, x1:x2] for item, (y1, y2, x1, x2) in zip(tensor, boxes)])


# ============================================================================  Cityscapes -> Dark Zurich
# Cityscapes class frequencies used by DANNet and SePiCo's Dark Zurich runs (trainId order).
CITYSCAPES_CLASS_FREQUENCIES = (
    0.36869696, 0.06084986, 0.22824049, 0.00655399, 0.00877272, 0.01227341, 0.00207795,
    0.0055127, 0.15928651, 0.01157818, 0.04018982, 0.01218957, 0.00135122, 0.06994545,
    0.00267456, 0.00235192, 0.00232904, 0.00098658, 0.00413907,
)  # fmt: skip
# road, sidewalk, building, wall, fence, vegetation, terrain, sky: little appearance change day/night.
SHIFT_INSENSITIVE_CLASSES = (0, 1, 2, 3, 4, 8, 9, 10)


def dark_zurich_class_weights(scale: float) -> Tensor:
    """Per-class weights v = (mean(ln f) - ln f) / std(ln f) * scale + 1 (std unbiased), 19 values.

    ``scale`` = 0.05 for training (CE class weights and pseudo-label fusion), 0.16 at test time.
    Rare classes get weights above 1.
    """
    log_freq = torch.tensor(CITYSCAPES_CLASS_FREQUENCIES, dtype=torch.float32).log()
    return (log_freq.mean() - log_freq) / log_freq.std() * scale + 1.0


def reweight_probabilities(probs: Tensor, class_weights: Tensor) -> Tensor:
    """Multiply B x K x H x W probabilities by a K-vector of class weights."""
    return probs * class_weights.to(probs).view(1, -1, 1, 1)


def fuse_day_night(
    p_day: Tensor,
    p_night: Tensor,
    class_weights: Optional[Tensor] = None,
    day_ratio: float = 0.8,
    day_threshold: float = 0.4,
    shift_insensitive: Sequence[int] = SHIFT_INSENSITIVE_CLASSES,
) -> Tensor:
    """Fuse the teacher's day and night softmax maps (B x K x H x W) into one, DANNet-style.

    For the shift-insensitive classes the per-pixel, per-class mixing weight is ``day_ratio`` where
    ``p_day[c] > day_threshold`` and ``1 - day_ratio`` elsewhere; the other classes take the night
    prediction only. ``P = weight * p_day + (1 - weight) * p_night``, then multiplied by
    ``class_weights`` when given. The pseudo-label is its argmax; its maximum is the confidence.
    """
    if p_day.shape != p_night.shape or p_day.dim() != 4:
        raise ValueError(f"p_day and p_night must both be B x K x H x W, got {tuple(p_day.shape)} and {tuple(p_night.shape)}")
    channels = torch.tensor(list(shift_insensitive), device=p_day.device, dtype=torch.long)
    day_weight = torch.where(p_day > day_threshold, day_ratio, 1.0 - day_ratio).to(p_day.dtype)
    is_static = torch.zeros(p_day.shape[1], dtype=torch.bool, device=p_day.device)
    is_static[channels] = True
    day_weight = day_weight * is_static.view(1, -1, 1, 1)
    fused = day_weight * p_day + (1.0 - day_weight) * p_night
    return fused if class_weights is None else reweight_probabilities(fused, class_weights)


class ClassPriorReweighting(nn.Module):
    """Test-time class re-weighting of the official Dark Zurich evaluation (s = 0.16).

    Wraps a segmentor: the logits are upsampled bilinearly to the input size, turned into a
    softmax and multiplied by the class weights v (``dark_zurich_class_weights(0.16)``). The output's
    ``logits`` are these re-weighted probabilities (B x K x H x W at the input size), so resizing
    them to the label size and taking the argmax is exactly the official prediction. Use it for
    argmax-based evaluation and prediction only (the scores are not logits).

    Example::

        >>> from udaseg.models import build_model
        >>> model = ClassPriorReweighting(build_model("daformer_tiny", 19), dark_zurich_class_weights(0.16))
        >>> model(torch.randn(1, 3, 32, 32)).logits.shape
        torch.Size([1, 19, 32, 32])
    """

    def __init__(self, segmentor: nn.Module, class_weights: Tensor) -> None:
        super().__init__()
        self.segmentor = segmentor
        self.register_buffer("class_weights", class_weights.detach().clone().float(), persistent=False)

    def forward(self, x: Tensor, taps: Sequence[str] = ()):
        from udaseg.models.segmentor import SegmentorOutput

        out = self.segmentor(x, taps=taps)
        logits = out.logits.float()
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        scores = reweight_probabilities(torch.softmax(logits, dim=1), self.class_weights)
        return SegmentorOutput(logits=scores, features=dict(out.features))


# ==========================================================================  objectives (training step)
# Per iteration, in the official order (spec sepico.md §1.0):
#   TargetCropping      teacher on the full weak target -> pseudo-label -> CBC box per image -> crop
#                       'target' (and the Dark Zurich day image); the pseudo-labels are predicted again
#                       on the crop (regen_pseudo)
#   StrongAugmentedView 'source_strong' = colour jitter / blur of the weak source (shared flags)
#   SupervisedSegmentation on 'source_strong'                                  (group 1: source)
#   SePiCoContrast      statistics from the teacher's projection of the weak source (every iteration);
#                       from warmup_iters on: CL + L_reg on 'source_strong' (group 1) and on
#                       'target_strong' (group 2: strong cropped target, pseudo-labels)
#   PseudoLabelSelfTraining  ClassMix of weak source and weak cropped target     (group 3: mixed)
PROJECTION_HEAD = "proj_head"
SOURCE_STRONG_VIEW = "source_strong"
TARGET_STRONG_VIEW = "target_strong"
DAY_VIEW = "target_day"
DAY_IMAGE_KEY = "day_image"
CROP_BOXES = "sepico_crop_boxes"


class StrongAugmentedView(Objective):
    """Adds ``out_view``: colour jitter / blur of ``in_view`` with its labels (no losses).

    The on/off flags are the iteration's shared ones (``udaseg.methods.dacs.strong_view``).
    """

    name = "strong_view"

    def __init__(self, self_training: SelfTrainingConfig, mean: Sequence[float], std: Sequence[float],
                 in_view: str = "source", out_view: str = SOURCE_STRONG_VIEW) -> None:
        super().__init__()
        self.self_training = self_training
        self.mean, self.std = list(mean), list(std)
        self.in_view, self.out_view = in_view, out_view

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        source = ctx.view(self.in_view)
        image = strong_view(ctx, self.self_training, source.image, self.mean, self.std, self.out_view)
        ctx.add_view(self.out_view, image, source.label, source.weight)


class TargetCropping(Objective):
    """Class-balanced cropping of the target inside the step (SePiCo Alg. 1 with ``regen_pseudo``).

    ``prepare``: the teacher predicts the full weak target (B x 3 x H x W, uncropped by the data
    pipeline); for each image a ``crop_size`` box is chosen by :func:`class_balanced_crop_box` on the
    argmax pseudo-label; the 'target' view is replaced by the crops, which drops the cached teacher
    output, so the pseudo-labels used afterwards (``teacher_pseudo_labels``) are predicted again on the
    crop. The boxes are kept in ``ctx.state["sepico_crop_boxes"]`` and on the cropped view (``View.boxes``).

    With ``dark=True`` (Cityscapes -> Dark Zurich, spec §1.11) the pseudo-label is the day/night fusion
    (:func:`fuse_day_night`, with ``class_weights``) of the teacher on the night image and on the
    paired day image (the target batch's ``day_image``), on the full images for the box and again on
    the crops for training; the fused result is stored as the iteration's target pseudo-labels.

    ``crop_size=None``, or an image no larger than the crop, means no crop (and no second pass).
    """

    name = "target_cropping"

    def __init__(self, cfg: SePiCoConfig, self_training: SelfTrainingConfig, crop_size: Optional[Sequence[int]],
                 class_weights: Optional[Tensor] = None, target_view: str = "target") -> None:
        super().__init__()
        self.cfg = cfg
        self.self_training = self_training
        self.crop_size = tuple(int(v) for v in crop_size) if crop_size else None
        self.target_view = target_view
        self.register_buffer("class_weights", class_weights, persistent=False)

    def needs(self, iteration: int) -> list[Need]:
        needs = [Need("teacher", self.target_view)]
        if self.cfg.dark:
            needs.append(Need("teacher", DAY_VIEW))
        return needs

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        if self.cfg.dark:
            self._add_day_view(ctx, batch)
        target = ctx.view(self.target_view)
        size = self._effective_crop(target.image.shape[-2:])
        if size is not None:
            valid = pseudo_valid_region(ctx, self.target_view)
            full = self._pseudo_labels(ctx)
            if self.cfg.class_balanced_crop:
                boxes = class_balanced_crop_boxes(full["labels"], size, self.cfg.crop_candidates,
                                                  self.cfg.crop_cat_max_ratio, ctx.generator)
            else:
                boxes = [random_crop_box(target.image.shape[-2:], size, ctx.generator) for _ in full["labels"]]
            ctx.add_view(self.target_view, crop_batch(target.image, boxes),
                         boxes=[GeometryBox.from_corners(*box) for box in boxes])
            truth = monitor_label(ctx, batch, self.target_view)
            if truth is not None:
                ctx.state.setdefault(MONITOR, {})[self.target_view] = crop_batch(truth, boxes)
            if valid is not None:
                ctx.state.setdefault(PSEUDO_VALID, {})[self.target_view] = crop_batch(valid, boxes)
            if self.cfg.dark:
                ctx.add_view(DAY_VIEW, crop_batch(ctx.view(DAY_VIEW).image, boxes))
            ctx.state[CROP_BOXES] = boxes
        if self.cfg.dark:
            self._pseudo_labels(ctx)  # the fused labels of the crop become the iteration's pseudo-labels

    def _effective_crop(self, image_size: Sequence[int]) -> Optional[tuple[int, int]]:
        if self.crop_size is None:
            return None
        size = (min(self.crop_size[0], int(image_size[0])), min(self.crop_size[1], int(image_size[1])))
        return None if size == tuple(int(v) for v in image_size) else size

    def _add_day_view(self, ctx: StepContext, batch: dict) -> None:
        item = batch.get(self.target_view, {})
        if DAY_IMAGE_KEY not in item:
            raise UserError("method.sepico.dark=true needs the paired day images: set "
                            "data.target.options.paired_day=true (dataset darkzurich, split train, night)")
        ctx.add_view(DAY_VIEW, item[DAY_IMAGE_KEY])

    def _pseudo_labels(self, ctx: StepContext) -> dict:
        if not self.cfg.dark:
            return teacher_pseudo_labels(ctx, self.self_training, self.target_view)
        return fused_day_night_pseudo_labels(ctx, self.self_training, self.class_weights, self.target_view)


def fused_day_night_pseudo_labels(ctx: StepContext, self_training: SelfTrainingConfig,
                                  class_weights: Optional[Tensor], target_view: str = "target",
                                  day_view: str = DAY_VIEW) -> dict:
    """Dark Zurich pseudo-labels: argmax of the fused, class-weighted day/night teacher softmax.

    Stored in ``ctx.state`` exactly like ``teacher_pseudo_labels`` stores its result, so the
    self-training objective and the target contrastive term use the fused labels and confidence
    ratio (``max P >= pseudo_threshold``) of the current target view.
    """
    size = tuple(ctx.view(target_view).image.shape[-2:])
    night = pseudo_labels(ctx.teacher(target_view).logits, size).probs
    day = pseudo_labels(ctx.teacher(day_view).logits, size).probs
    fused = fuse_day_night(day, night, class_weights)
    confidence, labels = fused.max(dim=1)
    return store_pseudo_labels(ctx, self_training, target_view, fused, labels, confidence)


class SePiCoContrast(Objective):
    """SePiCo's contrastive terms and the class statistics they use (kept in ``self.stats``).

    ``prepare`` (every iteration, before any student loss): the teacher's projection of the weak
    source view, with its labels brought to the feature grid by the 75%-majority rule, updates
    ``stats`` (an :class:`OnlineClassStatistics`, saved with the objective). From ``warmup_iters`` on
    it also adds the 'target_strong' view: the strongly augmented (cropped) weak target, labelled
    with the teacher's pseudo-labels where their weight is > 0 and 255 elsewhere.

    ``losses``: from ``warmup_iters`` on, ``sepico_cl = weight * (l_cl + reg_weight * L_reg)`` on the
    student's projection of 'source_strong' (its group, shared with the source CE: one forward) and
    of 'target_strong'. Before warm-up the student's projection head is not run at all.
    """

    name = "sepico"

    def __init__(self, cfg: SePiCoConfig, self_training: SelfTrainingConfig, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], head: str = PROJECTION_HEAD,
                 source_view: str = "source", target_view: str = "target") -> None:
        super().__init__()
        self.cfg = cfg
        self.self_training = self_training
        self.mean, self.std = list(mean), list(std)
        self.head = head
        self.source_view, self.target_view = source_view, target_view
        bank_size = cfg.bank_size if cfg.variant == "bank" else 0
        self.stats = OnlineClassStatistics(num_classes, cfg.proj_dim, cfg.covariance, bank_size)

    def active(self, iteration: int) -> bool:
        return iteration >= self.cfg.warmup_iters

    def needs(self, iteration: int) -> list[Need]:
        needs = [Need("teacher", self.source_view, heads=(self.head,), logits=False)]
        if self.active(iteration):
            if self.cfg.source_loss:
                needs.append(Need("student", SOURCE_STRONG_VIEW, heads=(self.head,)))
            if self.cfg.target_loss:
                needs.append(Need("student", TARGET_STRONG_VIEW, heads=(self.head,), logits=False))
        return needs

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        self.update_statistics(ctx)
        if self.active(ctx.iteration) and self.cfg.target_loss:
            pseudo = teacher_pseudo_labels(ctx, self.self_training, self.target_view)
            labels = pseudo["labels"].clone()
            labels[pseudo["weight"] == 0] = IGNORE_INDEX
            image = strong_view(ctx, self.self_training, ctx.view(self.target_view).image, self.mean, self.std,
                                TARGET_STRONG_VIEW)
            ctx.add_view(TARGET_STRONG_VIEW, image, labels)

    @torch.no_grad()
    def update_statistics(self, ctx: StepContext) -> None:
        source = ctx.view(self.source_view)
        if source.label is None:
            raise RuntimeError(f"view '{self.source_view}' has no labels")
        features = ctx.teacher(self.source_view).projections[self.head]
        small = _downscale_labels(source.label.long(), features.shape[-2:], self.cfg.label_min_ratio,
                                  self.stats.num_classes)
        queries, labels = flatten_valid(features.float(), small.to(features.device))
        self.stats.update(queries, labels)

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if not self.active(ctx.iteration):
            return {}
        if group == SOURCE_STRONG_VIEW and self.cfg.source_loss:
            return {"sepico_cl": self._domain_loss(ctx, group, "source")}
        if group == TARGET_STRONG_VIEW and self.cfg.target_loss:
            return {"sepico_cl": self._domain_loss(ctx, group, "target")}
        return {}

    def _domain_loss(self, ctx: StepContext, view: str, domain: str) -> Tensor:
        cfg = self.cfg
        features = ctx.student(view).projections[self.head]
        loss, metrics = sepico_pixel_loss(features, ctx.view(view).label, self.stats, cfg.variant, cfg.temperature,
                                          cfg.weight, cfg.reg_weight, cfg.label_min_ratio, cfg.bank_negatives)
        for key, value in metrics.items():
            ctx.metrics[f"sepico.{domain}_{key}"] = value.detach() if torch.is_tensor(value) else float(value)
        return loss


def projection_tap(cfg: SePiCoConfig, segmentor: nn.Module) -> str:
    """The encoder tap of the projection head: ``auto`` is layer 4 for ResNets, the fusion for MiT."""
    if cfg.feature != "auto":
        return cfg.feature
    from udaseg.models.backbones.resnet import ResNet

    return "enc4" if isinstance(segmentor.backbone, ResNet) else "enc_fused"


def sepico_projection_head(cfg: SePiCoConfig, segmentor: nn.Module) -> tuple[nn.Module, str]:
    """``(SePiCoProjectionHead, tap)``: hidden width C_in, or C_in / #stages on ``enc_fused``."""
    from udaseg.models.heads.projection import SePiCoProjectionHead
    from udaseg.models.registry import sepico_hidden_channels

    tap = projection_tap(cfg, segmentor)
    if tap == "proj":
        raise UserError("method.sepico.feature cannot be 'proj'")
    try:
        channels = segmentor.tap_channels(tap)
    except ValueError as error:
        raise UserError(f"method.sepico.feature: {error}") from None
    return SePiCoProjectionHead(channels, sepico_hidden_channels(segmentor, tap), cfg.proj_dim), tap


def _check_config(cfg: SePiCoConfig, self_training: SelfTrainingConfig, num_classes: int) -> None:
    checks = [
        (cfg.temperature > 0, "temperature", cfg.temperature, "must be > 0"),
        (cfg.warmup_iters >= 0, "warmup_iters", cfg.warmup_iters, "must be >= 0"),
        (cfg.proj_dim >= 1, "proj_dim", cfg.proj_dim, "must be >= 1"),
        (cfg.bank_size >= 0, "bank_size", cfg.bank_size, "must be >= 0"),
        (cfg.variant != "bank" or cfg.bank_size > 0, "bank_size", cfg.bank_size, "must be > 0 for variant bank"),
        (0.0 < cfg.label_min_ratio <= 1.0, "label_min_ratio", cfg.label_min_ratio, "must lie in (0, 1]"),
        (cfg.crop_candidates >= 1, "crop_candidates", cfg.crop_candidates, "must be >= 1"),
        (0.0 < cfg.crop_cat_max_ratio <= 1.0, "crop_cat_max_ratio", cfg.crop_cat_max_ratio, "must lie in (0, 1]"),
        (cfg.target_crop_size is None or (len(cfg.target_crop_size) == 2 and min(cfg.target_crop_size) > 0),
         "target_crop_size", cfg.target_crop_size, "must be two positive ints [h, w]"),
        (not cfg.dark or num_classes == 19, "dark", cfg.dark, f"needs the 19 Cityscapes classes, the model has {num_classes}"),
        (cfg.dark_train_scale >= 0, "dark_train_scale", cfg.dark_train_scale, "must be >= 0"),
    ]
    for ok, key, value, why in checks:
        if not ok:
            raise UserError(f"method.sepico.{key}={value!r} {why}")
    if self_training.mix != "class":
        raise UserError("method sepico trains on ClassMix images; method.self_training.mix must be 'class'")
    if self_training.feature_distance.enabled:
        raise UserError("method sepico does not use the ImageNet feature distance; set "
                        "method.self_training.feature_distance.enabled=false")


def _check_crop(name: str, size: Optional[Sequence[int]], stride: int, tap: str) -> None:
    if size and (size[0] % stride or size[1] % stride):
        raise UserError(f"{name}={list(size)} is not a multiple of the stride {stride} of the projection "
                        f"input (method.sepico.feature={tap!r})")


@register_method("sepico", config=SePiCoConfig)
def build_sepico(cfg: Config, segmentor: nn.Module) -> Method:
    """SePiCo on DAFormer-style self-training (the official order, spec sepico.md §1.0)."""
    from udaseg.methods.base import SupervisedSegmentation

    sep, self_training = cfg.method.sepico, cfg.method.self_training
    num_classes = cfg.model.num_classes
    _check_config(sep, self_training, num_classes)
    head, tap = sepico_projection_head(sep, segmentor)
    stride = segmentor.tap_stride(tap)
    source_crop = cfg.data.source.crop_size
    target_crop = sep.target_crop_size or source_crop
    if sep.target_crop_size and source_crop and list(sep.target_crop_size) != list(source_crop):
        raise UserError(f"method.sepico.target_crop_size={sep.target_crop_size} must equal "
                        f"data.source.crop_size={source_crop} (ClassMix pastes source onto target crops)")
    _check_crop("data.source.crop_size", source_crop, stride, tap)
    _check_crop("method.sepico.target_crop_size", target_crop, stride, tap)
    class_weights = dark_zurich_class_weights(sep.dark_train_scale) if sep.dark else None
    mean, std = cfg.data.mean, cfg.data.std
    objectives: list[Objective] = [
        TargetCropping(sep, self_training, target_crop, class_weights),
        StrongAugmentedView(self_training, mean, std, "source", SOURCE_STRONG_VIEW),
        SupervisedSegmentation(SOURCE_STRONG_VIEW, class_weight=class_weights),
        SePiCoContrast(sep, self_training, num_classes, mean, std),
        PseudoLabelSelfTraining(self_training, mean, std, class_weight=class_weights),
    ]
    return Method(objectives=objectives, heads={PROJECTION_HEAD: (head, tap)}, uses_teacher=True,
                  uses_target=True)
