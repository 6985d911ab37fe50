"""Teacher pseudo-labels, their confidence ratio and the per-pixel pseudo-label weight.

DACS / DAFormer conventions (spec sepico §1.2.2):

* ŷ = argmax_k P̄, with P̄ the softmax of the teacher logits upsampled bilinearly
  (``align_corners=False``) to the input size. Pseudo-labels are **not** thresholded.
* The quality weight is one scalar per batch: w = #{pixels with max_k P̄ ≥ α} / (B·H·W), α = 0.968,
  with **≥** as in the code (the papers write >).
* The weight map is w everywhere, except rows [0, top) and the last ``bottom`` rows, which are 0
  (DAFormer's guard against rectification artefacts on Cityscapes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F


class PseudoLabels(NamedTuple):
    probs: torch.Tensor  # B×K×H×W softmax probabilities (float32)
    labels: torch.Tensor  # B×H×W int64 argmax
    confidence: torch.Tensor  # B×H×W max probability (float32)


def pseudo_labels(logits: torch.Tensor, size: Optional[Sequence[int]] = None) -> PseudoLabels:
    """Softmax, argmax and max probability of teacher logits, optionally resized to ``size``.

    Args:
        logits: B×K×h×w teacher logits (any float dtype; computed in float32).
        size: (H, W) to upsample to bilinearly (``align_corners=False``); ``None`` keeps h×w.

    Returns:
        ``PseudoLabels(probs B×K×H×W, labels B×H×W int64, confidence B×H×W)``.

    Example::

        >>> out = pseudo_labels(torch.zeros(1, 3, 2, 2), size=(4, 4))
        >>> out.labels.shape, float(out.confidence[0, 0, 0])
        (torch.Size([1, 4, 4]), 0.3333333432674408)
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be B×K×h×w, got shape {tuple(logits.shape)}")
    logits = logits.detach().float()
    if size is not None and tuple(size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    probs = torch.softmax(logits, dim=1)
    confidence, labels = probs.max(dim=1)
    return PseudoLabels(probs, labels, confidence)


def confidence_ratio(
    confidence: torch.Tensor, threshold: float = 0.968, per_image: bool = False
) -> torch.Tensor:
    """Fraction of pixels whose confidence is ≥ ``threshold``.

    Args:
        confidence: B×H×W max probabilities.
        threshold: α; a pixel counts when ``confidence >= threshold``.
        per_image: ``False`` (official code): one 0-dim tensor over the whole batch.
            ``True`` (the papers' Eq. 3): a length-B tensor, one ratio per image.

    The result stays on the input's device (no host synchronisation).
    """
    confident = (confidence >= threshold).float()
    if per_image:
        return confident.flatten(1).mean(dim=1)
    return confident.mean()


def pseudo_weight_map(
    ratio: Union[float, torch.Tensor],
    shape: Sequence[int],
    ignore_top: int = 0,
    ignore_bottom: int = 0,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Per-pixel pseudo-label weight W_t of shape B×H×W.

    Args:
        ratio: the confidence ratio: a float, a 0-dim tensor, or a length-B tensor (per image).
        shape: (B, H, W).
        ignore_top: rows [0, ignore_top) get weight 0.
        ignore_bottom: the last ``ignore_bottom`` rows get weight 0.
        device: where to build the map; defaults to the ratio's device (or CPU for a float).
    """
    batch, height, width = (int(v) for v in shape)
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top/ignore_bottom must be >= 0, got {ignore_top}, {ignore_bottom}")
    ratio = torch.as_tensor(ratio, dtype=torch.float32, device=device)
    if device is None:
        device = ratio.device
    if ratio.dim() == 0:
        ratio = ratio.expand(batch)
    if ratio.shape != (batch,):
        raise ValueError(f"ratio must be a scalar or have B={batch} entries, got {tuple(ratio.shape)}")
    weights = ratio.to(device).view(batch, 1, 1).expand(batch, height, width).clone()
    if ignore_top > 0:
        weights[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weights[:, max(height - ignore_bottom, 0):, :] = 0
    return weights


def pseudo_label_accuracy(labels: torch.Tensor, truth: torch.Tensor, confidence: torch.Tensor,
                          threshold: float, ignore_index: int = 255) -> dict[str, float]:
    """Quality of pseudo-labels against held-back ground truth (monitoring only).

    Returns ``pseudo_acc`` (pixel accuracy over every labelled pixel), ``pseudo_acc_confident``
    (over the labelled pixels whose confidence is ≥ ``threshold``; NaN when there is none) and
    ``pseudo_miou`` (mean IoU over the classes present in the batch's labels or pseudo-labels), which
    is not dominated by a class that covers most pixels.
    """
    valid = truth != ignore_index
    correct = (labels == truth) & valid
    confident = valid & (confidence >= threshold)
    total, total_confident = int(valid.sum()), int(confident.sum())
    nan = float("nan")
    classes = int(max(labels.max(), truth[valid].max() if total else 0)) + 1
    pairs = truth[valid] * classes + labels[valid]
    matrix = torch.bincount(pairs, minlength=classes * classes).view(classes, classes).double()
    union = matrix.sum(0) + matrix.sum(1) - matrix.diag()
    present = union > 0
    return {"pseudo_acc": float(correct.sum()) / total if total else nan,
            "pseudo_acc_confident": float((correct & confident).sum()) / total_confident if total_confident else nan,
            "pseudo_miou": float((matrix.diag()[present] / union[present]).mean()) if total else nan}
