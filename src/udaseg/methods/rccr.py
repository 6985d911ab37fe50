r"""RCCR: regional contrastive consistency regularisation on DACS (Zhou, Zhuang, Lu, Ma; spec rccr.md).

RCCR is DACS plus one loss (Eq. 9):

.. math::
    L = L_{CE}(y_s, P_s) + \lambda L_{cons}(y_{class}, P_{class}) + \mu(t) L_{cont}(E_{cut}, \hat E_t),
    \qquad \lambda = 1,\ \mu(t) = 0.01\, e^{-5 (1 - t/t_{max})^{0.5}}

:math:`L_{cont}` is the region-wise contrastive (RWC) loss on a projector head behind the encoder
(``Conv1x1 2048→2048, ReLU, Conv1x1 2048→128``). A square of the target crop, with side and corner
on the stride grid, is pasted onto the source image at the same place (CutMix, Eq. 3); the
student embeds the mix, the EMA teacher (with its momentum projector, Eq. 2) embeds the clean
target. Every student cell inside the square (a "region": one 8×8 px cell) is pulled towards the
teacher cell at the same place and pushed from every other cell of both maps (Eqs. 4–8), with
three refinements (Sec. 3.2.4–3.2.5): a random half of the negatives, no negatives of the anchor's
class, anchors only where the teacher is confident (> 0.75), and the maps of the last 3 batches as
extra negatives.

The file holds, in order: the weight ramp (:func:`rccr_weight`), cell-level labels
(:func:`cell_labels_of_target`, :func:`cell_labels_of_source`, :func:`square_cells`), the negative
sets (:func:`negative_mask`, :func:`random_keep`), the loss (:class:`RegionContrastLoss`) and the
objective (:class:`RegionContrast`, method ``rccr``). The choices the paper leaves open (spec §5)
are switches of ``method.rccr``, listed in ``docs/methods/rccr.md``.

Flattening convention: a ``D x h x w`` map of one image becomes ``(h*w) x D`` with cell (i, j) at
row ``i*w + j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.adapt.downsample import downscale_label_majority, downscale_label_nearest
from udaseg.adapt.geometry import require_crops_on_stride
from udaseg.adapt.mixing import cutmix_boxes, mix
from udaseg.adapt.pixel_bank import BatchFIFOBank
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import ITERATION_COUNT, Config, SelfTrainingConfig, require, require_range
from udaseg.errors import UserError
from udaseg.methods import Method, register_method
from udaseg.methods.base import segmentation_cross_entropy
from udaseg.methods.dacs import self_training_objectives, strong_view, teacher_pseudo_labels

IGNORE_INDEX = 255
PROJECTION_HEAD = "proj_head"
CUT_VIEW = "region_mixed"
PLAN = "rccr_plan"


@dataclass
class RCCRConfig:
    """The section ``method.rccr``. Defaults: the paper's values and the spec's choices (§5)."""

    weight: float = 0.01  # mu_max of mu(t); 0 trains plain DACS (Table 3 baseline)
    ramp_exponent: float = 0.5  # A7: 0.5 as printed; 2.0 is the usual sigmoid ramp-up
    ramp_scale: float = 5.0  # mu(t) = weight * exp(-ramp_scale * (1 - t / t_max) ** ramp_exponent)
    ramp_iters: int = field(default=0, metadata=ITERATION_COUNT)  # t_max; 0: train.iterations
    temperature: float = 0.1  # tau (A24)
    confidence_threshold: float = 0.75  # delta of positive sampling, strict ">" (A25)
    proj_dim: int = 128
    proj_hidden: int = 0  # 0: the input width (2048 on ResNet-101)
    feature: str = "enc_last"  # encoder tap the projector reads (layer4)
    projector_momentum: Optional[float] = None  # alpha of the teacher projector; None: self_training.ema_alpha (A5)
    cut_area: list[float] = field(default_factory=lambda: [0.5])  # A6: square area share, or [min, max]
    augment_cut: bool = True  # A11: jitter/blur on the CutMix image too
    cut_segmentation_loss: bool = False  # A10: CE of the CutMix image against y_cut
    random_negatives: bool = True  # NS(R)
    negative_keep: float = 0.5  # share of negatives NS(R) keeps
    negative_sampling: Literal["bernoulli", "exact", "per_anchor"] = "bernoulli"  # A13
    class_aware_negatives: bool = True  # NS(C)
    ignored_negatives: Literal["keep", "drop"] = "keep"  # A15
    positive_sampling: bool = True  # PS
    normalization: Literal["surviving", "square"] = "surviving"  # A16
    bank_batches: int = 3  # MB: batches held; 0 switches the bank off
    bank_store: Literal["both", "teacher", "sampled"] = "both"  # A17
    detach_student_negatives: bool = False  # A12
    cross_image_negatives: bool = False  # A18
    target_cell_labels: Literal["native", "pooled"] = "native"  # A14
    source_cell_labels: Literal["majority", "nearest"] = "majority"  # A14

    def validate(self, path: str = "method.rccr") -> None:
        require_range(path, "weight", self.weight, 0.0)
        require_range(path, "ramp_exponent", self.ramp_exponent, 0.0, low_open=True)
        require_range(path, "ramp_scale", self.ramp_scale, 0.0)
        require_range(path, "ramp_iters", self.ramp_iters, 0)
        require_range(path, "temperature", self.temperature, 0.0, low_open=True)
        require_range(path, "confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        require_range(path, "proj_dim", self.proj_dim, 1)
        require_range(path, "proj_hidden", self.proj_hidden, 0)
        if self.projector_momentum is not None:
            require_range(path, "projector_momentum", self.projector_momentum, 0.0, 1.0, high_open=True)
        require(len(self.cut_area) in (1, 2) and all(0 < a <= 1 for a in self.cut_area)
                and list(self.cut_area) == sorted(self.cut_area), path, "cut_area", self.cut_area,
                "expects [r] or [r_min, r_max] with 0 < r_min <= r_max <= 1")
        require_range(path, "negative_keep", self.negative_keep, 0.0, 1.0, low_open=True)
        require_range(path, "bank_batches", self.bank_batches, 0)


# ============================================================================  weight ramp
def rccr_weight(iteration: int, total: int, weight: float = 0.01, exponent: float = 0.5, scale: float = 5.0) -> float:
    r"""μ(t) = weight · exp(−scale · (1 − t/t_max)^exponent), t clamped to [0, t_max] (Eq. 9).

    The printed exponent is 0.5; 2 gives the usual sigmoid ramp-up (spec A7).

    Example::

        >>> round(rccr_weight(0, 100), 7), rccr_weight(100, 100)
        (6.74e-05, 0.01)
    """
    progress = min(max(iteration / max(total, 1), 0.0), 1.0)
    return weight * math.exp(-scale * (1.0 - progress) ** exponent)


# ============================================================================  cell-level labels
def cell_labels_of_target(logits: Tensor, probs: Tensor, grid: Sequence[int], mode: str = "native"
                          ) -> tuple[Tensor, Tensor]:
    """Teacher pseudo-label and confidence per cell of the projector grid: (B x h x w int64, B x h x w).

    ``native`` (default, A14): softmax of the teacher logits at the head's own stride, when that is
    the grid (else as ``pooled``); ``pooled``: the full-resolution softmax ``probs`` average-pooled
    to the grid.
    """
    size = tuple(int(v) for v in grid)
    if mode == "native" and tuple(logits.shape[-2:]) == size:
        cell = torch.softmax(logits.detach().float(), dim=1)
    else:
        cell = F.interpolate(probs.detach().float(), size=size, mode="area")
    confidence, labels = cell.max(dim=1)
    return labels, confidence


def cell_labels_of_source(labels: Tensor, stride: int, num_classes: int, mode: str = "majority") -> Tensor:
    """Source GT at cell resolution: majority vote over each block ignoring 255 (A14), or ``nearest``."""
    if mode == "majority":
        return downscale_label_majority(labels, stride, num_classes, IGNORE_INDEX)
    return downscale_label_nearest(labels, scale=stride).long()


def square_cells(masks: Tensor, stride: int) -> Tensor:
    """B x H x W CutMix masks -> B x h x w bool: cells lying entirely inside the square."""
    share = F.avg_pool2d(masks.float().unsqueeze(1), kernel_size=stride, stride=stride)[:, 0]
    return share >= 1.0 - 1e-6


# ============================================================================  negatives
def random_keep(count: int, keep: float, mode: str, generator: Optional[torch.Generator],
                anchors: int = 1) -> Tensor:
    """NS(R) keep mask over ``count`` negative candidates (CPU bool), spec A13.

    ``bernoulli``: each candidate kept with probability ``keep`` (one mask, shared by all anchors);
    ``exact``: exactly ⌊keep · count⌋ candidates, uniformly; ``per_anchor``: an ``anchors x count``
    Bernoulli mask, a subset of its own for every anchor.

    Example::

        >>> int(random_keep(10, 0.5, "exact", torch.Generator().manual_seed(0)).sum())
        5
    """
    if mode == "exact":
        mask = torch.zeros(count, dtype=torch.bool)
        mask[torch.randperm(count, generator=generator)[: int(math.floor(keep * count + 1e-9))]] = True
        return mask
    shape = (anchors, count) if mode == "per_anchor" else (count,)
    return torch.rand(shape, generator=generator) < keep


def negative_mask(anchors: Tensor, anchor_labels: Tensor, negative_labels: Tensor, keep: Optional[Tensor] = None,
                  self_cells: bool = True, class_aware: bool = True, drop_ignored: bool = False) -> Tensor:
    """Which candidates are negatives of which anchor: A x N bool.

    Args:
        anchors: A int64, the anchors' cells (row indices into the N candidates when ``self_cells``).
        anchor_labels: A, the anchors' (pseudo-)labels.
        negative_labels: N, the candidates' labels.
        keep: N or A x N NS(R) mask (None: every candidate).
        self_cells: the candidate at the anchor's own cell is excluded (Ω of Eq. 8, same image).
        class_aware: NS(C), candidates of the anchor's class are dropped.
        drop_ignored: candidates labelled 255 are dropped (A15; default: kept).

    Example: 2 anchors over 3 same-image candidates, no sampling::

        >>> negative_mask(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 1]),
        ...               class_aware=False).tolist()
        [[False, True, True], [True, False, True]]
    """
    count = negative_labels.shape[0]
    mask = torch.ones(anchors.shape[0], count, dtype=torch.bool, device=negative_labels.device)
    if keep is not None:
        mask &= keep.to(mask.device).expand_as(mask)
    if self_cells:
        mask[torch.arange(anchors.shape[0], device=mask.device), anchors.to(mask.device)] = False
    if class_aware:
        mask &= anchor_labels.to(mask.device).unsqueeze(1) != negative_labels.unsqueeze(0)
    if drop_ignored:
        mask &= (negative_labels != IGNORE_INDEX).unsqueeze(0)
    return mask


# ============================================================================  loss
class RegionContrastLoss(nn.Module):
    r"""Region-wise contrastive loss of one image, RCCR Eqs. 4–8 with the sampling of Sec. 3.2.4.

    With :math:`Z` the student CutMix map and :math:`\hat Z` the teacher target map, both
    L2-normalised and flattened to ``N x K`` (N = h·w cells), every anchor cell a (inside the
    pasted square) has the positive :math:`\hat Z_a` and the negatives :math:`\hat Z_n`,
    :math:`Z_n` (n ≠ a) and the bank entries:

    .. math::
        \ell_a = -\frac{Z_a^\top \hat Z_a}{\tau} + \log\Big(e^{Z_a^\top \hat Z_a/\tau}
            + \sum_{n \in \mathcal N_a} e^{Z_a^\top \hat Z_n/\tau} + \sum_{n \in \mathcal N'_a} e^{Z_a^\top Z_n/\tau}
            + \sum_{m \in \mathcal B_a} e^{Z_a^\top B_m/\tau}\Big)

    The sets :math:`\mathcal N_a, \mathcal N'_a, \mathcal B_a` are given as masks
    (:func:`negative_mask`); with every candidate kept, each anchor has 2N − 2 negatives. The
    teacher map and the bank are detached; gradients flow through the anchors and, unless
    ``detach_student_negatives``, through the student negatives :math:`Z_n`. Computed in float32.

    Inputs: ``student`` N x K, ``teacher`` N x K, ``anchors`` A int64 cells, the masks
    ``teacher_mask`` A x N, ``student_mask`` A x N, optionally ``extra`` M x K with ``extra_mask``
    A x M (bank entries, cross-image negatives). Returns the A per-anchor losses.

    Example: identical embeddings everywhere give ℓ = log(2N − 1) per anchor::

        >>> z = F.normalize(torch.ones(4, 8), dim=1)
        >>> a = torch.tensor([0, 3]); labels = torch.arange(4)
        >>> m = negative_mask(a, labels[a], labels, class_aware=False)
        >>> RegionContrastLoss(0.1)(z, z, a, m, m)  # log 7 = 1.9459
        tensor([1.9459, 1.9459])
    """

    def __init__(self, temperature: float = 0.1, detach_student_negatives: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.detach_student_negatives = detach_student_negatives

    def forward(self, student: Tensor, teacher: Tensor, anchors: Tensor, teacher_mask: Tensor, student_mask: Tensor,
                extra: Optional[Tensor] = None, extra_mask: Optional[Tensor] = None) -> Tensor:
        if student.dim() != 2 or teacher.shape != student.shape:
            raise ValueError(f"student and teacher must both be N x K, got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        z = F.normalize(student.float(), dim=1)
        z_hat = F.normalize(teacher.detach().float(), dim=1)
        queries = z[anchors]
        positive = (queries * z_hat[anchors]).sum(1) / self.temperature
        keys = z.detach() if self.detach_student_negatives else z
        # log-sum-exp per candidate set, then over the sets: no concatenated A x (2N + M) copy
        parts = [positive, self._logsumexp(queries, z_hat, teacher_mask), self._logsumexp(queries, keys, student_mask)]
        if extra is not None and extra.shape[0] > 0:
            parts.append(self._logsumexp(queries, F.normalize(extra.detach().float(), dim=1), extra_mask))
        return torch.logsumexp(torch.stack(parts, dim=1), dim=1) - positive

    def _logsumexp(self, queries: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Per query, log Σ exp(q·k/τ) over the keys ``mask`` allows (−inf when none)."""
        used = mask.any(0)
        if not bool(used.all()):  # keys no anchor uses are skipped before the product
            keys, mask = keys[used], mask[:, used]
        if keys.shape[0] == 0:
            return queries.new_full((queries.shape[0],), float("-inf"))
        return torch.logsumexp((queries @ keys.T / self.temperature).masked_fill(~mask, float("-inf")), dim=1)


# ============================================================================  objective (training step)
# Per iteration, after DACS prepared the ClassMix view:
#   prepare  the teacher forward on the clean target (shared with the pseudo-labels) gives the
#            projector map and the cell pseudo-labels / confidences; the CutMix view (target square
#            on the source) with its cell labels; anchors (PS) and the NS(R) masks
#   losses   group 'region_mixed': student projector map -> mu(t) * L_cont (+ optional CE on x_cut)
#   after    the optimiser step: this iteration's maps enter the bank (the oldest batch leaves)
@dataclass
class RegionPlan:
    stride: int
    teacher_maps: Tensor  # B x N x K, normalised teacher target maps
    teacher_labels: Tensor  # B x N cell pseudo-labels (labels of the teacher map and of the anchors)
    cut_labels: Tensor  # B x N cell labels of the CutMix image (y_cut)
    anchors: list[Tensor]  # per image, anchor cells (inside the square, confident)
    square: Tensor  # B x N bool, cells inside the square
    teacher_keep: list[Optional[Tensor]]  # per image, NS(R) masks (None: all kept)
    student_keep: list[Optional[Tensor]]
    bank_keep: list[Optional[Tensor]]
    bank: tuple[Tensor, Tensor]  # the bank's entries when the plan was made (features, labels)
    student_maps: Optional[Tensor] = None  # B x N x K, detached, set by the loss for the bank


def flatten_cells(maps: Tensor) -> Tensor:
    """B x K x h x w -> B x (h*w) x K."""
    return maps.flatten(2).transpose(1, 2)


class RegionContrast(Objective):
    """RCCR's CutMix view and μ(t)·L_cont inside the shared step, with its memory bank (checkpointed)."""

    name = "rccr"

    def __init__(self, cfg: RCCRConfig, self_training: SelfTrainingConfig, num_classes: int, total_iterations: int,
                 mean: Sequence[float], std: Sequence[float], head: str = PROJECTION_HEAD,
                 source_view: str = "source", target_view: str = "target") -> None:
        super().__init__()
        self.cfg = cfg
        self.self_training = self_training
        self.num_classes = num_classes
        self.total = cfg.ramp_iters or total_iterations
        self.mean, self.std = list(mean), list(std)
        self.head = head
        self.source_view, self.target_view = source_view, target_view
        self.bank = BatchFIFOBank(cfg.bank_batches, cfg.proj_dim) if cfg.bank_batches > 0 else None
        self.loss_fn = RegionContrastLoss(cfg.temperature, cfg.detach_student_negatives)

    def needs(self, iteration: int) -> list[Need]:
        return [Need("teacher", self.target_view, heads=(self.head,)),
                Need("student", CUT_VIEW, heads=(self.head,), logits=self.cfg.cut_segmentation_loss)]

    def weight(self, iteration: int) -> float:
        cfg = self.cfg
        return rccr_weight(iteration, self.total, cfg.weight, cfg.ramp_exponent, cfg.ramp_scale)

    # ------------------------------------------------------------------ prepare (no gradients)
    def prepare(self, ctx: StepContext, batch: dict) -> None:
        with torch.no_grad():
            self._prepare(ctx)

    def _prepare(self, ctx: StepContext) -> None:
        cfg, generator = self.cfg, ctx.generator
        source, target = ctx.view(self.source_view), ctx.view(self.target_view)
        pseudo = teacher_pseudo_labels(ctx, self.self_training, self.target_view)
        teacher_out = ctx.teacher(self.target_view)
        embedding = teacher_out.projections[self.head].float()
        height, width = target.image.shape[-2:]
        grid = tuple(embedding.shape[-2:])
        stride = height // grid[0]
        if height != grid[0] * stride or width != grid[1] * stride or tuple(source.image.shape[-2:]) != (height, width):
            raise UserError(f"RCCR needs source and target crops of one size, a multiple of the projector grid; "
                            f"got source {tuple(source.image.shape[-2:])}, target {(height, width)}, grid {grid} "
                            f"(set data.source.crop_size and data.target.crop_size)")
        teacher_labels, confidence = cell_labels_of_target(teacher_out.logits, pseudo["probs"], grid,
                                                           cfg.target_cell_labels)
        area = cfg.cut_area[0] if len(cfg.cut_area) == 1 else tuple(cfg.cut_area)
        masks, _ = cutmix_boxes(target.image.shape[0], height, width, area, grid=stride, generator=generator,
                                device=target.image.device)
        image = mix(masks, target.image, source.image)
        label = mix(masks, pseudo["labels"], source.label)
        weight = mix(masks, pseudo["weight"], torch.ones_like(pseudo["weight"]))
        if cfg.augment_cut:
            image = strong_view(ctx, self.self_training, image, self.mean, self.std, CUT_VIEW)
        ctx.add_view(CUT_VIEW, image, label, weight)
        square = square_cells(masks, stride)
        source_cells = cell_labels_of_source(source.label, stride, self.num_classes, cfg.source_cell_labels)
        cut_labels = torch.where(square, teacher_labels, source_cells.to(teacher_labels.device))
        anchor_ok = square & (confidence > cfg.confidence_threshold) if cfg.positive_sampling else square
        bank = self.bank.entries() if self.bank is not None else (embedding.new_zeros(0, cfg.proj_dim), None)
        cells = grid[0] * grid[1]
        anchors, keeps = [], {"teacher": [], "student": [], "bank": []}
        for b in range(target.image.shape[0]):
            rows = anchor_ok[b].reshape(-1).nonzero().squeeze(1)
            anchors.append(rows)
            extra = bank[0].shape[0] + (2 * cells * (target.image.shape[0] - 1) if cfg.cross_image_negatives else 0)
            for key, count in (("teacher", cells), ("student", cells), ("bank", extra)):
                keeps[key].append(random_keep(count, cfg.negative_keep, cfg.negative_sampling, generator,
                                              rows.numel()) if cfg.random_negatives else None)
        ctx.state[PLAN] = RegionPlan(stride, flatten_cells(F.normalize(embedding, dim=1)), teacher_labels.flatten(1),
                                     cut_labels.flatten(1), anchors, square.flatten(1), keeps["teacher"],
                                     keeps["student"], keeps["bank"], bank)
        ctx.metrics["rccr.square_cells"] = float(square.flatten(1).sum(1).float().mean())

    # ------------------------------------------------------------------ losses
    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != CUT_VIEW:
            return {}
        out = ctx.student(CUT_VIEW)
        plan: RegionPlan = ctx.state[PLAN]
        loss, metrics = self.contrast(flatten_cells(out.projections[self.head]), plan)
        mu = self.weight(ctx.iteration)
        ctx.metrics.update({**metrics, "rccr.mu": mu})
        losses = {"rccr_cont": mu * loss}
        if self.cfg.cut_segmentation_loss:
            view = ctx.view(CUT_VIEW)
            losses["cut_ce"] = segmentation_cross_entropy(out.logits, view.label, view.weight)
        return losses

    def image_negatives(self, plan: RegionPlan, b: int, student: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Masks of image b's negatives and the extra candidates: (teacher A x N, student A x N, extra M x K, A x M)."""
        cfg = self.cfg
        anchors = plan.anchors[b]
        anchor_labels = plan.teacher_labels[b][anchors]
        options = dict(class_aware=cfg.class_aware_negatives, drop_ignored=cfg.ignored_negatives == "drop")
        teacher_mask = negative_mask(anchors, anchor_labels, plan.teacher_labels[b], plan.teacher_keep[b], **options)
        student_mask = negative_mask(anchors, anchor_labels, plan.cut_labels[b], plan.student_keep[b], **options)
        extra, extra_labels = plan.bank
        extra = extra.to(student.device)
        extra_labels = (extra_labels.to(student.device) if extra_labels is not None
                        else plan.teacher_labels.new_zeros(0))
        if cfg.cross_image_negatives:
            others = [i for i in range(student.shape[0]) if i != b]
            keys = student if not cfg.detach_student_negatives else student.detach()
            extra = torch.cat([extra, *(plan.teacher_maps[i] for i in others), *(keys[i] for i in others)])
            extra_labels = torch.cat([extra_labels, *(plan.teacher_labels[i] for i in others),
                                      *(plan.cut_labels[i] for i in others)])
        extra_mask = negative_mask(anchors, anchor_labels, extra_labels, plan.bank_keep[b], self_cells=False,
                                   **options)
        return teacher_mask, student_mask, extra, extra_mask

    def contrast(self, student: Tensor, plan: RegionPlan) -> tuple[Tensor, dict[str, float]]:
        """Unweighted L_cont of the student CutMix maps ``student`` B x N x K for a plan (mean over images)."""
        plan.student_maps = F.normalize(student.detach().float(), dim=2)
        per_image, anchors, negatives = [], 0, 0.0
        for b in range(student.shape[0]):
            rows = plan.anchors[b].to(student.device)
            if rows.numel() == 0:
                per_image.append(student[b].sum() * 0.0)
                continue
            teacher_mask, student_mask, extra, extra_mask = self.image_negatives(plan, b, student)
            losses = self.loss_fn(student[b], plan.teacher_maps[b], rows, teacher_mask, student_mask, extra,
                                  extra_mask)
            square = int(plan.square[b].sum())
            denominator = square if self.cfg.normalization == "square" else rows.numel()
            per_image.append(losses.sum() / max(denominator, 1))
            anchors += rows.numel()
            negatives += float(teacher_mask.sum() + student_mask.sum() + extra_mask.sum())
        loss = torch.stack(per_image).mean()
        metrics = {"rccr.anchors": anchors / student.shape[0], "rccr.negatives": negatives / max(anchors, 1),
                   "rccr.cont": float(loss.detach())}
        return loss, metrics

    # ------------------------------------------------------------------ memory bank
    def after_step(self, ctx: StepContext) -> None:
        plan: Optional[RegionPlan] = ctx.state.get(PLAN)
        if self.bank is None or plan is None or plan.student_maps is None:
            return
        features, labels = [], []
        for b in range(plan.teacher_maps.shape[0]):
            maps = [(plan.teacher_maps[b], plan.teacher_labels[b], plan.teacher_keep[b])]
            if self.cfg.bank_store != "teacher":
                maps.append((plan.student_maps[b].to(plan.teacher_maps.device), plan.cut_labels[b],
                             plan.student_keep[b]))
            for feature, label, keep in maps:
                if self.cfg.bank_store == "sampled" and keep is not None:
                    rows = (keep if keep.dim() == 1 else keep.any(0)).to(feature.device)
                    feature, label = feature[rows], label[rows]
                features.append(feature)
                labels.append(label)
        self.bank.push(torch.cat(features), torch.cat(labels))


# ============================================================================  method
def rccr_projector(cfg: RCCRConfig, segmentor: nn.Module) -> tuple[nn.Module, str]:
    """The momentum projector F_proj (``Conv1x1 C→H, ReLU, Conv1x1 H→K``) on ``cfg.feature``."""
    from udaseg.models.heads.projection import MLPProjectionHead

    try:
        channels = segmentor.tap_channels(cfg.feature)
    except ValueError as error:
        raise UserError(f"method.rccr.feature: {error}") from None
    return MLPProjectionHead(channels, cfg.proj_hidden or channels, cfg.proj_dim), cfg.feature


@register_method("rccr", config=RCCRConfig)
def build_rccr(cfg: Config, segmentor: nn.Module) -> Method:
    """RCCR on DACS: source CE, ClassMix pseudo-label CE, μ(t)·L_cont on the CutMix view."""
    rccr, self_training = cfg.method.rccr, cfg.method.self_training
    if self_training.mix != "class":
        raise UserError("method rccr trains DACS on ClassMix images; method.self_training.mix must be 'class'")
    head, tap = rccr_projector(rccr, segmentor)
    stride = segmentor.tap_stride(tap)
    require_crops_on_stride(cfg.data, stride, f"method.rccr.feature={tap!r}")
    objectives = self_training_objectives(cfg, segmentor, feature_distance=False)
    objectives.append(RegionContrast(rccr, self_training, cfg.model.num_classes, cfg.train.iterations,
                                     cfg.data.mean, cfg.data.std))
    rates = {f"heads.{PROJECTION_HEAD}": rccr.projector_momentum} if rccr.projector_momentum is not None else {}
    return Method(objectives=objectives, heads={PROJECTION_HEAD: (head, tap)}, uses_teacher=True, uses_target=True,
                  ema_rates=rates)
