"""Typed view geometry: crop boxes and scales.

A :class:`CropBox` is a rectangle in the pixel grid of an image (``top``/``left`` offsets,
``height``/``width``). Views made by cropping (SePiCo's class-balanced target crop, HRDA's
detail crop) carry their box, and model outputs that cover only part of their input (HRDA's
high-resolution branch) carry theirs, so a loss can cut the matching labels without passing
coordinates around in untyped state.

Example::

    box = CropBox(top=8, left=16, height=32, width=32)
    box.crop(torch.zeros(2, 3, 64, 64)).shape   # (2, 3, 32, 32)
    box.scaled(0.25)                            # CropBox(top=2, left=4, height=8, width=8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from udaseg.config.schema import DataConfig


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.top < 0 or self.left < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid crop box {self}")

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    @classmethod
    def from_corners(cls, y1: int, y2: int, x1: int, x2: int) -> "CropBox":
        return cls(int(y1), int(x1), int(y2 - y1), int(x2 - x1))

    def corners(self) -> tuple[int, int, int, int]:
        """``(y1, y2, x1, x2)``, the order mmseg's crop helpers use."""
        return self.top, self.bottom, self.left, self.right

    def crop(self, tensor: Tensor) -> Tensor:
        """The box's region of the last two dimensions of ``tensor``."""
        if self.bottom > tensor.shape[-2] or self.right > tensor.shape[-1]:
            raise ValueError(f"{self} does not fit into a {tuple(tensor.shape[-2:])} grid")
        return tensor[..., self.top:self.bottom, self.left:self.right]

    def scaled(self, factor: float) -> "CropBox":
        """The same region on a grid resized by ``factor`` (coordinates truncated, as HRDA's code does)."""
        return CropBox(int(self.top * factor), int(self.left * factor),
                       max(1, int(self.height * factor)), max(1, int(self.width * factor)))

    def paste(self, canvas: Tensor, values: Tensor) -> Tensor:
        """A copy of ``canvas`` with ``values`` written into the box."""
        out = canvas.clone()
        out[..., self.top:self.bottom, self.left:self.right] = values
        return out


def random_crop_box(image_size: Sequence[int], crop_size: Sequence[int], divisible: int = 1,
                    generator: Optional[torch.Generator] = None) -> CropBox:
    """A random ``crop_size`` box inside ``image_size`` whose offsets are multiples of ``divisible``.

    Offsets follow HRDA's ``get_crop_bbox``: ``top = randint(0, (H − h + 1) // d) · d`` with the upper
    bound excluded (so for a 512 crop of 1024 with d = 8 the largest offset is 504, not 512); an
    image no larger than the crop gives offset 0. Drawn from ``generator``.
    """
    offsets = []
    for size, crop in zip(image_size, crop_size):
        choices = max((max(int(size) - int(crop), 0) + 1) // divisible, 1)
        offsets.append(int(torch.randint(0, choices, (1,), generator=generator)) * divisible)
    return CropBox(offsets[0], offsets[1], min(int(crop_size[0]), int(image_size[0])),
                   min(int(crop_size[1]), int(image_size[1])))


def require_crops_on_stride(data: "DataConfig", stride: int, reader: str) -> None:
    """Refuse source/target crop sizes that are not multiples of ``stride``.

    A head on a feature tap of that stride needs labels and cells that tile the crop exactly;
    ``reader`` names the setting that chose the tap, for the error message.
    """
    from udaseg.errors import UserError

    for name, spec in (("data.source", data.source), ("data.target", data.target)):
        crop = spec.crop_size if spec is not None else None
        if crop and (crop[0] % stride or crop[1] % stride):
            raise UserError(f"{name}.crop_size={list(crop)} is not a multiple of the stride {stride} of "
                            f"the feature tap that {reader} reads")
