"""Label maps brought down to a feature grid.

:func:`downscale_label_ratio` is DAFormer's majority-ratio rule (spec sepico §1.3), used for the
contrastive losses, the class statistics and the ImageNet feature distance:

1. map the ignore value to an extra class K and one-hot the labels into K + 1 channels;
2. average-pool with kernel = stride = s, giving each cell's class fractions;
3. the cell takes the argmax class; it becomes ``ignore`` when that is the extra class or when its
   fraction is below ``min_ratio``.

So a cell keeps a label only if one real class covers at least ``min_ratio`` of its s×s block.
Cells are the ⌊H/s⌋×⌊W/s⌋ full blocks (trailing rows/columns are dropped, as avg-pooling does).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _split_channel(labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if labels.dim() == 4 and labels.shape[1] == 1:
        return labels[:, 0], True
    if labels.dim() != 3:
        raise ValueError(f"labels must be B×H×W (or B×1×H×W), got shape {tuple(labels.shape)}")
    return labels, False


def _block_class_counts(labels: torch.Tensor, scale: int, classes: int) -> torch.Tensor:
    """B×H×W labels in [0, classes) -> B×⌊H/s⌋×⌊W/s⌋×classes pixel counts per s×s block.

    One ``bincount`` over (block, class) keys: the same numbers as average-pooling a one-hot map,
    without materialising the B×classes×H×W float tensor.
    """
    batch, height, width = labels.shape
    h, w = height // scale, width // scale
    blocks = labels[:, : h * scale, : w * scale].reshape(batch, h, scale, w, scale)
    offsets = torch.arange(batch * h * w, device=labels.device).view(batch, h, 1, w, 1) * classes
    counts = torch.bincount((blocks + offsets).reshape(-1), minlength=batch * h * w * classes)
    return counts.view(batch, h, w, classes)


def downscale_label_ratio(
    labels: torch.Tensor,
    scale: int,
    min_ratio: float = 0.75,
    num_classes: int = 19,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Majority-ratio downsampling of B×H×W (or B×1×H×W) labels by an integer ``scale``.

    Returns int64 labels of shape B×⌊H/s⌋×⌊W/s⌋ (B×1×… when the input had the channel axis).
    Values outside [0, num_classes) other than ``ignore_index`` are an error.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    scale = int(scale)
    plain, had_channel = _split_channel(labels)
    plain = plain.long()
    extra = num_classes
    remapped = torch.where(plain == ignore_index, torch.full_like(plain, extra), plain)
    if remapped.numel():
        low, high = torch.aminmax(remapped)
        if bool((low < 0) | (high > extra)):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal {ignore_index}, "
                f"got range [{int(plain.min())}, {int(plain.max())}]"
            )
    counts = _block_class_counts(remapped, scale, extra + 1)
    best_count, best_class = counts.max(dim=-1)  # ties: the first (lowest) class, as on the pooled one-hot
    best_fraction = best_count.float() / float(scale * scale)
    rejected = (best_class == extra) | (best_fraction < min_ratio)
    out = torch.where(rejected, torch.full_like(best_class, ignore_index), best_class)
    return out.unsqueeze(1) if had_channel else out


def downscale_label_nearest(
    labels: torch.Tensor,
    scale: Optional[int] = None,
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Nearest-neighbour downsampling of B×H×W (or B×1×H×W) labels to ``size`` or by ``scale``.

    PyTorch's ``nearest`` mode picks source index ⌊i·H/h⌋, i.e. the top-left pixel of each block
    when H is a multiple of h. Give exactly one of ``scale`` (output ⌊H/s⌋×⌊W/s⌋) or ``size`` (h, w).
    """
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    plain, had_channel = _split_channel(labels)
    height, width = plain.shape[-2:]
    if size is None:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        size = (height // int(scale), width // int(scale))
    out = F.interpolate(plain[:, None].float(), size=tuple(int(v) for v in size), mode="nearest")
    out = out[:, 0].to(plain.dtype)
    return out.unsqueeze(1) if had_channel else out


def downscale_label_majority(
    labels: torch.Tensor,
    scale: int,
    num_classes: int = 19,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Majority vote over each s×s block among the **valid** pixels (RCCR's cell labels, spec A14).

    A cell takes the most frequent real class of its block (ties: the lowest class index); it is
    ``ignore_index`` only when every pixel of the block is ignored. Unlike
    :func:`downscale_label_ratio` there is no minimum share and void pixels never win the vote.
    Returns int64 labels B×⌊H/s⌋×⌊W/s⌋ (B×1×… when the input had the channel axis).

    Example: a 2×2 block ``[[3, 255], [255, 255]]`` becomes 3; ``[[255, 255], [255, 255]]`` stays 255.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    scale = int(scale)
    plain, had_channel = _split_channel(labels)
    plain = plain.long()
    valid = plain != ignore_index
    if bool(((plain < 0) | (plain >= num_classes))[valid].any()):
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal {ignore_index}")
    one_hot = F.one_hot(torch.where(valid, plain, torch.zeros_like(plain)), num_classes).permute(0, 3, 1, 2)
    counts = F.avg_pool2d((one_hot * valid.unsqueeze(1)).float(), kernel_size=scale, stride=scale)
    best_count, best_class = counts.max(dim=1)
    out = torch.where(best_count > 0, best_class, torch.full_like(best_class, ignore_index))
    return out.unsqueeze(1) if had_channel else out
