"""Whole-image and sliding-window inference returning full-resolution logits.

Follows mmseg's ``EncoderDecoder.whole_inference`` / ``slide_inference`` (what DAFormer and SePiCo
evaluate with: slide mode, 1024×1024 windows at stride 683 on 1024×2048 Cityscapes images):

* ``whole``: one forward, logits resized bilinearly (align_corners=False) to ``out_size``.
* ``slide``: windows of ``crop_size`` at ``stride``; the last window of each row/column is shifted back so
  it ends at the border; each window's logits are resized to the window size, added into a full-size
  canvas, and the canvas is divided by how many windows covered each pixel. Windows are run in batches
  of ``batch_windows`` crops (all windows have the same size, ``min(crop, image)``).
* a model with its own inference (a method ``inference_logits(images, mode, crop_size, stride,
  batch_windows) -> logits``, e.g. HRDA's fused multi-resolution sliding inference) is run through
  it instead of the two modes above; resizing to ``out_size`` and ``flip`` still apply.
* ``flip``: also run the horizontally flipped image, flip its logits back and average. mmseg averages
  softmax *probabilities* in its flip test; ``flip_merge="logits"`` (default) averages raw logits instead,
  ``flip_merge="probs"`` reproduces mmseg and returns ``log`` of the averaged probabilities (so their
  softmax is mmseg's merged probability map and the argmax is identical).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError


def _as_pair(value, name: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise UserError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    return value  # type: ignore[return-value]


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    return out.logits if hasattr(out, "logits") else out


def _upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def window_grid(height: int, width: int, crop: Tuple[int, int], stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """mmseg's window placement: ``(y1, y2, x1, x2)`` of every window, row-major."""
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def _slide(model: nn.Module, images: Tensor, crop: Tuple[int, int], stride: Tuple[int, int], batch_windows: int) -> Tensor:
    batch, _, height, width = images.shape
    windows = window_grid(height, width, crop, stride)
    canvas: Optional[Tensor] = None
    count = images.new_zeros((1, 1, height, width))
    for start in range(0, len(windows), max(1, batch_windows)):
        group = windows[start:start + max(1, batch_windows)]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group], dim=0)
        window_logits = _upsample(_logits(model, crops), crops.shape[-2:])
        if canvas is None:
            canvas = window_logits.new_zeros((batch, window_logits.shape[1], height, width))
        for i, (y1, y2, x1, x2) in enumerate(group):
            canvas[:, :, y1:y2, x1:x2] += window_logits[i * batch:(i + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    assert canvas is not None
    return canvas / count


def own_inference(model: nn.Module):
    """The model's own inference method, or ``None`` (then whole / slide inference run the forward)."""
    method = getattr(model, "inference_logits", None)
    return method if callable(method) else None


def _single(model: nn.Module, images: Tensor, mode: str, crop, stride, batch_windows: int, out_size) -> Tensor:
    own = own_inference(model)
    if own is not None:
        return _upsample(own(images, mode=mode, crop_size=crop, stride=stride, batch_windows=batch_windows), out_size)
    if mode == "whole":
        return _upsample(_logits(model, images), out_size)
    return _upsample(_slide(model, images, crop, stride, batch_windows), out_size)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    mode: str = "whole",
    crop_size=None,
    stride=None,
    flip: bool = False,
    out_size=None,
    batch_windows: int = 8,
    flip_merge: str = "logits",
) -> Tensor:
    """Logits ``B×K×H'×W'`` for ``images: B×3×H×W`` at ``out_size`` (default: the input size ``H×W``).

    Args:
        mode: ``"whole"`` or ``"slide"``.
        crop_size, stride: window size and step for ``slide`` (int or ``(h, w)``); stride defaults to
            two thirds of the crop, rounded up (mmseg's 1024/683).
        flip: add the horizontally flipped image (see ``flip_merge`` and the module docstring).
        batch_windows: windows per forward in ``slide`` mode.

    The model is called as ``model(x)`` and may return a tensor or a :class:`SegmentorOutput`; its mode
    (train/eval) is left as it is.
    """
    if images.dim() != 4:
        raise UserError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    if mode not in ("whole", "slide"):
        raise UserError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if flip_merge not in ("logits", "probs"):
        raise UserError(f"flip_merge must be 'logits' or 'probs', got {flip_merge!r}")
    out_size = _as_pair(out_size, "out_size") or tuple(images.shape[-2:])
    crop = _as_pair(crop_size, "crop_size")
    step = _as_pair(stride, "stride")
    if mode == "slide":
        if crop is None:
            raise UserError("slide inference needs crop_size")
        step = step or (-(-2 * crop[0] // 3), -(-2 * crop[1] // 3))
    logits = _single(model, images, mode, crop, step, batch_windows, out_size)
    if not flip:
        return logits
    flipped = _single(model, images.flip(-1), mode, crop, step, batch_windows, out_size).flip(-1)
    if flip_merge == "logits":
        return (logits + flipped) / 2
    probs = (logits.float().softmax(1) + flipped.float().softmax(1)) / 2
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def sliding_window_mode(crop_size, stride=None, batch_windows: int = 8):
    """An inference mode for the training step (``Objective.inference_modes``): sliding-window logits
    at the input's resolution, windows of ``crop_size`` at ``stride`` (default two thirds of the crop)."""
    crop = _as_pair(crop_size, "crop_size")
    if crop is None:
        raise UserError("slide inference needs crop_size")
    step = _as_pair(stride, "stride") or (-(-2 * crop[0] // 3), -(-2 * crop[1] // 3))

    def run(model: nn.Module, images: Tensor) -> Tensor:
        return _slide(model, images, crop, step, batch_windows)

    return run
