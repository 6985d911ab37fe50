"""Official release checkpoints (mmseg / UDA state dicts) on `udaseg eval` and `udaseg predict`."""

import json

import torch
import yaml

from udaseg.cli import main
from udaseg.config import to_dict
from udaseg.models import build_model

from .conftest import tiny_config


def _release(path, student, teacher):
    """A DAFormer-style UDA release: mmseg keys under model.* (student), ema_model.* and imnet_model.*."""
    state = {}
    for prefix, model in (("model.", student), ("ema_model.", teacher), ("imnet_model.", student)):
        state.update({prefix + k: v for k, v in model.state_dict().items()})
    torch.save({"meta": {"iter": 40000, "CLASSES": ["a", "b", "c"]}, "state_dict": state}, path)


def test_eval_and_predict_accept_a_release_checkpoint(fake_domains, tmp_path, capsys):
    torch.manual_seed(0)
    student, teacher = build_model("daformer_tiny", 3), build_model("daformer_tiny", 3)
    release = tmp_path / "daformer_release.pth"
    _release(release, student, teacher)
    cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "unused")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))

    assert main(["eval", "--checkpoint", str(release), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "converted release checkpoint" in out and "0 missing" in out
    assert main(["eval", "--checkpoint", str(release), "--config", str(config), "--teacher"]) == 0
    student_result = json.loads((tmp_path / "daformer_release.eval.json").read_text())
    teacher_result = json.loads((tmp_path / "daformer_release.teacher.eval.json").read_text())
    assert student_result["model"] == "student" and teacher_result["model"] == "teacher"

    from udaseg.engine.commands import load_segmentor_for_inference

    _, loaded = load_segmentor_for_inference(release, str(config), [], use_teacher=True)
    for (name, a), b in zip(loaded.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), name
    images = fake_domains[1] / "images" / "val"
    assert main(["predict", "--checkpoint", str(release), "--config", str(config), "--input", str(images),
                 "--out", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred" / "labels").iterdir())) == 4
