"""Run a configured training to completion and keep its result, once.

Used by ``udaseg demo`` and ``udaseg bench``: a finished run leaves ``result.json`` in its work
directory together with the exact config it ran; asking again for the same config returns the
stored result instead of training again, so an interrupted benchmark resumes where it stopped.
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
    return data if data.get("config") == to_dict(cfg) else None


def run_experiment(cfg: Config, progress: bool = True) -> dict:
    """Train ``cfg`` (resuming an interrupted run of the same config) and return its final evaluation.

    The result holds the student's (headline) and the teacher's per-class IoU at the final iteration.
    """
    done = stored_result(cfg)
    if done is not None:
        return done
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
    tmp = work_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, work_dir / RESULT_FILE)
    return result


def _same_config(work_dir: Path, cfg: Config) -> bool:
    import yaml

    path = work_dir / "config.yaml"
    if not path.exists():
        return False
    try:
        return yaml.safe_load(path.read_text()) == to_dict(cfg)
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
