"""Two processes (gloo): every rank ends with the same banks, holding the rows of both ranks in rank order."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from udaseg.adapt.pixel_bank import ClassPixelQueues, RankedPixelQueue

    source, target = ClassPixelQueues(2, 3, capacity=8), RankedPixelQueue(3, capacity=8, rank=1)
    count = 2 + rank  # ranks contribute different numbers of rows
    features = torch.full((count, 3), float(rank)) + torch.arange(count, dtype=torch.float32).unsqueeze(1) / 10
    source.push(features, torch.zeros(count, dtype=torch.long), per_class=10)
    target.push(features, torch.full((count, 1), rank), torch.zeros(count, dtype=torch.long), per_image=10)
    torch.save({"source": source.state_dict(), "target": target.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_hold_identical_banks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for bank in ("source", "target"):
        for key, value in states[0][bank].items():
            assert torch.equal(value, states[1][bank][key]), (bank, key)
    assert int(states[0]["source"]["length"][0]) == 5
    torch.testing.assert_close(states[0]["source"]["features"][0, :5, 0], torch.tensor([0.0, 0.1, 1.0, 1.1, 1.2]))
    assert states[0]["target"]["top_classes"][:5, 0].tolist() == [0, 0, 1, 1, 1]
