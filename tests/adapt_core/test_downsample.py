import pytest
import torch

from udaseg.adapt.downsample import downscale_label_nearest, downscale_label_ratio


def _loop_reference(labels, scale, min_ratio, num_classes, ignore=255):
    batch, height, width = labels.shape
    out = torch.full((batch, height // scale, width // scale), ignore, dtype=torch.long)
    for b in range(batch):
        for i in range(height // scale):
            for j in range(width // scale):
                block = labels[b, i * scale : (i + 1) * scale, j * scale : (j + 1) * scale].flatten().tolist()
                counts = {}
                for v in block:
                    key = num_classes if v == ignore else v
                    counts[key] = counts.get(key, 0) + 1
                best = max(counts.values())
                winner = min(k for k, c in counts.items() if c == best)
                if winner != num_classes and best / len(block) >= min_ratio:
                    out[b, i, j] = winner
    return out


@pytest.mark.parametrize("scale", [2, 4])
def test_ratio_downsampling_matches_loop(scale):
    generator = torch.Generator().manual_seed(scale)
    # Blocky labels so that many cells pass the 75% rule, plus noise and ignore pixels.
    coarse = torch.randint(0, 4, (2, 4, 5), generator=generator)
    labels = coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    noise = torch.rand(labels.shape, generator=generator)
    labels = torch.where(noise < 0.1, torch.randint(0, 4, labels.shape, generator=generator), labels)
    labels = torch.where(noise > 0.93, torch.full_like(labels, 255), labels)
    labels = torch.cat([labels, torch.zeros(2, 1, labels.shape[2], dtype=labels.dtype)], dim=1)  # ragged
    out = downscale_label_ratio(labels, scale, 0.75, num_classes=4)
    assert torch.equal(out, _loop_reference(labels, scale, 0.75, 4))
    kept = (out != 255).float().mean()
    assert 0.2 < float(kept) < 1.0  # both outcomes occur


def test_ratio_rules_by_hand():
    labels = torch.tensor(
        [[[1, 1, 2, 2], [1, 255, 2, 3], [255, 255, 0, 0], [255, 4, 0, 0]]]
    )
    # cells: [1,1,1,255] -> 1 (0.75); [2,2,2,3] -> 2; ignore majority -> 255; [0]*4 -> 0
    out = downscale_label_ratio(labels, 2, 0.75, num_classes=5)
    assert out.tolist() == [[[1, 2], [255, 0]]]
    strict = downscale_label_ratio(labels, 2, 0.8, num_classes=5)
    assert strict.tolist() == [[[255, 255], [255, 0]]]
    with_channel = downscale_label_ratio(labels[:, None], 2, 0.75, num_classes=5)
    assert with_channel.shape == (1, 1, 2, 2)


def test_ratio_rejects_bad_values():
    with pytest.raises(ValueError):
        downscale_label_ratio(torch.tensor([[[7, 7], [7, 7]]]), 2, num_classes=5)


def test_nearest_downsampling():
    labels = torch.arange(16).view(1, 4, 4)
    assert downscale_label_nearest(labels, scale=2).tolist() == [[[0, 2], [8, 10]]]
    assert downscale_label_nearest(labels, size=(1, 2)).tolist() == [[[0, 2]]]
    assert downscale_label_nearest(labels, scale=2).dtype == labels.dtype
    with pytest.raises(ValueError):
        downscale_label_nearest(labels)


def _pooled_one_hot_reference(labels, scale, min_ratio, num_classes, ignore_index=255):
    """The rule written out as the official code does it: one-hot, average-pool, argmax."""
    import torch.nn.functional as F

    remapped = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)
    one_hot = F.one_hot(remapped, num_classes + 1).permute(0, 3, 1, 2).float()
    fraction, best = F.avg_pool2d(one_hot, scale, scale).max(dim=1)
    return torch.where((best == num_classes) | (fraction < min_ratio), torch.full_like(best, ignore_index), best)


@pytest.mark.parametrize("scale,min_ratio", [(2, 0.5), (4, 0.75), (8, 0.75), (3, 0.6)])
def test_ratio_downscale_equals_pooled_one_hot(scale, min_ratio):
    gen = torch.Generator().manual_seed(scale)
    # few classes on a coarse grid, so blocks are often pure, often tied, often mixed with ignore
    coarse = torch.randint(0, 4, (2, 7, 9), generator=gen)
    labels = coarse.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :20, :26].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = 255
    expected = _pooled_one_hot_reference(labels, scale, min_ratio, num_classes=4)
    assert torch.equal(downscale_label_ratio(labels, scale, min_ratio, num_classes=4), expected)
