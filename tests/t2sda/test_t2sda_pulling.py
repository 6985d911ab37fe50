import math

import numpy as np
import pytest
import torch

from udaseg.errors import UserError
from udaseg.methods.t2sda import (PullingLoss, class_fractions, class_query_counts, dynamic_class_weights,
                                  feature_resolution_targets,
                                  source_prototypes, unreliable_target_mask)

C = 4


def _batch(seed, d=6, b=2, h=3, w=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, d, h, w, generator=g, dtype=dtype, requires_grad=True)
    source_keys = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    target_keys = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    source_labels = torch.randint(0, C, (b, h, w), generator=g)
    source_labels[0, 0, 0] = 255
    target_labels = torch.randint(0, C, (b, h, w), generator=g)
    unreliable = torch.rand(b, h, w, generator=g) < 0.6
    return queries, source_keys, source_labels, target_keys, target_labels, unreliable


def _vector(features, flat_index):
    b, _, h, w = features.shape
    image, rest = divmod(flat_index, h * w)
    row, col = divmod(rest, w)
    return features[image, :, row, col]


def _unit(v):
    return v / math.sqrt(float((v * v).sum()))


def _reference_loss(samples, queries, source_keys, source_labels, target_keys, weights, tau, loss, reduction):
    """The pulling loss recomputed one query and one negative at a time."""
    per_class = {}
    flat_labels = source_labels.reshape(-1).tolist()
    for sample in samples:
        members = [i for i, y in enumerate(flat_labels) if y == sample.cls]
        prototype = _unit(sum(_vector(source_keys, i) for i in members) / len(members))
        losses = []
        for row, q_index in enumerate(sample.queries.tolist()):
            q = _unit(_vector(queries, q_index).detach())
            if loss == "mse":
                losses.append(float(((q - prototype) ** 2).sum()))
                continue
            logits = [float(q @ prototype) / tau]
            logits += [float(q @ _unit(_vector(source_keys, k))) / tau for k in sample.source_negatives[row].tolist()]
            logits += [float(q @ _unit(_vector(target_keys, k))) / tau for k in sample.target_negatives[row].tolist()]
            denominator = sum(math.exp(z) for z in logits)
            losses.append(-math.log(math.exp(logits[0]) / denominator))
        per_class[sample.cls] = losses
    if reduction == "mean":
        total_weight = sum(weights[c] for c in per_class)
        return sum(weights[c] / total_weight * sum(v) / len(v) for c, v in per_class.items())
    return sum(weights[c] * sum(v) for c, v in per_class.items()) / C


@pytest.mark.parametrize("loss_name", ["infonce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "paper_sum"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_pulling_loss_matches_loop_reference(loss_name, reduction, use_weights):
    queries, ks, ys, kt, yt, unreliable = _batch(0)
    module = PullingLoss(C, temperature=0.2, negatives=6, base_queries=3, loss=loss_name, reduction=reduction)
    weights = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64) if use_weights else None
    samples = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(11))
    loss, metrics = module(queries, ks, ys, kt, yt, unreliable, weights, generator=torch.Generator().manual_seed(11))
    reference_weights = weights.tolist() if use_weights else [1.0 / C] * C
    expected = _reference_loss(samples, queries, ks, ys, kt, reference_weights, 0.2, loss_name, reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics["classes"] == len(samples) > 0
    assert metrics["queries"] == sum(s.queries.numel() for s in samples)


def test_same_seed_same_sample_and_different_seed_differs():
    _, _, ys, _, yt, unreliable = _batch(1)
    module = PullingLoss(C, negatives=8, base_queries=4)
    a = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(3))
    b = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(3))
    c = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x.source_negatives, y.source_negatives) for x, y in zip(a, b))
    assert any(not torch.equal(x.source_negatives, y.source_negatives) for x, y in zip(a, c))


def test_queries_come_from_their_class_and_follow_cbqs_counts():
    _, _, ys, _, yt, unreliable = _batch(2)
    module = PullingLoss(C, negatives=8, base_queries=5)
    samples = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(0))
    flat = ys.reshape(-1)
    expected_counts = class_query_counts(class_fractions(ys, C), 5)
    for sample in samples:
        assert (flat[sample.queries] == sample.cls).all()
        assert sample.queries.numel() == expected_counts[sample.cls]


def test_denps_half_and_half_and_pools_respected():
    _, _, ys, _, yt, unreliable = _batch(3)
    m = 10
    module = PullingLoss(C, negatives=m, base_queries=4)
    samples = module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(0))
    flat_ys, flat_yt, flat_unrel = ys.reshape(-1), yt.reshape(-1), unreliable.reshape(-1)
    assert samples
    for sample in samples:
        n = sample.queries.numel()
        assert sample.source_negatives.shape == (n, m // 2)
        assert sample.target_negatives.shape == (n, m // 2)
        source_labels = flat_ys[sample.source_negatives]
        assert ((source_labels != sample.cls) & (source_labels != 255)).all()
        assert (flat_yt[sample.target_negatives] != sample.cls).all()
        assert flat_unrel[sample.target_negatives].all()


def test_denps_falls_back_to_source_when_target_pool_is_empty():
    _, _, ys, _, yt, _ = _batch(4)
    module = PullingLoss(C, negatives=10, base_queries=4)
    nothing_unreliable = torch.zeros_like(yt, dtype=torch.bool)
    for sample in module.draw(ys, yt, nothing_unreliable, generator=torch.Generator().manual_seed(0)):
        assert sample.source_negatives.shape == (sample.queries.numel(), 10)
        assert sample.target_negatives.shape[1] == 0
    # A target where every unreliable pixel has the query's class also leaves that class without target negatives.
    same_class = torch.zeros_like(yt)
    for sample in module.draw(ys, same_class, torch.ones_like(yt, dtype=torch.bool), torch.Generator().manual_seed(0)):
        expected_target = 0 if sample.cls == 0 else 5
        assert sample.target_negatives.shape[1] == expected_target


def test_target_negatives_off_takes_all_from_source():
    _, _, ys, _, yt, unreliable = _batch(5)
    module = PullingLoss(C, negatives=10, base_queries=4, target_negatives=False)
    for sample in module.draw(ys, yt, unreliable, generator=torch.Generator().manual_seed(0)):
        assert sample.source_negatives.shape[1] == 10 and sample.target_negatives.shape[1] == 0


def test_single_source_class_is_skipped_and_loss_keeps_the_graph():
    queries, ks, _, kt, yt, unreliable = _batch(6)
    ys = torch.full((2, 3, 4), 2)
    ys[0, 0] = 255
    module = PullingLoss(C, negatives=6, base_queries=3)
    loss, metrics = module(queries, ks, ys, kt, yt, unreliable, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and metrics["classes"] == 0
    loss.backward()
    assert queries.grad is not None and queries.grad.abs().sum() == 0
    # The MSE variant needs no negatives, so the class still counts.
    mse_loss, mse_metrics = PullingLoss(C, loss="mse", base_queries=3)(queries, ks, ys)
    assert mse_metrics["classes"] == 1 and mse_loss.item() > 0


def test_gradient_reaches_only_the_queries():
    queries, ks, ys, kt, yt, unreliable = _batch(7)
    ks.requires_grad_(True)
    kt.requires_grad_(True)
    loss, _ = PullingLoss(C, negatives=6, base_queries=3)(queries, ks, ys, kt, yt, unreliable,
                                                           generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert ks.grad is None and kt.grad is None
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_mse_variant_is_two_minus_two_cosine():
    queries, ks, ys, _, _, _ = _batch(8)
    module = PullingLoss(C, loss="mse", base_queries=3)
    samples = module.draw(ys, generator=torch.Generator().manual_seed(0))
    per_query = module.per_query_losses(queries, ks, ys, None, samples)
    prototypes, _ = source_prototypes(ks, ys, C)
    for sample, losses in zip(samples, per_query):
        q = torch.stack([_vector(queries, i) for i in sample.queries.tolist()])
        cosine = torch.nn.functional.cosine_similarity(q, prototypes[sample.cls].unsqueeze(0), dim=1)
        assert torch.allclose(losses, 2 - 2 * cosine)


def test_infonce_vanishes_when_query_equals_positive_and_negatives_are_orthogonal():
    d = C
    # Source features are one-hot per class, so prototypes and negatives are orthogonal unit vectors.
    ys = torch.tensor([[[0, 1], [2, 3]]])
    ks = torch.nn.functional.one_hot(ys, d).permute(0, 3, 1, 2).double()
    queries = ks.clone().requires_grad_(True)
    loss, _ = PullingLoss(C, temperature=0.01, negatives=8, base_queries=2)(
        queries, ks, ys, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-30 + 8 * math.exp(-100)


def test_prototype_is_normalised_mean_of_raw_features():
    _, ks, ys, _, _, _ = _batch(9)
    prototypes, present = source_prototypes(ks, ys, C)
    for cls in range(C):
        members = [_vector(ks, i) for i, y in enumerate(ys.reshape(-1).tolist()) if y == cls]
        assert bool(present[cls]) == bool(members)
        if members:
            assert torch.allclose(prototypes[cls], _unit(sum(members) / len(members)))


def test_class_query_counts():
    fractions = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = class_query_counts(fractions, base_queries=10)
    assert counts.tolist() == [20, 12, 8, 0]
    assert class_query_counts(fractions, base_queries=10, balanced=False).tolist() == [10, 10, 10, 0]
    # ceil with float-exact inputs: a uniform distribution over 19 classes gives exactly n each.
    uniform = class_fractions(torch.arange(19).repeat(7), 19)
    assert class_query_counts(uniform, 128).tolist() == [128] * 19
    # Rounding up: the total is at least C * n and at most C * n + C.
    odd = class_fractions(torch.tensor([0] * 7 + [1] * 5 + [2] * 1 + [255] * 4), 3)
    counts = class_query_counts(odd, 4)
    assert counts.tolist() == [math.ceil(3 * 7 / 13 * 4), math.ceil(3 * 5 / 13 * 4), math.ceil(3 * 1 / 13 * 4)]
    assert 12 <= counts.sum() <= 15


def _reference_drw(labels, confidence, num_classes, beta, absent):
    labels, confidence = labels.reshape(-1).tolist(), confidence.reshape(-1).tolist()
    conf, present = [], []
    for c in range(num_classes):
        values = [p for y, p in zip(labels, confidence) if y == c]
        present.append(bool(values))
        conf.append(sum(values) / len(values) if values else 0.0)
    if absent == "max":
        top = max(1 - x for x in conf)
        weights = [((1 - x) / top) ** beta for x in conf]
    else:
        top = max(1 - x for x, p in zip(conf, present) if p)
        raw = [((1 - x) / top) ** beta for x, p in zip(conf, present) if p]
        mean = sum(raw) / len(raw)
        weights = [((1 - x) / top) ** beta if p else mean for x, p in zip(conf, present)]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("absent", ["max", "mean"])
@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_dynamic_class_weights_match_formula(absent, beta):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)  # class 4 is absent
    labels[0, 0, :3] = 255
    confidence = 0.3 + 0.7 * torch.rand(2, 5, 6, generator=g)
    weights = dynamic_class_weights(labels, confidence, 5, beta=beta, absent=absent)
    expected = _reference_drw(labels, confidence, 5, beta, absent)
    assert weights.tolist() == pytest.approx(expected, rel=1e-5)
    assert weights.sum().item() == pytest.approx(1.0)
    present_conf = [confidence[labels == c].mean().item() for c in range(4)]
    assert int(weights[:4].argmax()) == int(np.argmin(present_conf))
    if absent == "max":
        assert int(weights.argmax()) == 4


def test_dynamic_class_weights_edge_cases():
    labels = torch.tensor([[[0, 1, 1, 2]]])
    confidence = torch.tensor([[[0.9, 0.5, 0.7, 0.99]]])
    assert torch.allclose(dynamic_class_weights(labels, confidence, 3, beta=0.0), torch.full((3,), 1 / 3))
    certain = dynamic_class_weights(labels, torch.ones(1, 1, 4), 3)
    assert torch.allclose(certain, torch.full((3,), 1 / 3))
    subset = dynamic_class_weights(labels, confidence, [1, 2])
    assert subset.shape == (2,) and subset[0] > subset[1]
    with pytest.raises(UserError):
        dynamic_class_weights(labels, confidence, 3, absent="min")


def test_unreliable_mask_matches_numpy_percentile():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2, 5, 7, generator=g)
    for alpha in (0.1, 0.5, 0.9):
        gamma = np.percentile(conf.numpy().flatten(), 100 * alpha)
        assert torch.equal(unreliable_target_mask(conf, alpha), conf < float(gamma))
        per_image = unreliable_target_mask(conf, alpha, per_image=True)
        for i in range(2):
            gamma_i = np.percentile(conf[i].numpy().flatten(), 100 * alpha)
            assert torch.equal(per_image[i], conf[i] < float(gamma_i))
    assert unreliable_target_mask(conf, 0.5).sum() == 35
    with pytest.raises(UserError):
        unreliable_target_mask(conf, 1.5)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="temperature"):
        PullingLoss(C, temperature=0)
    with pytest.raises(UserError, match="loss"):
        PullingLoss(C, loss="cosine")
    with pytest.raises(UserError, match="reduction"):
        PullingLoss(C, reduction="sum")


def test_feature_resolution_targets():
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 0, 1, 255],
                            [2, 2, 3, 1],
                            [2, 255, 1, 3]]])
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, C, 4, 6, generator=g), dim=1)
    out = feature_resolution_targets(labels, probs, (2, 2), (2, 3), C, label_downsample="ratio", min_ratio=0.75)
    # Purity over all four pixels of the block: (1, 255) block has 3/4 ones -> 1; (3, 1) block is mixed -> 255.
    assert out.source_labels.tolist() == [[[0, 1], [2, 255]]]
    nearest = feature_resolution_targets(labels, probs, (2, 2), (2, 3), C, label_downsample="nearest")
    assert nearest.source_labels.tolist() == [[[0, 1], [2, 3]]]
    pooled = torch.nn.functional.avg_pool2d(probs, 2)
    assert torch.allclose(out.target_confidence, pooled.max(dim=1).values)
    assert torch.equal(out.target_labels, pooled.argmax(dim=1))
    assert torch.equal(out.target_unreliable, unreliable_target_mask(out.target_confidence, 0.5))
