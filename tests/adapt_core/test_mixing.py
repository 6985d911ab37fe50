import math

import pytest
import torch

from udaseg.adapt.mixing import class_mix_masks, cutmix_boxes, mix


def test_class_mix_masks_use_batch_union_including_ignore():
    labels = torch.tensor(
        [
            [[0, 0, 1], [1, 255, 255]],
            [[2, 2, 3], [3, 4, 4]],
        ]
    )  # union {0,1,2,3,4,255}: n = 6 -> 3 classes per image
    generator = torch.Generator().manual_seed(0)
    masks = class_mix_masks(labels, generator)
    reference_gen = torch.Generator().manual_seed(0)
    classes = torch.tensor([0, 1, 2, 3, 4, 255])
    for i in range(2):
        chosen = classes[torch.randperm(6, generator=reference_gen)[:3]]
        assert chosen.numel() == 3
        expected = torch.zeros_like(labels[i], dtype=torch.bool)
        for c in chosen.tolist():
            expected |= labels[i] == c
        assert torch.equal(masks[i], expected)
    assert masks.dtype == torch.bool and masks.shape == labels.shape


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_class_mix_draws_half_rounded_up(n):
    # One image holding each of n classes once: the mask covers exactly ceil(n/2) pixels.
    labels = torch.arange(n).view(1, 1, n)
    for seed in range(5):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        assert int(masks.sum()) == math.ceil(n / 2)


def test_class_mix_accepts_channel_axis():
    labels = torch.tensor([[[[0, 1], [1, 0]]]])
    assert class_mix_masks(labels, torch.Generator().manual_seed(1)).shape == (1, 2, 2)


def test_mix_images_labels_weights():
    mask = torch.tensor([[[True, False], [False, True]]])
    source = torch.ones(1, 3, 2, 2)
    target = torch.zeros(1, 3, 2, 2)
    mixed = mix(mask, source, target)
    assert torch.equal(mixed[0, :, 0, 0], torch.ones(3))
    assert torch.equal(mixed[0, :, 0, 1], torch.zeros(3))
    labels = mix(mask, torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 3))
    assert labels.dtype == torch.int64 and labels.tolist() == [[[7, 3], [3, 7]]]
    weights = mix(mask, 1.0, torch.full((1, 2, 2), 0.4))
    assert torch.allclose(weights, torch.tensor([[[1.0, 0.4], [0.4, 1.0]]]))
    # Same as the arithmetic form M·a + (1 − M)·b.
    m = mask.float().unsqueeze(1)
    assert torch.equal(mixed, m * source + (1 - m) * target)


def test_cutmix_boxes_on_grid_and_inside():
    generator = torch.Generator().manual_seed(3)
    masks, boxes = cutmix_boxes(4, 512, 512, area_ratio=0.5, grid=8, generator=generator)
    assert masks.shape == (4, 512, 512)
    for mask, (top, left, height, width) in zip(masks, boxes.tolist()):
        assert height == width == 360
        assert top % 8 == 0 and left % 8 == 0
        assert top + height <= 512 and left + width <= 512
        assert int(mask.sum()) == 360 * 360
        assert bool(mask[top : top + height, left : left + width].all())


def test_cutmix_random_ratio_range():
    generator = torch.Generator().manual_seed(0)
    masks, boxes = cutmix_boxes(6, 32, 48, area_ratio=(0.1, 0.4), grid=1, generator=generator)
    for mask, (top, left, side, _) in zip(masks, boxes.tolist()):
        assert 0.1 * 32 * 48 - 2 * side <= side * side <= 0.4 * 32 * 48
        assert int(mask.sum()) == side * side
    with pytest.raises(ValueError):
        cutmix_boxes(1, 8, 8, area_ratio=1.5)


def test_class_mix_exclude_never_pastes_the_excluded_classes_and_halves_the_rest():
    labels = torch.zeros(16, 8, 8, dtype=torch.long)
    labels[:, :2, :2] = 3
    labels[:, 4:6, 4:6] = 5
    labels[:, 7, 7] = 255
    for seed in range(20):
        masks = class_mix_masks(labels, torch.Generator().manual_seed(seed), exclude=(0, 255))
        assert not masks[labels == 0].any() and not masks[labels == 255].any()
        # candidates {3, 5}: one is drawn per image, so each image pastes exactly one 2x2 block
        assert masks.flatten(1).sum(1).tolist() == [4] * 16
    only_background = torch.zeros(2, 4, 4, dtype=torch.long)
    assert not class_mix_masks(only_background, torch.Generator(), exclude=(0,)).any()


def test_class_mix_without_exclude_keeps_the_official_draws():
    labels = torch.randint(0, 4, (4, 6, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(class_mix_masks(labels, torch.Generator().manual_seed(3)),
                       class_mix_masks(labels, torch.Generator().manual_seed(3), exclude=()))
