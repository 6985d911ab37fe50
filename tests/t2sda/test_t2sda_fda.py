import pytest
import torch

from udaseg.adapt.fda import fda_translate, fda_translate_normalised, low_frequency_mask
from udaseg.errors import UserError


def _mid_range_images(seed, batch=2, height=24, width=40):
    """Images around 128 with small variation, so the translated result never needs clipping."""
    g = torch.Generator().manual_seed(seed)
    return 128 + 20 * (torch.rand(batch, 3, height, width, generator=g, dtype=torch.float64) - 0.5)


def _expected_spectrum(source, target, mask_shifted):
    spec_src, spec_tgt = torch.fft.fft2(source), torch.fft.fft2(target)
    amp_src = torch.fft.fftshift(spec_src.abs(), dim=(-2, -1))
    amp_tgt = torch.fft.fftshift(spec_tgt.abs(), dim=(-2, -1))
    amp = torch.fft.ifftshift(torch.where(mask_shifted, amp_tgt, amp_src), dim=(-2, -1))
    return amp, spec_src.angle()


def test_beta_zero_is_identity():
    src, tgt = _mid_range_images(0), _mid_range_images(1)
    assert torch.allclose(fda_translate(src, tgt, beta=0.0), src)
    assert torch.allclose(fda_translate(src.float(), tgt.float(), beta=0.0, window="paper"), src.float())


@pytest.mark.parametrize("window", ["official", "paper"])
def test_low_frequency_amplitude_from_target_and_phase_from_source(window):
    src, tgt = _mid_range_images(2), _mid_range_images(3)
    beta = 0.1
    out = fda_translate(src, tgt, beta=beta, window=window, clip=False)
    mask = low_frequency_mask(24, 40, beta, window)
    expected_amp, source_phase = _expected_spectrum(src, tgt, mask)
    spec_out = torch.fft.fft2(out)
    assert torch.allclose(spec_out.abs(), expected_amp, atol=1e-6)
    significant = expected_amp > 1e-6
    phase_diff = torch.angle(spec_out * torch.exp(-1j * source_phase))
    assert phase_diff[significant].abs().max() < 1e-6
    # Inside the window the amplitude is the target's and differs from the source's.
    shifted_out = torch.fft.fftshift(spec_out.abs(), dim=(-2, -1))
    shifted_src = torch.fft.fftshift(torch.fft.fft2(src).abs(), dim=(-2, -1))
    shifted_tgt = torch.fft.fftshift(torch.fft.fft2(tgt).abs(), dim=(-2, -1))
    assert torch.allclose(shifted_out[..., mask], shifted_tgt[..., mask], atol=1e-6)
    assert torch.allclose(shifted_out[..., ~mask], shifted_src[..., ~mask], atol=1e-6)
    assert not torch.allclose(shifted_out[..., mask], shifted_src[..., mask])
    # Mid-range images: clipping does not change anything.
    assert torch.allclose(fda_translate(src, tgt, beta=beta, window=window), out)


def test_official_window_is_11_by_11_for_1024x512():
    mask = low_frequency_mask(512, 1024, 0.01, "official")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert mask.sum() == 121
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (251, 261, 507, 517)


def test_paper_window_is_a_rectangle():
    mask = low_frequency_mask(512, 1024, 0.01, "paper")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (11, 21)
    assert mask.sum() == 11 * 21


def test_shape_dtype_and_range_kept_with_extreme_inputs():
    g = torch.Generator().manual_seed(4)
    src = (torch.rand(3, 3, 16, 20, generator=g) > 0.5).float() * 255
    tgt = torch.rand(3, 3, 16, 20, generator=g) * 255
    out = fda_translate(src, tgt, beta=0.2)
    assert out.shape == src.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, src)


def test_target_batch_of_one_is_broadcast():
    src, tgt = _mid_range_images(5, batch=3), _mid_range_images(6, batch=1)
    out = fda_translate(src, tgt, beta=0.1)
    for i in range(3):
        assert torch.allclose(out[i], fda_translate(src[i:i + 1], tgt, beta=0.1)[0])


def test_normalised_helper_round_trips():
    src, tgt = _mid_range_images(7).float(), _mid_range_images(8).float()
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = fda_translate_normalised((src - m) / s, (tgt - m) / s, mean, std, beta=0.1)
    expected = (fda_translate(src, tgt, beta=0.1) - m) / s
    assert torch.allclose(out, expected, atol=1e-4)


def test_user_errors():
    src = torch.zeros(1, 3, 8, 8)
    with pytest.raises(UserError, match="same size"):
        fda_translate(src, torch.zeros(1, 3, 8, 9))
    with pytest.raises(UserError, match="beta"):
        fda_translate(src, src, beta=0.7)
    with pytest.raises(UserError, match="window"):
        fda_translate(src, src, beta=0.1, window="round")
