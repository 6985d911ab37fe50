"""Pipelines of stages: several ordinary training runs in a row, with offline passes between them.

A config with ``stages`` is a pipeline (SPCL: adversarial warm-up → prototypes and offline
pseudo-labels → contrastive training → self-training)::

    stages:
      - name: warmup
        config: {method: {name: source_only}, train: {iterations: 40000}}
      - name: selftrain
        before:
          - {name: pseudo, kind: pseudo_labels, threshold: 0.9}
        config:
          method: {name: target_oracle}
          data: {target: {pseudo_labels: "{work_dir}/pseudo"}}

Layout under ``train.work_dir``: ``<stage>/`` is the stage's run folder (checkpoints, metrics,
``config.yaml``) and ends with ``<stage>/final.pt``, the weights of its **last** iteration (never a
checkpoint chosen on an evaluation split); ``<pass>/`` holds an offline pass's files. Each stage
starts from the previous stage's ``final.pt`` through ``model.init_from`` (weights only) unless its
config names another ``init_from``; passes before a stage read the previous stage's ``final.pt``.

``run_pipeline(cfg, resume=True)`` skips finished stages and passes, finishes an interrupted pass
(files already written are kept) and resumes an interrupted stage from its latest checkpoint, so a
pipeline stopped anywhere ends with the same weights as one run straight through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from udaseg.config import config_to_yaml, to_dict
from udaseg.config.loader import closest, deep_merge, from_dict
from udaseg.config.schema import Config, PassConfig
from udaseg.engine import distributed as dist
from udaseg.errors import UserError

FINAL_WEIGHTS = "final.pt"
WORK_DIR_PLACEHOLDER = "{work_dir}"


@dataclass
class Stage:
    name: str
    cfg: Config  # the stage's complete config (its train.work_dir is <root>/<name>)
    passes: list[PassConfig]
    overrides: dict

    @property
    def work_dir(self) -> Path:
        return Path(self.cfg.train.work_dir)

    @property
    def final_weights(self) -> Path:
        return self.work_dir / FINAL_WEIGHTS


def _substitute(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(WORK_DIR_PLACEHOLDER, root)
    if isinstance(value, dict):
        return {k: _substitute(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, root) for v in value]
    return value


def build_stages(cfg: Config) -> list[Stage]:
    """Every stage's complete, validated config; errors name the stage and the key."""
    if not cfg.stages:
        raise UserError("the config has no stages")
    root = cfg.train.work_dir
    base = to_dict(cfg)
    base["stages"] = []
    stages: list[Stage] = []
    seen: set[str] = set()
    for spec in cfg.stages:
        if spec.name in seen:
            raise UserError(f"stage name '{spec.name}' is used twice")
        seen.add(spec.name)
        overrides = _substitute(spec.config, root)
        if not isinstance(overrides, dict):
            raise UserError(f"stage '{spec.name}': 'config' must be a mapping")
        if "stages" in overrides:
            raise UserError(f"stage '{spec.name}': a stage cannot declare stages of its own")
        data = deep_merge(base, overrides)
        data["train"] = dict(data["train"], work_dir=str(Path(root) / spec.name))
        model_overrides = overrides.get("model")
        explicit_init = isinstance(model_overrides, dict) and bool(model_overrides.get("init_from"))
        if stages and not explicit_init:
            data["model"] = dict(data["model"], init_from=str(stages[-1].final_weights))
        try:
            stage_cfg = from_dict(Config, data)
        except UserError as error:
            raise UserError(f"stage '{spec.name}': {error}") from None
        for pass_spec in spec.before:
            _check_pass_kind(spec.name, pass_spec)
        stages.append(Stage(spec.name, stage_cfg, list(spec.before), overrides))
    names = [p.name for s in stages for p in s.passes]
    for name in names:
        if names.count(name) > 1 or name in seen:
            raise UserError(f"offline pass name '{name}' is used twice (stage and pass folders share train.work_dir)")
    return stages


def _check_pass_kind(stage: str, spec: PassConfig) -> None:
    from udaseg.engine.offline import PASSES, check_pass_options

    if spec.kind not in PASSES:
        hint = closest(spec.kind, PASSES)
        suffix = f"; did you mean '{hint}'?" if hint else f"; kinds: {', '.join(sorted(PASSES))}"
        raise UserError(f"stage '{stage}': offline pass '{spec.name}' has an unknown kind '{spec.kind}'{suffix}")
    try:
        check_pass_options(spec)
    except UserError as error:
        raise UserError(f"stage '{stage}': {error}") from None


def find_stage(stages: list[Stage], name: str) -> int:
    names = [s.name for s in stages]
    if name not in names:
        hint = closest(name, names)
        suffix = f"; did you mean '{hint}'?" if hint else ""
        raise UserError(f"unknown stage '{name}'{suffix} (stages: {', '.join(names)})")
    return names.index(name)


def run_pipeline(cfg: Config, resume: bool = False, only_stage: Optional[str] = None,
                 progress: bool = True, overwrite: bool = False) -> dict:
    """Run the stages (all, or ``only_stage``) with the passes before each; return the last summary.

    ``resume``: skip stages that have their ``final.pt`` and passes that are complete, finish an
    interrupted pass, and continue an interrupted stage from its latest checkpoint. Without it a
    whole pipeline refuses a work dir that already holds one, unless ``overwrite`` (each stage's
    earlier run files are then deleted by its trainer, and the passes run again).
    """
    from udaseg.engine import run_folder

    stages = build_stages(cfg)
    selected = range(len(stages)) if only_stage is None else [find_stage(stages, only_stage)]
    root = Path(cfg.train.work_dir)
    if dist.is_main() and not resume and only_stage is None and not overwrite:
        run_folder.check_new_run(root, "new")
    if dist.is_main():
        from udaseg.engine.trainer import check_writable

        check_writable(root)
        (root / "pipeline.yaml").write_text(config_to_yaml(cfg))
    summary: dict = {}
    for index in selected:
        stage = stages[index]
        previous = stages[index - 1] if index > 0 else None
        if resume and stage.final_weights.is_file():
            continue
        for spec in stage.passes:
            _run_stage_pass(spec, stage, previous, root, resume, progress)
        summary = run_stage(stage, resume, progress, overwrite)
    return summary


def _run_stage_pass(spec: PassConfig, stage: Stage, previous: Optional[Stage], root: Path, resume: bool,
                    progress: bool) -> None:
    from udaseg.engine.offline import PassContext, run_pass

    if previous is not None:
        weights, weights_cfg = previous.final_weights, previous.cfg
        if not weights.is_file():
            raise UserError(f"offline pass '{spec.name}' needs the final weights of stage '{previous.name}': "
                            f"{weights} not found (run that stage first)")
    elif stage.cfg.model.init_from:
        weights, weights_cfg = Path(stage.cfg.model.init_from), stage.cfg
    else:
        raise UserError(f"offline pass '{spec.name}' before the first stage needs model.init_from (the weights it uses)")
    if dist.is_main():
        run_pass(PassContext(spec, stage.cfg, weights_cfg, weights, root / spec.name, resume, progress))
    dist.barrier()


def run_stage(stage: Stage, resume: bool, progress: bool = True, overwrite: bool = False) -> dict:
    """Train one stage (continuing from its latest checkpoint with ``resume``) and write ``final.pt``."""
    from udaseg.engine.checkpoint import CheckpointManager
    from udaseg.engine.trainer import Trainer

    init = stage.cfg.model.init_from
    if init and not Path(init).is_file():
        raise UserError(f"stage '{stage.name}' starts from {init}, which does not exist (run the stage before it)")
    has_checkpoint = stage.work_dir.is_dir() and CheckpointManager(stage.work_dir).latest() is not None
    resume_stage = resume and has_checkpoint
    trainer = Trainer(stage.cfg, resume="latest" if resume_stage else None, progress=progress,
                      overwrite=overwrite and not resume_stage)
    if dist.is_main():
        print(f"udaseg train: stage '{stage.name}' ({stage.cfg.method.name}) -> {stage.work_dir}")
    summary = trainer.train()
    save_final_weights(trainer, stage.final_weights)
    return summary


def save_final_weights(trainer, path: Path) -> None:
    """The weights of the trainer's last iteration, as a checkpoint that ``model.init_from`` reads."""
    from udaseg.engine.checkpoint import save_checkpoint

    if dist.is_main():
        state = trainer.state()
        weights = {key: state[key] for key in ("model", "teacher", "objectives", "iteration", "config",
                                               "model_name", "num_classes", "method")}
        save_checkpoint(path, weights)
    dist.barrier()
