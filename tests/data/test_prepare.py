import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udaseg.cli import main
from udaseg.config.schema import DatasetConfig
from udaseg.data import build_dataset


def prepare(*argv):
    return main(["prepare", *map(str, argv)])


def read(path):
    return np.asarray(Image.open(path))


def test_gta5_prepare_writes_train_ids_and_statistics(tmp_path, fake, capsys):
    labels = [fake.label_from([7, 26]), fake.label_from([7, 7, 33, 1])]
    root = fake.gta(tmp_path / "gta", labels)
    assert prepare("gta5", "--root", root, "--nproc", 1) == 0
    assert "2 label files, 2 converted, class statistics written" in capsys.readouterr().out
    first = read(root / "labels" / "00001_labelTrainIds.png")
    np.testing.assert_array_equal(first, fake.label_from([0, 13]))
    np.testing.assert_array_equal(read(root / "labels" / "00002_labelTrainIds.png"), fake.label_from([0, 0, 18, 255]))
    f1, f2 = (str(root / "labels" / f"0000{i}_labelTrainIds.png") for i in (1, 2))
    stats = json.loads((root / "sample_class_stats.json").read_text())
    # 48 pixels each: image 1 alternates road/car; image 2 cycles road, road, bicycle, ego vehicle
    assert stats == [{"0": 24, "13": 24, "file": f1}, {"0": 24, "18": 12, "file": f2}]
    assert json.loads((root / "sample_class_stats_dict.json").read_text()) == {
        f1: {"0": 24, "13": 24}, f2: {"0": 24, "18": 12}}
    assert json.loads((root / "samples_with_class.json").read_text()) == {
        "0": [[f1, 24], [f2, 24]], "13": [[f1, 24]], "18": [[f2, 12]]}
    assert (root / "sample_class_stats.json").read_text().startswith('[\n  {\n    "0": 24,')
    assert not list(root.rglob(".*.tmp"))
    ds = build_dataset(DatasetConfig(name="gta5", root=str(root)), [0, 0, 0], [1, 1, 1])
    assert all(s.label.name.endswith("_labelTrainIds.png") and s.label_table is None for s in ds.samples)


def test_prepare_is_resumable_and_force_redoes(tmp_path, fake, capsys):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7, 26])] * 3)
    assert prepare("gta5", "--root", root, "--nproc", 1) == 0
    converted = root / "labels" / "00002_labelTrainIds.png"
    os.utime(converted, (1, 1))
    capsys.readouterr()
    assert prepare("gta5", "--root", root, "--nproc", 1) == 0
    assert "0 converted, class statistics up to date" in capsys.readouterr().out
    assert converted.stat().st_mtime == 1
    (root / "labels" / "00003_labelTrainIds.png").unlink()
    (root / "samples_with_class.json").unlink()
    assert prepare("gta5", "--root", root, "--nproc", 1) == 0
    assert "1 converted, class statistics written" in capsys.readouterr().out
    assert converted.stat().st_mtime == 1
    assert len(json.loads((root / "sample_class_stats.json").read_text())) == 3
    assert prepare("gta5", "--root", root, "--nproc", 1, "--force") == 0
    assert "3 converted" in capsys.readouterr().out and converted.stat().st_mtime != 1


def test_prepare_with_a_process_pool_matches_serial(tmp_path, fake):
    labels = [fake.label_from([7, 26, 24, 33][: k + 1]) for k in range(4)]
    serial = fake.gta(tmp_path / "a", labels)
    pooled = fake.gta(tmp_path / "b", labels)
    assert prepare("gta5", "--root", serial, "--nproc", 1) == 0
    assert prepare("gta5", "--root", pooled, "--nproc", 2) == 0
    strip = lambda root: [{k: v for k, v in e.items() if k != "file"}
                          for e in json.loads((root / "sample_class_stats.json").read_text())]
    assert strip(serial) == strip(pooled)
    for name in ("00001", "00004"):
        np.testing.assert_array_equal(read(serial / "labels" / f"{name}_labelTrainIds.png"),
                                      read(pooled / "labels" / f"{name}_labelTrainIds.png"))


def test_prepare_synthia_cityscapes_mapillary_bdd(tmp_path, fake, capsys):
    synthia = fake.synthia(tmp_path / "synthia", [fake.label_from([3, 10])])
    assert prepare("synthia", "--root", synthia, "--nproc", 1) == 0
    np.testing.assert_array_equal(read(synthia / "GT" / "LABELS" / "0000000_labelTrainIds.png"),
                                  fake.label_from([0, 11]))

    cs = fake.cityscapes(tmp_path / "cs", "train", {"aachen": [fake.label_from([26])]})
    fake.cityscapes(cs, "val", {"lindau": [fake.label_from([7])]})
    assert prepare("cityscapes", "--root", cs, "--nproc", 1) == 0
    stats = json.loads((cs / "sample_class_stats.json").read_text())
    assert [Path(e["file"]).name for e in stats] == ["aachen_000000_000019_gtFine_labelTrainIds.png"]
    assert stats[0]["13"] == 48
    assert not (cs / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png").exists()

    mapillary = fake.mapillary(tmp_path / "m", [fake.label_from([55, 65])])
    assert prepare("mapillary", "--root", mapillary, "--nproc", 1) == 0
    converted = next((mapillary / "training" / "v1.2" / "labels").glob("*_labelTrainIds.png"))
    np.testing.assert_array_equal(read(converted), fake.label_from([13, 255]))

    bdd = fake.bdd(tmp_path / "bdd")
    assert prepare("bdd100k", "--root", bdd, "--nproc", 1) == 0
    stats = json.loads((bdd / "sample_class_stats.json").read_text())
    assert stats[0]["0"] == 16 and stats[0]["13"] == 16 and stats[0]["file"].endswith(".png")

    dz = fake.darkzurich(tmp_path / "dz")
    capsys.readouterr()
    assert prepare("darkzurich", "--root", dz) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_prepare_digits_calls_the_exporter(tmp_path, monkeypatch, capsys):
    calls = []
    module = types.ModuleType("udaseg.data.digits")
    module.export_folder = lambda out, seed, root: calls.append((out, seed, root))
    monkeypatch.setitem(sys.modules, "udaseg.data.digits", module)
    assert prepare("digits", "--out", tmp_path / "d", "--seed", 3) == 0
    assert calls == [(tmp_path / "d", 3, None)]
    assert prepare("digits") == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["gta5"], "needs --root"),
    (["gta5", "--root", "/nonexistent/gta"], "dataset root not found: /nonexistent/gta"),
    (["imagenet", "--root", "/tmp"], "cannot prepare dataset 'imagenet'"),
    (["gta5", "--root", "/tmp", "--nproc", "0"], "--nproc must be at least 1"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert prepare(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("udaseg prepare: error:")


def test_cli_reports_bad_data_in_one_line(tmp_path, fake, capsys):
    root = fake.gta(tmp_path / "gta", [fake.label_from([7])] * 2)
    (root / "labels" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    assert prepare("gta5", "--root", root, "--nproc", 1) == 2
    err = capsys.readouterr().err
    assert "cannot read label" in err and "00002.png" in err and err.count("\n") == 1
    (root / "labels" / "00002.png").unlink()
    assert prepare("gta5", "--root", root, "--nproc", 1) == 2
    assert "1 images in" in capsys.readouterr().err
