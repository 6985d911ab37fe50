import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.augment import (
    JitterParams,
    apply_color_jitter,
    blur_kernel_size,
    denormalize,
    draw_augmentation_flags,
    gaussian_blur,
    hsv_to_rgb,
    normalize,
    rgb_to_hsv,
    sample_blur_sigmas,
    sample_jitter_params,
    strong_augment,
)

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def _constant(rgb, batch=1, size=4):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def test_identity_when_both_flags_off():
    images = torch.randn(2, 3, 8, 8)
    out = strong_augment(images, MEAN, STD, apply_jitter=False, apply_blur=False)
    assert torch.equal(out, images)


def test_shape_preserved_and_normalisation_round_trip():
    images = normalize(torch.rand(2, 3, 20, 24), MEAN, STD)
    generator = torch.Generator().manual_seed(0)
    out = strong_augment(images, MEAN, STD, True, True, generator=generator)
    assert out.shape == images.shape
    back = denormalize(out, MEAN, STD)
    assert float(back.min()) >= -1e-5 and float(back.max()) <= 1 + 1e-5


def test_blur_kernel_size_formula():
    assert blur_kernel_size(640) == 63
    assert blur_kernel_size(512) == 51
    assert blur_kernel_size(1024) == 103
    for dim in range(1, 2000):
        tenth = math.ceil(0.1 * dim)
        assert blur_kernel_size(dim) == math.floor(tenth - 0.5 + tenth % 2)
        assert blur_kernel_size(dim) % 2 == 1


def test_brightness_on_constant_image():
    base = _constant([0.2, 0.5, 0.9], batch=2)
    params = JitterParams(
        brightness=torch.tensor([0.15, -0.3]),
        contrast=torch.ones(2),
        saturation=torch.ones(2),
        hue=torch.zeros(2),
        order=[0, 1, 2, 3],
    )
    out = apply_color_jitter(base, params)
    expected0 = torch.tensor([0.35, 0.65, 1.0])  # 0.9 + 0.15 clamps to 1
    expected1 = torch.tensor([0.0, 0.2, 0.6])
    assert torch.allclose(out[0, :, 0, 0], expected0, atol=1e-5)
    assert torch.allclose(out[1, :, 0, 0], expected1, atol=1e-5)


def test_hue_shift_on_constant_image():
    # Pure red (H = 0) rotated by 1/3 turn (2π/3 rad) becomes pure green; 2/3 turn blue.
    base = _constant([1.0, 0.0, 0.0], batch=3)
    params = JitterParams(torch.zeros(3), torch.ones(3), torch.ones(3), torch.tensor([1 / 3, 2 / 3, 1 / 6]), [3, 2, 1, 0])
    out = apply_color_jitter(base, params)[:, :, 0, 0]
    assert torch.allclose(out[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    assert torch.allclose(out[1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)
    assert torch.allclose(out[2], torch.tensor([1.0, 1.0, 0.0]), atol=1e-5)  # 60° -> yellow


def test_hue_formula_on_general_colour():
    # Compare against a plain per-pixel HSV rotation with Python's colorsys.
    import colorsys

    rgb = (0.8, 0.3, 0.1)
    shift = -0.12
    out = apply_color_jitter(
        _constant(list(rgb)), JitterParams(torch.zeros(1), torch.ones(1), torch.ones(1), torch.tensor([shift]), [3, 0, 1, 2])
    )[0, :, 0, 0]
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    expected = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_contrast_and_saturation():
    base = _constant([0.6, 0.4, 0.2])
    contrast = apply_color_jitter(base, JitterParams(torch.zeros(1), torch.tensor([1.5]), torch.ones(1), torch.zeros(1), [1, 0, 2, 3]))
    assert torch.allclose(contrast[0, :, 0, 0], torch.tensor([0.9, 0.6, 0.3]), atol=1e-5)
    gray = apply_color_jitter(base, JitterParams(torch.zeros(1), torch.ones(1), torch.tensor([0.0]), torch.zeros(1), [2, 0, 1, 3]))
    assert torch.allclose(gray[0, :, 0, 0], torch.full((3,), 0.6), atol=1e-5)  # S=0 keeps V


def test_hsv_round_trip():
    rgb = torch.rand(2, 3, 5, 5)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)


def test_strong_augment_reproduces_drawn_parameters():
    images01 = torch.rand(3, 3, 10, 10)
    images = normalize(images01, MEAN, STD)
    out = strong_augment(images, MEAN, STD, True, False, strength=0.2, generator=torch.Generator().manual_seed(5))
    params = sample_jitter_params(3, 0.2, torch.Generator().manual_seed(5))
    expected = normalize(apply_color_jitter(images01, params), MEAN, STD)
    assert torch.allclose(out, expected, atol=1e-4)
    assert all(sorted(order) == [0, 1, 2, 3] for order in params.order) and len(params.order) == 3
    assert bool((params.brightness.abs() <= 0.2).all())
    assert bool(((params.contrast >= 0.8) & (params.contrast <= 1.2)).all())
    assert len(set(params.brightness.tolist())) == 3  # drawn per image


def test_blur_matches_explicit_convolution():
    images = torch.rand(1, 2, 30, 50)
    sigma = 0.9
    out = gaussian_blur(images, sigma)
    ky, kx = blur_kernel_size(30), blur_kernel_size(50)
    assert (ky, kx) == (3, 5)

    def window(k):
        x = torch.arange(k, dtype=torch.float32) - k // 2
        w = torch.exp(-(x**2) / (2 * sigma**2))
        return w / w.sum()

    kernel2d = window(ky)[:, None] * window(kx)[None, :]
    padded = F.pad(images, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    expected = F.conv2d(padded, kernel2d.expand(2, 1, ky, kx), groups=2)
    assert torch.allclose(out, expected, atol=1e-5)
    constant = torch.full((1, 3, 30, 50), 0.3)
    assert torch.allclose(gaussian_blur(constant, 1.1), constant, atol=1e-6)


def test_blur_commutes_with_normalisation():
    images01 = torch.rand(1, 3, 30, 30)
    images = normalize(images01, MEAN, STD)
    out = strong_augment(images, MEAN, STD, False, True, generator=torch.Generator().manual_seed(1))
    sigma_gen = torch.Generator().manual_seed(1)
    sigma = 0.15 + float(torch.rand(1, generator=sigma_gen, dtype=torch.float64))
    expected = normalize(gaussian_blur(images01, sigma), MEAN, STD)
    assert torch.allclose(out, expected, atol=1e-4)


def test_flags_follow_thresholds():
    generator = torch.Generator().manual_seed(0)
    flags = [draw_augmentation_flags(generator) for _ in range(4000)]
    jitter_rate = sum(f.jitter for f in flags) / len(flags)
    blur_rate = sum(f.blur for f in flags) / len(flags)
    assert abs(jitter_rate - 0.8) < 0.03 and abs(blur_rate - 0.5) < 0.03
    reference = torch.Generator().manual_seed(7)
    u = torch.rand(2, generator=reference, dtype=torch.float64).tolist()
    got = draw_augmentation_flags(torch.Generator().manual_seed(7))
    assert got.jitter == (u[0] > 0.2) and got.blur == (u[1] > 0.5)


def test_strength_limit():
    with pytest.raises(ValueError):
        sample_jitter_params(1, 0.6)


def test_jitter_order_and_blur_sigma_are_drawn_per_image():
    """The official code augments one mixed image at a time: each gets its own order and sigma."""
    params = sample_jitter_params(64, 0.2, torch.Generator().manual_seed(0))
    assert len({tuple(order) for order in params.order}) > 5
    sigmas = sample_blur_sigmas(64, (0.15, 1.15), torch.Generator().manual_seed(0))
    assert sigmas.shape == (64,) and len(set(sigmas.tolist())) == 64
    assert bool(((sigmas >= 0.15) & (sigmas <= 1.15)).all())


def test_batched_strong_augment_equals_one_image_at_a_time():
    images01 = torch.rand(6, 3, 20, 24)
    images = normalize(images01, MEAN, STD)
    out = strong_augment(images, MEAN, STD, True, True, strength=0.2, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    params = sample_jitter_params(6, 0.2, replay)
    sigmas = sample_blur_sigmas(6, (0.15, 1.15), replay)
    assert len({tuple(order) for order in params.order}) > 1
    for i in range(6):
        one = JitterParams(params.brightness[i:i + 1], params.contrast[i:i + 1], params.saturation[i:i + 1],
                           params.hue[i:i + 1], params.order[i])
        expected = normalize(gaussian_blur(apply_color_jitter(images01[i:i + 1], one), float(sigmas[i])), MEAN, STD)
        assert torch.allclose(out[i:i + 1], expected, atol=1e-4), i


def test_blur_with_per_image_sigmas_equals_separate_blurs():
    images = torch.rand(3, 2, 30, 40)
    sigmas = torch.tensor([0.2, 0.7, 1.1], dtype=torch.float64)
    out = gaussian_blur(images, sigmas)
    for i in range(3):
        assert torch.allclose(out[i:i + 1], gaussian_blur(images[i:i + 1], float(sigmas[i])), atol=1e-6)
    assert not torch.allclose(out[0], out[2])
