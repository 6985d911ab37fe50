"""SePiCo losses against plain per-pixel / per-class loop references and their properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.methods.sepico import (
    BankContrastiveLoss,
    ContrastRegularizer,
    DistContrastiveLoss,
    ProtoContrastiveLoss,
)

K, A = 4, 8
TEMPERATURES = [100.0, 0.1]


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.rand(7, A, generator=g), dim=1)  # non-negative, unit norm (official head)
    labels = torch.tensor([0, 1, 3, 3, 0, 1, 0])  # class 2 absent among the queries
    mean = 0.8 * F.normalize(torch.rand(K, A, generator=g), dim=1)
    mean[2] = 0.0  # a class never seen yet
    var = 0.05 * torch.rand(K, A, generator=g)
    root = 0.1 * torch.randn(K, A, A, generator=g)
    cov = root @ root.transpose(1, 2) + 0.01 * torch.eye(A)
    bank = torch.randn(K, 5, A, generator=g) * 0.5
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([1, 3, 5, 2]).unsqueeze(1)
    return features, labels, mean, var, cov, bank, mask


def dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def log_sum_exp(values):
    return math.log(sum(math.exp(v) for v in values))


def quad_form(q, cov):
    if cov.dim() == 1:
        return sum(float(q[a]) ** 2 * float(cov[a]) for a in range(len(q)))
    return sum(float(q[a]) * float(cov[a, b]) * float(q[b]) for a in range(len(q)) for b in range(len(q)))


def ref_proto(features, labels, mean, tau):
    total = 0.0
    for q, y in zip(features, labels.tolist()):
        logits = [dot(q, mean[k]) / tau for k in range(K)]
        total += log_sum_exp(logits) - logits[y]
    return total / len(labels)


def ref_dist(features, labels, mean, cov, tau):
    """Eq. 19, first line: log sum_k exp(q.mu_k/tau + q^T S_k q / (2 tau^2)) - q.mu_y / tau."""
    total = 0.0
    for q, y in zip(features, labels.tolist()):
        terms = [dot(q, mean[k]) / tau + quad_form(q, cov[k]) / (2 * tau * tau) for k in range(K)]
        total += log_sum_exp(terms) - dot(q, mean[y]) / tau
    return total / len(labels)


def ref_bank(features, labels, bank, mask, tau, negatives):
    """The official loop, written per pixel: no stabilisation, plain exp and log."""
    total = 0.0
    for q, c in zip(features, labels.tolist()):
        queues = [[bank[k, j] for j in range(bank.shape[1]) if mask[k, j]] for k in range(K)]
        negative_sum = 0.0
        for k in range(K):
            if k == c:
                continue
            logits = [dot(q, b) / tau for b in queues[k]]
            if negatives == "exp_of_mean":
                negative_sum += math.exp(sum(logits) / len(logits))
            else:
                negative_sum += sum(math.exp(v) for v in logits) / len(logits)
        terms = []
        for b in queues[c]:
            positive = math.exp(dot(q, b) / tau)
            terms.append(-math.log(positive / (positive + negative_sum)))
        total += sum(terms) / len(terms)
    return total / len(labels)


def ref_reg(features, mean, tau):
    n = len(features)
    centre = [sum(float(features[i, a]) for i in range(n)) / n for a in range(A)]
    logits = [dot(centre, mean[k]) / tau for k in range(K)]
    norm = log_sum_exp(logits)
    return sum(z - norm for z in logits) / (K * math.log(K))


def close(value, expected, tol=1e-5):
    assert abs(float(value) - expected) <= tol * max(1.0, abs(expected)), (float(value), expected)


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_proto_matches_loop_reference(tau):
    features, labels, mean, *_ = make_inputs()
    close(ProtoContrastiveLoss(tau)(features, labels, mean), ref_proto(features, labels, mean, tau))


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("full", [False, True])
def test_dist_matches_eq19(tau, full):
    features, labels, mean, var, cov, *_ = make_inputs(1)
    covariance = cov if full else var
    close(DistContrastiveLoss(tau)(features, labels, mean, covariance), ref_dist(features, labels, mean, covariance, tau))


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("negatives", ["exp_of_mean", "mean_of_exp"])
def test_bank_matches_loop_reference(tau, negatives):
    features, labels, _, _, _, bank, mask = make_inputs(2)
    loss = BankContrastiveLoss(tau, negatives=negatives)(features, labels, bank, mask)
    close(loss, ref_bank(features, labels, bank, mask, tau, negatives))


def test_bank_per_query_order_and_full_mask():
    features, labels, _, _, _, bank, _ = make_inputs(3)
    per_query = BankContrastiveLoss(0.1, reduction="none")(features, labels, bank)
    for i in range(len(labels)):
        full = torch.ones(K, bank.shape[1], dtype=torch.bool)
        close(per_query[i], ref_bank(features[i : i + 1], labels[i : i + 1], bank, full, 0.1, "exp_of_mean"))


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_regulariser_matches_formula(tau):
    features, _, mean, *_ = make_inputs(4)
    close(ContrastRegularizer(tau)(features, mean), ref_reg(features, mean, tau))


def test_regulariser_near_minus_one_at_official_temperature():
    features, _, mean, *_ = make_inputs(5)
    assert abs(float(ContrastRegularizer(100.0)(features, mean)) + 1.0) < 1e-3


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_dist_with_zero_variance_is_proto(tau):
    features, labels, mean, var, cov, *_ = make_inputs(6)
    proto = ProtoContrastiveLoss(tau)(features, labels, mean)
    torch.testing.assert_close(DistContrastiveLoss(tau)(features, labels, mean, torch.zeros_like(var)), proto)
    torch.testing.assert_close(DistContrastiveLoss(tau)(features, labels, mean, torch.zeros_like(cov)), proto)
    # a positive variance makes every negative heavier, so the loss grows
    assert DistContrastiveLoss(tau)(features, labels, mean, var) > proto


def test_dist_diagonal_equals_full_with_diagonal_matrix():
    features, labels, mean, var, *_ = make_inputs(7)
    full = torch.diag_embed(var)
    torch.testing.assert_close(
        DistContrastiveLoss(0.1)(features, labels, mean, var), DistContrastiveLoss(0.1)(features, labels, mean, full)
    )


@pytest.mark.parametrize("tau", TEMPERATURES)
def test_bank_official_negatives_never_exceed_paper_negatives(tau):
    features, labels, _, _, _, bank, mask = make_inputs(8)
    official = BankContrastiveLoss(tau, "exp_of_mean", reduction="none")(features, labels, bank, mask)
    paper = BankContrastiveLoss(tau, "mean_of_exp", reduction="none")(features, labels, bank, mask)
    assert bool((official <= paper + 1e-7).all())
    if tau < 1:
        assert bool((official < paper - 1e-4).any())  # entries differ, so Jensen is strict somewhere


def test_bank_with_one_entry_per_class_is_proto():
    features, labels, mean, *_ = make_inputs(9)
    bank = mean.unsqueeze(1)
    for negatives in ("exp_of_mean", "mean_of_exp"):
        torch.testing.assert_close(
            BankContrastiveLoss(0.1, negatives)(features, labels, bank), ProtoContrastiveLoss(0.1)(features, labels, mean)
        )


def test_distcl_bounds_monte_carlo_expected_loss():
    """At tau = 0.1 the closed form is Eq. 17's bound for Gaussian classes; Eq. 16 lies below it."""
    tau, samples = 0.1, 100000
    g = torch.Generator().manual_seed(11)
    dtype = torch.float64
    mean = 0.7 * F.normalize(torch.rand(K, A, generator=g, dtype=dtype), dim=1)
    root = 0.025 * torch.randn(K, A, A, generator=g, dtype=dtype)  # logit std ~0.5-1: a well-behaved MC
    cov = root @ root.transpose(1, 2) + 1e-3 * torch.eye(A, dtype=dtype)
    draws = [
        mean[k] + torch.randn(samples, A, generator=g, dtype=dtype) @ torch.linalg.cholesky(cov[k]).T for k in range(K)
    ]
    queries = F.normalize(torch.rand(5, A, generator=g, dtype=dtype), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 1])
    bound = DistContrastiveLoss(tau, reduction="none")(queries, labels, mean, cov)
    for q, y, closed_form in zip(queries, labels.tolist(), bound):
        logits = [d @ q / tau for d in draws]  # samples x 1 logits per class
        exp_means = [torch.exp(v).mean() for v in logits]
        exp_vars = [torch.exp(v).var() / samples for v in logits]
        # (a) Monte-Carlo value of Eq. 17's right-hand side equals the closed form (checks the MGF term)
        inside = sum(exp_means)
        mc_bound = torch.log(inside) - logits[y].mean()
        se_bound = math.sqrt(float(sum(exp_vars))) / float(inside) + float(logits[y].std()) / math.sqrt(samples)
        assert abs(float(mc_bound) - float(closed_form)) < 5 * se_bound
        # (b) Eq. 16 with M = N = samples: -mean_m log(e^{s_m} / (e^{s_m} + sum_k mean_n e^{s_kn}))
        negatives = sum(exp_means[k] for k in range(K) if k != y)
        terms = F.softplus(torch.log(negatives) - logits[y])
        mc_loss = terms.mean()
        se_loss = float(terms.std()) / math.sqrt(samples) + math.sqrt(
            float(sum(exp_vars[k] for k in range(K) if k != y))
        ) / float(negatives)
        assert float(mc_loss) <= float(closed_form) + 5 * se_loss
        # the bound is not vacuous: for these small variances it stays close to the expected loss
        assert float(closed_form) - float(mc_loss) < 0.2


@pytest.mark.parametrize(
    "make",
    [
        lambda f, y, s: ProtoContrastiveLoss(0.1)(f, y, s["mean"]),
        lambda f, y, s: DistContrastiveLoss(0.1)(f, y, s["mean"], s["var"]),
        lambda f, y, s: DistContrastiveLoss(0.1)(f, y, s["mean"], s["cov"]),
        lambda f, y, s: BankContrastiveLoss(0.1)(f, y, s["bank"], s["mask"]),
        lambda f, y, s: BankContrastiveLoss(0.1, "mean_of_exp")(f, y, s["bank"], s["mask"]),
        lambda f, y, s: ContrastRegularizer(0.1)(f, s["mean"]),
    ],
)
def test_gradient_reaches_queries_not_statistics(make):
    features, labels, mean, var, cov, bank, mask = make_inputs(12)
    features.requires_grad_(True)
    stats = {name: t.clone().requires_grad_(True) for name, t in dict(mean=mean, var=var, cov=cov, bank=bank).items()}
    stats["mask"] = mask
    make(features, labels, stats).backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0
    for name in ("mean", "var", "cov", "bank"):
        assert stats[name].grad is None


def test_empty_queries_give_connected_zero():
    features = torch.zeros(0, A, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    _, _, mean, var, _, bank, mask = make_inputs()
    for loss in (
        ProtoContrastiveLoss()(features, labels, mean),
        DistContrastiveLoss()(features, labels, mean, var),
        BankContrastiveLoss()(features, labels, bank, mask),
        ContrastRegularizer()(features, mean),
    ):
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        loss.backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ProtoContrastiveLoss(0.0)
    with pytest.raises(ValueError, match="negatives"):
        BankContrastiveLoss(negatives="median")
    features, labels, _, _, _, bank, mask = make_inputs()
    mask[1] = False
    with pytest.raises(ValueError, match="at least one queue entry"):
        BankContrastiveLoss()(features, labels, bank, mask)
