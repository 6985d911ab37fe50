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

Example::

    >>> model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32])
    >>> out = model(torch.randn(2, 3, 64, 64), mode="train")
    >>> terms = hrda_segmentation_loss(out, torch.randint(0, 3, (2, 64, 64)))
    >>> sorted(terms)
    ['detail', 'fused']
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from udaseg.errors import UserError
from udaseg.methods.base import segmentation_cross_entropy
from udaseg.models.hrda import HRDAOutput


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
