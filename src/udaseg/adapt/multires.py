"""Multi-resolution crop geometry of HRDA (Hoyer, Dai, Van Gool; ECCV 2022).

HRDA trains on two views of the data loader's crop (the **context crop**, e.g. 1024×1024):

- the **context** (low-resolution) input: the whole crop resized by ``s_c = 0.5`` (bilinear,
  ``align_corners=False``; at exactly 0.5 this is 2×2 box averaging), e.g. 512×512;
- the **detail** (high-resolution) input: a ``h_d×w_d`` crop (512×512) of the full-resolution
  context crop at the box ``b_d = (y1, y1 + h_d, x1, x1 + w_d)``.

The offsets are multiples of ``k = s_c^-1 · o = 8`` (``o`` = 4, the output stride of the DAFormer
head), so that the box falls on whole cells of both the low-resolution (stride 8) and the detail
(stride 4) prediction grids:

    y1 = k · randint(0, max(1, (H − h_d + 1) // k)),     x1 likewise (drawn after y1)

so for ``H = 1024, h_d = 512``: ``y1 ∈ {0, 8, …, 504}``; the official code never reaches offset
512, i.e. the last 8 rows and columns are never inside a training detail crop. One box is drawn
per forward and shared by the whole batch; a crop the size of the context gives the full box.

Boxes are :class:`udaseg.adapt.geometry.CropBox` es in pixels of the full-resolution context
crop; ``box.scaled(1 / d)`` maps them onto a grid of stride ``d`` with truncation (the official
``scale_box``).

Example::

    >>> box = draw_detail_box(1024, 1024, (512, 512), 8, torch.Generator().manual_seed(0))
    >>> box.height, box.width, box.top % 8, box.top <= 504
    (512, 512, 0, True)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from udaseg.adapt.geometry import CropBox, random_crop_box
from udaseg.errors import UserError

DETAIL_CROP_KEY = "model.options.detail_crop_size"


def check_detail_crop(context_size: Sequence[int], detail_size: Sequence[int], key: str = DETAIL_CROP_KEY) -> None:
    """One-line ``UserError`` naming ``key`` when the detail crop does not fit into the context crop."""
    (ch, cw), (dh, dw) = (int(v) for v in context_size), (int(v) for v in detail_size)
    if dh < 1 or dw < 1:
        raise UserError(f"config key '{key}' must be two positive ints, got [{dh}, {dw}]")
    if dh > ch or dw > cw:
        raise UserError(f"config key '{key}' = [{dh}, {dw}] is larger than the {ch}x{cw} context crop; the detail "
                        "crop must fit inside it (HRDA: 512x512 detail crops of 1024x1024 context crops)")


def draw_detail_box(height: int, width: int, detail_size: Sequence[int], divisible: int = 8,
                    generator: Optional[torch.Generator] = None, key: str = DETAIL_CROP_KEY) -> CropBox:
    """A random detail box inside a ``height × width`` context crop, offsets multiples of ``divisible``.

    Draws from ``generator`` (CPU) or torch's global RNG: first the row offset, then the column
    (:func:`udaseg.adapt.geometry.random_crop_box`, after checking the sizes).
    """
    detail_h, detail_w = (int(v) for v in detail_size)
    check_detail_crop((height, width), (detail_h, detail_w), key)
    if divisible < 1:
        raise UserError(f"config key 'model.options.crop_divisible' must be >= 1, got {divisible}")
    return random_crop_box((height, width), (detail_h, detail_w), divisible, generator)


def context_downscale(images: Tensor, scale: float = 0.5) -> Tensor:
    """The context (low-resolution) input: bilinear resize by ``scale`` (``align_corners=False``)."""
    if scale == 1:
        return images
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)


def slide_boxes(height: int, width: int, window: Sequence[int], overlapping: bool = True) -> list[CropBox]:
    """The detail windows of HRDA's sliding inference over a ``height × width`` crop, row-major.

    Window ``h_d×w_d`` at stride ``h_d/2 × w_d/2`` (``overlapping``) or ``h_d×w_d``; the last window
    of a row/column is shifted back to end at the border (mmseg's placement). For 1024² crops and
    512² windows: offsets {0, 256, 512} per axis, 9 windows.
    """
    from udaseg.models.inference import window_grid

    window_h, window_w = (int(v) for v in window)
    stride = (max(window_h // 2, 1), max(window_w // 2, 1)) if overlapping else (window_h, window_w)
    return [CropBox.from_corners(*b) for b in window_grid(height, width, (window_h, window_w), stride)]
