"""Strong photometric augmentation of the DACS / DAFormer family: colour jitter and Gaussian blur.

Semantics follow kornia 0.5.8 as used by the official code (spec sepico §1.2.4), batched on the
images' device:

* The images are de-normalised to [0, 1] (mean/std in 0–255 units), jittered, re-normalised.
* Colour jitter with strength s, factors drawn **per image**:
  brightness  x ← clamp(x + b, 0, 1),            b ~ U(−s, s)
  contrast    x ← clamp(c·x, 0, 1),              c ~ U(max(0, 1 − s), 1 + s)
  saturation  S ← clamp(σ·S, 0, 1) in HSV,       σ ~ U(max(0, 1 − s), 1 + s)
  hue         H ← (H + 2π·h) mod 2π in HSV,      h ~ U(−s, s)
  The four operations run in one random order per call (shared by the batch).
* Gaussian blur with one σ ~ U(σ_min, σ_max) per call, kernel size per dimension
  k(D) = ⌊⌈0.1·D⌉ − 0.5 + (⌈0.1·D⌉ mod 2)⌋ (always odd; 63 for D = 640), reflect padding.
  Blur is linear with a normalised kernel, so it commutes with the per-channel normalisation.
* Whether jitter and blur run at all is decided once per iteration by
  :func:`draw_augmentation_flags` (official: jitter when u > 0.2, blur when u > 0.5).

Randomness: all draws use the ``generator`` argument (a CPU ``torch.Generator``) or, when it is
``None``, torch's global CPU RNG. Parameters are drawn on the CPU and moved to the images' device.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

TensorOrSeq = Union[torch.Tensor, Sequence[float]]


class AugmentationFlags(NamedTuple):
    jitter: bool
    blur: bool


class JitterParams(NamedTuple):
    brightness: torch.Tensor  # B additive shifts
    contrast: torch.Tensor  # B factors
    saturation: torch.Tensor  # B factors
    hue: torch.Tensor  # B shifts in units of a full turn (radians / 2π)
    order: list[int]  # permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)


def draw_augmentation_flags(
    generator: Optional[torch.Generator] = None, jitter_prob: float = 0.8, blur_prob: float = 0.5
) -> AugmentationFlags:
    """Per-iteration on/off decisions, shared by every strongly augmented view of that iteration.

    Two uniforms u_cj, u_bl ~ U(0, 1) are drawn (in this order); jitter is on when
    u_cj > 1 − jitter_prob and blur when u_bl > 1 − blur_prob. With the defaults this is the
    official u_cj > 0.2 and u_bl > 0.5.
    """
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    return AugmentationFlags(jitter=u[0] > 1.0 - jitter_prob, blur=u[1] > 1.0 - blur_prob)


def blur_kernel_size(dim: int) -> int:
    """k(D) = ⌊⌈0.1·D⌉ − 0.5 + (⌈0.1·D⌉ mod 2)⌋, the official (always odd) blur kernel size."""
    tenth = math.ceil(0.1 * dim)
    return int(math.floor(tenth - 0.5 + tenth % 2))


def _channel_stats(values: TensorOrSeq, like: torch.Tensor) -> torch.Tensor:
    stats = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return stats.reshape(1, -1, 1, 1)


def denormalize(images: torch.Tensor, mean: TensorOrSeq, std: TensorOrSeq) -> torch.Tensor:
    """(x·std + mean) / 255 — normalised images back to [0, 1] RGB (mean, std in 0–255 units)."""
    return (images * _channel_stats(std, images) + _channel_stats(mean, images)) / 255.0


def normalize(images01: torch.Tensor, mean: TensorOrSeq, std: TensorOrSeq) -> torch.Tensor:
    """(255·x − mean) / std — the inverse of :func:`denormalize`."""
    return (images01 * 255.0 - _channel_stats(mean, images01)) / _channel_stats(std, images01)


def rgb_to_hsv(rgb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """B×3×H×W RGB in [0, 1] -> HSV with H in [0, 2π), S and V in [0, 1] (kornia's convention)."""
    value, argmax = rgb.max(dim=1)
    delta = value - rgb.min(dim=1).values
    saturation = delta / (value + eps)
    safe_delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = rgb.unbind(dim=1)
    # Hue sector offset by which channel is the maximum: (g−b)/Δ, 2+(b−r)/Δ, 4+(r−g)/Δ.
    candidates = torch.stack(
        ((g - b) / safe_delta, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta), dim=1
    )
    hue6 = candidates.gather(1, argmax.unsqueeze(1)).squeeze(1)
    hue6 = torch.where(delta == 0, torch.zeros_like(hue6), hue6)
    hue = torch.remainder(hue6 / 6.0, 1.0) * (2.0 * math.pi)
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (closed form: c_n = V − V·S·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6H/2π) mod 6, n = 5, 3, 1 for R, G, B)."""
    hue, saturation, value = hsv.unbind(dim=1)
    hue6 = hue * (6.0 / (2.0 * math.pi))
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue6, 6.0)
        weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(value - value * saturation * weight)
    return torch.stack(channels, dim=1)


def sample_jitter_params(
    batch_size: int, strength: float = 0.2, generator: Optional[torch.Generator] = None
) -> JitterParams:
    """Draw the jitter factors of one call (kornia ColorJitter(s, s, s, s) ranges, per image).

    Draw order: brightness, contrast, saturation, hue (B values each), then the op order.
    """
    if not 0.0 <= strength <= 0.5:
        raise ValueError(f"colour jitter strength must lie in [0, 0.5] (hue limit), got {strength}")

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch_size, generator=generator)

    low = max(0.0, 1.0 - strength)
    brightness = uniform(-strength, strength)
    contrast = uniform(low, 1.0 + strength)
    saturation = uniform(low, 1.0 + strength)
    hue = uniform(-strength, strength)
    order = torch.randperm(4, generator=generator).tolist()
    return JitterParams(brightness, contrast, saturation, hue, order)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def adjust_brightness(images01: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.clamp(images01 + _per_image(shift, images01), 0.0, 1.0)


def adjust_contrast(images01: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.clamp(images01 * _per_image(factor, images01), 0.0, 1.0)


def adjust_saturation(images01: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(images01)
    hue, saturation, value = hsv.unbind(dim=1)
    saturation = torch.clamp(saturation * _per_image(factor, images01)[:, 0], 0.0, 1.0)
    return hsv_to_rgb(torch.stack((hue, saturation, value), dim=1))


def adjust_hue(images01: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by 2π·turns radians (per image)."""
    hsv = rgb_to_hsv(images01)
    hue, saturation, value = hsv.unbind(dim=1)
    hue = torch.remainder(hue + 2.0 * math.pi * _per_image(turns, images01)[:, 0], 2.0 * math.pi)
    return hsv_to_rgb(torch.stack((hue, saturation, value), dim=1))


def apply_color_jitter(images01: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Apply brightness/contrast/saturation/hue in ``params.order`` to B×3×H×W images in [0, 1]."""
    ops = (
        lambda x: adjust_brightness(x, params.brightness),
        lambda x: adjust_contrast(x, params.contrast),
        lambda x: adjust_saturation(x, params.saturation),
        lambda x: adjust_hue(x, params.hue),
    )
    out = images01
    for index in params.order:
        out = ops[index](out)
    return out


def gaussian_kernel1d(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian window of odd ``size`` centred at size // 2."""
    offsets = torch.arange(size, device=device, dtype=dtype) - size // 2
    window = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return window / window.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of B×C×H×W images with the official kernel size and reflect padding."""
    _, channels, height, width = images.shape
    size_y, size_x = blur_kernel_size(height), blur_kernel_size(width)
    kernel_y = gaussian_kernel1d(size_y, sigma, images.device, images.dtype)
    kernel_x = gaussian_kernel1d(size_x, sigma, images.device, images.dtype)
    padded = F.pad(images, (size_x // 2, size_x // 2, size_y // 2, size_y // 2), mode="reflect")
    out = F.conv2d(padded, kernel_y.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(out, kernel_x.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def strong_augment(
    images: torch.Tensor,
    mean: TensorOrSeq,
    std: TensorOrSeq,
    apply_jitter: bool,
    apply_blur: bool,
    strength: float = 0.2,
    blur_sigma: Sequence[float] = (0.15, 1.15),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Colour jitter then Gaussian blur of normalised B×3×H×W images (a new tensor).

    Args:
        images: ImageNet-normalised images (mean/std in 0–255 units).
        apply_jitter, apply_blur: the per-iteration flags from :func:`draw_augmentation_flags`.
        strength: s, the jitter strength (brightness = contrast = saturation = hue = s).
        blur_sigma: (σ_min, σ_max); σ is drawn once per call.
        generator: CPU generator for the jitter factors, op order and σ; ``None``: global RNG.

    With both flags off the input tensor is returned unchanged (it is never modified in place).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    out = images
    if apply_jitter:
        if images.shape[1] != 3:
            raise ValueError(f"colour jitter needs RGB images, got {images.shape[1]} channels")
        params = sample_jitter_params(images.shape[0], strength, generator)
        jittered = apply_color_jitter(denormalize(images, mean, std), params)
        out = normalize(jittered, mean, std)
    if apply_blur:
        low, high = (float(v) for v in blur_sigma)
        sigma = low + (high - low) * float(torch.rand(1, generator=generator, dtype=torch.float64))
        out = gaussian_blur(out, sigma)
    return out
