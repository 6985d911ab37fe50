"""Rare class sampling on a folder dataset of one's own: `udaseg prepare folder` writes its statistics."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from udaseg.cli import main
from udaseg.config.schema import DatasetConfig, IMAGENET_MEAN, IMAGENET_STD, RCSConfig
from udaseg.data import build_dataset
from udaseg.data.sampling import RareClassSampledDataset


def _folder(root, ignore=255):
    for split in ("train",):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    counts = {0: 0, 1: 0, 2: 0, 3: 0}
    for i in range(6):
        label = np.zeros((16, 16), np.uint8)
        label[:, 8:] = 1
        if i % 3 == 0:
            label[:4, :4] = 3  # the rare class, in images 0 and 3
        label[15, 15] = ignore
        for c in counts:
            counts[c] += int((label == c).sum())
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(root / "images" / "train" / f"{i}.png")
        Image.fromarray(label).save(root / "labels" / "train" / f"{i}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c", "rare"], "ignore_index": ignore}))
    return counts


@pytest.mark.parametrize("ignore", [255, 9])
def test_prepare_folder_counts_its_own_classes(tmp_path, capsys, ignore):
    counts = _folder(tmp_path / "mine", ignore)
    assert main(["prepare", "folder", "--root", str(tmp_path / "mine"), "--nproc", "1"]) == 0
    assert "class statistics written" in capsys.readouterr().out
    stats = json.loads((tmp_path / "mine" / "sample_class_stats.json").read_text())
    assert len(stats) == 6
    totals = {}
    for entry in stats:
        for key, n in entry.items():
            if key != "file":
                totals[int(key)] = totals.get(int(key), 0) + n
    assert totals == {c: n for c, n in counts.items() if n}  # the ignore value is not counted as a class
    with_rare = json.loads((tmp_path / "mine" / "samples_with_class.json").read_text())["3"]
    assert sorted(f.split("/")[-1] for f, _ in with_rare) == ["0.png", "3.png"]


def test_rare_class_sampling_draws_the_rare_class_of_a_folder_dataset(tmp_path):
    _folder(tmp_path / "mine")
    assert main(["prepare", "folder", "--root", str(tmp_path / "mine"), "--nproc", "1"]) == 0
    spec = DatasetConfig(name="folder", root=str(tmp_path / "mine"), split="train")
    dataset = RareClassSampledDataset(build_dataset(spec, IMAGENET_MEAN, IMAGENET_STD), tmp_path / "mine",
                                      RCSConfig(enabled=True, temperature=0.01, min_pixels=4, min_crop_ratio=0.0))
    assert dataset.classes == [3, 0, 1]  # ascending frequency
    import torch

    torch.manual_seed(0)
    drawn = [dataset.draw() for _ in range(50)]
    assert sum(c == 3 for c, _ in drawn) > 40 and all(i in (0, 3) for c, i in drawn if c == 3)


def test_label_of_another_size_warns_once_for_public_datasets(tmp_path):
    import warnings

    from udaseg.data.datasets import SegmentationDataset, Sample
    from udaseg.data.labels import CITYSCAPES_CLASSES
    from udaseg.data.transforms import Pipeline

    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 12), np.uint8)).save(tmp_path / "a_label.png")
    samples = [Sample(image=tmp_path / "a.png", name="a.png", label=tmp_path / "a_label.png")]
    dataset = SegmentationDataset(samples, CITYSCAPES_CLASSES, Pipeline(IMAGENET_MEAN, IMAGENET_STD), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = dataset[0]
        dataset[0]
    messages = [str(w.message) for w in caught if "is 12x6 but its image" in str(w.message)]
    assert len(messages) == 1 and "a_label.png" in messages[0] and "12x8" in messages[0]
    assert tuple(item["label"].shape) == (8, 12)
