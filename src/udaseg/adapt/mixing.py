"""Domain mixing masks: ClassMix (DACS) and CutMix squares.

Randomness: every draw goes through the ``generator`` argument (a CPU ``torch.Generator``); with
``generator=None`` torch's global (CPU) RNG is used. Masks are built on the labels' device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Number = Union[int, float]


def _as_bhw(labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() == 4 and labels.shape[1] == 1:
        return labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"labels must be B×H×W (or B×1×H×W), got shape {tuple(labels.shape)}")
    return labels


def class_mix_masks(
    source_labels: torch.Tensor, generator: Optional[torch.Generator] = None, exclude: Sequence[int] = ()
) -> torch.Tensor:
    """ClassMix masks M (B×H×W bool): True where the source pixel is pasted.

    DACS quirk kept on purpose: the candidate classes are the unique values of the **whole** source
    label batch (255 included when present), n of them. For every image ⌈n/2⌉ = (n + n mod 2)/2
    of them are drawn without replacement, and M_i = [y_s[i] ∈ chosen_i]. A chosen class absent from
    image i simply pastes nothing.

    ``exclude`` removes classes from the candidates before the draw (they are never pasted). The
    official rule excludes nothing; on scenes where one class (a background) covers most pixels, the
    rule pastes that class in about half of the images, which makes those mixes mostly source.

    Args:
        source_labels: B×H×W (or B×1×H×W) integer labels.
        generator: CPU generator for the class draws; ``None`` uses torch's global RNG.
        exclude: class values that may not be pasted (e.g. ``(0, 255)``).
    """
    labels = _as_bhw(source_labels)
    if labels.numel() == 0:
        raise ValueError("class_mix_masks needs a non-empty label batch")
    classes = torch.unique(labels)
    if exclude:
        classes = classes[~torch.isin(classes, torch.as_tensor(list(exclude), device=classes.device))]
    num_classes = classes.numel()
    if num_classes == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    num_chosen = (num_classes + num_classes % 2) // 2
    masks = []
    for label in labels:
        order = torch.randperm(num_classes, generator=generator)[:num_chosen]
        chosen = classes[order.to(classes.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)


def mix(
    mask: torch.Tensor,
    pasted: Union[torch.Tensor, Number],
    background: Union[torch.Tensor, Number],
) -> torch.Tensor:
    """M·a + (1 − M)·b for a binary mask, for images, labels or weight maps.

    Args:
        mask: B×H×W (bool or 0/1) — True takes ``pasted``.
        pasted: B×C×H×W images, B×H×W labels / weights, or a number (e.g. 1.0 for source weights).
        background: same kinds as ``pasted``.

    Returns a tensor of the broadcast shape; the dtype follows the tensor argument(s), so labels stay
    integer. Nothing is modified in place.
    """
    mask = mask.bool()
    reference = pasted if isinstance(pasted, torch.Tensor) else background
    if not isinstance(reference, torch.Tensor):
        raise TypeError("mix needs at least one tensor argument")
    if reference.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, pasted, background)


def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    area_ratio: Union[float, Sequence[float]] = 0.5,
    grid: int = 1,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square CutMix masks, one square per image, fully inside the H×W crop.

    The side is S = ⌊sqrt(r·H·W) / grid⌋·grid, capped by min(H, W) rounded down to the grid (at least
    one grid cell); the top-left corner is uniform over the multiples of ``grid`` that keep the
    square inside. With ``grid=8`` the square covers stride-8 feature cells exactly (RCCR: a 512 crop
    with r = 0.5 gives S = 360).

    Args:
        area_ratio: r, the square's share of the crop area; a float, or ``(r_min, r_max)`` to draw
            r uniformly per image.
        grid: side and corner are multiples of this.
        generator: CPU generator; ``None`` uses torch's global RNG.

    Returns:
        ``(masks, boxes)``: masks B×H×W bool (True inside the square) on ``device``, and boxes
        B×4 int64 ``(top, left, side, side)`` on the CPU.
    """
    if grid < 1 or height < grid or width < grid:
        raise ValueError(f"grid {grid} does not fit a {height}×{width} crop")
    if isinstance(area_ratio, (int, float)):
        ratios = torch.full((batch_size,), float(area_ratio))
    else:
        low, high = (float(v) for v in area_ratio)
        ratios = low + (high - low) * torch.rand(batch_size, generator=generator)
    if bool((ratios <= 0).any()) or bool((ratios > 1).any()):
        raise ValueError(f"area_ratio must lie in (0, 1], got {area_ratio}")
    max_side = (min(height, width) // grid) * grid
    boxes = torch.zeros(batch_size, 4, dtype=torch.long)
    masks = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    for i, ratio in enumerate(ratios.tolist()):
        side = int(math.sqrt(ratio * height * width) // grid) * grid
        side = min(max(side, grid), max_side)
        top_slots = (height - side) // grid + 1
        left_slots = (width - side) // grid + 1
        top = int(torch.randint(top_slots, (1,), generator=generator)) * grid
        left = int(torch.randint(left_slots, (1,), generator=generator)) * grid
        boxes[i] = torch.tensor([top, left, side, side])
        masks[i, top : top + side, left : left + side] = True
    return masks, boxes
