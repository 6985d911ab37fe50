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

Boxes are ``(y1, y2, x1, x2)`` in pixels of the full-resolution context crop. ``box.divided(d)``
maps them onto a grid of stride ``d`` with truncation (the official ``scale_box``).

Example::

    >>> box = draw_detail_box(1024, 1024, (512, 512), 8, torch.Generator().manual_seed(0))
    >>> box.height, box.width, box.y1 % 8, box.y1 <= 504
    (512, 512, 0, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from udaseg.errors import UserError

DETAIL_CROP_KEY = "model.options.detail_crop_size"


@dataclass(frozen=True)
class CropBox:
    """A box ``[y1, y2) × [x1, x2)`` in pixels."""

    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    def divided(self, divisor: float) -> "CropBox":
        """The box on a grid of stride ``divisor`` (coordinates truncated, as the official code)."""
        return CropBox(int(self.y1 / divisor), int(self.y2 / divisor), int(self.x1 / divisor), int(self.x2 / divisor))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.y1, self.y2, self.x1, self.x2


def crop(tensor: Tensor, box: CropBox) -> Tensor:
    """Crop the last two dimensions of a ``…×H×W`` tensor (images, labels, weights) to ``box``."""
    if tensor.dim() < 2:
        raise ValueError(f"can only crop tensors with spatial dimensions, got shape {tuple(tensor.shape)}")
    return tensor[..., box.y1:box.y2, box.x1:box.x2]


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

    Draws from ``generator`` (CPU) or torch's global RNG: first the row offset, then the column.
    """
    detail_h, detail_w = (int(v) for v in detail_size)
    check_detail_crop((height, width), (detail_h, detail_w), key)
    if divisible < 1:
        raise UserError(f"config key 'model.options.crop_divisible' must be >= 1, got {divisible}")
    if (detail_h, detail_w) == (height, width):
        return CropBox(0, height, 0, width)
    choices_h = max(1, (height - detail_h + 1) // divisible)
    choices_w = max(1, (width - detail_w + 1) // divisible)
    y1 = int(torch.randint(choices_h, (1,), generator=generator)) * divisible
    x1 = int(torch.randint(choices_w, (1,), generator=generator)) * divisible
    return CropBox(y1, y1 + detail_h, x1, x1 + detail_w)


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
    return [CropBox(*b) for b in window_grid(height, width, (window_h, window_w), stride)]
