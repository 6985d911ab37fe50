"""AdaIN style translation with weights in the layout of the official release."""

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.adapt.translate import (AdaINTranslator, TranslationUnavailable, adain_decoder, adain_encoder,
                                    adaptive_instance_norm, build_translations)
from udaseg.errors import UserError

# Parameter names of the released vgg_normalised.pth (up to relu4_1) and decoder.pth, written out.
ENCODER_CONVS = [0, 2, 5, 9, 12, 16, 19, 22, 25, 29]
DECODER_CONVS = [1, 5, 8, 11, 14, 18, 21, 25, 28]


def _keys(indices):
    return {f"{i}.{p}" for i in indices for p in ("weight", "bias")}


def test_parameter_names_match_the_release():
    assert set(adain_encoder().state_dict()) == _keys(ENCODER_CONVS)
    assert set(adain_decoder().state_dict()) == _keys(DECODER_CONVS)


def test_adaptive_instance_norm_takes_the_style_statistics():
    gen = torch.Generator().manual_seed(0)
    content = torch.randn(2, 4, 6, 5, generator=gen)
    style = 3 * torch.randn(2, 4, 7, 7, generator=gen) + 1
    out = adaptive_instance_norm(content, style, eps=0)
    torch.testing.assert_close(out.mean((-2, -1)), style.mean((-2, -1)))
    torch.testing.assert_close(out.std((-2, -1)), style.std((-2, -1)))
    torch.testing.assert_close(adaptive_instance_norm(content, content, eps=0), content)


@pytest.fixture
def release(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights"
    weights.mkdir()
    encoder = adain_encoder().state_dict()
    encoder["32.weight"] = torch.zeros(512, 512, 3, 3)  # the release continues to relu5_4
    torch.save(encoder, weights / "vgg_normalised.pth")
    torch.save(adain_decoder().state_dict(), weights / "decoder.pth")
    styles = tmp_path / "styles"
    styles.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(styles / f"{i}.png")
    return weights, styles


def test_translation_keeps_type_shape_and_range_and_is_deterministic(release):
    weights, styles = release
    translator = AdaINTranslator(weights, styles)
    image = np.random.default_rng(5).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    a = translator(image, torch.Generator().manual_seed(1))
    b = translator(image, torch.Generator().manual_seed(1))
    assert a.shape == image.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    out = translator(tensor, torch.Generator().manual_seed(1))
    assert out.shape == tensor.shape and float(out.min()) >= 0 and float(out.max()) <= 255


def test_missing_style_images_skip_and_bad_weights_fail(release, tmp_path):
    weights, styles = release
    with pytest.raises(TranslationUnavailable, match="style images"):
        AdaINTranslator(weights)
    torch.save({"0.weight": torch.zeros(1)}, weights / "decoder.pth")
    with pytest.raises(UserError, match="decoder.pth does not hold the AdaIN network"):
        AdaINTranslator(weights, styles)
    translators, skipped = build_translations(["adain"], weights=str(weights))
    assert not translators and "style images" in skipped[0][1]
