import json
import math

import numpy as np
import pytest
import torch

from udaseg.config.schema import DatasetConfig, RCSConfig
from udaseg.data import build_dataset
from udaseg.data.sampling import (
    RareClassSampledDataset,
    build_stats_files,
    class_pixel_counts,
    files_per_class,
    rcs_class_probabilities,
    stats_entry,
)
from udaseg.errors import UserError


def test_class_pixel_counts_and_entry_format():
    label = np.array([[0, 0, 13], [255, 13, 13]], dtype=np.uint8)
    counts = class_pixel_counts(label)
    assert counts == {0: 2, 13: 3}
    entry = stats_entry(counts, "data/gta/labels/00001_labelTrainIds.png")
    assert list(entry) == ["0", "13", "file"]
    assert json.dumps(entry) == '{"0": 2, "13": 3, "file": "data/gta/labels/00001_labelTrainIds.png"}'


def test_build_stats_files_matches_daformer_layout():
    entries = [{"0": 5, "13": 2, "file": "a_labelTrainIds.png"}, {"13": 7, "file": "b_labelTrainIds.png"}]
    docs = build_stats_files(entries)
    assert docs["sample_class_stats.json"] == entries
    assert docs["sample_class_stats_dict.json"] == {"a_labelTrainIds.png": {"0": 5, "13": 2},
                                                    "b_labelTrainIds.png": {"13": 7}}
    assert docs["samples_with_class.json"] == {"0": [["a_labelTrainIds.png", 5]],
                                               "13": [["a_labelTrainIds.png", 2], ["b_labelTrainIds.png", 7]]}


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_rcs_probabilities_follow_the_formula(temperature):
    stats = [{"0": 100, "13": 10, "file": "a"}, {"0": 50, "18": 1, "file": "b"}]
    classes, probs = rcs_class_probabilities(stats, temperature)
    assert classes == [18, 13, 0]  # ascending frequency
    totals = {18: 1, 13: 10, 0: 150}
    total = sum(totals.values())
    weights = [math.exp((1 - totals[c] / total) / temperature) for c in classes]
    expected = [w / sum(weights) for w in weights]
    np.testing.assert_allclose(probs, expected, rtol=1e-9)
    assert probs[0] > probs[1] > probs[2]


def test_files_per_class_keeps_files_above_min_pixels():
    samples_with_class = {"0": [["x/a.png", 3000], ["x/b.png", 3001]], "5": [["y/c.png", 9000]]}
    assert files_per_class(samples_with_class, [0, 5], 3000) == {0: ["b.png"], 5: ["c.png"]}
    with pytest.raises(UserError, match="class 0"):
        files_per_class(samples_with_class, [0], 5000)


def rcs_dataset(cfg):
    return RareClassSampledDataset(build_dataset(cfg, [0, 0, 0], [1, 1, 1]), cfg.root, cfg.rcs)


def _stripe_dataset(tmp_path, fake, n_images=3):
    """GTA5 images of 4x16 pixels: bicycle (id 33 -> trainId 18) in the 4 left columns, road elsewhere."""
    label = np.full((4, 16), 7, dtype=np.uint8)
    label[:, :4] = 33
    root = tmp_path / "gta"
    for i in range(1, n_images + 1):
        fake.write_rgb(root / "images" / f"{i:05d}.png", seed=i, h=4, w=16)
        fake.write_gray(root / "labels" / f"{i:05d}.png", label)
    entries = [stats_entry({18: 16, 0: 48}, str(root / "labels" / f"{i:05d}_labelTrainIds.png"))
               for i in range(1, n_images + 1)]
    for name, doc in build_stats_files(entries).items():
        (root / name).write_text(json.dumps(doc))
    return root


def test_rcs_recrops_until_the_class_is_in_the_crop(tmp_path, fake):
    root = _stripe_dataset(tmp_path, fake)
    cfg = DatasetConfig(name="gta5", root=str(root), crop_size=[4, 4],
                        rcs=RCSConfig(enabled=True, temperature=0.01, min_pixels=10, min_crop_ratio=0.5))
    ds = rcs_dataset(cfg)
    assert len(ds) == 3
    torch.manual_seed(0)
    draws = [ds.draw()[0] for _ in range(2000)]
    assert abs(np.mean([c == 18 for c in draws]) - ds.probabilities[0].item()) < 0.03
    # class 18 only: every item draws it, and a 4x4 crop holds > 5 of its pixels for offsets 0..2 of 13
    ds.probabilities = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ds.classes = [18, 0]
    hits = [int((ds[0]["label"] == 18).sum()) > 5 for _ in range(200)]
    # one draw succeeds with p = 3/13; with up to 10 re-crops, 1 - (10/13)^11 = 0.944
    assert np.mean(hits) > 0.88
    no_recrop = RareClassSampledDataset(ds.dataset, root, RCSConfig(enabled=True, min_pixels=10, min_crop_ratio=0.0))
    no_recrop.probabilities = ds.probabilities
    no_recrop.classes = ds.classes
    assert np.mean([int((no_recrop[0]["label"] == 18).sum()) > 5 for _ in range(200)]) < 0.4


def test_rcs_is_deterministic_under_seed(tmp_path, fake):
    root = _stripe_dataset(tmp_path, fake)
    cfg = DatasetConfig(name="gta5", root=str(root), crop_size=[4, 4], flip=True,
                        rcs=RCSConfig(enabled=True, temperature=0.5, min_pixels=10))
    ds = rcs_dataset(cfg)
    torch.manual_seed(5)
    a = [(ds[0]["index"], ds[0]["label"]) for _ in range(10)]
    torch.manual_seed(5)
    b = [(ds[0]["index"], ds[0]["label"]) for _ in range(10)]
    assert all(i == j and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))


def test_rcs_errors(tmp_path, fake):
    root = _stripe_dataset(tmp_path, fake)
    cfg = DatasetConfig(name="gta5", root=str(root), rcs=RCSConfig(enabled=True, min_pixels=10))
    (root / "labels" / "00003.png").unlink()
    (root / "images" / "00003.png").unlink()
    with pytest.raises(UserError, match="00003_labelTrainIds.png, which is not in the dataset"):
        rcs_dataset(cfg)
    (root / "samples_with_class.json").unlink()
    with pytest.raises(UserError, match="udaseg prepare"):
        rcs_dataset(cfg)
    cfg.labelled = False
    with pytest.raises(UserError, match="labelled"):
        rcs_dataset(cfg)
