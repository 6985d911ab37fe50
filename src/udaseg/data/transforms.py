"""The paired image / label pipeline: resize -> random crop -> flip -> normalise -> pad.

It follows the mmseg training pipeline the papers' code uses:

* ``Resize(img_scale=(W, H), keep_ratio=True)`` scales the image by
  ``s = min(max(W, H) / long_side, min(W, H) / short_side)``, so that it fits in the rectangle with
  the given long and short sides; new sizes are ``int(w * s + 0.5)``. Images are resized
  bilinearly (half-pixel centres, no anti-aliasing, as OpenCV), labels by nearest neighbour with
  OpenCV's ``floor(dst * src / dst_size)`` index rule.
* ``RandomCrop(crop_size, cat_max_ratio)``: a box offset uniform over ``[0, H-h] × [0, W-w]``; when
  ``cat_max_ratio < 1`` the box is re-drawn up to 10 times until the crop holds at least two classes
  and the largest class (ignoring 255) covers less than ``cat_max_ratio`` of the labelled pixels.
* ``RandomFlip(0.5)`` horizontally; ``Normalize(mean, std)`` in 0-255 units; ``Pad`` to the crop
  size at the bottom / right with 0 (image) and 255 (label) when the image is smaller.
* ``normalization="per_image"`` (not in the papers' pipelines) replaces the fixed ``mean``/``std``
  by each image's own per-channel mean and standard deviation, taken over the whole resized image
  before cropping, so a crop and the full image at test time are normalised alike.

Extra inputs follow the image: ``extra_images`` (e.g. Dark Zurich's paired day image) are resized
to the image's size, cropped, flipped and normalised the same way; ``extra_maps`` (per-pixel
integer or float maps) are resized by nearest neighbour, cropped and flipped with the same box.

All randomness comes from torch's global RNG, so data-loader seeding decides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from udaseg.data.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from udaseg.config.schema import DatasetConfig

CROP_TRIES = 10


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def rescale_size(width: int, height: int, scale: Sequence[int], keep_ratio: bool = True) -> tuple[int, int]:
    """The ``(width, height)`` an image of ``width × height`` gets for ``scale = (W, H)``."""
    if not keep_ratio:
        return int(scale[0]), int(scale[1])
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a ``C×H×W`` image tensor holding 0-255 values.

    ``uint8`` input stays ``uint8`` (torch's integer kernel, several times faster); float input is
    rounded to whole values, as an 8-bit resize would give.
    """
    if image.shape[-2:] == (height, width):
        return image
    if image.dtype == torch.uint8:
        batch = image[None].contiguous(memory_format=torch.channels_last)
        return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False)[0]
    out = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``H×W[×C]`` array (source index ``floor(i * H / height)``)."""
    src_h, src_w = array.shape[:2]
    if (src_h, src_w) == (height, width):
        return array
    rows = np.minimum((np.arange(height) * src_h) // height, src_h - 1)
    cols = np.minimum((np.arange(width) * src_w) // width, src_w - 1)
    return array[rows[:, None], cols[None, :]]


def draw_crop_box(height: int, width: int, crop_height: int, crop_width: int) -> CropBox:
    """A uniformly placed crop box; a crop larger than the image covers the whole image side."""
    margin_h = max(height - crop_height, 0)
    margin_w = max(width - crop_width, 0)
    top = int(torch.randint(0, margin_h + 1, ()).item())
    left = int(torch.randint(0, margin_w + 1, ()).item())
    return CropBox(top, left, min(crop_height, height), min(crop_width, width))


def largest_class_share(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> tuple[int, float]:
    """``(number of classes, share of the most frequent one)`` among the non-ignored pixels."""
    values = label.ravel()
    values = values[values != ignore_index]
    if values.size == 0:
        return 0, 1.0
    counts = np.bincount(values.astype(np.int64))
    counts = counts[counts > 0]
    return int(counts.size), float(counts.max() / counts.sum())


def random_crop_box(
    label: Optional[np.ndarray],
    height: int,
    width: int,
    crop_size: Sequence[int],
    cat_max_ratio: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> CropBox:
    """mmseg ``RandomCrop`` box for an image of ``height × width``; ``crop_size = (h, w)``.

    With a label and ``cat_max_ratio < 1`` the box is re-drawn up to ``CROP_TRIES`` times while the
    crop has fewer than two classes or a class share ``>= cat_max_ratio``; the last draw is kept.
    """
    box = draw_crop_box(height, width, int(crop_size[0]), int(crop_size[1]))
    if label is None or cat_max_ratio >= 1.0:
        return box
    for _ in range(CROP_TRIES):
        n_classes, share = largest_class_share(label[box.slices()], ignore_index)
        if n_classes > 1 and share < cat_max_ratio:
            break
        box = draw_crop_box(height, width, int(crop_size[0]), int(crop_size[1]))
    return box


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(image - mean) / std`` per channel on a float ``3×H×W`` tensor in 0-255 units."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image - mean_t) / std_t


# A flat channel (std 0) is divided by one grey level instead.
_MIN_IMAGE_STD = 1.0


def image_statistics(image: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a ``3×H×W`` image in 0-255 units.

    ``normalize(image, *image_statistics(image))`` standardises each channel to mean 0 and
    standard deviation 1 (a flat channel to 0).
    """
    flat = image.float().flatten(1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, correction=0).clamp_min(_MIN_IMAGE_STD)
    return mean.tolist(), std.tolist()


def _pad(tensor: torch.Tensor, height: int, width: int, value: float) -> torch.Tensor:
    pad_h = max(height - tensor.shape[-2], 0)
    pad_w = max(width - tensor.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=value)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H×W×3 uint8`` array -> ``3×H×W uint8`` tensor (a view, no copy)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be H×W×3, got shape {image.shape}")
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1)


def _map_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind in "uib":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    return torch.from_numpy(np.array(array, dtype=np.float32))


NORMALIZATIONS = ("fixed", "per_image")
PSEUDO_VALID_KEY = "pseudo_valid"


def pseudo_valid_map(size: Sequence[int], margins: Sequence[int]) -> np.ndarray:
    """``H×W`` uint8 map: 1 inside, 0 on the ``[top, bottom, left, right]`` pixel margins.

    The official ``valid_pseudo_mask``: made on the loaded image and then resized, cropped and
    flipped with it, so a crop's left/right columns are masked only where it touches the border.
    """
    height, width = int(size[0]), int(size[1])
    top, bottom, left, right = (int(v) for v in margins)
    valid = np.zeros((height, width), dtype=np.uint8)
    valid[top:max(height - bottom, top), left:max(width - right, left)] = 1
    return valid


class Pipeline:
    """Resize, random crop, flip, normalise and pad an image with its label and extra maps.

    ``Pipeline(...)(image, label)`` returns ``{"image": float32 3×H×W, "label": int64 H×W}``
    (``label`` only when one is given) plus one entry per extra image / map, and with
    ``pseudo_margins`` a bool ``H×W`` ``pseudo_valid`` (:func:`pseudo_valid_map`, transformed alike).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        resize: Optional[Sequence[int]] = None,
        keep_ratio: bool = True,
        crop_size: Optional[Sequence[int]] = None,
        cat_max_ratio: float = 1.0,
        flip: bool = False,
        ignore_index: int = IGNORE_INDEX,
        normalization: str = "fixed",
        pseudo_margins: Optional[Sequence[int]] = None,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.resize = tuple(int(v) for v in resize) if resize is not None else None
        self.keep_ratio = keep_ratio
        self.crop_size = tuple(int(v) for v in crop_size) if crop_size is not None else None
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip = flip
        self.ignore_index = ignore_index
        self.pseudo_margins = tuple(int(v) for v in pseudo_margins) if pseudo_margins is not None else None

    @classmethod
    def from_config(cls, cfg: "DatasetConfig", mean: Sequence[float], std: Sequence[float]) -> "Pipeline":
        return cls(mean, std, resize=cfg.resize, keep_ratio=cfg.keep_ratio, crop_size=cfg.crop_size,
                   cat_max_ratio=cfg.cat_max_ratio, flip=cfg.flip, normalization=cfg.normalization or "fixed",
                   pseudo_margins=cfg.pseudo_margins)

    def statistics(self, image: torch.Tensor) -> tuple[list[float], list[float]]:
        """The ``(mean, std)`` that normalise ``image``: the fixed ones, or the image's own."""
        if self.normalization == "per_image":
            return image_statistics(image)
        return self.mean, self.std

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize step."""
        if self.resize is None:
            return height, width
        new_w, new_h = rescale_size(width, height, self.resize, self.keep_ratio)
        return new_h, new_w

    def __call__(
        self,
        image: np.ndarray,
        label: Optional[np.ndarray] = None,
        extra_images: Optional[Mapping[str, np.ndarray]] = None,
        extra_maps: Optional[Mapping[str, np.ndarray]] = None,
        presized: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``presized``: the arrays already went through this pipeline's resize (a resized cache)."""
        if self.pseudo_margins is not None:
            valid = pseudo_valid_map(image.shape[:2], self.pseudo_margins)
            extra_maps = {**(extra_maps or {}), PSEUDO_VALID_KEY: valid}
        height, width = image.shape[:2] if presized else self.output_size(*image.shape[:2])
        img = resize_image(image_to_tensor(image), height, width)
        images = {"image": img}
        for key, extra in (extra_images or {}).items():
            images[key] = resize_image(image_to_tensor(extra), height, width)
        statistics = {key: self.statistics(tensor) for key, tensor in images.items()}
        maps: dict[str, np.ndarray] = {}
        if label is not None:
            maps["label"] = resize_nearest(label, height, width)
        for key, extra in (extra_maps or {}).items():
            maps[key] = resize_nearest(extra, height, width)

        if self.crop_size is not None:
            box = random_crop_box(maps.get("label"), height, width, self.crop_size, self.cat_max_ratio,
                                  self.ignore_index)
            rows, cols = box.slices()
            images = {k: v[:, rows, cols] for k, v in images.items()}
            maps = {k: v[rows, cols] for k, v in maps.items()}

        flipped = self.flip and bool(torch.rand(()) < 0.5)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in images.items():
            tensor = normalize(tensor.float(), *statistics[key])
            if flipped:
                tensor = tensor.flip(-1)
            out[key] = tensor.contiguous()
        for key, array in maps.items():
            tensor = _map_to_tensor(array)
            if flipped:
                tensor = tensor.flip(-1)
            out[key] = tensor.contiguous()

        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            for key in out:
                is_int_map = key in maps and not out[key].is_floating_point()
                out[key] = _pad(out[key], crop_h, crop_w, float(self.ignore_index) if is_int_map else 0.0)
        if PSEUDO_VALID_KEY in out:
            out[PSEUDO_VALID_KEY] = out[PSEUDO_VALID_KEY] == 1  # padding (255) is not valid
        return out
