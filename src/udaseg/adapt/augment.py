"""Strong photometric augmentation of the DACS / DAFormer family: colour jitter and Gaussian blur.

Semantics follow kornia 0.5.8 as used by the official code (spec sepico §1.2.4), batched on the
images' device:

* The images are de-normalised to [0, 1] (mean/std in 0–255 units), jittered, re-normalised.
* Colour jitter with strength s, factors drawn **per image**:
  brightness  x ← clamp(x + b, 0, 1),            b ~ U(−s, s)
  contrast    x ← clamp(c·x, 0, 1),              c ~ U(max(0, 1 − s), 1 + s)
  saturation  S ← clamp(σ·S, 0, 1) in HSV,       σ ~ U(max(0, 1 − s), 1 + s)
  hue         H ← (H + 2π·h) mod 2π in HSV,      h ~ U(−s, s)
  The four operations run in a random order drawn **per image**.
* Gaussian blur with σ ~ U(σ_min, σ_max) drawn **per image**, kernel size per dimension
  k(D) = ⌊⌈0.1·D⌉ − 0.5 + (⌈0.1·D⌉ mod 2)⌋ (always odd; 63 for D = 640), reflect padding.
  Blur is linear with a normalised kernel, so it commutes with the per-channel normalisation.
* Whether jitter and blur run at all is decided once per iteration by
  :func:`draw_augmentation_flags` (official: jitter when u > 0.2, blur when u > 0.5).

The official code augments one mixed image at a time (a fresh kornia ``ColorJitter`` and a fresh
``np.random.uniform(0.15, 1.15)`` for each), so every image gets its own factors, op order and σ;
only the on/off flags are shared by the iteration. This module draws the same per-image quantities
for the whole batch at once.

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
    # per image, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue); a single
    # permutation (a flat list) applies to every image
    order: list[list[int]] | list[int]


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

    Draw order: brightness, contrast, saturation, hue (B values each), then one op order per image.
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
    order = [torch.randperm(4, generator=generator).tolist() for _ in range(batch_size)]
    return JitterParams(brightness, contrast, saturation, hue, order)


def sample_blur_sigmas(batch_size: int, sigma_range: Sequence[float] = (0.15, 1.15),
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One σ ~ U(σ_min, σ_max) per image (float64, CPU)."""
    low, high = (float(v) for v in sigma_range)
    return low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float64)


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


def _orders_per_image(order: list, batch_size: int) -> list[tuple[int, ...]]:
    if order and isinstance(order[0], int):
        return [tuple(order)] * batch_size
    if len(order) != batch_size:
        raise ValueError(f"expected one jitter order per image ({batch_size}), got {len(order)}")
    return [tuple(o) for o in order]


def _jitter_in_order(images01: torch.Tensor, params: JitterParams, order: Sequence[int],
                     index: torch.Tensor) -> torch.Tensor:
    ops = (
        lambda x: adjust_brightness(x, params.brightness[index]),
        lambda x: adjust_contrast(x, params.contrast[index]),
        lambda x: adjust_saturation(x, params.saturation[index]),
        lambda x: adjust_hue(x, params.hue[index]),
    )
    out = images01
    for op in order:
        out = ops[op](out)
    return out


def apply_color_jitter(images01: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Apply brightness/contrast/saturation/hue to B×3×H×W images in [0, 1], each image in its own
    ``params.order`` (images that share an order are processed together)."""
    orders = _orders_per_image(params.order, images01.shape[0])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, order in enumerate(orders):
        groups.setdefault(order, []).append(i)
    if len(groups) == 1:
        return _jitter_in_order(images01, params, orders[0], torch.arange(images01.shape[0]))
    out = torch.empty_like(images01)
    for order, members in groups.items():
        index = torch.tensor(members)
        out[index.to(images01.device)] = _jitter_in_order(images01[index.to(images01.device)], params, order, index)
    return out


def _gaussian_windows(size: int, sigmas: torch.Tensor, device, dtype) -> torch.Tensor:
    """``len(sigmas) × size`` normalised Gaussian windows centred at size // 2."""
    offsets = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    windows = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigmas.to(device)[:, None] ** 2))
    return (windows / windows.sum(dim=1, keepdim=True)).to(dtype)


def gaussian_blur(images: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    """Separable Gaussian blur of B×C×H×W images with the official kernel size and reflect padding.

    ``sigma`` is one float for the batch or a tensor of B values, one per image.
    """
    batch, channels, height, width = images.shape
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if sigmas.numel() == 1:
        sigmas = sigmas.expand(batch)
    if sigmas.numel() != batch:
        raise ValueError(f"expected one blur sigma or {batch}, got {sigmas.numel()}")
    size_y, size_x = blur_kernel_size(height), blur_kernel_size(width)
    # one depth-wise kernel per (image, channel): fold the batch into the channels
    kernel_y = _gaussian_windows(size_y, sigmas, images.device, images.dtype).repeat_interleave(channels, dim=0)
    kernel_x = _gaussian_windows(size_x, sigmas, images.device, images.dtype).repeat_interleave(channels, dim=0)
    folded = images.reshape(1, batch * channels, height, width)
    padded = F.pad(folded, (size_x // 2, size_x // 2, size_y // 2, size_y // 2), mode="reflect")
    out = F.conv2d(padded, kernel_y.view(-1, 1, size_y, 1), groups=batch * channels)
    out = F.conv2d(out, kernel_x.view(-1, 1, 1, size_x), groups=batch * channels)
    return out.reshape(batch, channels, height, width)


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
        blur_sigma: (σ_min, σ_max); σ is drawn per image.
        generator: CPU generator for the jitter factors, op orders and σs; ``None``: global RNG.

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
        out = gaussian_blur(out, sample_blur_sigmas(images.shape[0], blur_sigma, generator))
    return out
