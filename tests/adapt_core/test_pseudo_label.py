import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.pseudo_label import confidence_ratio, pseudo_labels, pseudo_weight_map


def test_pseudo_labels_upsample_softmax_argmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    out = pseudo_labels(logits, size=(6, 10))
    up = F.interpolate(logits, size=(6, 10), mode="bilinear", align_corners=False)
    probs = torch.softmax(up, dim=1)
    assert out.probs.shape == (2, 4, 6, 10)
    assert torch.allclose(out.probs, probs)
    assert torch.equal(out.labels, probs.argmax(dim=1))
    assert torch.allclose(out.confidence, probs.max(dim=1).values)
    same = pseudo_labels(logits)
    assert same.labels.shape == (2, 3, 5)


def test_confidence_ratio_counts_equal_threshold():
    confidence = torch.tensor([[[0.968, 0.5], [0.99, 0.9679]]])  # 2 of 4 are >= 0.968
    threshold = float(torch.tensor(0.968))  # the float32 value stored in the tensor
    assert float(confidence_ratio(confidence, threshold)) == 0.5


def test_confidence_ratio_over_whole_batch_and_per_image():
    confidence = torch.zeros(2, 2, 2)
    confidence[0] = 1.0  # image 0 fully confident, image 1 not at all
    confidence[1, 0, 0] = 1.0
    assert float(confidence_ratio(confidence)) == 5 / 8
    assert confidence_ratio(confidence, per_image=True).tolist() == [1.0, 0.25]


def test_weight_map_ignores_rows():
    weights = pseudo_weight_map(0.75, (2, 6, 3), ignore_top=1, ignore_bottom=2)
    expected = torch.full((2, 6, 3), 0.75)
    expected[:, 0] = 0
    expected[:, 4:] = 0
    assert torch.equal(weights, expected)
    per_image = pseudo_weight_map(torch.tensor([0.5, 1.0]), (2, 2, 2))
    assert per_image[0].unique().tolist() == [0.5] and per_image[1].unique().tolist() == [1.0]
    assert torch.equal(pseudo_weight_map(torch.tensor(0.3), (1, 2, 2)), torch.full((1, 2, 2), 0.3))


def test_pseudo_label_accuracy_counts_labelled_and_confident_pixels_by_hand():
    from udaseg.adapt.pseudo_label import pseudo_label_accuracy

    labels = torch.tensor([[[1, 2], [3, 4]]])
    truth = torch.tensor([[[1, 0], [3, 255]]])
    confidence = torch.tensor([[[0.99, 0.99], [0.5, 0.99]]])
    out = pseudo_label_accuracy(labels, truth, confidence, threshold=0.9)
    assert out["pseudo_acc"] == pytest.approx(2 / 3)  # 3 labelled pixels, 2 right
    assert out["pseudo_acc_confident"] == pytest.approx(1 / 2)  # confident & labelled: (0,0) right, (0,1) wrong
    # labelled pixels (truth, pseudo): (1,1) (0,2) (3,3); IoU: class 0 0/1, 1 1/1, 2 0/1, 3 1/1
    assert out["pseudo_miou"] == pytest.approx(0.5)
    none_confident = pseudo_label_accuracy(labels, truth, confidence * 0, threshold=0.9)
    assert math.isnan(none_confident["pseudo_acc_confident"])
