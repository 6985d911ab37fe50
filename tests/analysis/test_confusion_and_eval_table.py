"""The confusion matrix and the evaluation printout against a hand count."""

import math

import pytest
import torch
from torch import nn

from udaseg.config.schema import EvalConfig
from udaseg.evaluation.evaluator import evaluate
from udaseg.evaluation.metrics import format_mmseg_tables, normalised_confusion

# ground truth / prediction of a 2×4 image, 3 classes, one ignored pixel
LABEL = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 255]])
PRED = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 1]])
# hand count (rows: truth, columns: prediction), the 255 pixel skipped:
#   truth 0: predicted 0, 0, 1     truth 1: predicted 1, 2     truth 2: predicted 2, 0
HAND = [[2, 1, 0], [0, 1, 1], [1, 0, 1]]


class FixedPrediction(nn.Module):
    """A 'segmentor' whose logits put all mass on ``PRED`` whatever the image."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1).float()[None] * 10
        return logits.expand(x.shape[0], -1, -1, -1) + self.anchor


def test_evaluator_confusion_iou_and_accuracy_match_the_hand_count():
    data = [{"image": torch.zeros(3, 2, 4), "label": LABEL}] * 2
    result = evaluate(FixedPrediction(), data, EvalConfig(), 3, torch.device("cpu"), ["a", "b", "c"], progress=False)
    assert result["confusion_matrix"] == [[2 * v for v in row] for row in HAND]
    # IoU_c = TP / (row + column − TP): 2/(3+3−2), 1/(2+2−1), 1/(2+2−1)
    assert result["iou"] == pytest.approx([2 / 4, 1 / 3, 1 / 3])
    assert result["accuracy"] == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert result["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 7)
    protocol = evaluate(FixedPrediction(), data, EvalConfig(protocol="all"), 3, torch.device("cpu"), progress=False)
    assert protocol["miou"] == pytest.approx((0.5 + 2 / 3) / 3)


def test_normalised_confusion_rows_are_shares_of_the_true_class():
    rows = normalised_confusion(HAND + [[0, 0, 0]])
    assert rows[0] == pytest.approx([2 / 3, 1 / 3, 0]) and rows[2] == pytest.approx([0.5, 0, 0.5])
    assert all(math.isnan(v) for v in rows[3])  # a class without labelled pixels


def test_mmseg_printout_has_per_class_iou_and_acc_and_the_summary():
    text = format_mmseg_tables(["road", "car", "sky"], [0.5, 1 / 3, math.nan], [2 / 3, 0.5, math.nan],
                               aacc=4 / 7, miou=(0.5 + 1 / 3) / 2, macc=(2 / 3 + 0.5) / 2, classes=[0, 2])
    lines = text.splitlines()
    assert lines[0] == "per class results:" and "Summary:" in lines
    assert "| Class |  IoU  |  Acc  |" in lines
    assert "| road  | 50.00 | 66.67 |" in lines and "|  sky  |  nan  |  nan  |" in lines
    assert not any("car" in line for line in lines)  # outside the protocol's classes
    assert "| 57.14 | 41.67 | 58.33 |" in lines
