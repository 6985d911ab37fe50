"""udaseg train / eval / predict through the command line."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from udaseg.cli import main
from udaseg.config import to_dict

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained(fake_domains, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    cfg = tiny_config("digits_source_only", *fake_domains, base / "run", iterations=2)
    config_file = base / "config.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train", "--config", str(config_file)]) == 0
    return base, config_file


def test_eval_writes_table_and_json(trained, capsys):
    base, _ = trained
    out = base / "eval.json"
    assert main(["eval", "--checkpoint", str(base / "run" / "latest.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "background" in printed
    result = json.loads(out.read_text())
    (entry,) = result["results"].values()
    assert len(entry["iou"]) == 3 and 0.0 <= entry["miou"] <= 1.0


def test_eval_teacher_of_source_only_run_is_a_clear_error(trained, capsys):
    base, _ = trained
    assert main(["eval", "--checkpoint", str(base / "run" / "latest.pt"), "--teacher"]) == 2
    assert "holds no EMA teacher" in capsys.readouterr().err


def test_predict_writes_labels_colours_and_overlays(trained, fake_domains, tmp_path):
    base, _ = trained
    images = fake_domains[1] / "images" / "val"
    assert main(["predict", "--checkpoint", str(base / "run" / "latest.pt"), "--input", str(images),
                 "--out", str(tmp_path / "pred")]) == 0
    names = sorted(p.name for p in images.iterdir())
    for folder in ("labels", "color", "overlay"):
        assert sorted(p.name for p in (tmp_path / "pred" / folder).iterdir()) == names
    label = np.asarray(Image.open(tmp_path / "pred" / "labels" / names[0]))
    assert label.shape == (32, 32) and label.max() < 3
    assert np.asarray(Image.open(tmp_path / "pred" / "color" / names[0])).shape == (32, 32, 3)


def test_predict_dark_zurich_submission_layout(trained, fake_domains, tmp_path):
    base, _ = trained
    image = next((fake_domains[1] / "images" / "val").iterdir())
    assert main(["predict", "--checkpoint", str(base / "run" / "latest.pt"), "--input", str(image),
                 "--out", str(tmp_path / "dz"), "--format", "darkzurich"]) == 0
    for folder in ("labelTrainIds", "labelTrainIds_invalid", "confidence"):
        assert (tmp_path / "dz" / folder / image.name).exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "daformer_mitb5_gta2c"], "unknown preset 'daformer_mitb5_gta2c'; did you mean 'daformer_mitb5_gta2cs'"),
    (["eval", "--checkpoint", "/nonexistent/x.pt"], "/nonexistent/x.pt"),
    (["train", "--config", "digits_dacs", "optim.lrr=1"], "did you mean 'optim.lr'"),
])
def test_user_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_predict_into_unwritable_folder(trained, fake_domains, tmp_path, capsys):
    base, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["predict", "--checkpoint", str(base / "run" / "latest.pt"), "--input",
                 str(fake_domains[1] / "images" / "val"), "--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_train_list_shows_presets(capsys):
    assert main(["train", "--list"]) == 0
    assert "daformer_mitb5_gta2cs" in capsys.readouterr().out.split()
