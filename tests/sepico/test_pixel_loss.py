"""sepico_pixel_loss: label downsampling, valid-pixel selection, weighting and the empty case."""

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.stats import OnlineClassStatistics
from udaseg.errors import UserError
from udaseg.methods.sepico import (
    BankContrastiveLoss,
    ContrastRegularizer,
    DistContrastiveLoss,
    ProtoContrastiveLoss,
    sepico_pixel_loss,
)

K, A = 4, 6


def fitted_stats(bank_size: int = 3) -> OnlineClassStatistics:
    g = torch.Generator().manual_seed(0)
    stats = OnlineClassStatistics(K, A, bank_size=bank_size)
    for _ in range(3):
        stats.update(F.normalize(torch.rand(20, A, generator=g), dim=1), torch.randint(0, K, (20,), generator=g))
    return stats


def example():
    """Features 1 x A x 2 x 2; labels 4 x 4 at scale 2."""
    labels = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 255],  # top-right block: class 1 covers exactly 3/4 -> kept
            [2, 2, 255, 255],
            [0, 0, 255, 255],  # bottom-left: 2/4 of class 2 -> ignored; bottom-right: all ignored
        ]
    ).unsqueeze(0)
    features = F.normalize(torch.rand(1, A, 2, 2, generator=torch.Generator().manual_seed(1)), dim=1)
    return features.requires_grad_(True), labels


@pytest.mark.parametrize("variant", ["proto", "dist", "bank"])
def test_loss_uses_the_majority_cells_only(variant):
    stats = fitted_stats()
    features, labels = example()
    loss, metrics = sepico_pixel_loss(features, labels, stats, variant=variant, temperature=0.1, weight=0.5, reg_weight=2.0)
    queries = features[0, :, 0, :].T  # cells (0, 0) and (0, 1)
    targets = torch.tensor([0, 1])
    if variant == "proto":
        contrast = ProtoContrastiveLoss(0.1)(queries, targets, stats.mean)
    elif variant == "dist":
        contrast = DistContrastiveLoss(0.1)(queries, targets, stats.mean, stats.var)
    else:
        bank, mask = stats.bank_with_mask()
        contrast = BankContrastiveLoss(0.1)(queries, targets, bank, mask)
    reg = ContrastRegularizer(0.1)(queries, stats.mean)
    torch.testing.assert_close(loss, 0.5 * (contrast + 2.0 * reg))
    torch.testing.assert_close(metrics["cl"], contrast.detach())
    torch.testing.assert_close(metrics["reg"], reg.detach())
    assert float(metrics["pixels"]) == 2.0
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    loss.backward()
    assert float(features.grad[0, :, 0, :].abs().sum()) > 0  # the valid cells get gradients
    assert float(features.grad[0, :, 1, :].abs().sum()) == 0  # ignored cells do not
    assert all(torch.equal(v, stats.state_dict()[k]) for k, v in before.items())


def test_without_regulariser_only_the_contrast_counts():
    stats = fitted_stats()
    features, labels = example()
    loss, metrics = sepico_pixel_loss(features, labels, stats, variant="proto", temperature=100.0, reg_weight=0.0)
    torch.testing.assert_close(loss, ProtoContrastiveLoss(100.0)(features[0, :, 0, :].T, torch.tensor([0, 1]), stats.mean))
    assert float(metrics["reg"]) == 0.0


def test_no_valid_pixel_gives_a_connected_zero():
    stats = fitted_stats()
    features, _ = example()
    labels = torch.full((1, 4, 4), 255)
    loss, metrics = sepico_pixel_loss(features, labels, stats)
    assert float(loss.detach()) == 0.0 and float(metrics["pixels"]) == 0.0
    loss.backward()
    assert features.grad is not None and float(features.grad.abs().sum()) == 0.0


def test_same_resolution_labels_are_used_directly():
    stats = fitted_stats()
    features, _ = example()
    labels = torch.tensor([[[3, 255], [1, 2]]])
    loss, _ = sepico_pixel_loss(features, labels, stats, variant="dist", reg_weight=0.0)
    queries = features.permute(0, 2, 3, 1).reshape(-1, A)[[0, 2, 3]]
    torch.testing.assert_close(loss, DistContrastiveLoss(100.0)(queries, torch.tensor([3, 1, 2]), stats.mean, stats.var))


def test_user_errors():
    features, labels = example()
    with pytest.raises(UserError, match="not an integer multiple"):
        sepico_pixel_loss(features, labels[:, :, :3], fitted_stats())
    with pytest.raises(UserError, match="bank_size"):
        sepico_pixel_loss(features, labels, fitted_stats(bank_size=0), variant="bank")
    with pytest.raises(UserError, match="variant"):
        sepico_pixel_loss(features, labels, fitted_stats(), variant="queue")
