"""Pseudo-label margins (official crop_pseudo_margins [top, bottom, left, right]): a validity map
made on the loaded image, resized / cropped / flipped with it, multiplying the pseudo-label weight
after the confidence ratio."""

import numpy as np
import pytest
import torch

from udaseg.adapt.step import StepContext, UDAModel
from udaseg.config import load_config
from udaseg.data.transforms import Pipeline, pseudo_valid_map
from udaseg.errors import UserError
from udaseg.methods.dacs import PSEUDO_VALID, teacher_pseudo_labels
from udaseg.models import build_model


def test_the_map_zeroes_each_margin():
    valid = pseudo_valid_map((6, 10), (1, 2, 3, 1))
    expected = np.zeros((6, 10), dtype=np.uint8)
    expected[1:4, 3:9] = 1
    assert np.array_equal(valid, expected)
    assert not pseudo_valid_map((4, 4), (3, 3, 0, 0)).any()  # margins wider than the image: nothing valid


def test_the_map_follows_the_crop_and_the_flip_of_the_image():
    height, width, margins = 8, 12, (1, 2, 3, 0)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 10  # each column tells where it came from
    full = pseudo_valid_map((height, width), margins).astype(bool)
    pipeline = Pipeline([0, 0, 0], [1, 1, 1], crop_size=(8, 6), flip=True, pseudo_margins=margins)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = pipeline(image)
        columns = (out["image"][0, 0] / 10).round().long().tolist()
        assert out["pseudo_valid"].dtype == torch.bool
        assert torch.equal(out["pseudo_valid"], torch.from_numpy(full[:, columns]))
        seen.add((columns[0] > columns[-1], columns[0] == 0 or columns[-1] == 0))
    assert {True, False} == {flipped for flipped, _ in seen}  # both flips occurred
    assert any(at_left for _, at_left in seen) and not all(at_left for _, at_left in seen)


def test_padding_is_not_valid():
    pipeline = Pipeline([0, 0, 0], [1, 1, 1], crop_size=(6, 6), pseudo_margins=(0, 0, 0, 0))
    out = pipeline(np.zeros((4, 4, 3), dtype=np.uint8))
    assert out["pseudo_valid"][:4, :4].all() and not out["pseudo_valid"][4:].any()


def test_margins_multiply_the_weight_after_the_confidence_ratio():
    cfg = load_config("hrda_daformer_gta2cs", ["method.self_training.pseudo_threshold=0.34"]).method.self_training
    torch.manual_seed(0)
    teacher = UDAModel(build_model("daformer_tiny", 3)).eval()
    image = torch.randn(2, 3, 32, 32)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, :3], valid[:, :, -5:] = False, False
    ratios = []
    for batch_item in ({"image": image}, {"image": image, PSEUDO_VALID: valid}):
        ctx = StepContext(teacher, teacher, 0, torch.Generator().manual_seed(0), [], 3)
        ctx.batch = {"target": batch_item}
        ctx.add_view("target", image)
        pseudo = teacher_pseudo_labels(ctx, cfg, "target")
        ratios.append(float(pseudo["ratio"]))
    assert 0 < ratios[0] == ratios[1]  # the ratio counts every pixel, margins included
    assert torch.equal(pseudo["weight"], torch.where(valid, torch.full_like(pseudo["weight"], ratios[0]), 0.0))


def test_official_defaults_in_the_presets():
    for preset in ("hrda_daformer_gta2cs", "mic_hrda_daformer_gta2cs", "hrda_daformer_synthia2cs",
                   "t2sda_mic_hrda_daformer_gta2cs", "pgpc_mic_hrda_daformer_gta2cs",
                   "sepico_distcl_mic_hrda_daformer_gta2cs"):
        cfg = load_config(preset)
        assert cfg.data.target.pseudo_margins == [30, 240, 30, 30], preset
        assert (cfg.method.self_training.ignore_top, cfg.method.self_training.ignore_bottom) == (0, 0), preset
    for preset in ("hrda_daformer_cs2acdc", "hrda_daformer_cs2dz", "mic_hrda_daformer_cs2acdc",
                   "mic_hrda_daformer_cs2dz"):
        assert load_config(preset).data.target.pseudo_margins is None, preset
    assert load_config("daformer_mitb5_gta2cs").data.target.pseudo_margins is None  # DAFormer: the 15/120 rows


@pytest.mark.parametrize("value", ["[30, 240, 30]", "[30, 240, -1, 30]"])
def test_bad_margins_are_a_one_line_error_naming_the_key(value):
    with pytest.raises(UserError) as info:
        load_config("hrda_daformer_gta2cs", [f"data.target.pseudo_margins={value}"])
    assert "pseudo_margins" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_sepico_target_crop_crops_the_margin_map_with_the_image():
    from udaseg.adapt.step import Need
    from udaseg.methods.sepico import CROP_BOXES, TargetCropping

    cfg = load_config("sepico_distcl_mic_hrda_daformer_gta2cs", ["method.self_training.pseudo_threshold=0"])
    torch.manual_seed(0)
    model = UDAModel(build_model("daformer_tiny", 3)).train()
    image = torch.randn(2, 3, 64, 96)
    valid = torch.from_numpy(pseudo_valid_map((64, 96), (4, 12, 8, 8)).astype(bool)).expand(2, -1, -1)
    cropping = TargetCropping(cfg.method.sepico, cfg.method.self_training, (32, 32))
    ctx = StepContext(model, model, 0, torch.Generator().manual_seed(1), [Need("teacher", "target")], 3)
    ctx.batch = {"target": {"image": image, PSEUDO_VALID: valid}}
    ctx.add_view("target", image)
    cropping.prepare(ctx, ctx.batch)
    pseudo = teacher_pseudo_labels(ctx, cfg.method.self_training, "target")
    for i, (top, bottom, left, right) in enumerate(ctx.state[CROP_BOXES]):
        assert torch.equal(ctx.view("target").image[i], image[i, :, top:bottom, left:right])
        assert torch.equal(pseudo["weight"][i], valid[i, top:bottom, left:right].float())  # ratio 1 at threshold 0
