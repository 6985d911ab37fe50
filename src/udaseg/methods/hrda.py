"""HRDA's multi-resolution segmentation loss (Hoyer, Dai, Van Gool; ECCV 2022), official weighting.

Every student forward of HRDA (source, mixed, MIC's masked view) is supervised by

    L = (1 − λ_d − λ_lr) · CE(ŷ_F, y) + λ_d · CE(ŷ_d, y[b_d]) + λ_lr · CE((1 − a) ⊙ ŷ_c, y)

with ``λ_d = 0.1`` (``hr_loss_weight``) and ``λ_lr = 0`` (``lr_loss_weight``), so
``0.9 · L_fused + 0.1 · L_detail``. ``y`` and the pixel weight ``W`` are full-resolution maps of the
context crop; the detail term uses ``y`` and ``W`` cropped to the same detail box ``b_d`` as the
forward (``crop(label, b_d)``: for target images the detail pseudo-label is the fused pseudo-label
map cropped). Each CE is mmseg's: logits bilinearly upsampled to the label size, weighted per pixel,
**averaged over all pixels, ignored ones included** (:func:`udaseg.methods.base.segmentation_cross_entropy`).
The context term is the attention-weighted context prediction, as the official code returns it.

Shapes: ``ŷ_F`` ``B×K×(H/4)×(W/4)``, ``ŷ_d`` ``B×K×(h_d/4)×(w_d/4)``, ``y``/``W`` ``B×H×W``.

Inside the training step, the ``hrda`` method is its base (``method.hrda.base``: DAFormer by
default) on an HRDA model (``model.name: hrda_daformer_mitb5``) whose source and ClassMix losses
address the model's named outputs, ``{"logits": 1 − λ_d, "hr": λ_d}``: the step carries the
detail box of the ``hr`` output and cuts labels and weights to it
(:func:`udaseg.methods.base.output_losses`). The student draws a new detail crop in every forward;
the teacher's pseudo-labels are the fused sliding-window prediction (:mod:`udaseg.models.hrda`).

Example::

    >>> model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32])
    >>> out = model(torch.randn(2, 3, 64, 64), mode="train")
    >>> terms = hrda_segmentation_loss(out, torch.randint(0, 3, (2, 64, 64)))
    >>> sorted(terms)
    ['detail', 'fused']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from udaseg.adapt.multires import check_detail_crop
from udaseg.adapt.step import Objective, StepContext
from udaseg.adapt.teacher import unwrap_model
from udaseg.config.schema import Config
from udaseg.errors import UserError
from udaseg.methods import Method, build_method, register_method
from udaseg.methods.base import segmentation_cross_entropy
from udaseg.models.hrda import HRDAOutput, HRDASegmentor


def hrda_segmentation_loss(output: HRDAOutput, labels: Tensor, pixel_weight: Optional[Tensor] = None,
                           detail_weight: float = 0.1, low_res_weight: float = 0.0) -> dict[str, Tensor]:
    """The weighted terms of ``L`` (module docstring), by name: ``fused``, ``detail``, ``low_res``.

    A term whose weight is 0 is left out. Without a detail box (a forward in ``slide`` mode) the
    detail term is taken over the whole label map, as the official code does without HR crops.
    """
    if detail_weight < 0 or low_res_weight < 0 or detail_weight + low_res_weight > 1:
        raise UserError(f"HRDA loss weights must be >= 0 and sum to at most 1, got detail {detail_weight}, "
                        f"low_res {low_res_weight}")
    if output.logits is None:
        raise ValueError("the HRDA forward ran without decoding (decode=False); there are no logits")
    terms = {"fused": (1 - detail_weight - low_res_weight)
             * segmentation_cross_entropy(output.logits, labels, pixel_weight)}
    if detail_weight > 0:
        box = output.detail_box
        detail_labels = labels if box is None else box.crop(labels)
        detail_weights = pixel_weight if (pixel_weight is None or box is None) else box.crop(pixel_weight)
        terms["detail"] = detail_weight * segmentation_cross_entropy(output.high_res, detail_labels, detail_weights)
    if low_res_weight > 0:
        terms["low_res"] = low_res_weight * segmentation_cross_entropy(output.weighted_low_res(), labels,
                                                                       pixel_weight)
    return terms


DETAIL_CROP_STREAM = 0x48524441  # tags the detail-crop stream derived from the step's seed


def detail_crop_generator(step_generator: torch.Generator) -> torch.Generator:
    """The iteration's stream for detail-crop boxes: seeded from the step generator's seed, so it
    is reproduced on resume and draws from neither the step's stream nor torch's global RNG."""
    from udaseg.engine.loader import mix_seed

    return torch.Generator().manual_seed(mix_seed(step_generator.initial_seed(), DETAIL_CROP_STREAM))


class DetailCropDraws(Objective):
    """Hands the student's HRDA segmentor the iteration's detail-crop stream.

    Its ``prepare`` runs before any objective's losses, where the student forwards run, so every
    student forward of the iteration then draws its detail box from
    :func:`detail_crop_generator` (source, mixed and masked views in the order they run); the
    stream is dropped after the step. No views, no losses.
    """

    name = "hrda_detail_crops"

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        _hrda_segmentor(ctx.student_model).crop_generator = detail_crop_generator(ctx.generator)

    def after_step(self, ctx: StepContext) -> None:
        _hrda_segmentor(ctx.student_model).crop_generator = None


def _hrda_segmentor(model: nn.Module) -> HRDASegmentor:
    model = unwrap_model(model)
    segmentor = unwrap_model(getattr(model, "segmentor", model))
    if not isinstance(segmentor, HRDASegmentor):
        raise RuntimeError(f"the student is not an HRDA model ({type(segmentor).__name__})")
    return segmentor


@dataclass
class HRDAConfig:
    """``method.hrda``: the self-training base and the detail-loss weight λ_d (official: 0.1)."""

    base: Literal["dacs", "daformer", "sepico", "t2sda", "pgpc"] = "daformer"
    detail_loss_weight: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.detail_loss_weight <= 1.0:
            raise UserError(f"config key 'method.hrda.detail_loss_weight' must lie in [0, 1], "
                            f"got {self.detail_loss_weight}")


def hrda_output_weights(cfg: Config, main_weight: float = 1.0) -> dict[str, float]:
    """``{"logits": main_weight · (1 − λ_d), "hr": λ_d}``, the named-output weights of one HRDA loss."""
    detail = cfg.method.hrda.detail_loss_weight
    weights = {"logits": main_weight * (1.0 - detail)}
    if detail > 0:
        weights["hr"] = detail
    return weights


def check_hrda_setup(cfg: Config, segmentor: nn.Module) -> None:
    """The model must be an HRDA model and its detail crop must fit into the data crops."""
    if not isinstance(segmentor, HRDASegmentor):
        raise UserError(f"method 'hrda' needs an HRDA model (model.name: hrda_daformer_mitb5, ...), "
                        f"got model.name={cfg.model.name!r}")
    for spec in (cfg.data.source, cfg.data.target):
        if spec is not None and spec.crop_size:
            check_detail_crop(spec.crop_size, segmentor.detail_crop_size)


@register_method("hrda", config=HRDAConfig)
def build_hrda(cfg: Config, segmentor: nn.Module) -> Method:
    """``method.hrda.base`` on an HRDA model, with the 0.9 fused + 0.1 detail loss on the source and
    ClassMix views."""
    from udaseg.methods.base import SupervisedSegmentation
    from udaseg.methods.dacs import PseudoLabelSelfTraining

    check_hrda_setup(cfg, segmentor)
    base_cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=cfg.method.hrda.base))
    base = build_method(base_cfg, segmentor)
    weights = hrda_output_weights(cfg)
    for objective in base.objectives:
        if isinstance(objective, (SupervisedSegmentation, PseudoLabelSelfTraining)):
            objective.outputs = dict(weights)
    return dataclasses.replace(base, objectives=[*base.objectives, DetailCropDraws()])
