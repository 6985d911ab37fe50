"""HRDA's crop geometry against hand-computed boxes: offsets, scales, label crops, bad input."""

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.geometry import CropBox
from udaseg.adapt.multires import check_detail_crop, context_downscale, draw_detail_box, slide_boxes
from udaseg.errors import UserError
from udaseg.models import build_model


def _boxes(height, width, detail, draws=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [draw_detail_box(height, width, detail, 8, g) for _ in range(draws)]


def test_paper_size_offsets_are_multiples_of_8_up_to_504():
    boxes = _boxes(1024, 1024, (512, 512), draws=2000)
    rows = {b.top for b in boxes}
    cols = {b.left for b in boxes}
    assert rows == cols == set(range(0, 505, 8))  # 64 offsets each; 512 is never drawn (official quirk)
    assert all(b.height == 512 and b.width == 512 for b in boxes)


def test_rectangular_crop_offsets_match_hand_computed_sets():
    # 64x96 context, 32x48 detail: rows (64-32+1)//8 = 4 choices, cols (96-48+1)//8 = 6 choices.
    boxes = _boxes(64, 96, (32, 48))
    assert {b.top for b in boxes} == {0, 8, 16, 24}
    assert {b.left for b in boxes} == {0, 8, 16, 24, 32, 40}
    assert all((b.height, b.width) == (32, 48) for b in boxes)


def test_draw_order_rows_then_columns_from_the_generator():
    box = draw_detail_box(1024, 1024, (512, 512), 8, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    y1 = int(torch.randint(64, (1,), generator=g)) * 8
    x1 = int(torch.randint(64, (1,), generator=g)) * 8
    assert box == CropBox.from_corners(y1, y1 + 512, x1, x1 + 512)


def test_detail_crop_of_context_size_is_the_whole_crop_and_small_margins_give_offset_0():
    assert draw_detail_box(64, 64, (64, 64), 8) == CropBox.from_corners(0, 64, 0, 64)
    assert {b.top for b in _boxes(68, 64, (64, 32), draws=50)} == {0}  # margin 4 < 8


def test_boxes_on_the_prediction_grids():
    box = CropBox.from_corners(8, 520, 496, 1008)
    assert box.scaled(1 / 8) == CropBox.from_corners(1, 65, 62, 126)  # context grid (stride 4 / 0.5)
    assert box.scaled(1 / 4) == CropBox.from_corners(2, 130, 124, 252)  # detail grid (stride 4)
    # truncation, as the official scale_box
    assert CropBox.from_corners(12, 44, 4, 36).scaled(1 / 16) == CropBox.from_corners(0, 2, 0, 2)


def test_crops_of_images_labels_and_weights():
    box = CropBox.from_corners(8, 24, 16, 40)
    image = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    label = torch.arange(2 * 32 * 48).reshape(2, 32, 48)
    assert torch.equal(box.crop(image), image[:, :, 8:24, 16:40])
    assert torch.equal(box.crop(label), label[:, 8:24, 16:40])
    assert box.crop(label[0]).shape == (16, 24)


def test_context_input_is_2x2_box_averaging_at_scale_half():
    images = torch.randn(2, 3, 16, 24)
    assert torch.allclose(context_downscale(images, 0.5), F.avg_pool2d(images, 2), atol=1e-6)
    assert context_downscale(images, 1.0) is images


def test_overlapping_slide_windows():
    offsets = {(b.top, b.left) for b in slide_boxes(1024, 1024, (512, 512))}
    assert offsets == {(y, x) for y in (0, 256, 512) for x in (0, 256, 512)}
    assert {(b.top, b.left) for b in slide_boxes(1024, 1024, (512, 512), overlapping=False)} == \
        {(y, x) for y in (0, 512) for x in (0, 512)}
    # 64x96 crop, 32x32 windows at stride 16: rows {0,16,32}, cols {0,16,...,64}; all 32x32.
    boxes = slide_boxes(64, 96, (32, 32))
    assert [(b.top, b.left) for b in boxes] == [(y, x) for y in (0, 16, 32) for x in (0, 16, 32, 48, 64)]
    assert all((b.height, b.width) == (32, 32) for b in boxes)


@pytest.mark.parametrize("context, detail", [((512, 512), (1024, 512)), ((1024, 1024), (512, 1025))])
def test_a_detail_crop_larger_than_the_context_is_a_one_line_error(context, detail):
    with pytest.raises(UserError) as info:
        check_detail_crop(context, detail)
    message = str(info.value)
    assert "model.options.detail_crop_size" in message and len(message.splitlines()) == 1
    assert f"{context[0]}x{context[1]}" in message


def test_the_model_refuses_a_detail_crop_larger_than_its_input():
    model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[128, 64])
    with pytest.raises(UserError, match="model.options.detail_crop_size"):
        model(torch.randn(1, 3, 64, 64), mode="train")
    with pytest.raises(UserError, match="model.options.detail_crop_size"):
        build_model("hrda_daformer_tiny", 3, detail_crop_size=[0, 32])
