"""Two processes on CPU (gloo) train like one process with the same global batch."""

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from udaseg.engine.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_folder_dataset, tiny_config  # noqa: E402

# Frozen BN makes the forward independent of how the batch is split, so the only difference left
# is the order of floating-point sums.
EXTRA = ["model.options={frozen_bn: true}", "data.batch_size=4", "train.checkpoint_interval=3", "train.amp=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, source: str, target: str, work_dir: str, extra=()) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from udaseg.engine import distributed
    from udaseg.engine.trainer import Trainer

    import toy_methods  # noqa: F401  (registers 'toy_adversarial' in this process)

    cfg = tiny_config("digits_source_only", Path(source), Path(target), Path(work_dir), iterations=3,
                      model="deeplabv2_tiny", extra=[*EXTRA, *extra])
    Trainer(cfg, progress=False).train()
    distributed.cleanup()


def test_two_process_run_matches_single_process(tmp_path):
    source = make_folder_dataset(tmp_path / "source", 0, count=8, seed=1)
    target = make_folder_dataset(tmp_path / "target", 90, count=4, seed=2)
    mp.spawn(_worker, args=(2, _free_port(), str(source), str(target), str(tmp_path / "ddp")), nprocs=2, join=True)

    from udaseg.engine.trainer import Trainer

    cfg = tiny_config("digits_source_only", source, target, tmp_path / "single", iterations=3,
                      model="deeplabv2_tiny", extra=EXTRA)
    Trainer(cfg, progress=False).train()
    ddp = load_checkpoint(tmp_path / "ddp" / "latest.pt")["model"]
    single = load_checkpoint(tmp_path / "single" / "latest.pt")["model"]
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
    from udaseg.engine.logging import read_metrics

    ddp_losses = [r["source.ce"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl", "train")]
    single_losses = [r["source.ce"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl", "train")]
    assert len(ddp_losses) == 3  # losses are averaged over ranks before logging
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-6)


def test_objective_owned_discriminator_is_averaged_across_ranks(tmp_path):
    import toy_methods  # noqa: F401

    source = make_folder_dataset(tmp_path / "source", 0, count=8, seed=1)
    target = make_folder_dataset(tmp_path / "target", 90, count=8, seed=2)
    extra = ["method.name=toy_adversarial"]
    mp.spawn(_worker, args=(2, _free_port(), str(source), str(target), str(tmp_path / "ddp"), extra), nprocs=2,
             join=True)

    from udaseg.engine.trainer import Trainer

    cfg = tiny_config("digits_source_only", source, target, tmp_path / "single", iterations=3,
                      model="deeplabv2_tiny", extra=[*EXTRA, *extra])
    Trainer(cfg, progress=False).train()
    ddp, single = load_checkpoint(tmp_path / "ddp" / "latest.pt"), load_checkpoint(tmp_path / "single" / "latest.pt")
    for part in ("model", "objectives"):
        assert ddp[part].keys() == single[part].keys()
        for key in single[part]:
            torch.testing.assert_close(ddp[part][key], single[part][key], rtol=1e-4, atol=1e-5)
    assert any(key.startswith("1.discriminator.") for key in single["objectives"])
