"""Class-balanced cropping (Alg. 1, official rule) and the Dark Zurich helpers."""

import math
from collections import Counter

import pytest
import torch

from udaseg.methods.sepico import (
    class_balanced_crop_box,
    class_balanced_crop_boxes,
    crop_batch,
    crop_box_score,
    dark_zurich_class_weights,
    fuse_day_night,
)


def example_label() -> torch.Tensor:
    """4 x 12 pseudo-label; 4 x 4 boxes can only move horizontally (offsets 0..8)."""
    label = torch.full((4, 12), 255, dtype=torch.long)
    label[:, 0:4] = 0
    label[:, 4:6] = 1
    label[:, 6] = 2
    label[:, 8:10] = 3
    label[0:3, 10] = 4
    label[0, 11] = 5
    label[1:4, 11] = 3
    return label


def hand_score(crop: torch.Tensor, cat_max_ratio: float = 0.75) -> float:
    counts = Counter(v for v in crop.reshape(-1).tolist() if v != 255)
    total = sum(counts.values())
    if len(counts) < 2 or max(counts.values()) / total >= cat_max_ratio:
        return 0.0
    return sum(math.log(c) for c in counts.values() if c > 1)


@pytest.mark.parametrize(
    "x, expected",
    [
        (0, 0.0),  # one class
        (1, 0.0),  # class 0 covers 12/16 = exactly 0.75: not below the ratio
        (2, math.log(8) + math.log(8)),
        (3, math.log(4) + math.log(8) + math.log(4)),
        (4, math.log(8) + math.log(4)),  # the 255 column does not count
        (6, math.log(4) + math.log(8)),
        (8, math.log(11) + math.log(3)),  # class 5 has one pixel and is skipped
    ],
)
def test_scores_of_hand_worked_boxes(x, expected):
    crop = example_label()[:, x : x + 4]
    assert crop_box_score(crop) == pytest.approx(expected, abs=1e-9)
    assert hand_score(crop) == pytest.approx(expected, abs=1e-9)


def replay_offsets(seed: int, candidates: int, margin_h: int, margin_w: int):
    g = torch.Generator().manual_seed(seed)
    offsets = []
    for _ in range(candidates):
        y = int(torch.randint(0, margin_h + 1, (1,), generator=g))
        x = int(torch.randint(0, margin_w + 1, (1,), generator=g))
        offsets.append((y, x))
    return offsets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_best_of_ten_candidates(seed):
    label = example_label()
    offsets = replay_offsets(seed, 10, 0, 8)
    best_score, best = -1.0, None
    for y, x in offsets:  # the official loop: best starts at -1, strictly greater replaces
        score = hand_score(label[y : y + 4, x : x + 4])
        if score > best_score:
            best_score, best = score, (y, y + 4, x, x + 4)
    box = class_balanced_crop_box(label, (4, 4), generator=torch.Generator().manual_seed(seed))
    assert box == best


def test_ties_keep_the_first_candidate():
    label = example_label()
    seed = next(s for s in range(10000) if [x for _, x in replay_offsets(s, 2, 0, 8)] in ([4, 6], [6, 4]))
    (_, first_x), _ = replay_offsets(seed, 2, 0, 8)
    box = class_balanced_crop_box(label, (4, 4), candidates=2, generator=torch.Generator().manual_seed(seed))
    assert box == (0, 4, first_x, first_x + 4)
    uniform = torch.zeros(6, 9, dtype=torch.long)  # every score is 0: the first box is kept
    (y0, x0), *_ = replay_offsets(7, 10, 2, 5)
    assert class_balanced_crop_box(uniform, (4, 4), generator=torch.Generator().manual_seed(7)) == (y0, y0 + 4, x0, x0 + 4)


def test_batched_boxes_and_crop():
    labels = torch.stack([example_label(), example_label().flip(1)])
    boxes = class_balanced_crop_boxes(labels, (4, 4), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert boxes == [class_balanced_crop_box(label, (4, 4), generator=g) for label in labels]
    images = torch.arange(2 * 3 * 4 * 12, dtype=torch.float32).reshape(2, 3, 4, 12)
    cropped = crop_batch(images, boxes)
    assert cropped.shape == (2, 3, 4, 4)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        assert torch.equal(cropped[i], images[i, :, y1:y2, x1:x2])
    assert torch.equal(crop_batch(labels, boxes)[1], labels[1, boxes[1][0] : boxes[1][1], boxes[1][2] : boxes[1][3]])


OFFICIAL_TRAIN_WEIGHTS = [0.9041, 0.9542, 0.9175, 1.0162, 1.0081, 0.9988, 1.0482, 1.0210, 0.9275, 1.0004,
                          0.9658, 0.9990, 1.0601, 0.9504, 1.0411, 1.0447, 1.0450, 1.0689, 1.0290]  # fmt: skip
OFFICIAL_TEST_WEIGHTS = [0.6932, 0.8536, 0.7359, 1.0519, 1.0259, 0.9961, 1.1541, 1.0673, 0.7679, 1.0013,
                         0.8905, 0.9967, 1.1924, 0.8412, 1.1317, 1.1431, 1.1440, 1.2204, 1.0928]  # fmt: skip


@pytest.mark.parametrize("scale, expected", [(0.05, OFFICIAL_TRAIN_WEIGHTS), (0.16, OFFICIAL_TEST_WEIGHTS)])
def test_dark_zurich_class_weights(scale, expected):
    weights = dark_zurich_class_weights(scale)
    assert weights.shape == (19,)
    for value, printed in zip(weights.tolist(), expected):
        assert abs(value - printed) <= 1e-4 + 1e-9


def test_fuse_day_night_matches_the_rule():
    g = torch.Generator().manual_seed(0)
    p_day = torch.softmax(4 * torch.randn(2, 19, 2, 3, generator=g), dim=1)
    p_night = torch.softmax(4 * torch.randn(2, 19, 2, 3, generator=g), dim=1)
    weights = dark_zurich_class_weights(0.05)
    fused = fuse_day_night(p_day, p_night, weights)
    static = {0, 1, 2, 3, 4, 8, 9, 10}
    confident = p_day[:, sorted(static)] > 0.4
    assert bool(confident.any()) and not bool(confident.all())  # both branches of the rule occur
    for b in range(2):
        for c in range(19):
            for i in range(2):
                for j in range(3):
                    day, night = float(p_day[b, c, i, j]), float(p_night[b, c, i, j])
                    w = (0.8 if day > 0.4 else 0.2) if c in static else 0.0
                    expected = (w * day + (1 - w) * night) * float(weights[c])
                    assert abs(float(fused[b, c, i, j]) - expected) < 1e-6
    unweighted = fuse_day_night(p_day, p_night)
    torch.testing.assert_close(unweighted * weights.view(1, -1, 1, 1), fused)
