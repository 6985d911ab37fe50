"""Random block masks of masked image consistency (MIC, Hoyer et al., CVPR 2023).

The image is split into a grid of ``b×b`` blocks. Per image and block one ``v ~ U(0, 1)`` is
drawn; the block is **kept** when ``v > r`` and masked otherwise, so on average a fraction ``r`` of
the blocks is masked (Bernoulli per block; no exact count per image). The mask is shared by the
channels and multiplies the **normalised** image:

    M[m·b:(m+1)·b, n·b:(n+1)·b] = [v_mn > r],        x^M = M ⊙ x

so a masked pixel becomes 0 in normalised space, i.e. the dataset mean colour, not black (the
official code masks the ImageNet-normalised tensor).

The official generator draws a ``round(H/b) × round(W/b)`` grid and resizes it (nearest) to
``H×W``; here ``b`` must divide the crop, which makes every block exactly ``b×b`` pixels. Presets
keep the official 16×16 grid: ``b = 64`` on 1024² crops (HRDA), ``b = 32`` on 512² crops
(DAFormer).

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> mask = block_mask(2, 64, 64, block_size=32, ratio=0.7, generator=g)
    >>> mask.shape, sorted(mask.unique().tolist()) in ([0.0], [1.0], [0.0, 1.0])
    (torch.Size([2, 1, 64, 64]), True)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from udaseg.errors import UserError


def check_block_size(height: int, width: int, block_size: int, key: str = "block_size") -> None:
    """Raise a one-line ``UserError`` naming ``key`` unless ``block_size`` divides ``height × width``."""
    if block_size < 1:
        raise UserError(f"config key '{key}' must be a positive number of pixels, got {block_size}")
    if height % block_size or width % block_size:
        raise UserError(f"config key '{key}' = {block_size} does not divide the {height}x{width} crop; "
                        f"choose a divisor of both sides (the official grid is 16x16 blocks: "
                        f"{max(height // 16, 1)} px for this crop)")


def check_mask_ratio(ratio: float, key: str = "mask_ratio") -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"config key '{key}' must lie in [0, 1) (the masked fraction), got {ratio}")


def block_mask(batch: int, height: int, width: int, block_size: int, ratio: float,
               generator: Optional[torch.Generator] = None, device: Union[str, torch.device, None] = None,
               key: str = "block_size") -> Tensor:
    """A float ``B×1×H×W`` mask of 0 (masked) and 1 (kept) blocks of ``block_size`` pixels.

    The uniforms are drawn on the CPU from ``generator`` (``B×1×(H/b)×(W/b)``, row-major), so the
    mask does not depend on the device.
    """
    check_block_size(height, width, block_size, key)
    check_mask_ratio(ratio)
    grid = torch.rand(batch, 1, height // block_size, width // block_size, generator=generator)
    kept = (grid > ratio).float()
    mask = kept.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return mask.to(device) if device is not None else mask


def mask_images(images: Tensor, block_size: int, ratio: float, generator: Optional[torch.Generator] = None,
                key: str = "block_size") -> tuple[Tensor, Tensor]:
    """Mask normalised ``B×C×H×W`` images with fresh block masks: ``(masked images, mask B×1×H×W)``."""
    if images.dim() != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    mask = block_mask(batch, height, width, block_size, ratio, generator, images.device, key).to(images.dtype)
    return images * mask, mask
