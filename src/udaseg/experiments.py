"""Run a configured training to completion and keep its result, once.

Used by ``udaseg demo`` and ``udaseg bench``: a finished run leaves ``result.json`` in its work
directory together with the exact config it ran; asking again for the same config returns the
stored result instead of training again, so an interrupted benchmark resumes where it stopped.

A pipeline (a config with ``stages``) is run stage by stage; its result is the last stage's final
evaluation, and ``stages`` holds each stage's final evaluation (``<stage>/result.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from udaseg.config import to_dict
from udaseg.config.schema import Config

RESULT_FILE = "result.json"


def stored_result(cfg: Config) -> Optional[dict]:
    path = Path(cfg.train.work_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if same_settings(data.get("config"), cfg) else None


def same_settings(stored: Optional[dict], cfg: Config) -> bool:
    """Whether a stored config dict describes ``cfg``, keys added to the schema since then included.

    The stored dict is read through the current schema first, so a setting introduced later
    counts at its default; a stored key the schema no longer knows makes the two differ.
    """
    from udaseg.config.loader import from_dict
    from udaseg.errors import UserError

    if not isinstance(stored, dict):
        return False
    current = to_dict(cfg)
    if stored == current:
        return True
    try:
        return to_dict(from_dict(Config, stored)) == current
    except (UserError, TypeError, ValueError):
        return False


def run_experiment(cfg: Config, progress: bool = True) -> dict:
    """Train ``cfg`` (resuming an interrupted run of the same config) and return its final evaluation.

    The result holds the student's (headline) and the teacher's per-class IoU at the final iteration.
    """
    done = stored_result(cfg)
    if done is not None:
        return done
    if cfg.stages:
        return _run_pipeline_experiment(cfg, progress)
    from udaseg.engine.trainer import Trainer

    work_dir = Path(cfg.train.work_dir)
    resume = None
    if (work_dir / "latest.pt").exists() and _same_config(work_dir, cfg):
        resume = "latest"
    # a folder holding another config's (or an unfinished first) run is this experiment's to redo
    trainer = Trainer(cfg, resume=resume, progress=progress, overwrite=resume is None)
    summary = trainer.train() if trainer.iteration < cfg.train.iterations else trainer.evaluate_all(teacher_too=True)
    result = {"config": to_dict(cfg), "name": cfg.name, "method": cfg.method.name, "seed": cfg.train.seed,
              "iterations": cfg.train.iterations, "evaluation": _jsonable(summary)}
    _write_result(work_dir, result)
    return result


def _write_result(work_dir: Path, result: dict) -> None:
    tmp = work_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, work_dir / RESULT_FILE)


def _run_pipeline_experiment(cfg: Config, progress: bool) -> dict:
    """Each stage as an experiment of its own (a finished stage's stored result is reused)."""
    from udaseg.engine.pipeline import build_stages, run_pipeline

    root = Path(cfg.train.work_dir)
    # a folder holding another config's pipeline is redone from scratch, passes included
    fresh = not ((root / "pipeline.yaml").is_file() and _same_config(root, cfg, "pipeline.yaml"))
    stages: dict[str, dict] = {}
    for stage in build_stages(cfg):
        stored = None if fresh else stored_result(stage.cfg)
        if stored is None:
            summary = run_pipeline(cfg, resume=not fresh, only_stage=stage.name, progress=progress, overwrite=fresh)
            if not summary:  # finished earlier without a stored result: evaluate its final weights again
                from udaseg.engine.trainer import Trainer

                summary = Trainer(stage.cfg, resume="latest", progress=progress).evaluate_all(teacher_too=True)
            stored = {"config": to_dict(stage.cfg), "evaluation": _jsonable(summary)}
            _write_result(stage.work_dir, stored)
        stages[stage.name] = stored["evaluation"]
    last = list(stages)[-1]
    result = {"config": to_dict(cfg), "name": cfg.name, "method": cfg.method.name, "seed": cfg.train.seed,
              "iterations": cfg.train.iterations, "evaluation": stages[last], "stages": stages,
              "final_stage_dir": str(root / last)}
    _write_result(root, result)
    return result


def _same_config(work_dir: Path, cfg: Config, name: str = "config.yaml") -> bool:
    import yaml

    path = work_dir / name
    if not path.exists():
        return False
    try:
        return same_settings(yaml.safe_load(path.read_text()), cfg)
    except yaml.YAMLError:
        return False


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item"):
        return value.item()
    return value
