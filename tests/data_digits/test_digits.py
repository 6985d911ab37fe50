"""The embedded digits benchmark: generation, splits, labels, cache, datasets and folder export."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from udaseg.config.schema import DatasetConfig
from udaseg.data import build_dataset
from udaseg.data import digits as D
from udaseg.errors import UserError

TINY = D.BenchmarkSize(train=40, val=10)
MEAN = [127.5, 127.5, 127.5]
STD = [64.0, 64.0, 64.0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A cache with every domain built once at the tiny size."""
    path = tmp_path_factory.mktemp("digits_cache")
    for domain in D.DOMAINS:
        D.load_split(domain, "train", 0, path, TINY)
    return path


def _luminance(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# ---------------------------------------------------------------- generation


def test_same_seed_same_arrays_and_other_seed_differs():
    for domain in D.DOMAINS:
        first = D.generate_split(domain, "val", 3, TINY)
        again = D.generate_split(domain, "val", 3, TINY)
        other = D.generate_split(domain, "val", 4, TINY)
        for key in D.DigitsSplit.ARRAYS:
            np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
        assert not np.array_equal(first.images, other.images)
        assert not np.array_equal(first.labels, other.labels)


def test_shapes_dtypes_and_label_values():
    data = D.generate_split("digits-photo", "train", 0, TINY)
    assert data.images.shape == (40, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (40, 64, 64) and data.labels.dtype == np.uint8
    values = set(np.unique(data.labels).tolist())
    assert values <= set(range(D.NUM_CLASSES)) | {D.IGNORE_INDEX}
    assert 0 in values and D.IGNORE_INDEX in values
    counts = (data.digit_index >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= D.MAX_DIGITS and counts.mean() >= 2.5


def test_labelled_classes_are_the_digits_placed_in_the_scene():
    _, targets = D.load_source_digits()
    data = D.generate_split("digits-clean", "train", 1, TINY)
    for labels, instances in zip(data.labels, data.digit_index):
        placed = {1 + int(targets[i]) for i in instances if i >= 0}
        present = set(np.unique(labels).tolist()) - {0, D.IGNORE_INDEX}
        assert present and present <= placed


def _reference_cubic_resize(digit: np.ndarray, size: int) -> np.ndarray:
    """Plain loops: out[i, j] = sum_{u, v} k(y_i - u) k(x_j - v) digit[u, v], Keys kernel a = -0.5."""

    def kernel(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return 1.5 * t**3 - 2.5 * t**2 + 1
        if t < 2:
            return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
        return 0.0

    n = digit.shape[0]
    out = np.zeros((size, size))
    for i in range(size):
        y = (i + 0.5) * n / size - 0.5
        for j in range(size):
            x = (j + 0.5) * n / size - 0.5
            out[i, j] = sum(kernel(y - u) * kernel(x - v) * digit[u, v] for u in range(n) for v in range(n))
    return np.clip(out, 0, 1)


def test_render_digit_matches_plain_bicubic_reference():
    digits, _ = D.load_source_digits()
    for index, size in [(0, 14), (5, 23)]:
        np.testing.assert_allclose(D.render_digit(digits[index], size),
                                   _reference_cubic_resize(digits[index], size), atol=1e-5)


def test_single_digit_labels_follow_the_stroke_thresholds():
    digits, targets = D.load_source_digits()
    rng = np.random.default_rng(0)
    pool = np.array([7])
    alpha, labels, instances = D.sample_layouts(rng, 3, pool, digits, targets, 64)
    assert (instances[:, 0] == 7).all()
    digit_label = 1 + int(targets[7])
    np.testing.assert_array_equal(labels == digit_label, alpha > D.LABEL_THRESHOLD)
    band = (alpha > D.IGNORE_THRESHOLD) & (alpha <= D.LABEL_THRESHOLD)
    np.testing.assert_array_equal(labels == D.IGNORE_INDEX, band)
    np.testing.assert_array_equal(labels == 0, alpha <= D.IGNORE_THRESHOLD)


def test_clean_labels_lie_on_dark_strokes(root):
    data = D.load_split("digits-clean", "val", 0, root, TINY)
    luminance = _luminance(data.images)
    for lum, labels in zip(luminance, data.labels):
        digit, background = lum[(labels > 0) & (labels < D.NUM_CLASSES)], lum[labels == 0]
        assert digit.mean() < background.mean() - 50
        assert (digit < background.mean()).mean() > 0.95


def test_photo_background_is_the_photo_crop(root):
    data = D.load_split("digits-photo", "val", 0, root, TINY)
    photos = D.load_photos()
    for image, labels, index, box in zip(data.images, data.labels, data.photo_index, data.photo_box):
        patch = np.asarray(Image.fromarray(photos[index]).resize((64, 64), Image.BILINEAR, box=tuple(box.tolist())))
        same = (image == patch).all(axis=-1)
        assert same[labels == 0].mean() > 0.7  # untouched wherever no stroke reaches
        # digits are the colour inversion: |patch - 255 a| with a > 0.5 moves every pixel far from the patch
        strokes = (labels > 0) & (labels < D.NUM_CLASSES)
        assert np.abs(image.astype(int) - patch.astype(int))[strokes].mean() > 60


def test_night_is_dark_and_noisy_compared_with_clean(root):
    clean = D.load_split("digits-clean", "val", 0, root, TINY).images.astype(float)
    night = D.load_split("digits-night", "val", 0, root, TINY).images.astype(float)
    assert night.mean() < 0.35 * clean.mean()
    assert night.mean() > 5  # not black: the task stays learnable


# ---------------------------------------------------------------- splits


def test_train_and_val_use_disjoint_digit_instances(root):
    total = len(D.load_source_digits()[0])
    for domain in D.DOMAINS:
        manifest = D.read_manifest(domain, 0, root, TINY)
        used = {}
        for split in D.SPLITS:
            indices = D.load_split(domain, split, 0, root, TINY).digit_index
            used[split] = set(indices[indices >= 0].tolist())
            low, high = manifest["splits"][split]["digit_index_range"]
            assert all(low <= i < high for i in used[split])
        assert not used["train"] & used["val"]
        assert manifest["splits"]["train"]["digit_index_range"][1] <= manifest["splits"]["val"]["digit_index_range"][0]
        assert manifest["splits"]["val"]["digit_index_range"][1] == total


def test_train_and_val_use_disjoint_photo_regions(root):
    manifest = D.read_manifest("digits-photo", 0, root, TINY)
    photos = D.load_photos()
    boxes = {split: D.load_split("digits-photo", split, 0, root, TINY) for split in D.SPLITS}
    for p, name in enumerate(manifest["photos"]):
        height, width = photos[p].shape[:2]
        spans = {}
        for split, data in boxes.items():
            x_low, x_high = manifest["splits"][split]["photo_columns"][name]
            mine = data.photo_box[data.photo_index == p]
            assert (mine[:, 0] >= x_low).all() and (mine[:, 2] <= x_high).all()
            assert (mine[:, 1] >= 0).all() and (mine[:, 3] <= height).all()
            spans[split] = (x_low, x_high)
        assert spans["train"][1] <= spans["val"][0] and spans["val"][1] == width
    for data in boxes.values():
        assert set(data.photo_index.tolist()) <= set(range(len(photos)))


# ---------------------------------------------------------------- cache


def test_cache_is_reused_without_regenerating(root, monkeypatch):
    calls = []
    monkeypatch.setattr(D, "generate_split", lambda *a, **k: calls.append(a) or pytest.fail("regenerated"))
    path = D.cache_dir(0, root, TINY) / "digits-night-val.npz"
    before = path.stat().st_mtime_ns
    data = D.load_split("digits-night", "val", 0, root, TINY)
    assert len(data) == 10 and not calls and path.stat().st_mtime_ns == before


def test_cache_files_are_deterministic_and_leave_no_temporaries(root, tmp_path):
    D.build_domain("digits-clean", 0, tmp_path, TINY)
    ours = json.loads((D.cache_dir(0, tmp_path, TINY) / "digits-clean.json").read_text())
    theirs = json.loads((D.cache_dir(0, root, TINY) / "digits-clean.json").read_text())
    assert ours == theirs  # concurrent builders write byte-identical files
    assert sorted(p.name for p in D.cache_dir(0, tmp_path, TINY).iterdir()) == [
        "digits-clean-train.npz", "digits-clean-val.npz", "digits-clean.json"]


def _damage_truncate(directory: Path) -> None:
    path = directory / "digits-clean-val.npz"
    path.write_bytes(path.read_bytes()[:1000])


def _damage_flip_byte(directory: Path) -> None:
    path = directory / "digits-clean-val.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_manifest(directory: Path) -> None:
    (directory / "digits-clean.json").write_text("{not json")


def _damage_version(directory: Path) -> None:
    path = directory / "digits-clean.json"
    manifest = json.loads(path.read_text())
    manifest["generator_version"] = -1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip_byte, _damage_manifest, _damage_version])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    original = D.load_split("digits-clean", "val", 0, tmp_path, TINY)
    damage(D.cache_dir(0, tmp_path, TINY))
    with pytest.warns(RuntimeWarning, match="invalid"):
        rebuilt = D.load_split("digits-clean", "val", 0, tmp_path, TINY)
    np.testing.assert_array_equal(rebuilt.images, original.images)
    np.testing.assert_array_equal(rebuilt.labels, original.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is valid: loading it warns no more
        D.load_split("digits-clean", "val", 0, tmp_path, TINY)


def test_default_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.default_root() == tmp_path / "udaseg" / "digits"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.default_root() == Path.home() / ".cache" / "udaseg" / "digits"


def test_missing_optional_packages_name_the_extra(monkeypatch):
    D.load_source_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(UserError, match=r"pip install udaseg\[bench\]"):
            D.load_source_digits()
    finally:
        D.load_source_digits.cache_clear()


def test_bad_domain_split_seed_and_size_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="digits-sunny"):
        D.load_split("digits-sunny", "train", 0, tmp_path, TINY)
    with pytest.raises(UserError, match="'test'"):
        D.load_split("digits-clean", "test", 0, tmp_path, TINY)
    with pytest.raises(UserError, match="seed"):
        D.load_split("digits-clean", "val", -1, tmp_path, TINY)
    with pytest.raises(UserError, match="train_size"):
        D.BenchmarkSize(train=0)


# ---------------------------------------------------------------- datasets


def _config(root: Path, options: Optional[dict] = None, **kwargs) -> DatasetConfig:
    options = {"train_size": TINY.train, "val_size": TINY.val, **(options or {})}
    return DatasetConfig(root=str(root), options=options, **kwargs)


def test_registered_datasets_return_items_per_the_contract(root):
    raw = D.load_split("digits-photo", "val", 0, root, TINY)
    dataset = build_dataset(_config(root, name="digits-photo", split="val"), MEAN, STD)
    assert len(dataset) == 10 and dataset.classes.num_classes == 11
    item = dataset[3]
    assert set(item) == {"image", "label", "name", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (64, 64)
    expected = (torch.from_numpy(raw.images[3]).permute(2, 0, 1).float() - 127.5) / 64.0
    torch.testing.assert_close(item["image"], expected)
    np.testing.assert_array_equal(item["label"].numpy(), raw.labels[3])
    assert item["index"] == 3 and item["name"] == "digits-photo/val/00003.png"
    for name in D.DOMAINS:
        assert len(build_dataset(_config(root, name=name, split="train"), MEAN, STD)) == 40


def test_datasets_apply_the_shared_pipeline_and_unlabelled_mode(root):
    cfg = _config(root, name="digits-night", split="train", labelled=False, crop_size=[32, 40], flip=True)
    item = build_dataset(cfg, MEAN, STD)[0]
    assert "label" not in item and item["image"].shape == (3, 32, 40)
    cfg = _config(root, name="digits-clean", split="train", resize=[32, 32], crop_size=[16, 16])
    item = build_dataset(cfg, MEAN, STD)[1]
    assert item["image"].shape == (3, 16, 16) and item["label"].shape == (16, 16)


def test_dataset_options_are_checked(root):
    with pytest.raises(UserError, match="unknown option 'sizes'"):
        build_dataset(DatasetConfig(name="digits-clean", root=str(root), options={"sizes": 3}), MEAN, STD)
    with pytest.raises(UserError, match="'seed' must be an int"):
        build_dataset(DatasetConfig(name="digits-clean", root=str(root), options={"seed": "x"}), MEAN, STD)


# ---------------------------------------------------------------- export


def test_export_folder_loads_as_a_folder_dataset(root, tmp_path):
    out = tmp_path / "export"
    D.export_folder(out, 0, root, TINY)
    for domain in D.DOMAINS:
        for split in D.SPLITS:
            raw = D.load_split(domain, split, 0, root, TINY)
            folder = build_dataset(DatasetConfig(name="folder", root=str(out / domain), split=split), MEAN, STD)
            assert len(folder) == len(raw)
            assert folder.classes.names == D.CLASS_NAMES
            assert folder.classes.palette == D.PALETTE
            if split == "val":
                for index in (0, len(raw) - 1):
                    item = folder[index]
                    np.testing.assert_array_equal(item["label"].numpy(), raw.labels[index])
                    expected = (torch.from_numpy(raw.images[index]).permute(2, 0, 1).float() - 127.5) / 64.0
                    torch.testing.assert_close(item["image"], expected)
        manifest = json.loads((out / domain / "digits_manifest.json").read_text())
        assert manifest["domain"] == domain


def test_example_grid_shape(root):
    grid = D.example_grid(0, root, columns=4, size=TINY)
    assert grid.shape == (6 * 64, 4 * 64, 3) and grid.dtype == np.uint8


def test_dev_split_holds_out_the_tail_of_train_and_train_keeps_the_rest(root):
    raw = D.load_split("digits-photo", "train", 0, root, TINY)
    options = {"train_size": TINY.train, "val_size": TINY.val, "dev_fraction": 0.25}
    train = build_dataset(_config(root, name="digits-photo", split="train", options=dict(options)), MEAN, STD)
    dev = build_dataset(_config(root, name="digits-photo", split="dev", options=dict(options)), MEAN, STD)
    assert len(train) == 30 and len(dev) == 10
    np.testing.assert_array_equal(dev[0]["label"].numpy(), raw.labels[30])
    np.testing.assert_array_equal(train[29]["label"].numpy(), raw.labels[29])
    assert dev[0]["name"] == "digits-photo/dev/00030.png"
    with pytest.raises(UserError, match="split 'dev' needs options.dev_fraction"):
        build_dataset(_config(root, name="digits-photo", split="dev"), MEAN, STD)
    with pytest.raises(UserError, match="'dev_fraction' must be a number in"):
        build_dataset(_config(root, name="digits-photo", split="train", options={**options, "dev_fraction": 0.9}),
                      MEAN, STD)


def test_monitor_labels_hide_the_label_from_training_but_keep_it_for_monitoring(root):
    cfg = _config(root, name="digits-night", split="train", labelled=False, monitor_labels=True)
    item = build_dataset(cfg, MEAN, STD)[2]
    assert "label" not in item
    np.testing.assert_array_equal(item["monitor_label"].numpy(), D.load_split("digits-night", "train", 0, root,
                                                                               TINY).labels[2])
