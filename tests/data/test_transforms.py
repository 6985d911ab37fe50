import numpy as np
import pytest
import torch

from udaseg.config.schema import DatasetConfig
from udaseg.data.transforms import (
    CROP_TRIES,
    CropBox,
    Pipeline,
    largest_class_share,
    random_crop_box,
    rescale_size,
    resize_image,
    resize_nearest,
)

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def test_rescale_size_keep_ratio_matches_mmcv_rule():
    # GTA5 1914x1052 into (1280, 720): factor min(1280/1914, 720/1052) = 0.66875...
    assert rescale_size(1914, 1052, (1280, 720)) == (1280, int(1052 * 1280 / 1914 + 0.5))
    assert rescale_size(2048, 1024, (1024, 512)) == (1024, 512)
    # portrait image: the long image side fits the long side of the scale (1280), the short one 720
    assert rescale_size(600, 1200, (1280, 720)) == (640, 1280)
    assert rescale_size(1914, 1052, (640, 640), keep_ratio=False) == (640, 640)


def test_resize_nearest_uses_floor_rule():
    array = np.arange(20).reshape(4, 5)
    out = resize_nearest(array, 3, 7)
    for i in range(3):
        for j in range(7):
            assert out[i, j] == array[(i * 4) // 3, (j * 5) // 7]


def test_resize_image_bilinear_half_pixel():
    image = torch.tensor([[[0.0, 100.0], [200.0, 50.0]]])  # 1x2x2
    out = resize_image(image, 4, 4)
    # half-pixel centres: output pixel (0,0) maps to source (-0.25,-0.25) -> clamped to (0,0)
    assert out[0, 0, 0] == 0
    # output (1,1) maps to (0.25, 0.25): bilinear weights 0.75/0.25 on each axis
    expected = 0.75 * 0.75 * 0 + 0.75 * 0.25 * 100 + 0.25 * 0.75 * 200 + 0.25 * 0.25 * 50
    assert out[0, 1, 1] == round(expected)


def test_largest_class_share_ignores_255():
    label = np.array([[1, 1, 2, 255, 255, 255]], dtype=np.uint8)
    assert largest_class_share(label) == (2, pytest.approx(2 / 3))
    assert largest_class_share(np.full((2, 2), 255, np.uint8)) == (0, 1.0)


def test_crop_gives_up_after_ten_redraws():
    # a label where no box can be balanced: the last of CROP_TRIES + 1 draws is returned
    calls = []
    import udaseg.data.transforms as tf

    original = tf.draw_crop_box

    def counting(*args):
        calls.append(args)
        return original(*args)

    tf.draw_crop_box = counting
    try:
        random_crop_box(np.zeros((8, 8), np.uint8), 8, 8, (4, 4), cat_max_ratio=0.75)
    finally:
        tf.draw_crop_box = original
    assert len(calls) == CROP_TRIES + 1


def test_crop_rejects_unbalanced_boxes_until_balanced():
    # left half class 0, right half: columns alternate 1/2. A 4-wide crop left of column 8 is pure 0.
    label = np.zeros((4, 16), dtype=np.uint8)
    label[:, 8:] = np.tile([1, 2], 4)
    torch.manual_seed(3)
    accepted = 0
    for _ in range(50):
        box = random_crop_box(label, 4, 16, (4, 4), cat_max_ratio=0.75)
        n, share = largest_class_share(label[box.slices()])
        accepted += n > 1 and share < 0.75
    # without the rule a box is balanced with probability 6/13; with 11 draws almost always
    assert accepted >= 48


def test_crop_without_ratio_is_uniform_single_draw():
    torch.manual_seed(0)
    boxes = {random_crop_box(None, 5, 6, (3, 3)) for _ in range(200)}
    assert {(b.top, b.left) for b in boxes} == {(t, l) for t in range(3) for l in range(4)}
    assert all(b.height == 3 and b.width == 3 for b in boxes)


def test_pipeline_same_box_for_label_and_extras():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (20, 30)).astype(np.uint8)
    pipe = Pipeline(MEAN, STD, crop_size=(8, 10), cat_max_ratio=0.75, flip=True)
    torch.manual_seed(1)
    for _ in range(10):
        out = pipe(image, label, extra_images={"copy": image.copy()}, extra_maps={"map": label.copy(),
                                                                                    "pos": np.arange(600).reshape(20, 30)})
        assert out["image"].shape == (3, 8, 10) and out["label"].shape == (8, 10)
        assert torch.equal(out["copy"], out["image"])
        assert torch.equal(out["map"], out["label"])
        # the position map tells where the crop came from: the label must match the source there
        pos = out["pos"].numpy()
        np.testing.assert_array_equal(label.ravel()[pos], out["label"].numpy())
        restored = (out["image"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).round()
        np.testing.assert_array_equal(image.reshape(-1, 3)[pos].transpose(2, 0, 1), restored.numpy())


def test_pipeline_is_deterministic_under_manual_seed():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (30, 40)).astype(np.uint8)
    pipe = Pipeline(MEAN, STD, resize=(32, 24), crop_size=(16, 16), cat_max_ratio=0.75, flip=True)
    torch.manual_seed(7)
    first = [pipe(image, label) for _ in range(5)]
    torch.manual_seed(7)
    second = [pipe(image, label) for _ in range(5)]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not all(torch.equal(first[0]["label"], f["label"]) for f in first[1:])


def test_flip_happens_about_half_the_time_and_mirrors_both():
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    image[:, 0] = 255
    label = np.array([[1, 2, 3, 4], [1, 2, 3, 4]], dtype=np.uint8)
    pipe = Pipeline([0, 0, 0], [1, 1, 1], flip=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(200):
        out = pipe(image, label)
        flipped = out["label"][0, 0].item() == 4
        flips += flipped
        assert out["image"][0, 0, 3 if flipped else 0] == 255
    assert 70 < flips < 130


def test_normalise_and_types():
    image = np.full((3, 3, 3), 200, dtype=np.uint8)
    out = Pipeline(MEAN, STD)(image, np.zeros((3, 3), np.uint8))
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.int64
    assert torch.allclose(out["image"][:, 0, 0], (200 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_per_image_normalisation_uses_the_whole_image_statistics():
    rng = np.random.default_rng(3)
    image = (rng.random((12, 16, 3)) * np.array([40.0, 120.0, 250.0])).astype(np.uint8)
    image[..., 2] = 7  # a flat channel
    pixels = image.reshape(-1, 3).astype(np.float64)
    mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1.0)

    full = Pipeline(MEAN, STD, normalization="per_image")(image)["image"]
    expected = (image.astype(np.float64) - mean) / std
    np.testing.assert_allclose(full.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert torch.allclose(full[:2].flatten(1).mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(full[:2].flatten(1).std(1, correction=0), torch.ones(2), atol=1e-5)
    assert (full[2] == 0).all()

    # a crop keeps the full image's statistics, so it equals the same window of the full result
    torch.manual_seed(0)
    out = Pipeline(MEAN, STD, crop_size=(5, 6), normalization="per_image")(
        image, extra_maps={"pos": np.arange(12 * 16).reshape(12, 16)})
    rows, cols = np.unravel_index(out["pos"].numpy(), (12, 16))
    np.testing.assert_allclose(out["image"].numpy(), full.numpy()[:, rows, cols], atol=1e-6)
    with pytest.raises(ValueError, match="normalization"):
        Pipeline(MEAN, STD, normalization="per_batch")


def test_pad_when_crop_is_larger_than_image():
    image = np.full((4, 5, 3), 10, dtype=np.uint8)
    label = np.ones((4, 5), dtype=np.uint8)
    out = Pipeline([0, 0, 0], [1, 1, 1], crop_size=(6, 8))(image, label)
    assert out["image"].shape == (3, 6, 8) and out["label"].shape == (6, 8)
    assert (out["label"][4:] == 255).all() and (out["label"][:, 5:] == 255).all()
    assert (out["image"][:, 4:] == 0).all() and (out["label"][:4, :5] == 1).all()


def test_resize_brings_label_to_image_size():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    label = np.zeros((20, 30), dtype=np.uint8)  # GTA5 has a few labels of another size
    out = Pipeline(MEAN, STD, resize=(30, 20))(image, label)
    assert out["image"].shape == (3, 20, 30) and out["label"].shape == (20, 30)


def test_from_config():
    cfg = DatasetConfig(resize=[64, 32], crop_size=[16, 24], cat_max_ratio=0.5, flip=True)
    pipe = Pipeline.from_config(cfg, MEAN, STD)
    assert pipe.resize == (64, 32) and pipe.crop_size == (16, 24) and pipe.cat_max_ratio == 0.5 and pipe.flip
    assert pipe.normalization == "fixed"
    assert Pipeline.from_config(DatasetConfig(normalization="per_image"), MEAN, STD).normalization == "per_image"
    assert CropBox(1, 2, 3, 4).slices() == (slice(1, 4), slice(2, 6))


def test_uint8_resize_agrees_with_float_reference():
    image = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    fast = resize_image(tensor, 20, 31)
    reference = resize_image(tensor.float(), 20, 31)
    assert fast.dtype == torch.uint8 and fast.shape == (3, 20, 31)
    assert (fast.float() - reference).abs().max() <= 1
    out = Pipeline([0, 0, 0], [1, 1, 1], resize=(31, 20), keep_ratio=False)(image)
    assert torch.equal(out["image"], fast.float())


def test_predict_normalises_an_image_like_the_validation_pipeline(tmp_path):
    from PIL import Image

    from udaseg.config import load_config
    from udaseg.engine.commands import _prepare_image

    rng = np.random.default_rng(5)
    image = rng.integers(0, 80, (16, 20, 3), dtype=np.uint8)
    path = tmp_path / "dark.png"
    Image.fromarray(image).save(path)
    for preset in ("digits_dacs", "dacs_deeplabv2_gta2cs"):
        cfg = load_config(preset)
        spec = cfg.data.val[0]
        spec.resize, spec.crop_size = None, None
        tensor, rgb = _prepare_image(path, cfg)
        expected = Pipeline.from_config(spec, cfg.data.mean, cfg.data.std)(image)["image"]
        np.testing.assert_array_equal(rgb, image)
        assert torch.allclose(tensor, expected, atol=1e-5), preset
