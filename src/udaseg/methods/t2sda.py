"""T2S-DA: pulling target to source (Wang et al., IJCV; arXiv 2305.13752).

The student embeds an FDA *pseudo-target* copy ``T(x^s)`` of each source image; those embeddings
(queries) are pulled towards the EMA teacher's **source** class prototypes and pushed away from
teacher features of other classes, half from the source and half from unreliable target pixels.
Per-class losses are weighted by how unsure the teacher is about the class on the target (DRW).

Building blocks, each usable on its own:

- :func:`class_fractions`, :func:`class_query_counts` - class-balanced query sampling (CBQS, Eq. 16).
- :func:`dynamic_class_weights` - dynamic re-weighting (DRW, Eq. 17-18).
- :func:`unreliable_target_mask` - the unreliable target partition (Eq. 13-14).
- :func:`source_prototypes` - positive keys (Eq. 10-11).
- :class:`PullingLoss` - InfoNCE / MSE pulling loss with CBQS and domain-equalised negative sampling
  (DENPS), class-weighted as in Eq. 5.
- :func:`feature_resolution_targets` - labels, pseudo-labels and confidences brought down to the
  projector's resolution.
- :class:`T2SDAPulling` - the objective that runs all of it inside the shared training step
  (:mod:`udaseg.adapt.step`), and the ``t2sda`` method builder: DACS/DAFormer self-training plus
  the pulling loss, or source-only training plus the pulling loss for domain generalisation.

Shapes: ``B`` images, ``d`` projection channels, ``h x w`` feature resolution, ``C`` classes,
labels are trainIds with 255 = ignore.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.adapt.downsample import downscale_label_nearest, downscale_label_ratio
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import Config, SelfTrainingConfig
from udaseg.errors import UserError
from udaseg.methods import Method, register_method


@dataclass
class T2SDAConfig:
    """T2S-DA (pulling target to source). Defaults are the paper's, with the spec's choices."""

    weight: float = 0.1  # lambda
    temperature: float = 0.2
    loss: Literal["infonce", "mse"] = "infonce"
    proj_dim: int = 256
    feature: str = "enc_last"  # projector input tap: enc_last | encN | enc_fused | decoder
    proj_final_act: bool = True
    fda_beta: float = 0.01
    fda_window: Literal["official", "paper"] = "official"
    base_queries: int = 128
    negatives: int = 1024
    unreliable_quantile: float = 0.5
    quantile_per_image: bool = False
    reweight: bool = True  # dynamic re-weighting (DRW)
    reweight_beta: float = 0.5
    absent_class_weight: Literal["max", "mean"] = "max"
    target_negatives: bool = True  # DENPS: half the negatives from unreliable target pixels
    class_balanced_queries: bool = True  # CBQS
    reduction: Literal["mean", "paper_sum"] = "paper_sum"  # Eq. 5 sums over queries; "mean": per-class mean
    source_ce_on_pseudo_target: bool = False
    label_downsample: Literal["ratio", "nearest"] = "ratio"
    label_min_ratio: float = 0.75
    domain_generalisation: bool = False
    dg_translations: list[str] = field(default_factory=lambda: ["fda", "weather", "cartoon", "style_stats"])
    dg_reference_dir: str = ""  # folder of reference images for the DG FDA translation
    dg_weights: str = ""  # folder with the AdaIN and/or Style Augmentation release files

if TYPE_CHECKING:
    from udaseg.adapt.translate import RandomTranslation, Translator

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# Class statistics and sampling quotas
# --------------------------------------------------------------------------------------------

def class_fractions(labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Label distribution ``p_hat(c)`` of a label map (Eq. 16), ignoring ``ignore_index``.

    Args:
        labels: integer tensor of any shape.
    Returns:
        float tensor ``[C]`` that sums to 1 (all zeros when no pixel is labelled).
    """
    flat = labels.reshape(-1)
    valid = flat[(flat >= 0) & (flat < num_classes) & (flat != ignore_index)]
    counts = torch.bincount(valid, minlength=num_classes).to(torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def class_query_counts(class_fractions: Tensor, base_queries: int = 128, balanced: bool = True) -> Tensor:
    """Number of queries drawn per class.

    Class-balanced query sampling (CBQS, T2S-DA Sec. 3.4): ``n_q(c) = ceil(C * p_hat(c) * n)``,
    so the total is about ``C * n`` and follows the batch's label distribution. With
    ``balanced=False`` every present class gets ``n`` (class-equalised sampling, CEQS). A class
    with ``p_hat(c) = 0`` gets 0 either way.

    Args:
        class_fractions: ``[C]`` label distribution ``p_hat`` (see :func:`class_fractions`).
        base_queries: ``n``.
    Returns:
        int64 tensor ``[C]``.

    Example::

        >>> class_query_counts(torch.tensor([0.5, 0.25, 0.25, 0.0]), base_queries=8)
        tensor([16,  8,  8,  0])
    """
    if base_queries < 1:
        raise UserError(f"t2sda.base_queries: must be >= 1, got {base_queries}")
    fractions = class_fractions.detach().to(torch.float64)
    if not balanced:
        return torch.where(fractions > 0, base_queries, 0).to(torch.int64)
    num_classes = fractions.numel()
    # The small tolerance keeps C * (1/C) * n from rounding up to n + 1 through float error.
    raw = num_classes * fractions * base_queries
    counts = torch.ceil(raw - 1e-6 * raw.clamp(min=1.0))
    return torch.where(fractions > 0, counts.clamp(min=1), torch.zeros_like(counts)).to(torch.int64)


def dynamic_class_weights(pseudo_labels: Tensor, confidence: Tensor, classes: Union[int, Sequence[int]],
                          beta: float = 0.5, absent: Literal["max", "mean"] = "max",
                          eps: float = 1e-6) -> Tensor:
    """Dynamic re-weighting (DRW, T2S-DA Eq. 17-18).

    ``conf(c)`` is the mean teacher confidence (max softmax probability) over the target pixels
    pseudo-labelled ``c``, at full resolution. Then

        w_c  = [ (1 - conf(c)) / max_c' (1 - conf(c')) ] ** beta,      w*_c = w_c / sum_c w_c

    so classes the teacher is unsure about on the target get more pulling weight. A class without
    pseudo-labelled pixels gets ``conf = 0`` (``absent="max"``: the largest weight, 1 before
    normalisation) or the mean weight of the present classes (``absent="mean"``). ``eps`` keeps
    the denominator positive; if every weight is 0 (all confidences exactly 1) the result is
    uniform. ``beta = 0`` gives uniform weights. The weights carry no gradient.

    Args:
        pseudo_labels: int ``B x H x W`` teacher argmax on the target (255 pixels are skipped).
        confidence: ``B x H x W`` teacher max probability.
        classes: the number of classes ``C`` (weights for ``0..C-1``) or explicit class ids.
        beta: the DRW exponent (0.5 in the paper; unrelated to FDA's beta).
    Returns:
        float32 ``[len(classes)]`` summing to 1.

    Example::

        >>> labels = torch.tensor([[[0, 0, 1]]])
        >>> conf = torch.tensor([[[0.9, 0.7, 0.6]]])
        >>> dynamic_class_weights(labels, conf, 3, beta=1.0)  # conf = (0.8, 0.6, absent -> 0)
        tensor([0.1250, 0.2500, 0.6250])
    """
    if beta < 0:
        raise UserError(f"t2sda.reweight_beta: must be >= 0, got {beta}")
    if absent not in ("max", "mean"):
        raise UserError(f"t2sda.absent_class_weight: unknown value {absent!r} (choose 'max' or 'mean')")
    class_ids = torch.arange(classes) if isinstance(classes, int) else torch.as_tensor(list(classes))
    with torch.no_grad():
        labels = pseudo_labels.reshape(-1).long()
        conf = confidence.reshape(-1).to(torch.float64)
        max_id = int(class_ids.max().item()) + 1 if class_ids.numel() else 0
        valid = (labels >= 0) & (labels < max_id)
        sums = torch.zeros(max_id, dtype=torch.float64, device=conf.device)
        counts = torch.zeros(max_id, dtype=torch.float64, device=conf.device)
        sums.index_add_(0, labels[valid], conf[valid])
        counts.index_add_(0, labels[valid], torch.ones_like(conf[valid]))
        ids = class_ids.to(conf.device)
        present = counts[ids] > 0
        mean_conf = torch.where(present, sums[ids] / counts[ids].clamp(min=1), torch.zeros_like(sums[ids]))

        unsure = 1.0 - mean_conf
        if absent == "mean":
            # Absent classes must not set the max; they take the present classes' mean weight below.
            denominator = unsure[present].max() if bool(present.any()) else unsure.new_tensor(1.0)
        else:
            denominator = unsure.max()
        weights = (unsure / denominator.clamp(min=eps)).clamp(min=0) ** beta
        if absent == "mean" and bool(present.any()):
            weights = torch.where(present, weights, weights[present].mean())
        total = weights.sum()
        if total <= 0:
            weights = torch.ones_like(weights)
            total = weights.sum()
        return (weights / total).to(torch.float32)


def unreliable_target_mask(confidence_ds: Tensor, quantile: float = 0.5, per_image: bool = False) -> Tensor:
    """Unreliable target pixels: confidence below the ``quantile`` of the confidence map (Eq. 14).

    ``gamma = percentile(conf.flatten(), 100 * alpha)`` (linear interpolation, like ``np.percentile``)
    over the whole batch, or over each image with ``per_image=True``; a pixel is unreliable when
    ``conf < gamma``.

    Args:
        confidence_ds: ``B x h x w`` teacher max probability at feature resolution.
        quantile: ``alpha`` in [0, 1] (0.5 in the paper).
    Returns:
        bool ``B x h x w``.

    Example::

        >>> unreliable_target_mask(torch.tensor([[[0.1, 0.9], [0.5, 0.7]]]), quantile=0.5)
        tensor([[[ True, False],
                 [ True, False]]])
    """
    if not 0.0 <= quantile <= 1.0:
        raise UserError(f"t2sda.unreliable_quantile: must lie in [0, 1], got {quantile}")
    conf = confidence_ds.detach().float()
    if per_image:
        gamma = torch.quantile(conf.reshape(conf.shape[0], -1), quantile, dim=1)
        gamma = gamma.view(-1, *([1] * (conf.dim() - 1)))
    else:
        gamma = torch.quantile(conf.reshape(-1), quantile)
    return conf < gamma


def source_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Positive keys: per-class mean of **raw** teacher source features, normalised afterwards.

    ``k_c^+ = norm( sum_j 1[y^s(j)=c] g_t(h_t(x^s))(j) / sum_j 1[y^s(j)=c] )`` (Eq. 10-11), over all
    images of the batch. No gradient.

    Args:
        features: ``B x d x h x w`` teacher projections of the real source images.
        labels: int ``B x h x w`` source labels at feature resolution (255 = ignore).
    Returns:
        ``(prototypes [C x d], present [C] bool)``; rows of absent classes are zero.
    """
    flat_feat, flat_labels = _flatten_features(features.detach()), labels.reshape(-1).long()
    valid = (flat_labels >= 0) & (flat_labels < num_classes)
    sums = flat_feat.new_zeros(num_classes, flat_feat.shape[1])
    sums.index_add_(0, flat_labels[valid], flat_feat[valid])
    counts = torch.bincount(flat_labels[valid], minlength=num_classes)
    present = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
    return F.normalize(means, dim=1) * present.unsqueeze(1), present


# --------------------------------------------------------------------------------------------
# The pulling loss
# --------------------------------------------------------------------------------------------

@dataclass
class ClassSample:
    """What :class:`PullingLoss` drew for one class. Indices are flat positions ``b*h*w + i*w + j``."""

    cls: int
    queries: Tensor  # [n_c] positions in the query / source map
    source_negatives: Tensor  # [n_c, m_s] positions in the source key map
    target_negatives: Tensor  # [n_c, m_t] positions in the target key map (m_t may be 0)


class PullingLoss(nn.Module):
    r"""The T2S-DA pulling loss (Eq. 4-5, 9-16) with CBQS and DENPS.

    For each class ``c`` in the source batch:

    - queries ``q``: ``n_q(c)`` student projections of the pseudo-target ``T(x^s)`` at pixels
      labelled ``c``, drawn uniformly **with replacement** (CBQS quota, Eq. 16), l2-normalised;
    - positive ``k_c^+``: the teacher's source prototype (:func:`source_prototypes`);
    - negatives (InfoNCE only), drawn per query, uniformly with replacement (DENPS): ``m/2`` teacher
      source pixels of another class (255 excluded) and ``m/2`` unreliable teacher target pixels
      pseudo-labelled as another class. Without target candidates all ``m`` come from the source; a
      class with no source negative candidate (the only class in the batch) is skipped.

    Per query:

        InfoNCE  l(q) = -log( e^{q.k+/tau} / (e^{q.k+/tau} + sum_{k-} e^{q.k-/tau}) )
        MSE      l(q) = ||q - k+||^2 = 2 - 2 cos(q, k+)

    Aggregation over the set ``V`` of classes that took part:

    - ``reduction="paper_sum"`` (default): the literal Eq. 5, ``(1/C) sum_{c in V} w*_c sum_q l(q)``,
      with the weights as given (uniform ``1/C`` without ``class_weights``). A class weighs in with
      its number of queries, which is what class-balanced query sampling (Table 8) acts on;
    - ``reduction="mean"`` (a switch): ``sum_{c in V} w*_c mean_q l(q)`` with ``w*`` renormalised
      over ``V``. Its expected value does not depend on how many queries a class gets, so CBQS then
      only changes the variance.

    Keys (teacher tensors) are detached; the gradient flows only into the queries. Similarities are
    computed as one matrix per class (``n_c x N``) from which the sampled columns are gathered, so an
    ``N_q x m x d`` tensor is never built.

    Args:
        num_classes: ``C`` (the head's class count; also used in CBQS).
        temperature: ``tau`` (0.2).
        negatives: ``m`` per query (1024).
        base_queries: ``n`` (128).
        loss: ``"infonce"`` or ``"mse"``.
        reduction: ``"paper_sum"`` (Eq. 5) or ``"mean"``.
        target_negatives: DENPS on (half the negatives from the target); off = all from the source.
        balanced_queries: CBQS on; off = ``n`` queries for every present class.

    Inputs of :meth:`forward`:
        queries_feat ``B x d x h x w`` (student, pseudo-target); source_keys_feat ``B x d x h x w``
        (teacher, real source, same size); source_labels_ds ``B x h x w``; target_keys_feat
        ``B' x d x h' x w'`` or None; target_labels_ds and target_unreliable_mask ``B' x h' x w'``;
        class_weights ``[C]`` or None; generator for the sampling.

    Returns:
        ``(loss, metrics)``: a scalar tensor and a dict of floats.

    Example::

        >>> loss_fn = PullingLoss(num_classes=3, negatives=8, base_queries=4)
        >>> q = torch.randn(2, 16, 4, 4, requires_grad=True)
        >>> ks, kt = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
        >>> ys = torch.randint(0, 3, (2, 4, 4)); yt = torch.randint(0, 3, (2, 4, 4))
        >>> unreliable = torch.rand(2, 4, 4) < 0.5
        >>> loss, metrics = loss_fn(q, ks, ys, kt, yt, unreliable, generator=torch.Generator().manual_seed(0))
        >>> loss.backward()
    """

    def __init__(self, num_classes: int, temperature: float = 0.2, negatives: int = 1024, base_queries: int = 128,
                 loss: Literal["infonce", "mse"] = "infonce", reduction: Literal["mean", "paper_sum"] = "paper_sum",
                 target_negatives: bool = True, balanced_queries: bool = True):
        super().__init__()
        if num_classes < 1:
            raise UserError(f"t2sda: num_classes must be >= 1, got {num_classes}")
        if temperature <= 0:
            raise UserError(f"t2sda.temperature: must be > 0, got {temperature}")
        if loss not in ("infonce", "mse"):
            raise UserError(f"t2sda.loss: unknown value {loss!r} (choose 'infonce' or 'mse')")
        if reduction not in ("mean", "paper_sum"):
            raise UserError(f"t2sda.reduction: unknown value {reduction!r} (choose 'mean' or 'paper_sum')")
        if loss == "infonce" and negatives < (2 if target_negatives else 1):
            raise UserError(f"t2sda.negatives: need at least {2 if target_negatives else 1} negatives, got {negatives}")
        if base_queries < 1:
            raise UserError(f"t2sda.base_queries: must be >= 1, got {base_queries}")
        self.num_classes = num_classes
        self.temperature = temperature
        self.negatives = negatives
        self.base_queries = base_queries
        self.loss = loss
        self.reduction = reduction
        self.target_negatives = target_negatives
        self.balanced_queries = balanced_queries

    # ---- sampling -----------------------------------------------------------------------------

    def draw(self, source_labels_ds: Tensor, target_labels_ds: Optional[Tensor] = None,
             target_unreliable_mask: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> list[ClassSample]:
        """Draw queries and negative positions for every class that takes part (CBQS + DENPS).

        :meth:`forward` calls this first, so the same generator state reproduces its sample.
        """
        source = source_labels_ds.reshape(-1).long()
        device = source.device
        valid_source = (source >= 0) & (source < self.num_classes)
        counts = class_query_counts(class_fractions(source, self.num_classes), self.base_queries,
                                    self.balanced_queries)
        use_target = (self.loss == "infonce" and self.target_negatives and target_labels_ds is not None
                      and target_unreliable_mask is not None)
        if use_target:
            target = target_labels_ds.reshape(-1).long().to(device)
            unreliable = target_unreliable_mask.reshape(-1).bool().to(device)
            unreliable = unreliable & (target >= 0) & (target < self.num_classes)

        samples = []
        for cls in torch.nonzero(counts > 0).flatten().tolist():
            n_queries = int(counts[cls])
            query_pool = torch.nonzero(source == cls).flatten()
            queries = query_pool[_randint(query_pool.numel(), (n_queries,), generator, device)]
            empty = torch.zeros(n_queries, 0, dtype=torch.long, device=device)
            if self.loss == "mse":
                samples.append(ClassSample(cls, queries, empty, empty))
                continue
            source_pool = torch.nonzero(valid_source & (source != cls)).flatten()
            if source_pool.numel() == 0:
                continue  # the only class in the batch: no negative to contrast with
            target_pool = torch.nonzero(unreliable & (target != cls)).flatten() if use_target else empty[0]
            n_target = self.negatives // 2 if target_pool.numel() > 0 else 0
            n_source = self.negatives - n_target
            source_neg = source_pool[_randint(source_pool.numel(), (n_queries, n_source), generator, device)]
            target_neg = (target_pool[_randint(target_pool.numel(), (n_queries, n_target), generator, device)]
                          if n_target else empty)
            samples.append(ClassSample(cls, queries, source_neg, target_neg))
        return samples

    # ---- loss ----------------------------------------------------------------------------------

    def forward(self, queries_feat: Tensor, source_keys_feat: Tensor, source_labels_ds: Tensor,
                target_keys_feat: Optional[Tensor] = None, target_labels_ds: Optional[Tensor] = None,
                target_unreliable_mask: Optional[Tensor] = None, class_weights: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, float]]:
        self._check_shapes(queries_feat, source_keys_feat, source_labels_ds, target_keys_feat, target_labels_ds,
                           target_unreliable_mask)
        samples = self.draw(source_labels_ds, target_labels_ds if target_keys_feat is not None else None,
                            target_unreliable_mask if target_keys_feat is not None else None, generator)
        per_query = self.per_query_losses(queries_feat, source_keys_feat, source_labels_ds, target_keys_feat,
                                          samples)
        loss = self.reduce(per_query, samples, class_weights, queries_feat)
        return loss, self._metrics(loss, samples)

    def per_query_losses(self, queries_feat: Tensor, source_keys_feat: Tensor, source_labels_ds: Tensor,
                         target_keys_feat: Optional[Tensor], samples: Sequence[ClassSample]) -> list[Tensor]:
        """``l(q)`` for the sampled queries of each class, in the order of ``samples``."""
        queries_all = _flatten_features(queries_feat)
        prototypes, _ = source_prototypes(source_keys_feat, source_labels_ds, self.num_classes)
        prototypes = prototypes.to(queries_all.dtype)
        if self.loss == "mse":
            out = []
            for sample in samples:
                q = F.normalize(queries_all[sample.queries], dim=1)
                out.append((q - prototypes[sample.cls]).pow(2).sum(dim=1))
            return out
        source_keys = F.normalize(_flatten_features(source_keys_feat.detach()), dim=1).to(queries_all.dtype)
        target_keys = (F.normalize(_flatten_features(target_keys_feat.detach()), dim=1).to(queries_all.dtype)
                       if target_keys_feat is not None else None)
        out = []
        for sample in samples:
            q = F.normalize(queries_all[sample.queries], dim=1)
            positive = q @ prototypes[sample.cls]
            # One similarity matrix per pool, then gather the sampled columns (no n x m x d tensor).
            logits = [positive.unsqueeze(1), torch.gather(q @ source_keys.t(), 1, sample.source_negatives)]
            if sample.target_negatives.shape[1] > 0:
                logits.append(torch.gather(q @ target_keys.t(), 1, sample.target_negatives))
            logits = torch.cat(logits, dim=1) / self.temperature
            out.append(torch.logsumexp(logits, dim=1) - logits[:, 0])
        return out

    def reduce(self, per_query: Sequence[Tensor], samples: Sequence[ClassSample], class_weights: Optional[Tensor],
               queries_feat: Tensor) -> Tensor:
        """Class-weighted aggregation (Eq. 5, see the class docstring for the two reductions)."""
        if not samples:
            return queries_feat.sum() * 0.0  # keeps the graph so a grouped backward still works
        classes = torch.tensor([s.cls for s in samples], device=queries_feat.device)
        if class_weights is None:
            weights = torch.full((len(samples),), 1.0 / self.num_classes, dtype=torch.float64, device=queries_feat.device)
        else:
            if class_weights.numel() != self.num_classes:
                raise ValueError(f"class_weights has {class_weights.numel()} entries, expected {self.num_classes}")
            weights = class_weights.detach().to(queries_feat.device, torch.float64)[classes]
        if self.reduction == "mean":
            total = weights.sum()
            weights = weights / total if total > 0 else torch.full_like(weights, 1.0 / len(samples))
            terms = torch.stack([losses.mean() for losses in per_query])
            return (weights.to(terms.dtype) * terms).sum()
        terms = torch.stack([losses.sum() for losses in per_query])
        return (weights.to(terms.dtype) * terms).sum() / self.num_classes

    # ---- helpers -------------------------------------------------------------------------------

    def _metrics(self, loss: Tensor, samples: Sequence[ClassSample]) -> dict[str, float]:
        n_queries = sum(int(s.queries.numel()) for s in samples)
        n_target = sum(int(s.target_negatives.numel()) for s in samples)
        n_source = sum(int(s.source_negatives.numel()) for s in samples)
        return {
            "loss": float(loss.detach()),
            "classes": float(len(samples)),
            "queries": float(n_queries),
            "target_negative_share": n_target / max(n_target + n_source, 1),
        }

    def _check_shapes(self, queries_feat: Tensor, source_keys_feat: Tensor, source_labels_ds: Tensor,
                      target_keys_feat: Optional[Tensor], target_labels_ds: Optional[Tensor],
                      target_unreliable_mask: Optional[Tensor]) -> None:
        if queries_feat.shape != source_keys_feat.shape:
            raise ValueError(f"queries {tuple(queries_feat.shape)} and source keys {tuple(source_keys_feat.shape)} "
                             "must have the same shape (the pseudo-target is pixel-aligned with the source)")
        b, _, h, w = queries_feat.shape
        if tuple(source_labels_ds.shape) != (b, h, w):
            raise ValueError(f"source labels {tuple(source_labels_ds.shape)} must be {(b, h, w)}; "
                             "downscale them to feature resolution first")
        if target_keys_feat is not None and self.loss == "infonce" and self.target_negatives:
            if target_labels_ds is None or target_unreliable_mask is None:
                raise ValueError("target keys need target_labels_ds and target_unreliable_mask")
            tb, _, th, tw = target_keys_feat.shape
            for name, t in (("target labels", target_labels_ds), ("target mask", target_unreliable_mask)):
                if tuple(t.shape) != (tb, th, tw):
                    raise ValueError(f"{name} {tuple(t.shape)} must be {(tb, th, tw)}")


# --------------------------------------------------------------------------------------------
# Feature-resolution targets
# --------------------------------------------------------------------------------------------

@dataclass
class FeatureTargets:
    """Labels and target statistics at the projector's resolution."""

    source_labels: Tensor  # B x h x w int64, 255 = ignore
    target_labels: Tensor  # B' x h' x w' int64 teacher pseudo-labels
    target_confidence: Tensor  # B' x h' x w' max of the average-pooled probabilities
    target_unreliable: Tensor  # B' x h' x w' bool


def feature_resolution_targets(source_labels: Tensor, target_probs: Tensor, source_size: tuple[int, int],
                               target_size: tuple[int, int], num_classes: int,
                               label_downsample: Literal["ratio", "nearest"] = "ratio",
                               min_ratio: float = 0.75, quantile: float = 0.5,
                               per_image: bool = False) -> FeatureTargets:
    """Bring source labels and teacher target probabilities down to feature resolution.

    Source labels use majority-with-purity downscaling (``"ratio"``, DAFormer style) or nearest.
    Teacher probabilities ``B x C x H x W`` are average-pooled (area interpolation) to the feature
    size, then max/argmax give confidence and pseudo-labels; the unreliable mask comes from
    :func:`unreliable_target_mask`.
    """
    labels_ds = source_labels_at_feature_resolution(source_labels, source_size, num_classes, label_downsample,
                                                    min_ratio)
    probs_ds = F.interpolate(target_probs.detach().float(), size=target_size, mode="area")
    confidence, pseudo = probs_ds.max(dim=1)
    return FeatureTargets(labels_ds, pseudo, confidence, unreliable_target_mask(confidence, quantile, per_image))


def _flatten_features(features: Tensor) -> Tensor:
    """``B x d x h x w`` -> ``(B*h*w) x d`` with position ``b*h*w + i*w + j``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _randint(high: int, size: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Uniform integers in ``[0, high)`` drawn on the generator's device, moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return torch.randint(high, size, generator=generator, device=draw_device).to(device)


# --------------------------------------------------------------------------------------------
# The objective: T2S-DA inside the shared training step
# --------------------------------------------------------------------------------------------

PSEUDO_TARGET_VIEW = "pseudo_target"
PROJECTION_HEAD = "proj_head"


def source_labels_at_feature_resolution(labels: Tensor, feature_size: tuple[int, int], num_classes: int,
                                        label_downsample: Literal["ratio", "nearest"] = "ratio",
                                        min_ratio: float = 0.75) -> Tensor:
    """Source labels ``B x H x W`` brought down to ``feature_size`` (``h, w``) by the 75%-majority rule
    (``"ratio"``) or nearest neighbour."""
    if label_downsample == "ratio":
        height, width = labels.shape[-2:]
        scale = height // feature_size[0]
        if scale < 1 or height // scale != feature_size[0] or width // scale != feature_size[1]:
            raise ValueError(f"labels {(height, width)} are not an integer multiple of the features {feature_size}")
        small = downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index=IGNORE_INDEX)
    elif label_downsample == "nearest":
        small = downscale_label_nearest(labels, size=feature_size)
    else:
        raise UserError(f"t2sda.label_downsample: unknown value {label_downsample!r} (choose 'ratio' or 'nearest')")
    return small.reshape(labels.shape[0], *feature_size).long()


def fda_pseudo_target(source: Tensor, target: Tensor, mean: Sequence[float], std: Sequence[float],
                      beta: float, window: Literal["official", "paper"], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """FDA pseudo-targets of a normalised source batch, each with a randomly drawn target image.

    For every source image ``i`` a reference ``j_i`` is drawn uniformly from the target batch and
    ``T(x^s_i) = FDA(x^s_i, x^t_{j_i})`` is computed in raw 0-255 RGB, then normalised again
    (:func:`udaseg.adapt.fda.fda_translate_normalised`), batched on the images' device. A target of
    another size is resized (bilinear) to the source size first; only its low frequencies are used.

    Returns:
        ``(pseudo_target B_s x 3 x H x W, reference indices [B_s])``.
    """
    from udaseg.adapt.fda import fda_translate_normalised

    index = _randint(target.shape[0], (source.shape[0],), generator, source.device)
    reference = target[index]
    if reference.shape[-2:] != source.shape[-2:]:
        reference = F.interpolate(reference, size=tuple(source.shape[-2:]), mode="bilinear", align_corners=False)
    return fda_translate_normalised(source, reference, mean, std, beta, window), index


def translate_normalised(images: Tensor, translator: "Translator", mean: Sequence[float], std: Sequence[float],
                         generator: torch.Generator) -> Tensor:
    """Apply a per-image translator (``3 x H x W`` float in 0-255 -> same) to a normalised batch."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    raw = (images * std_t + mean_t).clamp(0, 255)
    out = torch.stack([translator(image, generator).to(images) for image in raw])
    return (out - mean_t) / std_t


class T2SDAPulling(Objective):
    """T2S-DA's pulling loss as a step objective (spec t2sda §1.11, DG §1.13).

    Per iteration:

    - ``prepare`` adds the view ``pseudo_target``: FDA of each source image with a target image drawn
      at random from the batch (UDA), or an image-level translation of each source image (DG). It
      carries the source labels, since every translation is photometric.
    - Queries: the student's projection of ``pseudo_target`` (a student group of its own).
    - Positive keys and source negatives: the teacher's projection of the clean ``source`` view.
    - Target negatives (UDA): the teacher's projection of ``target``, requested on the same teacher
      forward that makes the pseudo-labels, so the target passes the teacher once. Their
      pseudo-labels and confidences, and the DRW class weights, come from
      :func:`udaseg.methods.dacs.teacher_pseudo_labels` (computed once per iteration).
    - Loss: ``weight * L_pull`` (λ = 0.1) in the ``pseudo_target`` group; optionally a CE on the
      pseudo-target as well (``source_ce_on_pseudo_target``, an ablation of the paper).

    The projector reads an encoder tap, so the decoder gets no gradient from ``L_pull``.
    """

    name = "t2sda"

    def __init__(self, cfg: T2SDAConfig, self_training_cfg: SelfTrainingConfig, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], translator: Optional["Translator"] = None,
                 source_view: str = "source", target_view: str = "target",
                 head: str = PROJECTION_HEAD, feature_stride: Optional[int] = None):
        super().__init__()
        self.feature_stride = feature_stride
        self.cfg = cfg
        self.self_training_cfg = self_training_cfg
        self.num_classes = num_classes
        self.mean, self.std = list(mean), list(std)
        self.source_view = source_view
        self.target_view = target_view
        self.head = head
        self.domain_generalisation = bool(cfg.domain_generalisation)
        if self.domain_generalisation and translator is None:
            raise UserError("t2sda.domain_generalisation needs at least one image translation (t2sda.dg_translations)")
        self.translator = translator
        if cfg.weight < 0:
            raise UserError(f"t2sda.weight: must be >= 0, got {cfg.weight}")
        if not 0 <= cfg.fda_beta < 0.5:
            raise UserError(f"t2sda.fda_beta: {cfg.fda_beta} is out of range (expected 0 <= beta < 0.5)")
        if not 0 < cfg.label_min_ratio <= 1:
            raise UserError(f"t2sda.label_min_ratio: must lie in (0, 1], got {cfg.label_min_ratio}")
        if cfg.label_downsample not in ("ratio", "nearest"):
            raise UserError(f"t2sda.label_downsample: unknown value {cfg.label_downsample!r} (choose 'ratio' or 'nearest')")
        unreliable_target_mask(torch.zeros(1, 1, 1), cfg.unreliable_quantile)  # validates the quantile
        dynamic_class_weights(torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1), 1, cfg.reweight_beta,
                              cfg.absent_class_weight)  # validates beta and the absent-class rule
        self.loss_fn = PullingLoss(num_classes, cfg.temperature, cfg.negatives, cfg.base_queries, cfg.loss,
                                   cfg.reduction, target_negatives=cfg.target_negatives and not self.domain_generalisation,
                                   balanced_queries=cfg.class_balanced_queries)

    @property
    def uses_target(self) -> bool:
        return not self.domain_generalisation

    @property
    def target_keys_used(self) -> bool:
        return self.uses_target and self.cfg.loss == "infonce" and self.cfg.target_negatives

    def needs(self, iteration: int) -> list[Need]:
        # Queries and keys are encoder-side projections: these forwards skip the decode head unless
        # the CE-on-pseudo-target ablation (or another objective) asks for logits on the same view.
        needs = [Need("student", PSEUDO_TARGET_VIEW, heads=(self.head,), logits=self.cfg.source_ce_on_pseudo_target),
                 Need("teacher", self.source_view, heads=(self.head,), logits=False)]
        if self.uses_target:
            heads = (self.head,) if self.target_keys_used else ()
            needs.append(Need("teacher", self.target_view, heads=heads))
        return needs

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        source = ctx.view(self.source_view)
        if source.label is None:
            raise RuntimeError(f"view '{self.source_view}' has no labels")
        if self.domain_generalisation:
            image = translate_normalised(source.image, self.translator, self.mean, self.std, ctx.generator)
        else:
            image, _ = fda_pseudo_target(source.image, ctx.view(self.target_view).image, self.mean, self.std,
                                         self.cfg.fda_beta, self.cfg.fda_window, ctx.generator)
        ctx.add_view(PSEUDO_TARGET_VIEW, image, source.label)

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != PSEUDO_TARGET_VIEW:
            return {}
        student = ctx.student(PSEUDO_TARGET_VIEW)
        queries = student.projections[self.head]
        source_keys = ctx.teacher(self.source_view).projections[self.head]
        labels = ctx.view(PSEUDO_TARGET_VIEW).label
        if self.uses_target:
            from udaseg.methods.dacs import teacher_pseudo_labels

            pseudo = teacher_pseudo_labels(ctx, self.self_training_cfg, self.target_view)
            target_keys = ctx.teacher(self.target_view).projections[self.head] if self.target_keys_used else None
            loss, metrics = self.pull_loss(queries, source_keys, labels, pseudo["probs"], target_keys, ctx.generator)
        else:
            loss, metrics = self.pull_loss(queries, source_keys, labels, generator=ctx.generator)
        ctx.metrics.update({f"pull_{k}": v for k, v in metrics.items() if k != "loss"})
        out = {"pull": self.cfg.weight * loss}
        if self.cfg.source_ce_on_pseudo_target:
            from udaseg.methods.base import segmentation_cross_entropy

            out["pseudo_target_ce"] = segmentation_cross_entropy(student.logits, labels)
        return out

    def pull_loss(self, queries: Tensor, source_keys: Tensor, source_labels: Tensor,
                  target_probs: Optional[Tensor] = None, target_keys: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, float]]:
        """Unweighted ``L_pull`` from projections and full-resolution labels / teacher probabilities.

        Args:
            queries: ``B x d x h x w`` student projections of the pseudo-target.
            source_keys: ``B x d x h x w`` teacher projections of the source.
            source_labels: ``B x H x W`` source labels at image resolution.
            target_probs: ``B' x C x H' x W'`` teacher softmax on the target (None in DG: no DRW, no
                target negatives).
            target_keys: ``B' x d x h' x w'`` teacher projections of the target, or None.
        """
        feature_size = tuple(queries.shape[-2:])
        self._check_feature_grid(tuple(source_labels.shape[-2:]), feature_size)
        if target_probs is None:
            labels_ds = source_labels_at_feature_resolution(source_labels, feature_size, self.num_classes,
                                                            self.cfg.label_downsample, self.cfg.label_min_ratio)
            return self.loss_fn(queries, source_keys, labels_ds, generator=generator)
        target_size = tuple(target_keys.shape[-2:]) if target_keys is not None else feature_size
        targets = feature_resolution_targets(source_labels, target_probs, feature_size, target_size, self.num_classes,
                                             self.cfg.label_downsample, self.cfg.label_min_ratio,
                                             self.cfg.unreliable_quantile, self.cfg.quantile_per_image)
        weights = None
        if self.cfg.reweight:
            confidence, pseudo = target_probs.detach().max(dim=1)
            weights = dynamic_class_weights(pseudo, confidence, self.num_classes, self.cfg.reweight_beta,
                                            self.cfg.absent_class_weight)
        if target_keys is None:
            return self.loss_fn(queries, source_keys, targets.source_labels, class_weights=weights,
                                generator=generator)
        return self.loss_fn(queries, source_keys, targets.source_labels, target_keys, targets.target_labels,
                            targets.target_unreliable, weights, generator)

    def _check_feature_grid(self, image_size: tuple[int, int], feature_size: tuple[int, int]) -> None:
        if self.cfg.label_downsample != "ratio":
            return
        scale = self.feature_stride or image_size[0] // max(feature_size[0], 1)
        if scale < 1 or image_size[0] != scale * feature_size[0] or image_size[1] != scale * feature_size[1]:
            raise UserError(f"t2sda: source crop {image_size[0]}x{image_size[1]} is not a multiple of the projector's "
                            f"{feature_size[0]}x{feature_size[1]} feature grid (t2sda.feature={self.cfg.feature!r}); "
                            "use a crop size divisible by the feature stride or t2sda.label_downsample=nearest")


def build_pseudo_target_translator(cfg: T2SDAConfig) -> "RandomTranslation":
    """The DG translator: one of ``cfg.dg_translations`` per image, chosen uniformly.

    Translations that cannot run here (``fda`` without ``dg_reference_dir``, the network ones
    without ``dg_weights``) are skipped with a printed message.
    """
    from udaseg.adapt.translate import RandomTranslation, build_translations

    translators, skipped = build_translations(cfg.dg_translations, cfg.dg_reference_dir, cfg.dg_weights,
                                              cfg.fda_beta if cfg.fda_beta > 0 else 0.01, cfg.fda_window)
    for name, reason in skipped:
        print(f"t2sda: image translation '{name}' {reason}", file=sys.stderr)
    if not translators:
        raise UserError(f"t2sda.dg_translations: none of {list(cfg.dg_translations)} can run here "
                        "(see the messages above); add 'weather', 'cartoon' or 'style_stats', or set "
                        "t2sda.dg_reference_dir")
    return RandomTranslation(translators)


def t2sda_projection_head(cfg: T2SDAConfig, segmentor: nn.Module) -> tuple[nn.Module, str]:
    """T2S-DA's projector g on the configured tap: ``(ConvProjectionHead, tap)``."""
    from udaseg.models.heads.projection import ConvProjectionHead

    tap = cfg.feature
    try:
        channels = segmentor.tap_channels(tap)
    except ValueError as error:
        raise UserError(f"t2sda.feature: {error}") from None
    if cfg.proj_dim < 1:
        raise UserError(f"t2sda.proj_dim: must be >= 1, got {cfg.proj_dim}")
    return ConvProjectionHead(channels, cfg.proj_dim, cfg.proj_dim, kernel_size=3, final_act=cfg.proj_final_act), tap


@register_method("t2sda", config=T2SDAConfig)
def build_t2sda(cfg: Config, segmentor: nn.Module) -> Method:
    """T2S-DA on the DACS/DAFormer base (UDA) or on source-only training (``domain_generalisation``)."""
    from udaseg.methods.base import SupervisedSegmentation
    from udaseg.methods.dacs import PseudoLabelSelfTraining
    from udaseg.methods.daformer import ImageNetFeatureDistance

    t2s = cfg.method.t2sda
    self_training = cfg.method.self_training
    num_classes = cfg.model.num_classes
    objectives: list[Objective] = [SupervisedSegmentation("source")]
    if self_training.feature_distance.enabled:
        objectives.append(ImageNetFeatureDistance(self_training.feature_distance, segmentor, num_classes))
    translator = None
    if t2s.domain_generalisation:
        translator = build_pseudo_target_translator(t2s)
    else:
        objectives.append(PseudoLabelSelfTraining(self_training, cfg.data.mean, cfg.data.std))
    head, tap = t2sda_projection_head(t2s, segmentor)
    stride = segmentor.tap_stride(tap)
    crop = cfg.data.source.crop_size
    if crop and t2s.label_downsample == "ratio" and (crop[0] % stride or crop[1] % stride):
        raise UserError(f"data.source.crop_size {crop} is not a multiple of the stride {stride} of the T2S-DA "
                        f"projector input (t2sda.feature={tap!r}); use a divisible crop or t2sda.label_downsample=nearest")
    objectives.append(T2SDAPulling(t2s, self_training, num_classes, cfg.data.mean, cfg.data.std, translator,
                                   feature_stride=stride))
    heads = {PROJECTION_HEAD: (head, tap)}
    return Method(objectives=objectives, heads=heads, uses_teacher=True, uses_target=not t2s.domain_generalisation)
