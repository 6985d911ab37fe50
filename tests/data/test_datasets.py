import warnings

import numpy as np
import pytest
import torch

from udaseg.config.schema import DatasetConfig
from udaseg.data import DATASETS, build_dataset, register_dataset
from udaseg.errors import UserError

MEAN = [0.0, 0.0, 0.0]
STD = [1.0, 1.0, 1.0]


def build(name, root, **kw):
    return build_dataset(DatasetConfig(name=name, root=str(root), **kw), MEAN, STD)


# Cityscapes labelIds and their trainIds: road 7->0, car 26->13, bicycle 33->18, ego vehicle 1->255
GTA_IDS = [7, 26, 33, 1]
GTA_TRAIN = [0, 13, 18, 255]


def test_gta5_maps_label_ids_on_load(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from(GTA_IDS), fake.label_from([7])])
    ds = build("gta5", root)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"image", "label", "name", "index"}
    assert item["name"] == "images/00001.png" and item["index"] == 0
    assert item["image"].shape == (3, fake.H, fake.W) and item["image"].dtype == torch.float32
    np.testing.assert_array_equal(item["label"].numpy(), fake.label_from(GTA_TRAIN))
    assert ds.stats_key(1) == "00002_labelTrainIds.png"


def test_gta5_prefers_prepared_train_ids(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from(GTA_IDS)])
    fake.write_gray(root / "labels" / "00001_labelTrainIds.png", fake.label_from([5]))
    ds = build("gta5", root)
    assert len(ds) == 1  # the prepared file is not a second label
    assert (ds[0]["label"] == 5).all()


def test_image_matches_file(tmp_path, fake):
    root = tmp_path / "gta"
    rgb = fake.write_rgb(root / "images" / "00001.png", seed=3)
    fake.write_gray(root / "labels" / "00001.png", fake.label_from([7]))
    item = build("gta5", root)[0]
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), rgb.astype(np.float32))


def test_unlabelled_split_has_no_label(tmp_path, fake):
    root = tmp_path / "gta"
    fake.write_rgb(root / "images" / "00001.png")
    item = build("gta5", root, labelled=False)[0]
    assert "label" not in item


def test_synthia_reads_class_id_from_first_16bit_channel(tmp_path, fake):
    # SYNTHIA ids 3 road, 8 car, 11 bicycle, 0 void, 13 parking slot (ignored)
    root = fake.synthia(tmp_path / "synthia", [fake.label_from([3, 8, 11, 0, 13])])
    label = build("synthia", root)[0]["label"].numpy()
    np.testing.assert_array_equal(label, fake.label_from([0, 13, 18, 255, 255]))


def test_cityscapes_label_ids_and_train_ids(tmp_path, fake):
    root = fake.cityscapes(tmp_path / "cs", "train", {"aachen": [fake.label_from([7, 26])],
                                                       "bochum": [fake.label_from([24]), fake.label_from([33])]})
    ds = build("cityscapes", root)
    assert [s.name for s in ds.samples] == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png",
    ]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), fake.label_from([0, 13]))
    assert (ds[1]["label"] == 11).all() and (ds[2]["label"] == 18).all()
    assert ds.stats_key(0) == "aachen_000000_000019_gtFine_labelTrainIds.png"
    root2 = fake.cityscapes(tmp_path / "cs2", "val", {"frankfurt": [fake.label_from([4, 255])]}, kind="labelTrainIds")
    assert build("cityscapes", root2, split="val")[0]["label"].unique().tolist() == [4, 255]


def test_darkzurich_splits_and_paired_day(tmp_path, fake):
    root = fake.darkzurich(tmp_path / "dz")
    val = build("darkzurich", root, split="val")
    assert len(val) == 2 and val[0]["label"].unique().tolist() == [0, 1, 255]
    train = build("darkzurich", root, split="train", labelled=False)
    assert len(train) == 3 and "label" not in train[0]
    paired = build("darkzurich", root, split="train", labelled=False, options={"paired_day": True},
                   crop_size=[4, 4], flip=True)
    item = paired[2]
    assert item["name"] == "rgb_anon/train/night/GOPR0364/GOPR0364_frame_000000_rgb_anon.png"
    assert item["day_image"].shape == item["image"].shape == (3, 4, 4)
    assert paired.samples[2].extra_images["day_image"].name == "GOPR0351_frame_000002_rgb_anon.png"
    assert len(build("darkzurich", root, split="test", labelled=False)) == 1
    with pytest.raises(UserError, match="no labels"):
        build("darkzurich", root, split="train")


def test_acdc_conditions(tmp_path, fake):
    root = fake.acdc(tmp_path / "acdc", {"fog": 2, "night": 1, "rain": 1, "snow": 3})
    assert len(build("acdc", root)) == 7
    night = build("acdc", root, options={"conditions": "night"})
    assert len(night) == 1 and night.samples[0].name.startswith("rgb_anon/night/train/GOPR0475/")
    assert len(build("acdc", root, options={"conditions": ["fog", "snow"]})) == 5
    with pytest.raises(UserError, match="unknown condition 'sun'"):
        build("acdc", root, options={"conditions": ["sun"]})


@pytest.mark.parametrize("old", [False, True])
def test_bdd100k_layouts(tmp_path, fake, old):
    root = fake.bdd(tmp_path / "bdd", old=old)
    ds = build("bdd100k", root)
    assert len(ds) == 2
    assert ds[0]["label"].unique().tolist() == [0, 13, 255]


def test_mapillary_palette_ids_mapped_to_19(tmp_path, fake):
    # v1.2 ids: 13 road -> 0, 55 car -> 13, 2 curb -> 1, 65 unlabeled -> 255
    root = fake.mapillary(tmp_path / "mapillary", [fake.label_from([13, 55, 2, 65])])
    label = build("mapillary", root)[0]["label"].numpy()
    np.testing.assert_array_equal(label, fake.label_from([0, 13, 1, 255]))
    root2 = fake.mapillary(tmp_path / "m2", [fake.label_from([27])], split="validation", v12=False)
    assert (build("mapillary", root2, split="val")[0]["label"] == 10).all()


def test_folder_dataset(tmp_path, fake):
    root = fake.folder(tmp_path / "mine", ["grass", "path", "tree"], [fake.label_from([0, 2, 7])],
                       extra_yaml="ignore_index: 7\npalette: [[0, 255, 0], [128, 128, 128], [0, 100, 0]]\n")
    ds = build("folder", root)
    assert ds.classes.names == ("grass", "path", "tree") and ds.classes.palette[1] == (128, 128, 128)
    assert ds[0]["label"].unique().tolist() == [0, 2, 255]


def test_folder_label_values_beyond_classes_are_an_error(tmp_path, fake):
    root = fake.folder(tmp_path / "mine", ["a", "b"], [fake.label_from([0, 1, 5])])
    ds = build("folder", root)
    with pytest.raises(UserError, match=r"img0.png holds values 5 .* 2 classes"):
        ds[0]


@pytest.mark.parametrize("text, message", [
    ("classes: grass\n", "non-empty list"),
    ("names: [a]\n", "'classes' list"),
    ("classes: [a, b]\npalette: [[1, 2, 3]]\n", "palette"),
    ("classes: [a, b\n", "cannot parse"),
])
def test_folder_bad_class_file(tmp_path, fake, text, message):
    root = fake.folder(tmp_path / "mine", ["a"], [fake.label_from([0])])
    (root / "classes.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        build("folder", root)


def test_unmapped_label_values_warn_once(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7, 77]), fake.label_from([99])])
    ds = build("gta5", root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ds[0]["label"]
        ds[1]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "00001.png" in messages[0] and "77" in messages[0]
    assert first.unique().tolist() == [0, 255]


# ---------------------------------------------------------------------------------------------
# Bad input: one clear UserError each
# ---------------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="dataset root not found"):
        build("gta5", tmp_path / "nope")
    with pytest.raises(UserError, match="needs a root folder"):
        build("gta5", "")


def test_missing_subfolder_shows_layout(tmp_path):
    (tmp_path / "gta").mkdir()
    with pytest.raises(UserError, match=r"folder not found: .*images \(expected layout: <root>/images/\*.png"):
        build("gta5", tmp_path / "gta")
    with pytest.raises(UserError, match="leftImg8bit"):
        build("cityscapes", tmp_path / "gta")


def test_images_without_labels_and_labels_without_images(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7])] * 5)
    for i in (2, 3, 4):
        (root / "labels" / f"0000{i}.png").unlink()
    with pytest.raises(UserError, match=r"3 images in .* have no label .*first: 00002.png, 00003.png, 00004.png"):
        build("gta5", root)
    root2 = fake.gta(tmp_path / "gta2", [fake.label_from([7])] * 2)
    (root2 / "images" / "00002.png").unlink()
    with pytest.raises(UserError, match=r"1 labels in .* have no image .*first: 00002.png"):
        build("gta5", root2)


def test_empty_split(tmp_path):
    (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        build("cityscapes", tmp_path / "cs", split="val")


def test_corrupt_and_truncated_files(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7])] * 2)
    (root / "images" / "00001.png").write_bytes(b"not a png at all")
    data = (root / "labels" / "00002.png").read_bytes()
    (root / "labels" / "00002.png").write_bytes(data[: len(data) // 2])
    ds = build("gta5", root)
    with pytest.raises(UserError, match=r"cannot read image .*00001.png"):
        ds[0]
    with pytest.raises(UserError, match=r"cannot read label .*00002.png"):
        ds[1]


def test_unknown_dataset_name_suggests_closest(tmp_path):
    with pytest.raises(UserError, match="did you mean 'cityscapes'"):
        build("cityscape", tmp_path)


def test_registry_accepts_factories(tmp_path):
    calls = []

    @register_dataset("digits-unittest")
    def factory(cfg, mean, std):
        calls.append((cfg.name, mean, std))
        return [cfg.name]

    try:
        assert build("digits-unittest", tmp_path) == ["digits-unittest"]
        assert calls == [("digits-unittest", MEAN, STD)]
        with pytest.raises(ValueError):
            register_dataset("digits-unittest")(lambda *a: None)
    finally:
        DATASETS.pop("digits-unittest")


def test_items_collate_in_a_data_loader(tmp_path, fake):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7, 26])] * 4)
    ds = build("gta5", root, crop_size=[4, 4], flip=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 4, 4) and batch["label"].shape == (2, 4, 4)
    assert batch["index"].tolist() == [0, 1] and batch["name"] == ["images/00001.png", "images/00002.png"]
