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
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from udaseg.adapt.augment import draw_augmentation_flags, strong_augment
from udaseg.adapt.masking import check_block_size, mask_images
from udaseg.adapt.pseudo_label import pseudo_weight_map
from udaseg.adapt.step import Need, Objective, StepContext
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

    def validate(self) -> None:
        if self.block_size < 1:
            raise UserError(f"config key 'method.mic.block_size' must be a positive number of pixels, "
                            f"got {self.block_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"config key 'method.mic.mask_ratio' must lie in [0, 1), got {self.mask_ratio}")
        if self.weight < 0:
            raise UserError(f"config key 'method.mic.weight' must be >= 0, got {self.weight}")


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


class MaskedImageConsistency(Objective):
    """The MIC view and loss inside the shared step (student group ``masked``)."""

    name = "mic"

    def __init__(self, cfg: MICConfig, self_training_cfg: SelfTrainingConfig, mean: Sequence[float],
                 std: Sequence[float], source_view: str = "source", target_view: str = "target",
                 outputs: Optional[dict[str, float]] = None):
        super().__init__()
        self.cfg = cfg
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
        if self.uses_target:
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
        from udaseg.methods.dacs import teacher_pseudo_labels

        pseudo = teacher_pseudo_labels(ctx, self.self_training_cfg, self.target_view)
        labels = pseudo["labels"]
        if self.cfg.quality_weight:
            weight = pseudo["weight"]
        else:
            weight = pseudo_weight_map(1.0, labels.shape, self.self_training_cfg.ignore_top,
                                       self.self_training_cfg.ignore_bottom, device=labels.device)
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
    objective = MaskedImageConsistency(mic, cfg.method.self_training, cfg.data.mean, cfg.data.std, outputs=outputs)
    if objective.uses_target and not base.uses_target:
        raise UserError(f"method.mic.images={mic.images!r} needs target images, but method.mic.base={mic.base!r} "
                        "is configured without them; use method.mic.images=source")
    return dataclasses.replace(base, objectives=[*base.objectives, objective])
