"""MIC: masked image consistency (Hoyer, Dai, Wang, Van Gool; CVPR 2023, arXiv 2212.01322).

MIC adds one view and one loss to a mean-teacher self-training base (DACS, DAFormer, and the
methods built on them). The student must predict, from a target image of which most blocks are
masked, the teacher's pseudo-label of the complete image, so it has to use context:

    x^M = M ⊙ aug(x^T)                     M: random block mask (adapt.masking), r = 0.7
    L_M = q^T · mean_{B·H·W} CE( up(f_θ(x^M)), ŷ^T )
    L   = L_S + L_T + λ_m · L_M,           λ_m = 1

- ``ŷ^T = argmax f_φ(x^T)`` and the quality weight ``q^T`` (the fraction of pixels whose teacher
  confidence is ≥ 0.968, one scalar per batch, times the margin rows) are those of the base's
  EMA teacher on the clean, un-jittered target crop (``methods.dacs.teacher_pseudo_labels``):
  the same tensors as the target half of ClassMix, **before** mixing. MIC runs no extra teacher.
- ``aug``: the DACS colour jitter and Gaussian blur with **fresh** on/off gates and parameters
  (independent of the ClassMix augmentation of the same iteration); augment first, then mask, so
  masked pixels stay exactly 0 in normalised space (the mean colour).
- The mask is applied to the **normalised** image and is redrawn every iteration, per image.
- No warm-up: the loss is on from iteration 0.
- Separate masking teacher (official ``mask_alpha`` / ``mask_pseudo_threshold``, both ``"same"``
  by default, i.e. no own teacher): when either differs, MIC keeps an EMA copy f_ψ of the student
  of its own, ``ψ ← α_t ψ + (1 − α_t) θ`` with ``α_t = min(1 − 1/(t+1), mask_alpha)`` (copied at
  t = 0, updated before the iteration's student step; ``mask_alpha = 0``: the current student),
  and takes ``ŷ^T``, ``q^T`` from it with ``τ = mask_pseudo_threshold`` (``null``: q^T = 1), times
  the same margins.
- The CE is the base's (mmseg reduction: mean over all pixels, ignored ones included).

Shapes: ``x^T`` ``B×3×H×W`` (normalised), mask ``B×1×H×W``, ``ŷ^T`` ``B×H×W`` int64,
``q^T``-map ``B×H×W``; the student's logits are at its head stride and upsampled bilinearly.

``images`` chooses what is masked (official ``mask_mode``): ``target`` (``separatetrg[aug]``, the
GTA/SYNTHIA → Cityscapes recipe), ``source_and_target`` (``separate[aug]``: the first source image
with its ground truth and weight 1 plus the first target image with its pseudo-label; the
Cityscapes → ACDC / Dark Zurich recipe, there without colour augmentation) and ``source``
(``separatesrc[aug]``, supervised MIC).

Example::

    >>> loss = masked_consistency_loss(torch.randn(2, 3, 8, 8, requires_grad=True),
    ...                                torch.randint(0, 3, (2, 32, 32)), torch.full((2, 32, 32), 0.5))
    >>> loss.backward()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from udaseg.adapt.augment import draw_augmentation_flags, strong_augment
from udaseg.adapt.masking import check_block_size, mask_images
from udaseg.adapt.pseudo_label import confidence_ratio, pseudo_labels, pseudo_weight_map
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.adapt.teacher import EMATeacher
from udaseg.config.schema import Config, SelfTrainingConfig
from udaseg.errors import UserError
from udaseg.methods import Method, build_method, register_method
from udaseg.methods.base import output_losses, segmentation_cross_entropy

MASKED_VIEW = "masked"
BLOCK_SIZE_KEY = "method.mic.block_size"


@dataclass
class MICConfig:
    """``method.mic``: MIC added to a self-training base. Defaults are the official code's."""

    base: Literal["dacs", "daformer", "sepico", "t2sda", "pgpc", "hrda"] = "daformer"  # the method MIC is added to
    block_size: int = 32  # mask block b in pixels; must divide the crop (32 on 512² crops, 64 on 1024²)
    mask_ratio: float = 0.7  # r, the masked fraction of blocks
    weight: float = 1.0  # lambda_m
    images: Literal["target", "source_and_target", "source"] = "target"
    color_augmentation: bool = True  # fresh colour jitter + blur before masking
    quality_weight: bool = True  # False: weight 1 instead of the teacher's confidence ratio
    # EMA rate of a separate MIC teacher; "same": the base teacher's labels (no own teacher)
    mask_alpha: Union[float, Literal["same"]] = "same"
    # confidence threshold of the MIC quality weight; "same": self_training.pseudo_threshold; null: weight 1
    mask_pseudo_threshold: Optional[Union[float, Literal["same"]]] = "same"

    @property
    def own_teacher(self) -> bool:
        """MIC keeps a teacher of its own iff either switch differs from ``"same"`` (official rule)."""
        return self.mask_alpha != "same" or self.mask_pseudo_threshold != "same"

    def validate(self) -> None:
        if self.block_size < 1:
            raise UserError(f"config key 'method.mic.block_size' must be a positive number of pixels, "
                            f"got {self.block_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"config key 'method.mic.mask_ratio' must lie in [0, 1), got {self.mask_ratio}")
        if self.weight < 0:
            raise UserError(f"config key 'method.mic.weight' must be >= 0, got {self.weight}")
        if self.mask_alpha != "same" and not 0.0 <= self.mask_alpha < 1.0:
            raise UserError(f"config key 'method.mic.mask_alpha' must lie in [0, 1) or be 'same', "
                            f"got {self.mask_alpha}")
        threshold = self.mask_pseudo_threshold
        if threshold not in ("same", None) and not 0.0 <= threshold <= 1.0:
            raise UserError(f"config key 'method.mic.mask_pseudo_threshold' must lie in [0, 1], be 'same' or null, "
                            f"got {threshold}")
        if self.own_teacher and self.images == "source":
            raise UserError("method.mic.mask_alpha / mask_pseudo_threshold set a teacher for target pseudo-labels, "
                            "but method.mic.images=source masks labelled images only")


def masked_consistency_loss(masked_logits: Tensor, pseudo_labels: Tensor,
                            pseudo_weight: Optional[Tensor] = None) -> Tensor:
    """``L_M``: weighted CE of the student's logits on the masked images against the pseudo-labels.

    Args:
        masked_logits: ``B×K×h×w`` student logits of ``x^M`` (upsampled to the label size).
        pseudo_labels: ``B×H×W`` teacher argmax on the unmasked images (255 = ignore).
        pseudo_weight: ``B×H×W`` quality weight (``None``: 1).
    Returns:
        a 0-dim tensor: ``mean over B·H·W of weight · CE``.
    """
    return segmentation_cross_entropy(masked_logits, pseudo_labels, pseudo_weight)


class MaskingTeacher(nn.Module):
    """MIC's separate EMA teacher f_ψ (official ``EMATeacher`` with the ``mask_`` parameters).

    A full copy of the segmentor (HRDA included), parameters without gradients, train-mode BN,
    dropout and drop-path off. :meth:`pseudo_labels` first updates ψ from the student
    (``ψ ← α_t ψ + (1 − α_t) θ``, ``α_t = min(1 − 1/(t+1), α)``; a copy at t = 0), then returns
    the argmax ``ŷ^T`` and the weight ``q^T`` (``B×H×W``): the fraction of the batch's pixels with
    ``max_c p ≥ τ`` (``threshold=None``: 1), times the margins. Its weights are saved with the
    objective, so a resumed run continues the same teacher.
    """

    def __init__(self, student: nn.Module, alpha: float, threshold: Optional[float]) -> None:
        super().__init__()
        ema = EMATeacher(student, alpha)
        self.module = ema.module
        self.threshold = threshold
        self._ema = ema  # not a submodule: it refers to the student, which the trainer owns

    @property
    def alpha(self) -> float:
        return self._ema.alpha_max

    def pseudo_labels(self, image: Tensor, iteration: int, cfg: SelfTrainingConfig,
                      autocast: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """``(ŷ^T B×H×W int64, q^T B×H×W)`` of ``image`` (normalised ``B×3×H×W``) at ``iteration``."""
        self._ema.update(iteration)
        with torch.autocast(image.device.type, dtype=autocast, enabled=autocast is not None):
            logits = self._ema(image).logits
        out = pseudo_labels(logits, tuple(image.shape[-2:]))
        ratio = 1.0 if self.threshold is None else confidence_ratio(
            out.confidence, self.threshold, per_image=cfg.confidence_weight == "image")
        weight = pseudo_weight_map(ratio, out.labels.shape, cfg.ignore_top, cfg.ignore_bottom,
                                   device=out.labels.device)
        return out.labels, weight


class MaskedImageConsistency(Objective):
    """The MIC view and loss inside the shared step (student group ``masked``)."""

    name = "mic"

    def __init__(self, cfg: MICConfig, self_training_cfg: SelfTrainingConfig, mean: Sequence[float],
                 std: Sequence[float], source_view: str = "source", target_view: str = "target",
                 outputs: Optional[dict[str, float]] = None, teacher: Optional[MaskingTeacher] = None):
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher  # MIC's own teacher, or None: the base's pseudo-labels
        self.outputs = dict(outputs) if outputs else None  # named outputs and weights (HRDA), λ_m included
        self.self_training_cfg = self_training_cfg
        self.mean, self.std = list(mean), list(std)
        self.source_view = source_view
        self.target_view = target_view

    @property
    def uses_target(self) -> bool:
        return self.cfg.images != "source"

    def needs(self, iteration: int) -> list[Need]:
        needs = [Need("student", MASKED_VIEW)]
        if self.uses_target and self.teacher is None:
            needs.append(Need("teacher", self.target_view))
        return needs

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        image, label, weight = self._masked_batch(ctx)
        if self.cfg.color_augmentation:
            jitter, blur = draw_augmentation_flags(ctx.generator, self.self_training_cfg.color_jitter_prob,
                                                   self.self_training_cfg.blur_prob)
            if jitter or blur:
                image = strong_augment(image, self.mean, self.std, apply_jitter=jitter, apply_blur=blur,
                                       strength=self.self_training_cfg.color_jitter_strength,
                                       blur_sigma=tuple(self.self_training_cfg.blur_sigma), generator=ctx.generator)
        image, mask = mask_images(image, self.cfg.block_size, self.cfg.mask_ratio, ctx.generator, BLOCK_SIZE_KEY)
        ctx.metrics["mic_masked_fraction"] = float(1.0 - mask.mean())
        ctx.add_view(MASKED_VIEW, image, label, weight)

    def _masked_batch(self, ctx: StepContext) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        if self.cfg.images == "source":
            source = ctx.view(self.source_view)
            if source.label is None:
                raise RuntimeError(f"view '{self.source_view}' has no labels")
            return source.image, source.label, None
        from udaseg.methods.dacs import apply_pseudo_margins

        labels, weight = self._target_pseudo_labels(ctx)
        if not self.cfg.quality_weight:
            weight = apply_pseudo_margins(ctx, self.target_view, pseudo_weight_map(
                1.0, labels.shape, self.self_training_cfg.ignore_top, self.self_training_cfg.ignore_bottom,
                device=labels.device))
        target = ctx.view(self.target_view)
        if self.cfg.images == "target":
            return target.image, labels, weight
        source = ctx.view(self.source_view)
        if source.image.shape[-2:] != target.image.shape[-2:]:
            raise UserError(f"method.mic.images=source_and_target needs source and target crops of one size, got "
                            f"{tuple(source.image.shape[-2:])} and {tuple(target.image.shape[-2:])} "
                            "(set data.source.crop_size and data.target.crop_size alike)")
        image = torch.stack([source.image[0], target.image[0]])
        label = torch.stack([source.label[0].to(labels.dtype), labels[0]])
        weight = torch.stack([torch.ones_like(weight[0]), weight[0]])
        return image, label, weight

    def _target_pseudo_labels(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(ŷ^T, q^T)`` of the target view: MIC's own teacher's, else the base teacher's (shared)."""
        from udaseg.methods.dacs import apply_pseudo_margins

        if self.teacher is not None:
            image = ctx.view(self.target_view).image
            labels, weight = self.teacher.pseudo_labels(image, ctx.iteration, self.self_training_cfg, ctx.autocast)
            weight = apply_pseudo_margins(ctx, self.target_view, weight)
            ctx.metrics["mic_pseudo_ratio"] = float(weight.max())
            return labels, weight
        from udaseg.methods.dacs import teacher_pseudo_labels

        pseudo = teacher_pseudo_labels(ctx, self.self_training_cfg, self.target_view)
        return pseudo["labels"], pseudo["weight"]  # the margins are already in

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != MASKED_VIEW:
            return {}
        view = ctx.view(MASKED_VIEW)
        if self.outputs is not None:
            return output_losses(ctx.student(MASKED_VIEW), view.label, view.weight, self.outputs, "mic_ce")
        loss = masked_consistency_loss(ctx.student(MASKED_VIEW).logits, view.label, view.weight)
        return {"mic_ce": self.cfg.weight * loss}


def check_crop_divisible(cfg: Config) -> None:
    """A mask block that does not divide the configured crop is a config error (named key)."""
    specs = [cfg.data.source] if cfg.method.mic.images == "source" else [cfg.data.target]
    if cfg.method.mic.images == "source_and_target":
        specs.append(cfg.data.source)
    for spec in specs:
        if spec is not None and spec.crop_size:
            check_block_size(spec.crop_size[0], spec.crop_size[1], cfg.method.mic.block_size, BLOCK_SIZE_KEY)


def masking_teacher(cfg: Config, segmentor: nn.Module) -> Optional[MaskingTeacher]:
    """MIC's own teacher when ``mask_alpha`` or ``mask_pseudo_threshold`` is not ``"same"``; "same"
    resolves to ``self_training.ema_alpha`` / ``self_training.pseudo_threshold``."""
    mic, self_training = cfg.method.mic, cfg.method.self_training
    if not mic.own_teacher:
        return None
    alpha = self_training.ema_alpha if mic.mask_alpha == "same" else float(mic.mask_alpha)
    threshold = mic.mask_pseudo_threshold
    threshold = self_training.pseudo_threshold if threshold == "same" else threshold
    return MaskingTeacher(segmentor, alpha, None if threshold is None else float(threshold))


@register_method("mic", config=MICConfig)
def build_mic(cfg: Config, segmentor: nn.Module) -> Method:
    """``method.mic.base`` (DAFormer, DACS, SePiCo or T2S-DA) with the MIC objective added last."""
    mic = cfg.method.mic
    check_crop_divisible(cfg)
    base_cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=mic.base))
    base = build_method(base_cfg, segmentor)
    if not base.uses_teacher:
        raise UserError(f"method.mic.base={mic.base!r} has no EMA teacher to make MIC's pseudo-labels")
    outputs = None
    if mic.base == "hrda":
        from udaseg.methods.hrda import hrda_output_weights

        # As the official code: lambda_m scales the fused term only, not HRDA's detail term.
        outputs = hrda_output_weights(cfg, main_weight=mic.weight)
    objective = MaskedImageConsistency(mic, cfg.method.self_training, cfg.data.mean, cfg.data.std, outputs=outputs,
                                       teacher=masking_teacher(cfg, segmentor))
    if objective.uses_target and not base.uses_target:
        raise UserError(f"method.mic.images={mic.images!r} needs target images, but method.mic.base={mic.base!r} "
                        "is configured without them; use method.mic.images=source")
    return dataclasses.replace(base, objectives=[*base.objectives, objective])
