"""Online class statistics: pooled moments, Eq. 7/10 recursion, queues, checkpoints, multi-process sums."""

import pytest
import torch

from udaseg.adapt.stats import OnlineClassStatistics

K, A = 4, 5


def batches(seed: int = 0, count: int = 5):
    """Batches of various sizes; class 3 appears only in some, 255 pixels everywhere."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = 6 + 7 * i
        features = torch.rand(n, A, generator=g) + 0.3 * i  # drifting features
        labels = torch.randint(0, 3 if i % 2 else K, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.2] = 255
        out.append((features, labels))
    return out


def pooled(data):
    features = torch.cat([f for f, _ in data]).double()
    labels = torch.cat([y for _, y in data])
    return features, labels


@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_online_moments_equal_pooled_moments(mode):
    data = batches()
    stats = OnlineClassStatistics(K, A, covariance=mode)
    for features, labels in data:
        stats.update(features, labels)
    features, labels = pooled(data)
    for k in range(K):
        rows = features[labels == k]
        assert int(stats.count[k]) == rows.shape[0]
        mean = rows.mean(0)
        centred = rows - mean
        torch.testing.assert_close(stats.mean[k].double(), mean, atol=1e-5, rtol=1e-5)
        if mode == "diagonal":
            expected = (centred**2).mean(0)
            torch.testing.assert_close(stats.var[k].double(), expected, atol=1e-5, rtol=1e-5)
            assert stats.covariance is stats.var
        else:
            expected = centred.T @ centred / rows.shape[0]
            torch.testing.assert_close(stats.cov[k].double(), expected, atol=1e-5, rtol=1e-5)
            assert stats.covariance is stats.cov


def test_diagonal_update_is_the_papers_recursion():
    """Eq. 7 and Eq. 10 (diagonal) written step by step with w = m / (n + m) and the old mean."""
    data = batches(1)
    stats = OnlineClassStatistics(K, A)
    mean = torch.zeros(K, A, dtype=torch.float64)
    var = torch.zeros(K, A, dtype=torch.float64)
    count = [0] * K
    for features, labels in data:
        stats.update(features, labels)
        for k in range(K):
            rows = features[labels == k].double()
            m = rows.shape[0]
            if m == 0:
                continue
            w = m / (count[k] + m)
            centroid = rows.mean(0)
            batch_var = ((rows - centroid) ** 2).mean(0)
            var[k] = (1 - w) * var[k] + w * batch_var + w * (1 - w) * (mean[k] - centroid) ** 2
            mean[k] = (1 - w) * mean[k] + w * centroid
            count[k] += m
        torch.testing.assert_close(stats.mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.var.double(), var, atol=1e-5, rtol=1e-5)


def test_unseen_class_stays_zero_and_ignored_pixels_do_not_count():
    stats = OnlineClassStatistics(K, A, bank_size=3)
    stats.update(torch.rand(4, A), torch.tensor([0, 0, 255, 1]))
    assert stats.count.tolist() == [2, 1, 0, 0]
    assert float(stats.mean[2:].abs().sum()) == 0.0 and float(stats.var[2:].abs().sum()) == 0.0
    assert stats.bank_length.tolist() == [2, 2, 1, 1]
    stats.update(torch.rand(3, A), torch.full((3,), 255))  # nothing valid: no change, nothing pushed
    assert stats.count.tolist() == [2, 1, 0, 0] and stats.bank_length.tolist() == [2, 2, 1, 1]


def test_queues_keep_the_last_centroids_and_the_initial_zero_until_full():
    bank_size, dim = 200, 3
    stats = OnlineClassStatistics(2, dim, bank_size=bank_size)
    g = torch.Generator().manual_seed(3)
    pushed = {0: [], 1: []}
    for step in range(250):
        labels = torch.tensor([0, 0, 1, 1]) if step < 150 else torch.tensor([0, 0, 0, 255])
        features = torch.rand(4, dim, generator=g)
        stats.update(features, labels)
        for k in (0, 1):
            if (labels == k).any():
                pushed[k].append(features[labels == k].mean(0))
        if step == 198:  # 199 pushes: the zero vector is still the oldest entry
            entries = stats.bank_entries(0)
            assert entries.shape == (200, dim) and float(entries[0].abs().sum()) == 0.0
            torch.testing.assert_close(entries[1:], torch.stack(pushed[0]))
    class0 = stats.bank_entries(0)
    torch.testing.assert_close(class0, torch.stack(pushed[0][-bank_size:]))  # exactly the last 200
    class1 = stats.bank_entries(1)
    assert class1.shape == (151, dim) and float(class1[0].abs().sum()) == 0.0
    torch.testing.assert_close(class1[1:], torch.stack(pushed[1]))
    bank, mask = stats.bank_with_mask()
    assert mask.sum(1).tolist() == [200, 151]
    torch.testing.assert_close(bank[0][mask[0]].sum(0), class0.sum(0))


def test_state_dict_round_trip_with_weights_only(tmp_path):
    data = batches(4)
    stats = OnlineClassStatistics(K, A, covariance="full", bank_size=3)
    for features, labels in data[:3]:
        stats.update(features, labels)
    path = tmp_path / "stats.pt"
    torch.save(stats.state_dict(), path)
    restored = OnlineClassStatistics(K, A, covariance="full", bank_size=3)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for features, labels in data[3:]:  # both continue identically (ring pointers included)
        stats.update(features, labels)
        restored.update(features, labels)
    for name, value in stats.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    for k in range(K):
        assert torch.equal(stats.bank_entries(k), restored.bank_entries(k))


def test_reduce_hook_equals_one_big_batch():
    """Two ranks: each sums its half locally, the hook adds the other's sums, both end up equal."""
    data = batches(5, count=4)
    warm_features, warm_labels = data[0]
    big = OnlineClassStatistics(K, A, bank_size=4)
    big.update(warm_features, warm_labels)
    for features, labels in data[1:]:
        half = features.shape[0] // 2
        shards = [(features[:half], labels[:half]), (features[half:], labels[half:])]
        ranks = []
        for _ in shards:
            rank = OnlineClassStatistics(K, A, bank_size=4)
            rank.load_state_dict(big.state_dict())
            ranks.append(rank)
        local = [rank.local_sums(f, y) for rank, (f, y) in zip(ranks, shards)]
        for index, (rank, (f, y)) in enumerate(zip(ranks, shards)):
            other = local[1 - index]
            rank.reduce_fn = lambda packed, other=other: packed.add_(other)
            rank.update(f, y)
        big.update(features, labels)
        for rank in ranks:
            for name, value in big.state_dict().items():
                torch.testing.assert_close(rank.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_update_detaches_and_validates():
    stats = OnlineClassStatistics(K, A)
    features = torch.rand(3, A, requires_grad=True)
    stats.update(features, torch.tensor([0, 1, 2]))
    assert not stats.mean.requires_grad and not stats.var.requires_grad
    with pytest.raises(ValueError, match="labels must lie"):
        stats.update(torch.rand(2, A), torch.tensor([0, K]))
    with pytest.raises(ValueError, match="features must be"):
        stats.update(torch.rand(2, A + 1), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="no centroid queues"):
        stats.bank_entries(0)


DDP_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from udaseg.adapt.stats import OnlineClassStatistics


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(3)]


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    stats = OnlineClassStatistics(4, 5, bank_size=3)
    for features, labels in data():
        stats.update(features[rank::2], labels[rank::2])  # each rank sees half of every batch
    torch.save(stats.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
'''


def test_torch_distributed_ranks_share_the_global_batch_statistics(tmp_path):
    """Two gloo processes, each with half of every batch, end with the one-process statistics."""
    import subprocess
    import sys

    script = tmp_path / "ddp_stats.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init"), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    g = torch.Generator().manual_seed(0)
    single = OnlineClassStatistics(4, 5, bank_size=3)
    for _ in range(3):
        single.update(torch.rand(12, 5, generator=g), torch.randint(0, 4, (12,), generator=g))
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5, msg=name)
