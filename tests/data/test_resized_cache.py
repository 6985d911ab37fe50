"""The pre-resized cache of ``udaseg prepare --resize`` gives the same items as the originals."""

import numpy as np
import pytest
import torch
from PIL import Image

import udaseg.data.datasets as datasets
from udaseg.cli import main
from udaseg.config.schema import DatasetConfig
from udaseg.data import build_dataset
from udaseg.errors import UserError

LABEL_IDS = np.array([7, 8, 11, 26, 33, 0], dtype=np.uint8)


def fake_gta(root, count=3, height=41, width=57):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(1, count + 1):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / f"{i:05d}.png")
        blocks = rng.choice(LABEL_IDS, (height // 4 + 1, width // 4 + 1))
        label = np.kron(blocks, np.ones((4, 4), dtype=np.uint8))[:height, :width]
        Image.fromarray(label, mode="L").save(root / "labels" / f"{i:05d}.png")
    return root


def config(root, **extra):
    return DatasetConfig(name="gta5", root=str(root), resize=[40, 24], crop_size=[16, 16], cat_max_ratio=0.75,
                         flip=True, **extra)


def items(dataset, draws=6):
    out = []
    for k in range(draws):
        torch.manual_seed(k)
        out.append(dataset[k % len(dataset)])
    return out


def test_cached_items_equal_the_originals(tmp_path, monkeypatch, capsys):
    root = fake_gta(tmp_path / "gta")
    assert main(["prepare", "gta5", "--root", str(root), "--nproc", "1", "--resize", "40", "24"]) == 0
    cache = root / "resized_40x24"
    assert "3 train images resized to (40, 24)" in capsys.readouterr().out
    assert np.load(cache / "images/00001.png.image.npy").shape == (24, 33, 3)  # 41×57 at scale 24/41
    expected = items(build_dataset(config(root), [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]))
    cached_ds = build_dataset(config(root, resized_cache=str(cache)), [123.7, 116.3, 103.5], [58.4, 57.1, 57.4])
    monkeypatch.setattr(datasets, "read_image", lambda path: pytest.fail(f"read the original {path}"))
    for want, got in zip(expected, items(cached_ds)):
        assert torch.equal(want["image"], got["image"]) and torch.equal(want["label"], got["label"])


def test_a_cache_for_another_resize_is_refused(tmp_path):
    root = fake_gta(tmp_path / "gta", count=1)
    assert main(["prepare", "gta5", "--root", str(root), "--nproc", "1", "--resize", "40", "24"]) == 0
    cfg = config(root, resized_cache=str(root / "resized_40x24"))
    cfg.resize = [50, 30]
    with pytest.raises(UserError, match="resized for \\[40, 24\\]"):
        build_dataset(cfg, [0, 0, 0], [1, 1, 1])
