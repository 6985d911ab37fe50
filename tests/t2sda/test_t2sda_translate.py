import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.adapt.fda import fda_translate
from udaseg.adapt.translate import (AdaINTranslator, CartoonTranslator, FDATranslator, RandomTranslation,
                                    StyleAugmentationTranslator, StyleStatisticsTranslator, TranslationUnavailable,
                                    WeatherTranslator, build_translations)
from udaseg.errors import UserError

H, W = 20, 28


def _image(seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, : W // 2] = (40, 90, 160)
    image[:, W // 2:] = (200, 170, 60)
    return np.clip(image + rng.integers(-20, 20, size=image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def reference_dir(tmp_path):
    folder = tmp_path / "styles"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 17, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((12, 40, 3), (250, 10, 10), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _translators(reference_dir):
    weather = [WeatherTranslator(kinds=(kind,)) for kind in WeatherTranslator.KINDS]
    return weather + [CartoonTranslator(iterations=1), StyleStatisticsTranslator(), FDATranslator(reference_dir, 0.1)]


def test_translations_keep_type_shape_dtype_and_range(reference_dir):
    image = _image()
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    for translator in _translators(reference_dir):
        out = translator(image, torch.Generator().manual_seed(0))
        assert isinstance(out, np.ndarray) and out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image), type(translator).__name__
        out_t = translator(tensor, torch.Generator().manual_seed(0))
        assert isinstance(out_t, torch.Tensor) and out_t.shape == tensor.shape and out_t.dtype == torch.float32
        assert out_t.min() >= 0 and out_t.max() <= 255
        # The uint8 and float paths compute the same thing.
        assert np.abs(out_t.permute(1, 2, 0).numpy() - out.astype(np.float32)).max() <= 0.51


def test_translations_are_deterministic_given_the_generator(reference_dir):
    image = _image(2)
    for translator in _translators(reference_dir):
        a = translator(image, torch.Generator().manual_seed(5))
        b = translator(image, torch.Generator().manual_seed(5))
        assert np.array_equal(a, b), type(translator).__name__
    random_ones = [WeatherTranslator(kinds=("fog",)), StyleStatisticsTranslator(), WeatherTranslator(kinds=("rain",))]
    for translator in random_ones:
        outputs = {translator(image, torch.Generator().manual_seed(s)).tobytes() for s in range(4)}
        assert len(outputs) > 1, type(translator).__name__


def test_style_statistics_translation_keeps_structure():
    image = _image(3)
    out = StyleStatisticsTranslator(mean_sigma=0.05, std_sigma=0.1)(image, torch.Generator().manual_seed(0))
    # An affine change per decorrelated channel keeps the two halves distinguishable and ordered per pixel
    # within a flat region: the left/right boundary is still the strongest horizontal edge.
    grey = out.astype(float).mean(axis=2)
    column_jumps = np.abs(np.diff(grey.mean(axis=0)))
    assert int(column_jumps.argmax()) == W // 2 - 1


def test_brightness_keeps_hue_ordering_and_brightens():
    image = _image(4)
    out = WeatherTranslator(severity=3, kinds=("brightness",))(image, torch.Generator().manual_seed(0))
    assert out.astype(int).sum() > image.astype(int).sum()
    assert np.array_equal(np.argmax(out[:, :3], axis=2), np.argmax(image[:, :3], axis=2))


def test_fda_translator_uses_a_reference_from_the_folder(reference_dir):
    image = _image(5)
    translator = FDATranslator(reference_dir, beta=0.1)
    assert [p.name for p in translator.references] == ["a.png", "b.jpg"]
    out = translator(image, torch.Generator().manual_seed(0))
    index = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(0)))
    reference = Image.open(translator.references[index]).convert("RGB").resize((W, H), Image.BILINEAR)
    source = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0)
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float32).copy()).permute(2, 0, 1).unsqueeze(0)
    expected = fda_translate(source, ref, beta=0.1)[0].permute(1, 2, 0).round().clamp(0, 255).numpy()
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_fda_translator_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FDATranslator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        FDATranslator(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    translator = FDATranslator(broken)
    with pytest.raises(UserError, match="x.png"):
        translator(_image(), torch.Generator().manual_seed(0))


def test_network_translators_need_weights(tmp_path):
    for cls in (AdaINTranslator, StyleAugmentationTranslator):
        with pytest.raises(TranslationUnavailable, match="needs weights"):
            cls()
        with pytest.raises(UserError, match="does not exist"):
            cls(tmp_path / "nothing")


def test_build_translations_reports_skips(reference_dir):
    translators, skipped = build_translations(["fda", "weather", "cartoon", "style_stats", "adain",
                                               "style_augmentation"])
    assert [type(t).__name__ for t in translators] == ["WeatherTranslator", "CartoonTranslator",
                                                        "StyleStatisticsTranslator"]
    assert [name for name, _ in skipped] == ["fda", "adain", "style_augmentation"]
    assert all(reason.startswith("skipped:") for _, reason in skipped)
    assert "needs weights" in dict(skipped)["adain"]
    translators, skipped = build_translations(["fda"], reference_dir=str(reference_dir))
    assert isinstance(translators[0], FDATranslator) and not skipped
    with pytest.raises(UserError, match="did you mean 'weather'"):
        build_translations(["wether"])
    with pytest.raises(UserError, match="does not exist"):
        build_translations(["fda"], reference_dir=str(reference_dir / "missing"))


class _Constant:
    def __init__(self, value):
        self.value = value

    def __call__(self, image, generator=None):
        return np.full_like(image, self.value)


def test_random_translation_picks_uniformly_and_deterministically():
    pick = RandomTranslation([_Constant(v) for v in (10, 20, 30)])
    g = torch.Generator().manual_seed(0)
    values = [int(pick(_image(), g)[0, 0, 0]) for _ in range(300)]
    counts = {v: values.count(v) for v in (10, 20, 30)}
    assert all(70 <= c <= 130 for c in counts.values()), counts
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [int(pick(_image(), g1)[0, 0, 0]) for _ in range(10)] == [int(pick(_image(), g2)[0, 0, 0]) for _ in range(10)]
    stored = RandomTranslation([_Constant(1), _Constant(2)], generator=torch.Generator().manual_seed(1))
    assert stored(_image()).shape == (H, W, 3)
    with pytest.raises(UserError, match="no translation"):
        RandomTranslation([])
