"""Released HRDA / MIC(HRDA) checkpoints: mmseg UDA state dicts with the official HRDAHead key names
(lhoyer/HRDA hrda_head.py: decode_head.head.* and decode_head.scale_attention.*; uda/dacs.py:
model.*, ema_model.*, imnet_model.*) load into the HRDA model, for evaluation and model.init_from."""

import pytest
import torch

from udaseg.adapt.step import UDAModel
from udaseg.engine.init_from import load_initial_weights
from udaseg.errors import UserError
from udaseg.models import build_model, load_pretrained


def _official_head_keys(head: torch.nn.Module) -> dict:
    """Our DAFormer heads carry mmseg's module names; the test writes them out explicitly."""
    names = [k for k in head.state_dict()]
    assert any(k.startswith("embed_layers.0.proj") for k in names) and "conv_seg.weight" in names
    return {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in head.state_dict().items()}


def _release(path, model, mic_teacher=False):
    """An HRDA release: student under model.*, EMA teacher under ema_model.* (student + 1), the
    ImageNet FD model under imnet_model.*; optionally MIC's separate teacher."""
    backbone = {k: torch.randn_like(v) if v.is_floating_point() else v.clone()
                for k, v in model.backbone.state_dict().items()}
    head = _official_head_keys(model.decode_head)
    attention = _official_head_keys(model.attention_head)
    assert "fuse_layer.conv.weight" in attention  # the 1x1-conv fusion of the scale attention
    student = {**{"backbone." + k: v for k, v in backbone.items()},
               **{"decode_head.head." + k: v for k, v in head.items()},
               **{"decode_head.scale_attention." + k: v for k, v in attention.items()}}
    state = {"model." + k: v for k, v in student.items()}
    state.update({"ema_model." + k: (v + 1 if v.is_floating_point() else v) for k, v in student.items()})
    state.update({"imnet_model.backbone." + k: v for k, v in backbone.items()})
    if mic_teacher:
        state.update({"mic.teacher.ema_model." + k: v for k, v in student.items()})
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)
    return student


@pytest.mark.parametrize("mic_teacher", [False, True])
def test_release_checkpoint_maps_the_shared_head_and_the_scale_attention(tmp_path, mic_teacher):
    model = build_model("hrda_daformer_tiny", 19)
    path = tmp_path / "hrda_release.pth"
    student = _release(path, model, mic_teacher)
    report = load_pretrained(model, str(path), strict=True)
    assert report.format == "uda" and report.ok
    assert all(k.startswith(("ema_model.", "imnet_model.", "mic.teacher.")) for k in report.ignored)
    assert torch.equal(model.decode_head.conv_seg.weight, student["decode_head.head.conv_seg.weight"])
    assert torch.equal(model.attention_head.fuse_layer.conv.weight,
                       student["decode_head.scale_attention.fuse_layer.conv.weight"])
    assert torch.equal(model.attention_head.conv_seg.bias, student["decode_head.scale_attention.conv_seg.bias"])
    teacher = build_model("hrda_daformer_tiny", 19)
    assert load_pretrained(teacher, str(path), strict=True, use_ema=True).ok
    torch.testing.assert_close(teacher.attention_head.conv_seg.bias,
                               student["decode_head.scale_attention.conv_seg.bias"] + 1)


def test_single_scale_model_takes_the_shared_head_and_ignores_the_attention(tmp_path):
    hrda = build_model("hrda_daformer_tiny", 19)
    path = tmp_path / "hrda_release.pth"
    student = _release(path, hrda)
    plain = build_model("daformer_tiny", 19)
    report = load_pretrained(plain, str(path), strict=True)
    assert report.ok and any(k.startswith("decode_head.scale_attention.") for k in report.ignored)
    assert torch.equal(plain.decode_head.conv_seg.weight, student["decode_head.head.conv_seg.weight"])


def test_init_from_a_release_file_and_a_wrong_one(tmp_path):
    path = tmp_path / "hrda_release.pth"
    student = _release(path, build_model("hrda_daformer_tiny", 19))
    model = UDAModel(build_model("hrda_daformer_tiny", 19))
    load_initial_weights(model, path, "hrda_daformer_tiny", 19, use="teacher")
    torch.testing.assert_close(model.segmentor.decode_head.conv_seg.weight,
                               student["decode_head.head.conv_seg.weight"] + 1)
    wrong = UDAModel(build_model("hrda_daformer_tiny", 5))
    with pytest.raises(UserError, match="model.init_from=.*does not fit model 'hrda_daformer_tiny'") as info:
        load_initial_weights(wrong, path, "hrda_daformer_tiny", 5)
    assert len(str(info.value).splitlines()) == 1


def test_eval_loads_the_release_teacher_into_the_hrda_model_of_the_config(tmp_path, capsys):
    import yaml

    from udaseg.config import load_config, to_dict
    from udaseg.engine.commands import load_segmentor_for_inference

    path = tmp_path / "hrda_release.pth"
    student = _release(path, build_model("hrda_daformer_tiny", 19))
    cfg = load_config("hrda_daformer_gta2cs", ["model.name=hrda_daformer_tiny", "model.pretrained=",
                                               "model.options={detail_crop_size: [32, 32]}"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    _, segmentor = load_segmentor_for_inference(path, str(config), [], use_teacher=True)
    assert "0 missing" in capsys.readouterr().out
    torch.testing.assert_close(segmentor.attention_head.fuse_layer.conv.weight,
                               student["decode_head.scale_attention.fuse_layer.conv.weight"] + 1)
