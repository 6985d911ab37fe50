"""DACS mean-teacher self-training (Tranheden et al., WACV 2021), the base DAFormer's code builds on.

``method.name=dacs`` is the DACS release: EMA teacher momentum 0.99, every target pixel weighted.
DAFormer changed two things that its presets (and SePiCo's, T2S-DA's) keep: momentum 0.999 and
zero pseudo-label weight on the top 15 / bottom 120 rows (``self_training.ignore_top/bottom``).

Per iteration (after the EMA teacher update done by the trainer):

1. The teacher predicts the weak target: ``p = softmax(up(f_teacher(x_t)))``, ``ŷ = argmax p``.
2. Confidence ratio ``w = #{max p ≥ 0.968} / (B·H·W)``: one scalar for the batch (Eqs. 2–3 of
   SePiCo; the code uses ``≥``). The weight map ``W_t`` is ``w`` everywhere except ignored rows.
   ``confidence_weight: image`` computes ``w`` per image instead (the papers' Eq. 3).
3. ClassMix: half of the classes of the source label batch (their union, 255 included, less
   ``mix_exclude_classes``) are pasted from the weak source onto the weak target; the mixed label
   and weight follow the same mask (weight 1 on source pixels, ``W_t`` on target pixels).
4. Colour jitter and blur on the mix: one on/off draw per iteration, shared by every strong view
   (``self_training.augmentation_draws="per_view"``: one draw per view).
5. Loss: pixel-weighted CE of the student on the mixed image, averaged over all pixels.

Example::

    objective = PseudoLabelSelfTraining(SelfTrainingConfig(), mean, std)
    # inside a TrainStep: needs the teacher on 'target', the student on 'mixed'
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from udaseg.adapt.augment import draw_augmentation_flags, strong_augment
from udaseg.adapt.mixing import class_mix_masks, mix
from udaseg.adapt.pseudo_label import confidence_ratio, pseudo_label_accuracy, pseudo_labels, pseudo_weight_map
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import Config, SelfTrainingConfig
from udaseg.methods import Method, register_method
from udaseg.methods.base import SupervisedSegmentation, output_losses, segmentation_cross_entropy

AUG_FLAGS = "augmentation_flags"
PSEUDO = "target_pseudo"
MONITOR = "monitor_labels"  # view name -> held-back ground truth aligned with that view (monitoring only)
PSEUDO_VALID = "pseudo_valid"  # view name -> B×H×W bool margin map aligned with that view (see below)
MIX_MASKS = "class_mix_masks"  # B×H×W bool, True on pasted source pixels of the 'mixed' view


def monitor_label(ctx: StepContext, batch: dict, view: str) -> Optional[Tensor]:
    """The held-back labels of ``view`` (a crop of the batch's when an objective re-cropped the view)."""
    aligned = ctx.state.get(MONITOR, {})
    if view in aligned:
        return aligned[view]
    return batch.get(view, {}).get("monitor_label")


def pseudo_valid_region(ctx: StepContext, view: str) -> Optional[Tensor]:
    """``B×H×W`` bool: where pseudo-labels of ``view`` may be trusted (the data's ``pseudo_margins``).

    The batch item's ``pseudo_valid`` map, or its crop when an objective re-cropped the view (kept in
    ``ctx.state["pseudo_valid"]``); ``None`` when the data set has no margins.
    """
    aligned = ctx.state.get(PSEUDO_VALID, {})
    valid = aligned[view] if view in aligned else ctx.batch.get(view, {}).get(PSEUDO_VALID)
    if valid is None:
        return None
    size = tuple(ctx.view(view).image.shape[-2:])
    if tuple(valid.shape[-2:]) != size:
        raise RuntimeError(f"the pseudo-label margin map of view '{view}' is {tuple(valid.shape[-2:])}, the view "
                           f"{size}; an objective that re-crops a view must crop ctx.state['{PSEUDO_VALID}'] too")
    return valid


def apply_pseudo_margins(ctx: StepContext, view: str, weight: Tensor) -> Tensor:
    """``weight`` (B×H×W) times the view's margin map (unchanged without one)."""
    valid = pseudo_valid_region(ctx, view)
    return weight if valid is None else weight * valid.to(weight.device, weight.dtype)


def iteration_augmentation_flags(ctx: StepContext, cfg: SelfTrainingConfig, view: str | None = None) -> tuple[bool, bool]:
    """The (jitter, blur) decision of a strong view.

    ``self_training.augmentation_draws="shared"`` (DACS, default): drawn once per iteration and
    shared by every strong view. ``"per_view"``: each named view draws its own (two independently
    augmented views, as RCCR needs); a call without a view name takes the shared draw.
    """
    key = AUG_FLAGS if cfg.augmentation_draws == "shared" or view is None else f"{AUG_FLAGS}:{view}"
    if key not in ctx.state:
        ctx.state[key] = draw_augmentation_flags(ctx.generator, cfg.color_jitter_prob, cfg.blur_prob)
    return ctx.state[key]


def strong_view(ctx: StepContext, cfg: SelfTrainingConfig, image: Tensor, mean: Sequence[float],
                std: Sequence[float], view: str | None = None) -> Tensor:
    """Colour jitter / blur of ``image`` for the strong view ``view`` (flags: see above)."""
    jitter, blur = iteration_augmentation_flags(ctx, cfg, view)
    if not (jitter or blur):
        return image
    return strong_augment(image, mean, std, apply_jitter=jitter, apply_blur=blur,
                          strength=cfg.color_jitter_strength, blur_sigma=tuple(cfg.blur_sigma),
                          generator=ctx.generator)


def teacher_pseudo_labels(ctx: StepContext, cfg: SelfTrainingConfig, view: str = "target") -> dict:
    """Teacher pseudo-labels on ``view``, computed once per iteration and shared through ``ctx.state``."""
    cached = pseudo_labels_of(ctx, view)
    if cached is not None and cached["image"] is ctx.view(view).image:
        return cached
    image = ctx.view(view).image
    probs, labels, confidence = pseudo_labels(ctx.teacher(view).logits, tuple(image.shape[-2:]))
    return store_pseudo_labels(ctx, cfg, view, probs, labels, confidence)


def pseudo_labels_of(ctx: StepContext, view: str) -> dict | None:
    """The pseudo-labels stored for ``view`` this iteration (probs, labels, confidence, ratio, weight)."""
    return ctx.state.get(f"{PSEUDO}:{view}")


def store_pseudo_labels(ctx: StepContext, cfg: SelfTrainingConfig, view: str, probs: Tensor, labels: Tensor,
                        confidence: Tensor) -> dict:
    """Add the confidence ratio and weight map to pseudo-labels of ``view`` and share them in ``ctx.state``."""
    ratio = confidence_ratio(confidence, cfg.pseudo_threshold, per_image=cfg.confidence_weight == "image")
    weight = apply_pseudo_margins(ctx, view, pseudo_weight_map(ratio, labels.shape, cfg.ignore_top, cfg.ignore_bottom))
    result = {"view": view, "image": ctx.view(view).image, "probs": probs, "labels": labels,
              "confidence": confidence, "ratio": ratio, "weight": weight}
    ctx.state[PSEUDO] = result  # the latest pseudo-labels of the iteration
    ctx.state[f"{PSEUDO}:{view}"] = result
    ctx.metrics["pseudo_ratio"] = ratio.mean()
    return result


class PseudoLabelSelfTraining(Objective):
    """The DACS / DAFormer target loss: weighted CE on ClassMix images with teacher pseudo-labels."""

    name = "self_training"

    def __init__(self, cfg: SelfTrainingConfig, mean: Sequence[float], std: Sequence[float],
                 source_view: str = "source", target_view: str = "target", class_weight: Tensor | None = None,
                 outputs: dict[str, float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.outputs = dict(outputs) if outputs else None  # named outputs and weights (multi-output models)
        self.mean, self.std = list(mean), list(std)
        self.source_view = source_view
        self.target_view = target_view
        self.student_view = "mixed" if cfg.mix == "class" else "target_strong"
        self.register_buffer("class_weight", class_weight, persistent=False)

    def needs(self, iteration: int) -> list[Need]:
        return [Need("teacher", self.target_view), Need("student", self.student_view)]

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        pseudo = teacher_pseudo_labels(ctx, self.cfg, self.target_view)
        truth = monitor_label(ctx, batch, self.target_view)
        if truth is not None:
            ctx.metrics.update(pseudo_label_accuracy(pseudo["labels"], truth, pseudo["confidence"],
                                                     self.cfg.pseudo_threshold))
        target = ctx.view(self.target_view)
        if self.cfg.mix == "class":
            source = ctx.view(self.source_view)
            masks = class_mix_masks(source.label, ctx.generator, tuple(self.cfg.mix_exclude_classes))
            ctx.state[MIX_MASKS] = masks
            image = mix(masks, source.image, target.image)
            label = mix(masks, source.label, pseudo["labels"])
            weight = mix(masks, torch.ones_like(pseudo["weight"]), pseudo["weight"])
        else:
            image, label, weight = target.image, pseudo["labels"], pseudo["weight"]
        image = strong_view(ctx, self.cfg, image, self.mean, self.std, self.student_view)
        ctx.add_view(self.student_view, image, label, weight)

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != self.student_view:
            return {}
        view = ctx.view(self.student_view)
        if self.outputs is not None:
            return output_losses(ctx.student(self.student_view), view.label, view.weight, self.outputs, "pseudo_ce",
                                 self.class_weight)
        logits = ctx.student(self.student_view).logits
        return {"pseudo_ce": segmentation_cross_entropy(logits, view.label, view.weight, self.class_weight)}


def self_training_objectives(cfg: Config, segmentor, feature_distance: bool) -> list[Objective]:
    """Source CE, optionally DAFormer's feature distance, and the ClassMix pseudo-label CE."""
    from udaseg.methods.daformer import ImageNetFeatureDistance

    objectives: list[Objective] = [SupervisedSegmentation("source")]
    if feature_distance:
        objectives.append(ImageNetFeatureDistance(cfg.method.self_training.feature_distance, segmentor,
                                                  cfg.model.num_classes))
    objectives.append(PseudoLabelSelfTraining(cfg.method.self_training, cfg.data.mean, cfg.data.std))
    return objectives


@register_method("dacs")
def build_dacs(cfg: Config, segmentor) -> Method:
    return Method(self_training_objectives(cfg, segmentor, feature_distance=False), uses_teacher=True,
                  uses_target=True)
