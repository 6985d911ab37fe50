import math

import torch

from udaseg.evaluation.metrics import ConfusionMatrix


def _hand_case():
    # 4 classes; class 3 never appears in labels or predictions.
    label = torch.tensor([[0, 0, 1, 1, 2, 255], [2, 2, 0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 3], [0, 2, 0, 2, 0, 0]])
    return pred, label


def test_matrix_and_iou_by_hand():
    pred, label = _hand_case()
    cm = ConfusionMatrix(4)
    cm.update(pred[:1], label[:1])
    cm.update(pred[1:], label[1:])
    expected = torch.tensor(
        [
            [2, 1, 0, 0],  # label 0: pred 0,1,0
            [0, 2, 1, 0],  # label 1: pred 1,1,2
            [1, 0, 2, 0],  # label 2: pred 2,0,2
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(cm.matrix, expected)
    iou = cm.iou().tolist()
    # class 0: tp 2, fn 1, fp 1 -> 2/4; class 1: tp 2, fn 1, fp 1 -> 2/4; class 2: 2/4
    assert iou[:3] == [0.5, 0.5, 0.5]
    assert math.isnan(iou[3])
    assert cm.miou() == 0.5  # NaN class excluded
    assert abs(cm.pixel_accuracy() - 6 / 9) < 1e-12


def test_predicted_only_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    iou = cm.iou().tolist()
    assert iou[0] == 0.5 and math.isnan(iou[1]) and iou[2] == 0.0
    assert cm.miou() == 0.25
    assert cm.miou(classes=[0]) == 0.5
    assert math.isnan(cm.miou(classes=[1]))


def test_dataset_level_not_per_image_mean():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1
    cm.update(torch.tensor([1]), torch.tensor([1]))  # image 2
    # class 0: tp 3, fp 1 -> 3/4; class 1: tp 1, fn 1 -> 1/2
    assert cm.iou().tolist() == [0.75, 0.5]


def test_merge_summary_and_table():
    pred, label = _hand_case()
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred[:1], label[:1])
    b.update(pred[1:], label[1:])
    whole = ConfusionMatrix(4)
    whole.update(pred, label)
    a.merge(b)
    assert torch.equal(a.matrix, whole.matrix)
    names = ["road", "car", "sky", "bus"]
    summary = a.summary(names, classes=[0, 1, 3])
    assert abs(summary["mIoU"] - 50.0) < 1e-9
    assert set(summary) == {"mIoU", "mAcc", "aAcc", "IoU.road", "IoU.car", "IoU.bus"}
    table = a.format_table(names)
    assert "road" in table and "50.00" in table and "n/a" in table
    a.reset()
    assert int(a.matrix.sum()) == 0
