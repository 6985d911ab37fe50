"""Nothing is lost: run-folder rules, checkpoints on signals, resume rules, consistent records, logs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from udaseg.cli import main
from udaseg.config import load_config, to_dict
from udaseg.engine.checkpoint import CheckpointManager, load_checkpoint
from udaseg.engine.logging import read_metrics
from udaseg.engine.run_folder import truncate_metrics, val_set_keys
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError

from .conftest import tiny_config

REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.fixture
def finished_run(fake_domains, tmp_path):
    cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "run", iterations=2,
                      extra=["train.checkpoint_interval=1", "train.eval_interval=1"])
    config = write_config(cfg, tmp_path / "config.yaml")
    assert main(["train", "--config", str(config)]) == 0
    return tmp_path / "run", config


# -- default folder, fresh runs, --overwrite ----------------------------------------------------
def test_default_work_dir_is_per_preset():
    assert load_config("digits_dacs").train.work_dir == "runs/digits_dacs"
    assert load_config("digits_sepico_distcl").train.work_dir == "runs/digits_sepico_distcl"
    assert load_config("daformer_mitb5_gta2cs").train.work_dir == "runs/daformer_mitb5_gta2cs"
    assert load_config(None).train.work_dir == "runs/custom"


def test_fresh_run_into_a_used_folder_is_refused_and_changes_nothing(finished_run, capsys):
    run, config = finished_run
    before = snapshot(run)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"run folder {run} is not empty" in err and "--resume" in err
    assert snapshot(run) == before


def test_overwrite_starts_over_and_keeps_foreign_files(finished_run, capsys):
    run, config = finished_run
    (run / "notes.txt").write_text("mine")
    assert (run / "best.json").exists()
    assert main(["train", "--config", str(config), "--overwrite", "train.iterations=1"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert load_checkpoint(run / "latest.pt")["iteration"] == 1
    assert sorted(p.name for p in run.glob("iter_*.pt")) == ["iter_1.pt"]
    assert {r["iteration"] for r in read_metrics(run / "metrics.jsonl", "train")} == {0}
    best = json.loads((run / "best.json").read_text())
    assert best["iteration"] == 1 and best["metric_name"] == "miou" and best["model"] == "student"
    assert best["dataset"].startswith("folder:val")


def test_overwrite_with_a_failing_config_deletes_nothing(finished_run, capsys):
    run, config = finished_run
    before = snapshot(run)
    assert main(["train", "--config", str(config), "--overwrite", "data.source.root=/nonexistent/data"]) == 2
    assert "/nonexistent/data" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_failing_first_run_leaves_no_folder(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "fresh", extra=["model.num_classes=4"])
    with pytest.raises(UserError, match="model.num_classes=4"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "fresh").exists()


# -- resume rules ---------------------------------------------------------------------------------
def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    run, config = finished_run
    before = snapshot(run)
    assert main(["train", "--config", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished (iteration 2 of 2)" in out
    assert snapshot(run) == before


def test_resume_with_more_iterations_is_refused(finished_run, capsys):
    run, config = finished_run
    before = snapshot(run)
    assert main(["train", "--config", str(config), "--resume", "train.iterations=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "planned for 2 iterations" in err and "train.iterations=8" in err and len(err.splitlines()) == 1
    assert snapshot(run) == before


def test_resume_cuts_the_log_back_cleans_orphans_and_repairs_best(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=4,
                      extra=["train.checkpoint_interval=2", "train.eval_interval=2"])
    first = Trainer(cfg, progress=False)
    original = first.step.run

    def crash_at_iteration_3(batch, iteration, generator):
        if iteration == 3:
            raise RuntimeError("killed")
        return original(batch, iteration, generator)

    first.step.run = crash_at_iteration_3  # iteration 2 is logged after the checkpoint of iteration 2
    with pytest.raises(RuntimeError, match="killed"):
        first.train()
    run = tmp_path / "run"
    assert {r["iteration"] for r in read_metrics(run / "metrics.jsonl", "train")} == {0, 1, 2}
    (run / ".latest.pt.123.link").write_bytes(b"x")
    (run / ".iter_4.pt.abc.tmp").write_bytes(b"x")
    best = json.loads((run / "best.json").read_text())
    (run / "best.pt").unlink()  # as if killed between best.json and best.pt
    second = Trainer(cfg, resume="latest", progress=False)
    assert second.iteration == 2
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.link"))
    assert os.path.samefile(run / "best.pt", run / f"iter_{best['iteration']}.pt")
    records = read_metrics(run / "metrics.jsonl")
    assert {r["iteration"] for r in records if r["kind"] == "train"} == {0, 1}
    second.train()
    train_iterations = [r["iteration"] for r in read_metrics(run / "metrics.jsonl", "train")]
    assert train_iterations == [0, 1, 2, 3]  # no repeated rows
    assert "resumed" in (run / "train.log").read_text()


def test_truncate_metrics_keeps_evaluations_of_the_resumed_iteration(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": 1, "kind": "train"}, {"iteration": 2, "kind": "eval"}, {"iteration": 2, "kind": "train"},
            {"iteration": 3, "kind": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "ki')
    assert truncate_metrics(path, 2) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_best_json_is_written_before_best_pt(tmp_path, monkeypatch):
    import udaseg.engine.checkpoint as checkpoint

    manager = CheckpointManager(tmp_path, keep_last=1)
    order = []
    real_write, real_alias = checkpoint._atomic_write, checkpoint._atomic_alias
    monkeypatch.setattr(checkpoint, "_atomic_write", lambda p, w: (order.append(p.name), real_write(p, w)))
    monkeypatch.setattr(checkpoint, "_atomic_alias", lambda s, a: (order.append(a.name), real_alias(s, a)))
    manager.save(1, {"x": torch.zeros(1)}, metric=0.5, about={"metric_name": "miou", "dataset": "d"})
    assert order.index("best.json") < order.index("best.pt")
    assert CheckpointManager(tmp_path).best == {"metric": 0.5, "iteration": 1, "metric_name": "miou", "dataset": "d"}


# -- logs -------------------------------------------------------------------------------------------
def test_logs_are_valid_json_with_one_meaning_of_time(finished_run):
    run, _ = finished_run
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # NaN would not parse with a strict parser below
    for line in lines:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert all("timestamp" in r and "time" not in r for r in records)
    assert all("iter_time" in r for r in records if r["kind"] == "train")
    ious = [v for r in records if r["kind"] == "eval" for v in r["iou"]]
    assert None in ious or all(isinstance(v, float) for v in ious)
    log = (run / "train.log").read_text()
    assert "iter 1/2" in log and "eval at iteration 2: student" in log and "eval at iteration 2: teacher" in log


def test_redirected_output_has_periodic_lines_not_progress_bars(finished_run, capsys):
    run, config = finished_run
    assert main(["train", "--config", str(config), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b[" not in out
    assert "iter 1/2" in out and "eval at iteration 2: teacher on folder:val" in out
    assert "final teacher mIoU" in out


def test_nan_is_written_as_null(tmp_path):
    from udaseg.engine.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(0, "eval", {"miou": float("nan"), "iou": [0.5, float("nan"), float("inf")]})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["miou"] is None and record["iou"] == [0.5, None, None]


def test_two_validation_sets_of_one_type_keep_their_own_results(fake_domains, tmp_path):
    from udaseg.config.schema import DatasetConfig

    source, target = fake_domains
    cfg = tiny_config("digits_source_only", source, target, tmp_path / "run", iterations=1)
    norm = cfg.data.source.normalization
    cfg.data.val = [DatasetConfig(name="folder", root=str(target), split="val", normalization=norm),
                    DatasetConfig(name="folder", root=str(source), split="val", normalization=norm)]
    keys = val_set_keys(cfg.data.val)
    assert keys == [f"folder:val@{target}", f"folder:val@{source}"]
    summary = Trainer(cfg, progress=False).train()
    assert {f"student/{k}" for k in keys} <= set(summary)
    sets = [r["set"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "eval") if r["model"] == "student"]
    assert sets == keys
    aliased = [DatasetConfig(name="folder", alias="night"), DatasetConfig(name="folder", alias="night")]
    assert val_set_keys(aliased) == ["night#1", "night#2"]


def test_eval_teacher_does_not_overwrite_the_student_results(finished_run, capsys):
    run, _ = finished_run
    ckpt = run / "latest.pt"
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    assert main(["eval", "--checkpoint", str(ckpt), "--teacher"]) == 0
    student = json.loads((run / "latest.eval.json").read_text())
    teacher = json.loads((run / "latest.teacher.eval.json").read_text())
    assert student["model"] == "student" and teacher["model"] == "teacher"


# -- signals ----------------------------------------------------------------------------------------
def _wait_for_train_records(path: Path, count: int, process, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training exited early: {process.stderr.read()}")
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"kind": "train"' in line) >= count:
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail("training did not log in time")


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_that_resumes_bit_exactly(signum, fake_domains, tmp_path):
    cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "run", iterations=400)
    config = write_config(cfg, tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO_SRC), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "udaseg.cli", "train", "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_train_records(tmp_path / "run" / "metrics.jsonl", 3, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert f"stopped by {name} after iteration" in err and "--resume" in err
    stopped = load_checkpoint(tmp_path / "run" / "latest.pt")["iteration"]
    assert 3 <= stopped < 400

    straight_cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "straight", iterations=400)
    straight = Trainer(straight_cfg, progress=False)
    straight.cfg.train.iterations = stopped + 2
    straight.train()
    resumed_cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "run", iterations=400)
    resumed = Trainer(resumed_cfg, resume="latest", progress=False)
    assert resumed.iteration == stopped
    resumed.cfg.train.iterations = stopped + 2
    resumed.train()
    for a, b in zip(_params(straight), _params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.teacher.module.parameters(), resumed.teacher.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- pretrained weights and rare class sampling on one's own data -----------------------------------
def test_pretrained_report_is_printed_and_logged(fake_domains, tmp_path, capsys):
    from udaseg.models import build_model

    backbone = tmp_path / "mit_tiny.pth"
    torch.save(build_model("daformer_tiny", 3).backbone.state_dict(), backbone)
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=1,
                      extra=[f"model.pretrained={backbone}"])
    Trainer(cfg, progress=True).train()
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model.pretrained:"))
    assert "0 missing" in line and "loaded" in line
    assert line in (tmp_path / "run" / "train.log").read_text()


def test_training_with_rare_class_sampling_on_a_folder_dataset(fake_domains, tmp_path):
    import shutil

    source = shutil.copytree(fake_domains[0], tmp_path / "source")
    cfg = tiny_config("digits_source_only", source, fake_domains[1], tmp_path / "run", iterations=2)
    cfg.data.source.rcs.enabled, cfg.data.source.rcs.min_pixels = True, 10
    with pytest.raises(UserError, match="udaseg prepare"):
        Trainer(cfg, progress=False)
    assert main(["prepare", "folder", "--root", str(source), "--nproc", "1"]) == 0
    assert Trainer(cfg, progress=False).train()["miou"] >= 0.0


def test_a_pipeline_refuses_a_used_work_dir_unless_resumed_or_overwritten(fake_domains, tmp_path):
    from udaseg.engine.pipeline import run_pipeline

    from .test_pipeline import pipeline_config

    cfg = pipeline_config(fake_domains, tmp_path / "run")
    run_pipeline(cfg, progress=False)
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserError, match="is not empty"):
        run_pipeline(pipeline_config(fake_domains, tmp_path / "run"), progress=False)
    assert snapshot(tmp_path / "run") == before
    run_pipeline(pipeline_config(fake_domains, tmp_path / "run"), progress=False, resume=True)  # all done: no-op
    summary = run_pipeline(pipeline_config(fake_domains, tmp_path / "run"), progress=False, overwrite=True)
    assert summary["miou"] >= 0.0
    assert load_checkpoint(tmp_path / "run" / "selftrain" / "final.pt")["iteration"] == 4
