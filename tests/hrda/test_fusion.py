"""HRDA's scale fusion against an explicit reference: training mask, order of upsampling, inference."""

import math

import torch

from udaseg.adapt.geometry import CropBox
from udaseg.models.hrda import fuse_scales


def upsample2_reference(x):
    """Bilinear x2, align_corners=False, written out: src = (o + 0.5) / 2 - 0.5, clamped at the border."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, 2 * h, 2 * w, dtype=torch.float64)

    def taps(o, n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        return i0, i1, src - i0

    for i in range(2 * h):
        y0, y1, ly = taps(i, h)
        for j in range(2 * w):
            x0, x1, lx = taps(j, w)
            out[:, :, i, j] = ((1 - ly) * (1 - lx) * x[:, :, y0, x0] + (1 - ly) * lx * x[:, :, y0, x1]
                               + ly * (1 - lx) * x[:, :, y1, x0] + ly * lx * x[:, :, y1, x1])
    return out


def _inputs(seed=0, classes=2, lr_size=6, hr_size=4):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(2, classes, lr_size, lr_size, generator=g, dtype=torch.float64)
    high = torch.randn(2, classes, hr_size, hr_size, generator=g, dtype=torch.float64)
    att = torch.rand(2, classes, lr_size, lr_size, generator=g, dtype=torch.float64)
    return low, high, att


def test_training_fusion_matches_the_explicit_reference():
    # Context crop 48x48 (context grid 6x6 at stride 8, fused grid 12x12 at stride 4);
    # detail box rows/cols [8, 24) = context cells [1, 3), detail cells [2, 6) holding a 4x4 prediction.
    low, high, att = _inputs()
    box = CropBox.from_corners(8, 24, 8, 24)
    fused, used = fuse_scales(low, high, att, box, output_stride=4, context_scale=0.5)

    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    for i in range(6):
        for j in range(6):
            mask[..., i, j] = 1.0 if (1 <= i < 3 and 1 <= j < 3) else 0.0
    masked_att = att * mask
    inserted = torch.zeros(2, 2, 12, 12, dtype=torch.float64)
    inserted[:, :, 2:6, 2:6] = high
    reference = upsample2_reference(masked_att) * inserted + upsample2_reference((1 - masked_att) * low)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(used, masked_att)


def test_outside_the_detail_region_the_prediction_is_pure_context():
    low, high, att = _inputs(1)
    fused, used = fuse_scales(low, high, att, CropBox.from_corners(8, 24, 8, 24), 4, 0.5)
    assert bool((used[..., 3:, :] == 0).all()) and bool((used[..., :, 3:] == 0).all())
    up_low = upsample2_reference(low)
    # Fused pixels whose bilinear taps are all outside the region (rows/cols >= 7) are exactly the context.
    torch.testing.assert_close(fused[..., 7:, :], up_low[..., 7:, :], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[..., :, 7:], up_low[..., :, 7:], rtol=1e-12, atol=1e-12)


def test_context_is_weighted_before_it_is_upsampled():
    low, high, att = _inputs(2)
    box = CropBox.from_corners(8, 24, 8, 24)
    fused, used = fuse_scales(low, high, att, box, 4, 0.5)
    inserted = torch.zeros(2, 2, 12, 12, dtype=torch.float64)
    inserted[:, :, 2:6, 2:6] = high
    upsample_first = upsample2_reference(used) * inserted + (1 - upsample2_reference(used)) * upsample2_reference(low)
    assert not torch.allclose(fused, upsample_first)  # the seam at the region border differs


def test_inference_fusion_is_unmasked_over_the_whole_crop():
    low, _, att = _inputs(3)
    canvas = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    fused, used = fuse_scales(low, canvas, att, None, 4, 0.5)
    reference = upsample2_reference(att) * canvas + upsample2_reference((1 - att) * low)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    assert used is att


def test_class_agnostic_attention_broadcasts_over_classes():
    low, high, _ = _inputs(4, classes=3)
    att = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    fused, _ = fuse_scales(low, high, att, CropBox.from_corners(8, 24, 8, 24), 4, 0.5)
    per_class, _ = fuse_scales(low, high, att.expand(2, 3, 6, 6), CropBox.from_corners(8, 24, 8, 24), 4, 0.5)
    torch.testing.assert_close(fused, per_class)
