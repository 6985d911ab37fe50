r"""PGPC: pseudo-label guided pixel contrast (Xiang, Wan, Cao; seed 004, spec pgpc.md).

On top of DAFormer self-training (source CE, ClassMix pseudo-label CE, FD), PGPC adds one term

.. math::
    L = L_s + \lambda_t L_t + \lambda_c L_c, \qquad \lambda_t = 1,\ \lambda_c = 0.1 \text{ (Eq. 6)}

switched on after 20k of 60k iterations. :math:`L_c` contrasts reliable **target** pixels of the
student's projection (anchors) against

* one positive per class: the mean of the source pixel features of that class held in a memory
  bank (Eq. 9), and
* N = 512 negatives per class: source pixels of other classes (Eq. 10) and target pixels whose
  teacher ranks the class outside its top r = 4 (Eq. 11), both from memory banks
  (:mod:`udaseg.adapt.pixel_bank`).

Per-pixel teacher quantities on the target come from the teacher softmax average-pooled to the
projection grid: pseudo-label (Eq. 2), entropy (Eq. 7), class ranks. Anchors are pixels whose
entropy lies in the lowest :math:`\eta = 50\%` of their image (Sec. 3.2), 256 per class.

The file holds, in order: the teacher maps (:func:`pixel_entropy`, :func:`class_ranks`,
:func:`teacher_pixel_maps`), reliable-pixel selection (:func:`reliable_pixel_mask` and its four
variants of Table 7), anchor and negative sampling, the loss module
(:class:`PixelPrototypeContrastLoss`, Eq. 5) and the objective that plugs it into the shared step
(:class:`PGPCContrast`, method ``pgpc``). Choices the paper leaves open are documented in
``docs/methods/pgpc.md``.

Flattening convention: a ``B x D x h x w`` map becomes ``(B*h*w) x D`` with pixel (b, i, j) at row
``b*h*w + i*w + j``; ``B x h x w`` maps flatten the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.adapt.downsample import downscale_label_ratio
from udaseg.adapt.geometry import require_crops_on_stride
from udaseg.adapt.pixel_bank import ClassPixelQueues, RankedPixelQueue
from udaseg.adapt.pseudo_label import pseudo_weight_map
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import ITERATION_COUNT, Config, SelfTrainingConfig
from udaseg.errors import UserError
from udaseg.methods import Method, register_method
from udaseg.methods.dacs import MIX_MASKS, PseudoLabelSelfTraining, strong_view, teacher_pseudo_labels


@dataclass
class PGPCConfig:
    """PGPC (pseudo-label guided pixel contrast). Defaults: the paper's values and the spec's choices
    (docs/methods/pgpc.md)."""

    weight: float = 0.1  # lambda_c
    target_weight: float = 1.0  # lambda_t: scales the target pixels' weights of the ClassMix CE
    warmup_iters: int = field(default=20000, metadata=ITERATION_COUNT)  # L_c on from this 0-based iteration
    temperature: float = 0.5
    proj_dim: int = 256
    proj_hidden: int = 0  # 0: C_in / number of stages on enc_fused (256 on MiT-B5), else C_in
    feature: str = "enc_fused"  # encoder tap the projection head reads
    anchors_per_class: int = 256  # M
    negatives: int = 512  # N, per anchor class (shared by its anchors)
    negative_pools: list[str] = field(default_factory=lambda: ["source", "target"])
    positive: Literal["source_proto", "target_proto"] = "source_proto"
    selection: Literal["global_entropy", "global_confidence", "classwise_entropy",
                       "classwise_confidence"] = "global_entropy"
    proportion: float = 0.5  # eta (entropy) / zeta (confidence)
    selection_scope: Literal["image", "batch"] = "image"
    rank: int = 4  # r: target pixels whose top-r classes exclude c are negatives of c
    exclude_ignored: bool = True  # no anchors in the pseudo-label ignore band
    anchor_view: Literal["target_strong", "mixed"] = "target_strong"
    bank_features: Literal["teacher", "student"] = "teacher"
    bank_start_iter: int = field(default=0, metadata=ITERATION_COUNT)
    source_bank_size: int = 2048  # per class
    source_enqueue_per_class: int = 128
    target_bank_size: int = 8192
    target_enqueue_per_image: int = 1024
    target_proto_bank_size: int = 2048  # per class, positive=target_proto only
    target_proto_enqueue_per_class: int = 128
    label_min_ratio: float = 0.75
    reduction: Literal["mean", "paper"] = "mean"

IGNORE_INDEX = 255
PROJECTION_HEAD = "proj_head"
TARGET_STRONG_VIEW = "target_strong"
MIXED_VIEW = "mixed"
PLAN = "pgpc_plan"
SELECTIONS = ("global_entropy", "global_confidence", "classwise_entropy", "classwise_confidence")


# ============================================================================  teacher pixel maps
def pixel_entropy(probs: Tensor) -> Tensor:
    r"""Prediction entropy per pixel, PGPC Eq. 7: :math:`E = -\sum_c P_c \ln P_c` (with 0 ln 0 = 0).

    ``probs`` B x C x h x w (a softmax over dim 1) -> B x h x w. Uniform over C classes gives ln C.

    Example::

        >>> float(pixel_entropy(torch.full((1, 4, 1, 1), 0.25))[0, 0, 0])  # ln 4
        1.3862943649291992
    """
    return -torch.special.xlogy(probs, probs).sum(1)


def class_ranks(probs: Tensor) -> Tensor:
    """Rank O(c) of every class per pixel: 0 for the most probable class, C-1 for the least.

    ``probs`` B x C x h x w -> int64 B x C x h x w. This is the order of PGPC Eq. 11 (the paper says
    "ascending" but fixes O(argmax) = 0 and O(argmin) = C-1, i.e. sorted by decreasing probability).
    Ties are broken by class index.

    Example::

        >>> class_ranks(torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1)).flatten().tolist()
        [2, 0, 1]
    """
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(probs.shape[1], device=probs.device).view(1, -1, 1, 1).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


@dataclass
class TeacherPixelMaps:
    """The teacher's target quantities on the projection grid (spec §1.3)."""

    probs: Tensor  # B x C x h x w, average-pooled softmax
    labels: Tensor  # B x h x w int64 pseudo-labels (argmax of the pooled probabilities)
    confidence: Tensor  # B x h x w max pooled probability
    entropy: Tensor  # B x h x w, Eq. 7 of the pooled probabilities
    top_classes: Tensor  # B x h x w x r int64, the r most probable classes, most probable first


def teacher_pixel_maps(probs: Tensor, feature_size: Sequence[int], rank: int) -> TeacherPixelMaps:
    """Average-pool the teacher softmax to the feature grid, then derive p, max P, E and the top-r classes.

    ``probs`` B x C x H x W (full-resolution teacher softmax); ``feature_size`` (h, w). When H, W are
    multiples of h, w the pooling is a plain s x s average (s = H / h); otherwise an area resize.

    Example::

        >>> maps = teacher_pixel_maps(torch.softmax(torch.randn(2, 5, 8, 8), 1), (2, 2), rank=2)
        >>> maps.labels.shape, maps.top_classes.shape
        (torch.Size([2, 2, 2]), torch.Size([2, 2, 2, 2]))
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be B x C x H x W, got shape {tuple(probs.shape)}")
    if not 1 <= rank <= probs.shape[1]:
        raise ValueError(f"rank must lie in [1, {probs.shape[1]}], got {rank}")
    probs = probs.detach().float()
    size = tuple(int(v) for v in feature_size)
    pooled = probs if tuple(probs.shape[-2:]) == size else F.interpolate(probs, size=size, mode="area")
    confidence, labels = pooled.max(dim=1)
    top = torch.sort(pooled, dim=1, descending=True, stable=True).indices[:, :rank]
    return TeacherPixelMaps(pooled, labels, confidence, pixel_entropy(pooled), top.permute(0, 2, 3, 1))


def full_cells(mask: Tensor, feature_size: Sequence[int]) -> Tensor:
    """B x H x W bool -> B x h x w bool: True where every pixel of the cell is True."""
    size = tuple(int(v) for v in feature_size)
    share = F.interpolate(mask.float().unsqueeze(1), size=size, mode="area")[:, 0]
    return share >= 1.0 - 1e-6


# ============================================================================  reliable pixels
def rank_within_groups(scores: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """0-based rank of each score within its group (ascending; ties by position) and group sizes.

    ``scores`` N float, ``groups`` N int64 in [0, G). Returns ``(ranks N, counts G)``.

    Example::

        >>> rank_within_groups(torch.tensor([3., 1., 2., 0.]), torch.tensor([0, 0, 1, 1]))[0].tolist()
        [1, 0, 1, 0]
    """
    if scores.numel() == 0:
        return groups.new_zeros(0), groups.new_zeros(0)
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups, minlength=int(groups.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_groups]
    return ranks, counts


def reliable_pixel_mask(maps: TeacherPixelMaps, valid: Optional[Tensor] = None,
                        selection: str = "global_entropy", proportion: float = 0.5,
                        scope: Literal["image", "batch"] = "image") -> Tensor:
    r"""Reliable target pixels, PGPC Sec. 3.2 and the variants of Table 7: B x h x w bool.

    In every group of valid pixels the :math:`k = \lfloor \eta \cdot n \rfloor` pixels with the
    lowest entropy (``*_entropy``) or the highest confidence (``*_confidence``) are kept; ties are
    broken by position, so exactly k are kept. Groups:

    * ``global_*``: one group per image (``scope="image"``, the paper's :math:`E_t^i`) or one for the
      batch (``scope="batch"``);
    * ``classwise_*``: one group per pseudo-label class (within each image, or over the batch).

    With ``global_entropy`` and distinct entropies this is exactly "E < gamma_t with gamma_t chosen so
    that a fraction eta of E_t^i lies below it". ``proportion`` 0 selects nothing, 1 everything valid.

    Example::

        >>> maps = teacher_pixel_maps(torch.softmax(torch.randn(1, 3, 2, 2), 1), (2, 2), rank=1)
        >>> int(reliable_pixel_mask(maps, proportion=0.5).sum())
        2
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"proportion must lie in [0, 1], got {proportion}")
    if scope not in ("image", "batch"):
        raise ValueError(f"scope must be 'image' or 'batch', got {scope!r}")
    batch, height, width = maps.labels.shape
    valid = torch.ones_like(maps.labels, dtype=torch.bool) if valid is None else valid.bool()
    score = maps.entropy if selection.endswith("entropy") else -maps.confidence
    image = torch.arange(batch, device=score.device).view(-1, 1, 1).expand(batch, height, width)
    group = image if scope == "image" else torch.zeros_like(image)
    if selection.startswith("classwise"):
        num_classes = maps.probs.shape[1]
        group = group * num_classes + maps.labels
    flat_valid = valid.reshape(-1)
    rows = flat_valid.nonzero().squeeze(1)
    ranks, counts = rank_within_groups(score.reshape(-1)[rows], group.reshape(-1)[rows])
    keep = torch.floor(proportion * counts.double() + 1e-9).long()
    selected = torch.zeros_like(flat_valid)
    if rows.numel():
        selected[rows] = ranks < keep[group.reshape(-1)[rows]]
    return selected.view(batch, height, width)


# ============================================================================  anchors and negatives
def sample_anchor_indices(labels: Tensor, candidates: Tensor, num_classes: int, per_class: int,
                          generator: Optional[torch.Generator] = None) -> dict[int, Tensor]:
    """Anchor positions per class, PGPC Eq. 8: ``{class: flat indices}``, at most ``per_class`` each.

    ``labels`` B x h x w pseudo-labels, ``candidates`` B x h x w bool (reliable and valid). For each
    class in ascending order, ``per_class`` candidates of that class are drawn uniformly without
    replacement (all of them if fewer). Indices follow the module's flattening convention.

    Example::

        >>> labels = torch.tensor([[[0, 0], [1, 2]]])
        >>> picked = sample_anchor_indices(labels, labels != 2, 3, 1, torch.Generator().manual_seed(0))
        >>> sorted(picked), picked[1].tolist()
        ([0, 1], [2])
    """
    flat_labels = labels.reshape(-1)
    flat_candidates = candidates.reshape(-1).bool()
    anchors: dict[int, Tensor] = {}
    for cls in range(num_classes):
        rows = (flat_candidates & (flat_labels == cls)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if rows.numel() > per_class:
            rows = rows[torch.randperm(rows.numel(), generator=generator)[:per_class].to(rows.device)]
        anchors[cls] = rows
    return anchors


def negative_split(total: int, available: Sequence[int]) -> list[int]:
    """How many negatives to take from each pool: an equal share each, the shortfall of a short pool
    filled from the others (spec §1.9). ``available`` per pool -> counts summing to
    ``min(total, sum(available))``.

    Example::

        >>> negative_split(512, [1000, 100])
        [412, 100]
    """
    pools = len(available)
    take = [0] * pools
    remaining = total
    open_pools = [i for i in range(pools) if available[i] > 0]
    while remaining > 0 and open_pools:
        share, extra = divmod(remaining, len(open_pools))
        progress = 0
        for position, pool in enumerate(list(open_pools)):
            want = share + (1 if position < extra else 0)
            got = min(want, available[pool] - take[pool])
            take[pool] += got
            progress += got
        remaining -= progress
        open_pools = [i for i in open_pools if take[i] < available[i]]
        if progress == 0:
            break
    return take


# ============================================================================  loss
class PixelPrototypeContrastLoss(nn.Module):
    r"""Pixel-to-prototype InfoNCE with pixel negatives, PGPC Eq. 5.

    For anchor m of class c with positive (prototype) :math:`z_c^+` and negatives
    :math:`z^-_{c,n}` (n = 1..N_c, shared by the anchors of class c):

    .. math::
        \ell_{c,m} = -\log \frac{e^{\langle z_{cm}, z_c^+\rangle/\tau}}
            {e^{\langle z_{cm}, z_c^+\rangle/\tau} + \sum_{n=1}^{N_c} e^{\langle z_{cm}, z^-_{c,n}\rangle/\tau}}

    with cosine similarity :math:`\langle\cdot,\cdot\rangle` (every vector is L2-normalised here).
    Computed per class as a cross-entropy over logits ``[M_c, 1 + N_c]`` with target 0, in float32.
    Positives and negatives are detached: the anchors carry the only gradient.

    Args:
        temperature: tau (PGPC: 0.5).
        reduction: ``"mean"`` over all anchors, ``"sum"``, or ``"none"`` (per anchor, input order).

    Inputs: ``anchors`` A x D; ``groups`` A int64 in [0, G) (the class slot of each anchor);
    ``positives`` G x D; ``negatives`` G x N x D with ``negative_mask`` G x N (True = a real
    negative; default all). Properties: the loss is >= 0, equals ln(1 + N) when every similarity is
    equal, and tends to 0 as the positive similarity exceeds every negative one.

    Example::

        >>> loss = PixelPrototypeContrastLoss(temperature=0.5)
        >>> anchors = F.normalize(torch.randn(5, 8), dim=1).requires_grad_()
        >>> value = loss(anchors, torch.tensor([0, 0, 1, 1, 1]), torch.randn(2, 8), torch.randn(2, 6, 8))
        >>> value.backward()
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward(self, anchors: Tensor, groups: Tensor, positives: Tensor, negatives: Tensor,
                negative_mask: Optional[Tensor] = None) -> Tensor:
        if anchors.dim() != 2 or groups.shape != anchors.shape[:1]:
            raise ValueError(f"anchors must be A x D with groups (A,), got {tuple(anchors.shape)} and {tuple(groups.shape)}")
        if positives.dim() != 2 or negatives.dim() != 3 or negatives.shape[0] != positives.shape[0]:
            raise ValueError(f"positives must be G x D and negatives G x N x D, got {tuple(positives.shape)} "
                             f"and {tuple(negatives.shape)}")
        if anchors.shape[0] == 0:
            return anchors.sum() * 0.0
        anchors = F.normalize(anchors.float(), dim=1)
        positives = F.normalize(positives.detach().float(), dim=1)
        negatives = F.normalize(negatives.detach().float(), dim=2)
        if negative_mask is None:
            negative_mask = torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device)
        per_anchor = anchors.new_zeros(anchors.shape[0])
        for group in torch.unique(groups).tolist():
            rows = (groups == group).nonzero().squeeze(1)
            queries = anchors[rows]
            positive = queries @ positives[group] / self.temperature  # M
            negative = queries @ negatives[group].T / self.temperature  # M x N
            negative = negative.masked_fill(~negative_mask[group].unsqueeze(0), float("-inf"))
            logits = torch.cat([positive.unsqueeze(1), negative], dim=1)
            per_anchor = per_anchor.index_put((rows,), torch.logsumexp(logits, dim=1) - positive)
        if self.reduction == "mean":
            return per_anchor.mean()
        if self.reduction == "sum":
            return per_anchor.sum()
        return per_anchor


def pad_negatives(negatives: Sequence[Tensor], dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A list of N_g x D tensors -> (G x N_max x D zero-padded, G x N_max mask of real entries)."""
    largest = max((n.shape[0] for n in negatives), default=0)
    padded = torch.zeros(len(negatives), largest, dim, device=device)
    mask = torch.zeros(len(negatives), largest, dtype=torch.bool, device=device)
    for g, entries in enumerate(negatives):
        padded[g, : entries.shape[0]] = entries.to(device)
        mask[g, : entries.shape[0]] = True
    return padded, mask


# ============================================================================  objective (training step)
# Per iteration, after the self-training objective prepared the ClassMix view (spec §1.10):
#   prepare  teacher softmax on the weak target -> pooled maps (p, E, top-r) -> reliable pixels;
#            from warmup_iters on: anchors (positions) and negatives (from the banks, before they
#            are updated: MoCo order) and, for anchor_view target_strong, the strong target view;
#            then the banks are updated (source: teacher projection of the weak source with its
#            labels at the feature grid; target: teacher projection of the weak target with top-r)
#   losses   in the anchor view's group: student projection -> anchors -> prototypes from the
#            (updated) bank -> lambda_c * Eq. 5
@dataclass
class ContrastPlan:
    anchors: dict[int, Tensor]  # class -> flat anchor positions on the anchor view's grid
    negatives: dict[int, Tensor]  # class -> N_c x D detached negatives


def labels_at_grid(labels: Tensor, feature_size: Sequence[int], num_classes: int, min_ratio: float) -> Tensor:
    """B x H x W labels -> B x h x w with DAFormer's majority rule (class share >= ``min_ratio``, else 255)."""
    height, width = labels.shape[-2:]
    h, w = (int(v) for v in feature_size)
    scale = height // h
    if scale < 1 or height != h * scale or width != w * scale:
        raise UserError(f"label size {height}x{width} is not a multiple of the projection grid {h}x{w}; use a crop "
                        "size divisible by the stride of method.pgpc.feature")
    if scale == 1:
        return labels.long().clone()
    return downscale_label_ratio(labels.long(), scale, min_ratio, num_classes, ignore_index=IGNORE_INDEX)


def flatten_pixels(features: Tensor) -> Tensor:
    """B x D x h x w -> (B*h*w) x D."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class PGPCContrast(Objective):
    """PGPC's L_c inside the shared step, with its memory banks (saved in checkpoints).

    Banks (spec §1.9): ``source_bank`` per-class queues of source pixel features (prototypes and
    source negatives), ``target_bank`` a queue of target pixel features with their teacher top-r
    classes (target negatives), ``target_proto_bank`` (``positive="target_proto"`` only) per-class
    queues of reliable target pixels by pseudo-label. They are filled from ``bank_start_iter`` on.
    """

    name = "pgpc"

    def __init__(self, cfg: PGPCConfig, self_training: SelfTrainingConfig, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], head: str = PROJECTION_HEAD,
                 source_view: str = "source", target_view: str = "target") -> None:
        super().__init__()
        self.cfg = cfg
        self.self_training = self_training
        self.num_classes = num_classes
        self.mean, self.std = list(mean), list(std)
        self.head = head
        self.source_view, self.target_view = source_view, target_view
        self.anchor_view = TARGET_STRONG_VIEW if cfg.anchor_view == "target_strong" else MIXED_VIEW
        self.source_bank = ClassPixelQueues(num_classes, cfg.proj_dim, cfg.source_bank_size)
        self.target_bank = RankedPixelQueue(cfg.proj_dim, cfg.target_bank_size, cfg.rank)
        self.target_proto_bank = (ClassPixelQueues(num_classes, cfg.proj_dim, cfg.target_proto_bank_size)
                                  if cfg.positive == "target_proto" else None)
        self.loss_fn = PixelPrototypeContrastLoss(cfg.temperature, reduction="none")

    def active(self, iteration: int) -> bool:
        return iteration >= self.cfg.warmup_iters

    def filling(self, iteration: int) -> bool:
        return iteration >= min(self.cfg.bank_start_iter, self.cfg.warmup_iters)

    def needs(self, iteration: int) -> list[Need]:
        needs: list[Need] = []
        if self.filling(iteration):
            needs.append(Need("teacher", self.target_view, heads=(self.head,)))
            if self.cfg.bank_features == "teacher":
                needs.append(Need("teacher", self.source_view, heads=(self.head,), logits=False))
            else:
                needs.append(Need("student", self.source_view, heads=(self.head,)))
        if self.active(iteration):
            needs.append(Need("student", self.anchor_view, heads=(self.head,),
                              logits=self.anchor_view == MIXED_VIEW))
        return needs

    # ------------------------------------------------------------------ prepare (no gradients)
    def prepare(self, ctx: StepContext, batch: dict) -> None:
        if self.cfg.target_weight != 1.0:
            self._scale_target_pixels(ctx)
        if not self.filling(ctx.iteration):
            return
        with torch.no_grad():
            self._prepare(ctx)

    def _prepare(self, ctx: StepContext) -> None:
        cfg, generator = self.cfg, ctx.generator
        pseudo = teacher_pseudo_labels(ctx, self.self_training, self.target_view)
        target_features = ctx.teacher(self.target_view).projections[self.head].float()
        grid = tuple(target_features.shape[-2:])
        maps = teacher_pixel_maps(pseudo["probs"], grid, cfg.rank)
        valid = self._valid_cells(ctx, pseudo["labels"].shape, grid, target_features.device)
        reliable = reliable_pixel_mask(maps, valid, cfg.selection, cfg.proportion, cfg.selection_scope)
        if self.active(ctx.iteration):
            candidates = reliable
            if self.anchor_view == MIXED_VIEW:
                candidates = candidates & full_cells(~ctx.state[MIX_MASKS].bool(), grid)
            anchors = sample_anchor_indices(maps.labels, candidates, self.num_classes, cfg.anchors_per_class,
                                            generator)
            negatives = {cls: self.sample_negatives(cls, generator) for cls in anchors}
            ctx.state[PLAN] = ContrastPlan(anchors, negatives)
            if self.anchor_view == TARGET_STRONG_VIEW:
                image = strong_view(ctx, self.self_training, ctx.view(self.target_view).image, self.mean, self.std)
                ctx.add_view(TARGET_STRONG_VIEW, image)
        if cfg.bank_features == "teacher":
            self.push_source(ctx.teacher(self.source_view).projections[self.head], ctx.view(self.source_view).label,
                             generator)
        flat_features = flatten_pixels(target_features)
        batch, height, width = maps.labels.shape
        image_index = torch.arange(batch, device=flat_features.device).repeat_interleave(height * width)
        self.target_bank.push(flat_features, maps.top_classes.reshape(-1, cfg.rank), image_index,
                              cfg.target_enqueue_per_image, generator)
        if self.target_proto_bank is not None:
            labels = torch.where(reliable, maps.labels, torch.full_like(maps.labels, IGNORE_INDEX))
            self.target_proto_bank.push(flat_features, labels.reshape(-1), cfg.target_proto_enqueue_per_class,
                                        generator)
        ctx.metrics["pgpc.reliable"] = reliable.float().mean()

    def _valid_cells(self, ctx: StepContext, full_shape: Sequence[int], grid: Sequence[int],
                     device: torch.device) -> Tensor:
        from udaseg.methods.dacs import apply_pseudo_margins

        batch = int(full_shape[0])
        if not self.cfg.exclude_ignored:
            return torch.ones(batch, *grid, dtype=torch.bool, device=device)
        band = pseudo_weight_map(1.0, full_shape, self.self_training.ignore_top, self.self_training.ignore_bottom,
                                 device=device)
        return full_cells(apply_pseudo_margins(ctx, self.target_view, band) > 0, grid)

    def _scale_target_pixels(self, ctx: StepContext) -> None:
        """lambda_t: multiply the ClassMix CE weights of target-origin pixels (source pixels keep 1)."""
        view = ctx.view(MIXED_VIEW)
        masks = ctx.state[MIX_MASKS].to(view.weight.device)
        view.weight = torch.where(masks, view.weight, view.weight * self.cfg.target_weight)

    def sample_negatives(self, cls: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """N_c x D negatives of class ``cls`` from the configured pools (Eqs. 10-11), N_c <= N."""
        pools = list(self.cfg.negative_pools)
        available = []
        for pool in pools:
            if pool == "source":
                occupied = self.source_bank.occupied()
                available.append(int(occupied.sum()) - int(occupied[cls].sum()))
            else:
                available.append(int(self.target_bank.excluding(cls).sum()))
        counts = negative_split(self.cfg.negatives, available)
        parts = []
        for pool, count in zip(pools, counts):
            bank = self.source_bank if pool == "source" else self.target_bank
            parts.append(bank.sample_excluding(cls, count, generator))
        return torch.cat(parts) if parts else self.source_bank.features.new_zeros(0, self.cfg.proj_dim)

    @torch.no_grad()
    def push_source(self, features: Tensor, labels: Tensor, generator: Optional[torch.Generator]) -> None:
        """Enqueue source pixels (features B x D x h x w, labels B x H x W) into the source bank."""
        small = labels_at_grid(labels, features.shape[-2:], self.num_classes, self.cfg.label_min_ratio)
        self.source_bank.push(flatten_pixels(features.float()), small.reshape(-1).to(features.device),
                              self.cfg.source_enqueue_per_class, generator)

    # ------------------------------------------------------------------ losses
    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group == self.source_view and self.cfg.bank_features == "student" and self.filling(ctx.iteration):
            features = ctx.student(self.source_view).projections[self.head].detach()
            self.push_source(features, ctx.view(self.source_view).label, ctx.generator)
        if not self.active(ctx.iteration) or group != self.anchor_view:
            return {}
        features = ctx.student(self.anchor_view).projections[self.head]
        loss, metrics = self.contrast(features, ctx.state[PLAN])
        ctx.metrics.update(metrics)
        return {"pgpc_cl": self.cfg.weight * loss}

    def prototypes(self, classes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Positives: class means of the source bank (or of the reliable-target bank) and which exist,
        for every class (K x D, K) or for ``classes``."""
        bank = self.target_proto_bank if self.target_proto_bank is not None else self.source_bank
        return bank.prototypes(classes)

    def contrast(self, features: Tensor, plan: ContrastPlan) -> tuple[Tensor, dict[str, float]]:
        """Unweighted L_c (Eq. 5) of the student projection ``features`` B x D x h x w for a plan."""
        flat = flatten_pixels(features)
        candidates = [c for c in plan.anchors if plan.negatives[c].shape[0] > 0]
        prototypes, has_prototype = self.prototypes(torch.tensor(candidates, dtype=torch.long))
        classes = [c for c, ok in zip(candidates, has_prototype.tolist()) if ok]
        prototypes = prototypes[has_prototype]
        metrics = {"pgpc.classes": float(len(classes)), "pgpc.anchors": 0.0}
        if not classes:
            zero = features.sum() * 0.0
            return zero, {**metrics, "pgpc.cl": 0.0}
        rows = [plan.anchors[c].to(flat.device) for c in classes]
        anchors = flat[torch.cat(rows)]
        groups = torch.cat([torch.full((r.numel(),), g, dtype=torch.long, device=flat.device)
                            for g, r in enumerate(rows)])
        negatives, mask = pad_negatives([plan.negatives[c] for c in classes], flat.shape[1], flat.device)
        positives = prototypes.to(flat.device)
        per_anchor = self.loss_fn(anchors, groups, positives, negatives, mask)
        if self.cfg.reduction == "paper":  # 1 / (C * M) * sum, Eq. 5 as printed
            loss = per_anchor.sum() / (self.num_classes * self.cfg.anchors_per_class)
        else:
            loss = per_anchor.mean()
        metrics.update({"pgpc.anchors": float(anchors.shape[0]), "pgpc.cl": float(loss.detach())})
        return loss, metrics


# ============================================================================  method
def pgpc_projection_head(cfg: PGPCConfig, segmentor: nn.Module) -> tuple[nn.Module, str]:
    """The SePiCo-style projection head (1x1 conv-BN-ReLU x 2, L2-normalised) on ``cfg.feature``."""
    from udaseg.models.heads.projection import SePiCoProjectionHead
    from udaseg.models.registry import sepico_hidden_channels

    try:
        channels = segmentor.tap_channels(cfg.feature)
    except ValueError as error:
        raise UserError(f"method.pgpc.feature: {error}") from None
    hidden = cfg.proj_hidden or sepico_hidden_channels(segmentor, cfg.feature)
    return SePiCoProjectionHead(channels, hidden, cfg.proj_dim), cfg.feature


def _check_config(cfg: PGPCConfig, self_training: SelfTrainingConfig, num_classes: int) -> None:
    checks = [
        (cfg.weight >= 0, "weight", cfg.weight, "must be >= 0"),
        (cfg.target_weight >= 0, "target_weight", cfg.target_weight, "must be >= 0"),
        (cfg.warmup_iters >= 0, "warmup_iters", cfg.warmup_iters, "must be >= 0"),
        (cfg.bank_start_iter >= 0, "bank_start_iter", cfg.bank_start_iter, "must be >= 0"),
        (cfg.temperature > 0, "temperature", cfg.temperature, "must be > 0"),
        (cfg.proj_dim >= 1, "proj_dim", cfg.proj_dim, "must be >= 1"),
        (cfg.proj_hidden >= 0, "proj_hidden", cfg.proj_hidden, "must be >= 0 (0: automatic)"),
        (cfg.anchors_per_class >= 1, "anchors_per_class", cfg.anchors_per_class, "must be >= 1"),
        (cfg.negatives >= 1, "negatives", cfg.negatives, "must be >= 1"),
        (len(cfg.negative_pools) > 0 and set(cfg.negative_pools) <= {"source", "target"}
         and len(set(cfg.negative_pools)) == len(cfg.negative_pools),
         "negative_pools", list(cfg.negative_pools), "must be a non-empty list of distinct 'source', 'target'"),
        (0.0 <= cfg.proportion <= 1.0, "proportion", cfg.proportion, "must lie in [0, 1]"),
        (1 <= cfg.rank < num_classes, "rank", cfg.rank, f"must lie in [1, {num_classes - 1}] (the model has "
                                                          f"{num_classes} classes)"),
        (0.0 < cfg.label_min_ratio <= 1.0, "label_min_ratio", cfg.label_min_ratio, "must lie in (0, 1]"),
    ]
    for key in ("source_bank_size", "source_enqueue_per_class", "target_bank_size", "target_enqueue_per_image",
                "target_proto_bank_size", "target_proto_enqueue_per_class"):
        value = getattr(cfg, key)
        checks.append((value >= 1, key, value, "must be >= 1"))
    for ok, key, value, why in checks:
        if not ok:
            raise UserError(f"method.pgpc.{key}={value!r} {why}")
    if self_training.mix != "class":
        raise UserError("method pgpc trains on ClassMix images; method.self_training.mix must be 'class'")


@register_method("pgpc", config=PGPCConfig)
def build_pgpc(cfg: Config, segmentor: nn.Module) -> Method:
    """PGPC on DAFormer self-training: source CE (+ FD), ClassMix pseudo-label CE, L_c."""
    from udaseg.methods.base import SupervisedSegmentation
    from udaseg.methods.daformer import ImageNetFeatureDistance

    pgpc, self_training = cfg.method.pgpc, cfg.method.self_training
    num_classes = cfg.model.num_classes
    _check_config(pgpc, self_training, num_classes)
    head, tap = pgpc_projection_head(pgpc, segmentor)
    stride = segmentor.tap_stride(tap)
    require_crops_on_stride(cfg.data, stride, f"method.pgpc.feature={tap!r}")
    objectives: list[Objective] = [SupervisedSegmentation("source")]
    if self_training.feature_distance.enabled:
        objectives.append(ImageNetFeatureDistance(self_training.feature_distance, segmentor, num_classes))
    objectives.append(PseudoLabelSelfTraining(self_training, cfg.data.mean, cfg.data.std))
    objectives.append(PGPCContrast(pgpc, self_training, num_classes, cfg.data.mean, cfg.data.std))
    return Method(objectives=objectives, heads={PROJECTION_HEAD: (head, tap)}, uses_teacher=True, uses_target=True)
