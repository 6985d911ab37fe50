"""Supervised segmentation losses and objectives: source only and the target oracle.

The cross-entropy follows mmseg's reduction, which every official code base of the methods uses:
per-pixel CE (0 on ignored pixels), optionally times a per-pixel weight, **averaged over all
B·H·W pixels, ignored ones included**. PyTorch's default ``ignore_index`` mean divides by the number
of valid pixels instead, which changes the loss scale.

Example::

    logits = torch.randn(2, 19, 16, 16)            # head stride output
    labels = torch.randint(0, 19, (2, 64, 64))     # full-resolution trainIds
    loss = segmentation_cross_entropy(logits, labels)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from udaseg.adapt.step import ModelOutput, Need, Objective, StepContext
from udaseg.methods import Method, register_method

IGNORE_INDEX = 255


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_cross_entropy(logits: Tensor, labels: Tensor, pixel_weight: Optional[Tensor] = None,
                               class_weight: Optional[Tensor] = None) -> Tensor:
    """mmseg-style CE: logits ``B×K×h×w`` (upsampled bilinearly to the label size), labels ``B×H×W``.

    Returns ``mean over all B·H·W pixels of weight · CE``, with CE = 0 on ignored pixels.
    """
    logits = upsample_logits(logits, tuple(labels.shape[-2:]))
    per_pixel = F.cross_entropy(logits, labels.long(), weight=class_weight, ignore_index=IGNORE_INDEX,
                                reduction="none")
    if pixel_weight is not None:
        per_pixel = per_pixel * pixel_weight
    return per_pixel.mean()


def output_losses(out: ModelOutput, label: Tensor, pixel_weight: Optional[Tensor], outputs: dict[str, float],
                  loss_name: str, class_weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Weighted CE of each named output of a multi-output model: ``{f"{loss_name}_{output}": w · CE}``.

    An output that covers part of the input only (``out.boxes[name]``, in the label's pixel grid)
    is compared with the labels and weights cut to its box (HRDA's detail crop).
    """
    losses = {}
    for name, factor in outputs.items():
        box = out.boxes.get(name)
        target = box.crop(label) if box is not None else label
        weight = box.crop(pixel_weight) if box is not None and pixel_weight is not None else pixel_weight
        losses[f"{loss_name}_{name}"] = factor * segmentation_cross_entropy(out.output(name), target, weight,
                                                                            class_weight)
    return losses


class SupervisedSegmentation(Objective):
    """Cross-entropy of the student on a labelled view.

    ``view="source"`` is source-only training (and the supervised part of every UDA method);
    ``view="target"`` with target labels is the target oracle, the upper bound of every report.
    ``outputs`` (``{output name: weight}``) trains several named outputs of a multi-output model
    instead of the main logits alone (see :func:`output_losses`).
    """

    name = "supervised"

    def __init__(self, view: str = "source", loss_name: str = "ce", class_weight: Optional[Tensor] = None,
                 outputs: Optional[dict[str, float]] = None):
        super().__init__()
        self.view = view
        self.loss_name = loss_name
        self.outputs = dict(outputs) if outputs else None
        self.register_buffer("class_weight", class_weight, persistent=False)

    def needs(self, iteration: int) -> list[Need]:
        return [Need("student", self.view)]

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != self.view:
            return {}
        view = ctx.view(self.view)
        if view.label is None:
            raise RuntimeError(f"view '{self.view}' has no labels")
        if self.outputs is not None:
            return output_losses(ctx.student(self.view), view.label, view.weight, self.outputs, self.loss_name,
                                 self.class_weight)
        logits = ctx.student(self.view).logits
        return {self.loss_name: segmentation_cross_entropy(logits, view.label, view.weight, self.class_weight)}


@register_method("source_only")
def build_source_only(cfg, segmentor) -> Method:
    return Method([SupervisedSegmentation("source")])


@register_method("target_oracle")
def build_target_oracle(cfg, segmentor) -> Method:
    return Method([SupervisedSegmentation("target", loss_name="oracle_ce")], uses_target=True,
                  target_labelled=True)
