"""End-to-end training on tiny fake data: every base preset, resume, bad input."""

import copy
import math

import pytest
import torch

from udaseg.config import list_presets
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError

from .conftest import tiny_config

BASE_PRESETS = ["source_only_deeplabv2_gta2cs", "dacs_deeplabv2_gta2cs", "daformer_mitb5_gta2cs",
                "source_only_daformer_mitb5_gta2cs", "target_oracle_daformer_mitb5_cs",
                "digits_source_only", "digits_dacs", "digits_target_oracle"]


@pytest.mark.parametrize("preset", BASE_PRESETS)
def test_base_preset_trains_and_saves_reloadable_checkpoint(preset, fake_domains, tmp_path):
    assert preset in list_presets()
    model = "deeplabv2_tiny" if "deeplabv2" in preset else "daformer_tiny"
    cfg = tiny_config(preset, *fake_domains, tmp_path / "run", model=model)
    trainer = Trainer(cfg, progress=False)
    summary = trainer.train()
    assert 0.0 <= summary["miou"] <= 1.0
    records = [r for r in __import__("udaseg.engine.logging", fromlist=["x"]).read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert records and all(math.isfinite(v) for r in records for k, v in r.items() if k.endswith(("ce", "fd")))
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["iteration"] == 2 and state["model_name"] == model
    resumed = Trainer(cfg, resume=str(tmp_path / "run" / "latest.pt"), progress=False)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("preset", ["digits_dacs", "daformer_mitb5_gta2cs"])
def test_resume_continues_the_same_trajectory(preset, fake_domains, tmp_path):
    straight_cfg = tiny_config(preset, *fake_domains, tmp_path / "straight", iterations=4)
    straight = Trainer(straight_cfg, progress=False)
    straight.train()

    half_cfg = tiny_config(preset, *fake_domains, tmp_path / "halves", iterations=4,
                           extra=["train.checkpoint_interval=2"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2  # stop half-way; the schedule still spans 4 iterations
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert second.iteration == 2
    second.train()
    for a, b in zip(_params(straight), _params(second)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.teacher.module.parameters(), second.teacher.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_of_other_architecture_or_class_count_is_refused(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=1)
    Trainer(cfg, progress=False).train()
    ckpt = str(tmp_path / "run" / "latest.pt")
    other = tiny_config("digits_source_only", *fake_domains, tmp_path / "run2", model="deeplabv2_tiny")
    with pytest.raises(UserError, match="holds a 'daformer_tiny' model"):
        Trainer(other, resume=ckpt, progress=False)
    more = tiny_config("digits_source_only", *fake_domains, tmp_path / "run3", extra=["model.num_classes=5"])
    with pytest.raises(UserError, match="model.num_classes=5 but .*classes.yaml lists 3 classes"):
        Trainer(more, resume=ckpt, progress=False)


def test_missing_checkpoint_and_unwritable_work_dir(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run")
    with pytest.raises(UserError, match="nope.pt"):
        Trainer(cfg, resume=str(tmp_path / "nope.pt"), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = tiny_config("digits_source_only", *fake_domains, blocker / "run")
    with pytest.raises(UserError, match="not writable"):
        Trainer(bad, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_domains, tmp_path, monkeypatch):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=4,
                      extra=["train.checkpoint_interval=2"])
    trainer = Trainer(cfg, progress=False)
    original = trainer.step.run

    def poisoned(batch, iteration, generator):
        if iteration == 3:
            batch["source"]["image"] = batch["source"]["image"] * float("nan")
        return original(batch, iteration, generator)

    monkeypatch.setattr(trainer.step, "run", poisoned)
    with pytest.raises(UserError, match=r"loss 'source\.ce' is nan at iteration 3"):
        trainer.train()
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iteration"] == 2
