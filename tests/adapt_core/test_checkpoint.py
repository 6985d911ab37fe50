import random

import numpy as np
import pytest
import torch

from udaseg.engine import checkpoint as ckpt
from udaseg.engine.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from udaseg.errors import UserError


def test_save_and_load_round_trip(tmp_path):
    state = {"iteration": 3, "model": {"w": torch.arange(4.0)}, "names": ["a", "b"]}
    path = save_checkpoint(tmp_path / "sub" / "c.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp files left


def test_failing_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"iteration": 1})

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial garbage")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_missing_and_corrupt_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        load_checkpoint(bad)


class Arbitrary:
    pass


def test_weights_only_rejects_arbitrary_objects(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": Arbitrary()}, path)
    with pytest.raises(UserError, match="obj.pt"):
        load_checkpoint(path)


def test_manager_keeps_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    metrics = {1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0, 5: 40.0}
    for it, metric in metrics.items():
        manager.save(it, {"iteration": it}, metric=metric)
    assert manager.iterations() == [2, 4, 5]  # last two plus the best (2)
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 2
    assert load_checkpoint(tmp_path / "latest.pt")["iteration"] == 5
    assert manager.best == {"metric": 50.0, "iteration": 2}
    # The best record survives a restart and keeps protecting iter_2.
    again = CheckpointManager(tmp_path, keep_last=1)
    again.save(6, {"iteration": 6}, metric=1.0)
    assert again.iterations() == [2, 6]
    again.save(7, {"iteration": 7}, metric=60.0)
    assert again.iterations() == [7]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 7


def test_latest_skips_corrupt(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest() is None
    manager.save(1, {"iteration": 1})
    manager.save(2, {"iteration": 2})
    # Damage the newest iteration file on its own (a new inode, so latest.pt keeps its content).
    (tmp_path / "iter_2.pt").unlink()
    (tmp_path / "iter_2.pt").write_bytes(b"\x00" * 10)
    with pytest.warns(UserWarning, match="iter_2.pt"):
        path, state = manager.load_latest()
    assert path.name == "latest.pt" and state["iteration"] == 2
    # With latest.pt damaged as well, the scan falls back to the older iteration.
    (tmp_path / "latest.pt").unlink()
    (tmp_path / "latest.pt").write_bytes(b"junk")
    with pytest.warns(UserWarning):
        assert manager.latest().name == "iter_1.pt"


def test_work_dir_under_a_file_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="a_file"):
        CheckpointManager(blocker / "run")
    with pytest.raises(UserError, match="a_file"):
        save_checkpoint(blocker / "x.pt", {"a": 1})


def test_rng_state_round_trip_with_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # populate python's cached gaussian
    np.random.normal()
    state = capture_rng_state()
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(), torch.rand(3))
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])
