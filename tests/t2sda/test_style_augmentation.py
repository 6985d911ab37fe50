"""Style Augmentation: the networks in the layout of the release, the embedding sampler, the translator."""

import numpy as np
import pytest
import torch

from udaseg.adapt.style_augmentation import (RELEASE_FILES, STYLE_DIM, InceptionStylePredictor,
                                             StyleEmbeddingDistribution, StyleTransformer)
from udaseg.adapt.translate import StyleAugmentationTranslator, TranslationUnavailable, build_translations
from udaseg.errors import UserError


def test_transformer_parameter_names_follow_the_release():
    keys = set(StyleTransformer().state_dict())
    for i in range(3):  # plain conv + instance norm + ReLU
        assert {f"layers.{i}.conv.weight", f"layers.{i}.conv.bias"} <= keys
        assert f"layers.{i}.fc_beta.weight" not in keys
    for i in range(3, 8):
        for name in ("conv1", "conv2", "fc_beta1", "fc_gamma1", "fc_beta2", "fc_gamma2"):
            assert f"layers.{i}.{name}.weight" in keys
    for i in range(8, 11):
        assert {f"layers.{i}.conv.weight", f"layers.{i}.fc_beta.weight", f"layers.{i}.fc_gamma.bias"} <= keys
    assert len(keys) == 3 * 2 + 5 * 12 + 3 * 6
    assert StyleTransformer().state_dict()["layers.10.conv.weight"].shape == (3, 32, 9, 9)


def test_predictor_parameter_names_follow_inception_v3():
    state = InceptionStylePredictor().state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6a.branch3x3.conv.weight"].shape == (384, 288, 3, 3)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_6b.branch7x7_3.conv.weight"].shape == (192, 128, 7, 1)
    assert "Mixed_6e.branch7x7_2.bn.running_var" in state and state["fc.weight"].shape == (STYLE_DIM, 768)
    assert not any(k.startswith(("Mixed_7", "AuxLogits")) for k in state)


def test_predictor_preprocessing_matches_the_release_arithmetic():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = InceptionStylePredictor.preprocess(x)
    torch.testing.assert_close(out[:, :2], 2 * x[:, :2] - 1)
    blue = (x[:, 2] - 0.406) / 0.255 * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
    torch.testing.assert_close(out[:, 2], blue)


@torch.no_grad()
def test_predictor_and_transformer_shapes():
    torch.manual_seed(0)
    predictor = InceptionStylePredictor().eval()
    assert predictor(torch.rand(2, 3, 80, 96)).shape == (2, STYLE_DIM)
    transformer = StyleTransformer()
    style = torch.randn(2, STYLE_DIM)
    out = transformer(torch.rand(2, 3, 24, 32), style)
    assert out.shape == (2, 3, 24, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert transformer(torch.rand(1, 3, 21, 30), style[:1]).shape[-2:] == (24, 32)  # rounded up to multiples of 4


@torch.no_grad()
def test_style_modulation_uses_the_embedding():
    """Zero γ everywhere and β only through the bias: the output no longer depends on the image."""
    torch.manual_seed(0)
    transformer = StyleTransformer()
    for name, p in transformer.named_parameters():
        if ".fc_gamma" in name:
            p.zero_()
    style = torch.randn(1, STYLE_DIM)
    a = transformer(torch.rand(1, 3, 16, 16), style)
    b = transformer(torch.rand(1, 3, 16, 16), style)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, transformer(torch.rand(1, 3, 16, 16), torch.randn(1, STYLE_DIM)))


def test_embedding_distribution_has_the_given_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    root = torch.randn(STYLE_DIM, STYLE_DIM, generator=g) / 10
    covariance = root @ root.T
    mean = torch.randn(1, STYLE_DIM, generator=g)
    samples = StyleEmbeddingDistribution(mean, covariance).sample(20000, torch.Generator().manual_seed(1)).double()
    assert samples.shape == (20000, STYLE_DIM)
    assert (samples.mean(0) - mean[0]).abs().max() < 0.04  # about 5 standard errors
    assert (torch.cov(samples.T) - covariance).abs().max() < 0.05
    singular = torch.zeros(STYLE_DIM, STYLE_DIM)
    singular[0, 0] = 4.0
    drawn = StyleEmbeddingDistribution(mean, singular).sample(500, torch.Generator().manual_seed(2))
    assert torch.allclose(drawn[:, 1:], mean[:, 1:].expand(500, -1))
    assert 1.6 < float(drawn[:, 0].std()) < 2.4
    with pytest.raises(ValueError, match="does not match"):
        StyleEmbeddingDistribution(mean, torch.eye(3))


def _write_release(folder, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer, predictor = StyleTransformer(), InceptionStylePredictor()
    torch.save({"state_dict_ghiasi": transformer.state_dict()}, folder / RELEASE_FILES["transformer"][0])
    torch.save({"state_dict_stylepredictor": predictor.state_dict()}, folder / RELEASE_FILES["predictor"][0])
    torch.save({"pbn_embedding_mean": torch.randn(1, STYLE_DIM), "pbn_embedding_covariance": torch.eye(STYLE_DIM),
                "imagenet_embedding_mean": torch.randn(1, STYLE_DIM)}, folder / RELEASE_FILES["embeddings"][0])
    return transformer, predictor


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("styleaug")
    _write_release(folder)
    return folder


def test_translator_loads_the_release_and_keeps_type_shape_and_range(release):
    translator = StyleAugmentationTranslator(release)
    image = np.random.default_rng(0).integers(0, 255, (30, 22, 3), dtype=np.uint8)
    a = translator(image, torch.Generator().manual_seed(3))
    b = translator(image, torch.Generator().manual_seed(3))
    c = translator(image, torch.Generator().manual_seed(4))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    out = translator(tensor, torch.Generator().manual_seed(3))
    assert out.shape == tensor.shape and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 255


@torch.no_grad()
def test_translator_follows_the_style_interpolation(release):
    """alpha = 0 restyles with the image's own predicted embedding: the random draw no longer matters."""
    image = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    own = StyleAugmentationTranslator(release, alpha=0.0)
    assert np.array_equal(own(image, torch.Generator().manual_seed(0)), own(image, torch.Generator().manual_seed(1)))
    translator = StyleAugmentationTranslator(release, alpha=0.5)
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255
    generator = torch.Generator().manual_seed(7)
    random_style = translator.styles.sample(1, torch.Generator().manual_seed(7))
    probe = torch.nn.functional.interpolate(x, size=(75, 75), mode="bilinear", align_corners=False)
    expected = translator.transformer(x, 0.5 * random_style + 0.5 * translator.predictor(probe))
    torch.testing.assert_close(translator.apply(x, generator), expected)
    imagenet = StyleAugmentationTranslator(release, alpha=0.0, use_style_predictor=False)
    torch.testing.assert_close(imagenet.apply(x, None), translator.transformer(x, imagenet.imagenet_style))
    assert StyleAugmentationTranslator(release, downsamples=1)(image, torch.Generator()).shape == image.shape


def test_translator_reports_bad_release_files(tmp_path):
    with pytest.raises(TranslationUnavailable, match="needs weights"):
        StyleAugmentationTranslator()
    folder = tmp_path / "w"
    _write_release(folder)
    (folder / RELEASE_FILES["embeddings"][0]).unlink()
    with pytest.raises(UserError, match="checkpoint_embeddings.pth does not exist"):
        StyleAugmentationTranslator(folder)
    _write_release(folder)
    state = InceptionStylePredictor().state_dict()
    state["Mixed_7a.branch3x3_1.conv.weight"] = torch.zeros(1)  # extra entries are tolerated
    torch.save({"state_dict_stylepredictor": state}, folder / RELEASE_FILES["predictor"][0])
    StyleAugmentationTranslator(folder)
    torch.save({"state_dict": StyleTransformer().state_dict()}, folder / RELEASE_FILES["transformer"][0])
    with pytest.raises(UserError, match="no 'state_dict_ghiasi' entry"):
        StyleAugmentationTranslator(folder)
    torch.save({"state_dict_ghiasi": StyleTransformer(width=16).state_dict()}, folder / RELEASE_FILES["transformer"][0])
    with pytest.raises(UserError, match="does not hold the style-augmentation transformer .*mis-shaped"):
        StyleAugmentationTranslator(folder)
    _write_release(folder)
    (folder / RELEASE_FILES["predictor"][0]).write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot read .*checkpoint_stylepredictor.pth"):
        StyleAugmentationTranslator(folder)
    _write_release(folder)
    torch.save({"pbn_embedding_mean": torch.zeros(1, STYLE_DIM)}, folder / RELEASE_FILES["embeddings"][0])
    with pytest.raises(UserError, match="'pbn_embedding_covariance'"):
        StyleAugmentationTranslator(folder)


def test_build_translations_runs_style_augmentation_with_weights(release):
    translators, skipped = build_translations(["style_augmentation", "adain"], weights=str(release))
    assert [type(t).__name__ for t in translators] == ["StyleAugmentationTranslator"]
    assert [name for name, _ in skipped] == ["adain"]


def test_dg_preset_uses_style_augmentation_from_the_weights_folder(release):
    from udaseg.config import load_config
    from udaseg.methods import build_method
    from udaseg.models import build_model

    cfg = load_config("t2sda_dg_daformer_mitb5_gta", [
        "model.name=daformer_tiny", "model.num_classes=3", "model.pretrained=", "model.options={}",
        "method.t2sda.proj_dim=8", "method.t2sda.dg_translations=[weather, style_augmentation]",
        f"method.t2sda.dg_weights={release}"])
    pulling = build_method(cfg, build_model("daformer_tiny", 3)).objectives[-1]
    assert [type(t).__name__ for t in pulling.translator.translators] == ["WeatherTranslator",
                                                                          "StyleAugmentationTranslator"]
