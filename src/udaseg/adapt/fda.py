"""Fourier Domain Adaptation (FDA, Yang & Soatto, CVPR 2020): batched, on the tensors' device.

FDA gives a source image the "style" of a target image by replacing the low-frequency part of its
amplitude spectrum with the target's, keeping the source phase (T2S-DA Eq. 6-8):

    T(x^s) = F^-1[ M_beta * |F(x^t)| + (1 - M_beta) * |F(x^s)| ,  angle(F(x^s)) ]

per RGB channel, where ``M_beta`` is 1 on a window centred on the zero frequency of the
centre-shifted spectrum. Only the real part of the inverse transform is kept, then it is clipped
to [0, 255]. Because the result keeps the source phase, edges stay where they were: the output is
pixel-aligned with the source and inherits its label map.

Apply FDA to **raw 0-255 RGB, before mean/std normalisation** (the FDA authors report artefacts
when the images are normalised first). :func:`fda_translate_normalised` does the
denormalise -> FDA -> renormalise round trip for tensors that are already normalised.

Windows (``b`` is the half size, the window is ``2b+1`` wide, ``c = floor(size / 2)``):

- ``"official"`` (default, as in the official FDA code): a square with
  ``b = floor(beta * min(H, W))`` in both directions. For 1024x512 and beta=0.01: b=5, 11x11.
- ``"paper"``: the rectangle of Eq. 7, ``b_h = floor(beta * H)`` rows and ``b_w = floor(beta * W)``
  columns either side of the centre.

``beta = 0`` is the identity (an empty window). For ``beta > 0`` the window always holds at least
the zero frequency, so very small images still get the target's mean colour.

Example::

    >>> src = torch.rand(2, 3, 64, 128) * 255
    >>> tgt = torch.rand(2, 3, 64, 128) * 255
    >>> fda_translate(src, tgt, beta=0.05).shape
    torch.Size([2, 3, 64, 128])
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import torch
from torch import Tensor

from udaseg.errors import UserError

Window = Literal["official", "paper"]


def window_half_sizes(height: int, width: int, beta: float, window: Window = "official") -> tuple[int, int]:
    """Half sizes ``(b_h, b_w)`` of the low-frequency window; the window is ``(2b_h+1) x (2b_w+1)``."""
    if window == "official":
        b = math.floor(beta * min(height, width))
        return b, b
    if window == "paper":
        return math.floor(beta * height), math.floor(beta * width)
    raise UserError(f"fda window: unknown value {window!r} (choose 'official' or 'paper')")


def low_frequency_mask(height: int, width: int, beta: float, window: Window = "official",
                       device: Union[torch.device, str, None] = None) -> Tensor:
    """Boolean ``H x W`` mask of the window, laid out like the **centre-shifted** spectrum.

    Row ``floor(H/2)`` and column ``floor(W/2)`` hold the zero frequency after ``fftshift``.
    """
    _check_beta(beta)
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    if beta == 0:
        return mask
    b_h, b_w = window_half_sizes(height, width, beta, window)
    c_h, c_w = height // 2, width // 2
    mask[max(c_h - b_h, 0):c_h + b_h + 1, max(c_w - b_w, 0):c_w + b_w + 1] = True
    return mask


def fda_translate(source: Tensor, target: Tensor, beta: float = 0.01, window: Window = "official",
                  clip: bool = True) -> Tensor:
    """Give ``source`` the low-frequency amplitude of ``target``.

    Args:
        source: ``B x 3 x H x W`` (or ``3 x H x W``) RGB in 0-255, any float dtype.
        target: same size as ``source``; a batch of 1 is broadcast over the source batch.
        beta: window size as a fraction of the image size (0 = identity).
        window: ``"official"`` square or ``"paper"`` rectangle (see the module docstring).
        clip: clip the result to [0, 255] (turn off only to inspect the raw spectrum swap).

    Returns:
        A tensor of ``source``'s shape and dtype (float32 computation for half inputs).
    """
    _check_pair(source, target)
    _check_beta(beta)
    out_dtype = source.dtype if source.is_floating_point() else torch.float32
    if beta == 0:
        out = source.to(out_dtype, copy=True)
        return out.clamp(0, 255) if clip else out
    compute_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    src = source.to(compute_dtype)
    tgt = target.to(compute_dtype)
    height, width = src.shape[-2:]

    spec_src = torch.fft.fft2(src, dim=(-2, -1))
    spec_tgt = torch.fft.fft2(tgt, dim=(-2, -1))
    amp_src, phase_src = spec_src.abs(), spec_src.angle()
    amp_tgt = spec_tgt.abs()

    # The window is defined on the shifted spectrum; shifting it back lets us mix unshifted spectra.
    mask_shifted = low_frequency_mask(height, width, beta, window, device=src.device)
    mask = torch.fft.ifftshift(mask_shifted, dim=(-2, -1))
    amp = torch.where(mask, amp_tgt, amp_src)

    mixed = torch.polar(amp, phase_src)
    out = torch.fft.ifft2(mixed, dim=(-2, -1)).real
    if clip:
        out = out.clamp(0, 255)
    return out.to(out_dtype)


def fda_translate_normalised(source: Tensor, target: Tensor, mean: Sequence[float], std: Sequence[float],
                             beta: float = 0.01, window: Window = "official") -> Tensor:
    """FDA on tensors normalised as ``(x - mean) / std`` with ``mean``/``std`` in 0-255 units.

    Denormalises both images to 0-255, runs :func:`fda_translate` (with clipping) and normalises
    the result again.
    """
    mean_t = torch.as_tensor(mean, dtype=source.dtype, device=source.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=source.dtype, device=source.device).view(-1, 1, 1)
    if mean_t.numel() != 3 or std_t.numel() != 3:
        raise UserError(f"fda: mean and std need 3 values each, got {list(mean)} and {list(std)}")
    if bool((std_t <= 0).any()):
        raise UserError(f"fda: std must be positive, got {list(std)}")
    raw_src = source * std_t + mean_t
    raw_tgt = target * std_t.to(target.dtype) + mean_t.to(target.dtype)
    return (fda_translate(raw_src, raw_tgt, beta, window) - mean_t) / std_t


def _check_beta(beta: float) -> None:
    if not 0 <= beta < 0.5:
        raise UserError(f"fda beta: {beta} is out of range (expected 0 <= beta < 0.5; the usual value is 0.01)")


def _check_pair(source: Tensor, target: Tensor) -> None:
    if source.dim() not in (3, 4) or source.shape[-3] != 3:
        raise UserError(f"fda: expected RGB images shaped [B,3,H,W] or [3,H,W], got {tuple(source.shape)}")
    if source.shape[-2:] != target.shape[-2:] or target.shape[-3] != 3:
        raise UserError(
            f"fda: source {tuple(source.shape)} and target {tuple(target.shape)} must have the same size "
            "(crop the source to the target size before FDA)")
    if target.dim() == 4 and source.dim() == 4 and target.shape[0] not in (1, source.shape[0]):
        raise UserError(f"fda: target batch {target.shape[0]} does not match source batch {source.shape[0]}")
