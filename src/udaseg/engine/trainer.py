"""Iteration-based UDA training: one loop for every method.

The trainer owns the model (segmentor + method heads), the EMA teacher, the optimiser and schedule,
the data streams and checkpoints; the method's objectives own the losses. Resuming restores all of
it, so N iterations straight give the same parameters as N/2, a restart, and N/2 more.

The run folder (``train.work_dir``) is touched only after everything is built and checked: the
config, the model and its pretrained weights, the data (class counts, sizes, one decoded item per
dataset) and the checkpoint to resume from. See :mod:`udaseg.engine.run_folder` for the rules.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from udaseg.adapt.step import TrainStep, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.config import config_to_yaml, to_dict
from udaseg.config.schema import Config, DatasetConfig
from udaseg.data import build_dataset
from udaseg.engine import distributed as dist
from udaseg.engine import run_folder
from udaseg.engine.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from udaseg.engine.checks import check_training_data, check_val_data, unwrap_worker_error
from udaseg.engine.loader import DataStream, mix_seed
from udaseg.engine.logging import MetricsLogger, RunLog, format_values, progress_bar, stdout_is_terminal
from udaseg.engine.optim import PolyWarmupSchedule, build_optimizer, schedule_length
from udaseg.engine.run_folder import check_writable, val_set_keys  # noqa: F401  (check_writable: public API)
from udaseg.engine.signals import TrainingInterrupted, stop_requests
from udaseg.engine.owned import OwnedOptimizers
from udaseg.errors import UserError
from udaseg.evaluation.evaluator import evaluate
from udaseg.methods import build_method
from udaseg.models import build_model, load_pretrained

SOURCE_STREAM, TARGET_STREAM = 0, 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_devices(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and, for a CUDA run, the current device's (cheaper than torch.manual_seed)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def build_segmentor(cfg: Config, notes: Optional[list[str]] = None) -> nn.Module:
    """The configured segmentor, with ``model.pretrained`` loaded into its backbone.

    The load report goes to ``notes`` (or is printed); a file that fills less than half of the
    backbone's weights is refused, since it is almost certainly the wrong file.
    """
    from udaseg.models.weights import require_mostly_loaded

    segmentor = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.options)
    if cfg.model.pretrained:
        try:
            report = load_pretrained(segmentor.backbone, cfg.model.pretrained)
        except UserError as error:
            raise UserError(f"model.pretrained: {error}") from None
        require_mostly_loaded(report)
        line = f"model.pretrained: {report.summary()}"
        if notes is None:
            print(line)
        else:
            notes.append(line)
    return segmentor


def build_source_dataset(cfg: Config, spec: DatasetConfig):
    if spec.pseudo_labels:
        return build_pseudo_labelled_dataset(cfg, spec)
    dataset = build_dataset(spec, cfg.data.mean, cfg.data.std)
    if spec.rcs.enabled:
        from udaseg.data.sampling import RareClassSampledDataset

        dataset = RareClassSampledDataset(dataset, Path(spec.root), spec.rcs)
    return dataset


def build_pseudo_labelled_dataset(cfg: Config, spec: DatasetConfig):
    """A training stream labelled by an offline ``pseudo_labels`` pass (``spec.pseudo_labels``)."""
    from udaseg.engine.offline import PseudoLabelledDataset

    if spec.rcs.enabled:
        raise UserError(f"dataset '{spec.name}': rare class sampling cannot run on offline pseudo-labels "
                        "(pseudo_labels and rcs.enabled are exclusive)")
    dataset = build_dataset(dataclasses.replace(spec, labelled=False), cfg.data.mean, cfg.data.std)
    return PseudoLabelledDataset(dataset, Path(spec.pseudo_labels))


def amp_dtype(cfg: Config) -> Optional[torch.dtype]:
    return torch.bfloat16 if cfg.train.amp == "bf16" else None


class Trainer:
    """Trains ``cfg``. ``resume``: a checkpoint path or ``"latest"``; ``overwrite``: start over in a
    run folder that holds an earlier run (its files are deleted once every check has passed)."""

    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True,
                 overwrite: bool = False):
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if cfg.stages:
            raise UserError(f"config '{cfg.name}' is a pipeline of {len(cfg.stages)} stages: run it with "
                            "'udaseg train' (udaseg.engine.pipeline.run_pipeline), not as one run")
        self.cfg = cfg
        self.progress = progress
        self.mode: run_folder.Mode = "resume" if resume else ("overwrite" if overwrite else "new")
        self.device = dist.local_device(cfg.train.device)
        dist.init_from_environment(self.device.type)
        self.work_dir = Path(cfg.train.work_dir)
        if dist.is_main():
            run_folder.check_new_run(self.work_dir, self.mode)  # before the slow part
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.notes: list[str] = []
        if cfg.method.name == "daformer" and not cfg.data.source.rcs.enabled:
            self.notes.append("method daformer without rare class sampling (data.source.rcs.enabled=false; the "
                              "GTA5/SYNTHIA presets enable it after 'udaseg prepare')")
        segmentor = build_segmentor(cfg, self.notes)
        self.method = build_method(cfg, segmentor)
        model = UDAModel(segmentor, self.method.heads)
        if cfg.model.init_from:
            self._init_from(model)
        if cfg.train.sync_bn and dist.is_enabled():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            self.model.segmentor.forward = torch.compile(self.model.segmentor.forward)
        dist.broadcast_module(self.model)
        self.objectives = nn.ModuleList(self.method.objectives).to(self.device)
        self.teacher = self._build_teacher()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = PolyWarmupSchedule(self.optimizer, cfg.optim, schedule_length(cfg.optim, cfg.train.iterations))
        self.owned = OwnedOptimizers(self.method.objectives, cfg.train.iterations)
        self.step = TrainStep(self.model, self.teacher, self.method.objectives, cfg.model.num_classes,
                              cfg.train.backward_per_group, amp_dtype(cfg), cfg.train.channels_last)

        self.streams: dict[str, DataStream] = {}
        self._build_streams()
        self.val_sets = [(spec, build_dataset(spec, cfg.data.mean, cfg.data.std)) for spec in cfg.data.val]
        self.val_keys = val_set_keys(cfg.data.val)
        check_training_data(cfg, self.streams, cfg.data.batch_size)
        check_val_data(cfg, self.val_sets)
        self.checkpoints = CheckpointManager(self.work_dir, keep_last=cfg.train.keep_last)
        self.iteration = 0
        self.history: list[dict] = []
        self._saved_at: Optional[int] = None
        if resume:
            self.load(self._resolve_resume(resume))
            self._saved_at = self.iteration

        self._open_run_folder()

    def _open_run_folder(self) -> None:
        """Every check has passed: prepare the run folder, write the config, open the logs.

        A finished run (resumed with nothing left to train) is left exactly as it is."""
        writes = dist.is_main() and not self.finished
        if writes:
            self.notes += run_folder.prepare(self.work_dir, self.mode, self.iteration)
            self.checkpoints = CheckpointManager(self.work_dir, keep_last=self.cfg.train.keep_last)  # re-read best.json
            (self.work_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
            if self.mode == "resume" and self.checkpoints.repair_best():
                self.notes.append("best.pt re-linked to the checkpoint best.json names")
        dist.barrier()
        self.logger = MetricsLogger(self.work_dir, enabled=writes,
                                    purge_step=self.iteration if self.mode == "resume" else None)
        self.log = RunLog(self.work_dir / "train.log", enabled=writes)
        self._bar = None

    @property
    def finished(self) -> bool:
        return self.iteration >= self.cfg.train.iterations

    def _say(self, text: str, echo: bool = True) -> None:
        """A line for ``train.log``, also printed (through the progress bar when one is shown)."""
        self.log.write(text, echo=echo and self.progress and dist.is_main(), bar=self._bar)

    def _init_from(self, model: UDAModel) -> None:
        from udaseg.engine.init_from import load_initial_weights

        load_initial_weights(model, Path(self.cfg.model.init_from), self.cfg.model.name, self.cfg.model.num_classes,
                             self.cfg.model.init_from_model)

    def _build_teacher(self) -> Optional[EMATeacher]:
        if not self.method.uses_teacher:
            return None
        try:
            return EMATeacher(self.model, self.cfg.method.self_training.ema_alpha, self.method.ema_rates)
        except ValueError as error:
            raise UserError(f"method '{self.cfg.method.name}': {error}") from None

    # -- data -------------------------------------------------------------------------------
    def _build_streams(self) -> None:
        cfg = self.cfg
        per_rank = cfg.data.batch_size // dist.world_size()
        if per_rank * dist.world_size() != cfg.data.batch_size:
            raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                            f"{dist.world_size()} processes")
        common = dict(batch_size=per_rank, seed=cfg.train.seed, workers=cfg.data.workers, rank=dist.rank(),
                      world_size=dist.world_size(), pin_memory=self.device.type == "cuda")
        if self.method.target_labelled:
            if cfg.data.target is None:
                raise UserError("method 'target_oracle' needs data.target (with labels)")
            spec = cfg.data.target if cfg.data.target.pseudo_labels else dataclasses.replace(cfg.data.target, labelled=True)
            self.streams["target"] = DataStream(build_source_dataset(cfg, spec), stream=TARGET_STREAM, **common)
            return
        self.streams["source"] = DataStream(build_source_dataset(cfg, cfg.data.source), stream=SOURCE_STREAM,
                                            **common)
        if self.method.uses_target:
            if cfg.data.target is None:
                raise UserError(f"method '{cfg.method.name}' needs data.target")
            target = (build_pseudo_labelled_dataset(cfg, cfg.data.target) if cfg.data.target.pseudo_labels
                      else build_dataset(cfg.data.target, cfg.data.mean, cfg.data.std))
            self.streams["target"] = DataStream(target, stream=TARGET_STREAM, **common)

    def _next_batch(self) -> dict:
        batch = {}
        for name, stream in self.streams.items():
            try:
                item = next(stream)
            except UserError as error:
                raise unwrap_worker_error(error) from None
            except RuntimeError as error:
                if "stack expects each tensor to be equal size" in str(error):
                    raise UserError(f"data.{name}: images of different sizes cannot share a batch; set "
                                    f"data.{name}.crop_size (or a resize with keep_ratio=false)") from None
                raise
            batch[name] = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                           for k, v in item.items()}
        return batch

    # -- training ---------------------------------------------------------------------------
    def train(self) -> dict:
        """Run to ``train.iterations``; returns the last evaluation summary (``{}`` without one).

        On SIGINT / SIGTERM the iteration in progress completes, a checkpoint is saved and
        :class:`TrainingInterrupted` is raised.
        """
        cfg = self.cfg.train
        if self.finished:
            return {}
        self._say(f"{'resumed' if self.iteration else 'started'} {self.cfg.name} ({self.cfg.method.name}, "
                  f"{self.cfg.model.name}) at iteration {self.iteration} of {cfg.iterations} in {self.work_dir}",
                  echo=False)
        for note in self.notes:
            self._say(note)
        self._bar = progress_bar(cfg.iterations, self.iteration, self.progress and dist.is_main())
        periodic_to_stdout = self.progress and dist.is_main() and not stdout_is_terminal()
        last_eval: dict = {}
        try:
            with stop_requests() as stop:
                while self.iteration < cfg.iterations:
                    last_eval = self._train_one(last_eval, periodic_to_stdout) or last_eval
                    if dist.any_rank(stop.requested, self.device):
                        self._stop(stop.name if stop.requested else "a signal on another rank", stop.signum)
        finally:
            self._bar.close()
            self._bar = None
            self.logger.close()
        self._say(f"finished {cfg.iterations} iterations", echo=False)
        return last_eval

    def _train_one(self, last_eval: dict, periodic_to_stdout: bool) -> Optional[dict]:
        cfg = self.cfg.train
        it = self.iteration
        start = time.perf_counter()
        result = self.train_iteration(it)
        self.iteration = it + 1
        self._bar.update(1)
        final = self.iteration == cfg.iterations
        if it % cfg.log_interval == 0 or final:
            losses = dist.average_values(result.losses)
            record = {**losses, **result.metrics, "lr": self.optimizer.param_groups[0]["lr"],
                      **self.owned.lrs(), "iter_time": round(time.perf_counter() - start, 4)}
            self.logger.log(it, "train", record)
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in list(result.losses.items())[:3]}, refresh=False)
            self._say(f"iter {self.iteration}/{cfg.iterations}  {format_values(losses)}  "
                      f"lr {record['lr']:.3g}  {record['iter_time']:.3f} s/it", echo=periodic_to_stdout)
        evaluation = None
        if self.val_sets and (self.iteration % cfg.eval_interval == 0 or final):
            evaluation = self.evaluate_all(teacher_too=final or cfg.eval_teacher == "every")
            last_eval = evaluation
        if self.iteration % cfg.checkpoint_interval == 0 or final:
            self.save(metric=last_eval.get("miou") if evaluation is not None else None, about=last_eval)
        return evaluation

    def _stop(self, name: str, signum: Optional[int]) -> None:
        if self._saved_at != self.iteration:
            self.save()
        path = self.work_dir / "latest.pt"
        message = (f"stopped by {name} after iteration {self.iteration} of {self.cfg.train.iterations}; "
                   f"checkpoint {path} (continue with --resume)")
        self._say(message, echo=False)
        raise TrainingInterrupted(signum or 15, message)

    def train_iteration(self, it: int):
        self.model.train()
        if self.teacher is not None:
            self.teacher.update(it)
        self.schedule.step(it)
        self.optimizer.zero_grad(set_to_none=True)
        self.owned.begin_iteration(it)
        batch = self._next_batch()
        # Everything random in an iteration (dropout, drop-path, the step's draws) derives from
        # (seed, iteration, rank): distinct per rank, identical after a resume.
        seed_devices(mix_seed(self.cfg.train.seed, it, dist.rank(), 1), self.device)
        generator = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, it, dist.rank()))
        result = self.step.run(batch, it, generator)
        dist.average_gradients(self.model.parameters())
        self.optimizer.step()
        self.owned.step()
        self.step.after_step(result)
        return result

    # -- evaluation -------------------------------------------------------------------------
    def evaluate_all(self, teacher_too: bool = False) -> dict:
        # Evaluation must not move the training RNG, or a run that evaluates at a different
        # iteration (or a resumed one) would follow another trajectory.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._evaluate_all(teacher_too)

    def _evaluate_all(self, teacher_too: bool) -> dict:
        """Evaluate on every ``data.val`` entry. The headline ``miou`` is the student's on the first one;
        per-set results are under ``'<model>/<set key>'`` (see :func:`run_folder.val_set_keys`)."""
        summary: dict = {}
        models = [("student", self.model.segmentor)]
        if teacher_too and self.teacher is not None:
            models.append(("teacher", self.teacher.module.segmentor))
        show_bar = self.progress and stdout_is_terminal()
        for who, segmentor in models:
            for key, (spec, dataset) in zip(self.val_keys, self.val_sets):
                result = evaluate(segmentor, dataset, self.cfg.eval, self.cfg.model.num_classes, self.device,
                                  list(dataset.classes.names), progress=show_bar, desc=f"eval {key}")
                self.logger.log(self.iteration, "eval", {"model": who, "dataset": spec.name, "split": spec.split,
                                                         "set": key, "miou": result["miou"], "iou": result["iou"]})
                self._say(f"eval at iteration {self.iteration}: {who} on {key}: mIoU {100 * result['miou']:.2f}")
                if who == "student" and "miou" not in summary:
                    summary.update(miou=result["miou"], dataset=key, iteration=self.iteration,
                                   metric_name="miou", model="student")
                summary[f"{who}/{key}"] = result
        self.history.append(summary)
        return summary

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "objectives": self.objectives.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            **({"owned_optimizers": self.owned.state_dict()} if self.owned else {}),
            "iteration": self.iteration,
            "streams": {name: stream.position for name, stream in self.streams.items()},
            "rng": capture_rng_state(),
            "config": to_dict(self.cfg),
            "model_name": self.cfg.model.name,
            "num_classes": self.cfg.model.num_classes,
            "method": self.cfg.method.name,
        }

    def save(self, metric: Optional[float] = None, about: Optional[dict] = None) -> None:
        self._saved_at = self.iteration
        if dist.is_main():
            described = {k: about[k] for k in ("metric_name", "model", "dataset") if about and k in about}
            self.checkpoints.save(self.iteration, self.state(), metric=metric, about=described)
        dist.barrier()

    def _resolve_resume(self, resume: str) -> Path:
        if resume == "latest":
            path = self.checkpoints.latest()
            if path is None:
                raise UserError(f"no checkpoint to resume from in {self.work_dir}")
            return path
        return Path(resume)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_compatible(state, self.cfg, path)
        saved_method = state.get("method")
        if saved_method is not None and saved_method != self.cfg.method.name:
            raise UserError(f"checkpoint {path} was saved by method '{saved_method}', the config trains "
                            f"'{self.cfg.method.name}' (use model.init_from to start from its weights)")
        check_schedule(state, self.cfg, path)
        self.model.load_state_dict(state["model"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.objectives.load_state_dict(state["objectives"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.owned:
            self.owned.load_state_dict(state.get("owned_optimizers", {}), path)
        self.iteration = int(state["iteration"])
        for name, position in state["streams"].items():
            if name in self.streams:
                self.streams[name].position = int(position)
                self.streams[name]._iterator = None
        restore_rng_state(state["rng"])


def check_compatible(state: dict, cfg: Config, path: Path) -> None:
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a udaseg checkpoint (no 'model' entry)")
    name, classes = state.get("model_name"), state.get("num_classes")
    if name is not None and name != cfg.model.name:
        raise UserError(f"checkpoint {path} holds a '{name}' model, the config asks for '{cfg.model.name}'")
    if classes is not None and int(classes) != cfg.model.num_classes:
        raise UserError(f"checkpoint {path} has {classes} classes, the config asks for {cfg.model.num_classes}")


def check_schedule(state: dict, cfg: Config, path: Path) -> None:
    """A resumed run keeps its learning-rate schedule: ``train.iterations`` cannot change on resume.

    The poly schedule decays to 0 at the planned length; training past it would run at lr 0, and
    re-planning it would make the run differ from the same run trained straight.
    """
    planned = state.get("schedule", {}).get("max_iters")
    if planned is None or int(planned) == schedule_length(cfg.optim, cfg.train.iterations):
        return
    planned = int(round(int(planned) / cfg.optim.schedule_horizon))
    done = int(state.get("iteration", 0))
    raise UserError(f"checkpoint {path} belongs to a run planned for {planned} iterations ({done} done), whose "
                    f"learning-rate schedule ends there; train.iterations={cfg.train.iterations} cannot change "
                    f"on resume: resume with train.iterations={planned}, or start a new run in another "
                    f"train.work_dir")
