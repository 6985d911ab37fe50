"""Iteration-based UDA training: one loop for every method.

The trainer owns the model (segmentor + method heads), the EMA teacher, the optimiser and schedule,
the data streams and checkpoints; the method's objectives own the losses. Resuming restores all of
it, so N iterations straight give the same parameters as N/2, a restart, and N/2 more.
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
from udaseg.engine.checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from udaseg.engine.loader import DataStream, mix_seed
from udaseg.engine.logging import MetricsLogger, progress_bar
from udaseg.engine.optim import PolyWarmupSchedule, build_optimizer
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


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output directory {path} is not writable ({err.strerror})") from None


def build_segmentor(cfg: Config) -> nn.Module:
    segmentor = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.options)
    if cfg.model.pretrained:
        load_pretrained(segmentor.backbone, cfg.model.pretrained)
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
    def __init__(self, cfg: Config, resume: Optional[str] = None, progress: bool = True):
        if cfg.stages:
            raise UserError(f"config '{cfg.name}' is a pipeline of {len(cfg.stages)} stages: run it with "
                            "'udaseg train' (udaseg.engine.pipeline.run_pipeline), not as one run")
        self.cfg = cfg
        self.progress = progress
        self.device = dist.local_device(cfg.train.device)
        dist.init_from_environment(self.device.type)
        self.work_dir = Path(cfg.train.work_dir)
        if dist.is_main():
            check_writable(self.work_dir)
            (self.work_dir / "config.yaml").write_text(config_to_yaml(cfg))
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        segmentor = build_segmentor(cfg)
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
        self.schedule = PolyWarmupSchedule(self.optimizer, cfg.optim, cfg.train.iterations)
        self.owned = OwnedOptimizers(self.method.objectives, cfg.train.iterations)
        self.step = TrainStep(self.model, self.teacher, self.method.objectives, cfg.model.num_classes,
                              cfg.train.backward_per_group, amp_dtype(cfg), cfg.train.channels_last)

        self.streams: dict[str, DataStream] = {}
        self._build_streams()
        self.val_sets = [(spec, build_dataset(spec, cfg.data.mean, cfg.data.std)) for spec in cfg.data.val]
        self.checkpoints = CheckpointManager(self.work_dir, keep_last=cfg.train.keep_last)
        self.logger = MetricsLogger(self.work_dir, enabled=dist.is_main())
        self.iteration = 0
        self.history: list[dict] = []
        if resume:
            self.load(self._resolve_resume(resume))

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
            item = next(stream)
            batch[name] = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                           for k, v in item.items()}
        return batch

    # -- training ---------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg.train
        bar = progress_bar(cfg.iterations, self.iteration, self.progress and dist.is_main())
        last_eval: dict = {}
        try:
            while self.iteration < cfg.iterations:
                it = self.iteration
                start = time.perf_counter()
                result = self.train_iteration(it)
                self.iteration = it + 1
                bar.update(1)
                if it % cfg.log_interval == 0 or self.iteration == cfg.iterations:
                    record = {**dist.average_values(result.losses), **result.metrics, "lr": self.optimizer.param_groups[0]["lr"],
                              **self.owned.lrs(), "time": round(time.perf_counter() - start, 4)}
                    self.logger.log(it, "train", record)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(result.losses.items())[:3]}, refresh=False)
                final = self.iteration == cfg.iterations
                if self.val_sets and (self.iteration % cfg.eval_interval == 0 or final):
                    last_eval = self.evaluate_all(teacher_too=final or cfg.eval_teacher == "every")
                if self.iteration % cfg.checkpoint_interval == 0 or final:
                    self.save(metric=last_eval.get("miou"))
        finally:
            bar.close()
            self.logger.close()
        return last_eval

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
        per-set results are under ``'<model>/<dataset>:<split>'`` (``#<n>`` added when a set repeats)."""
        summary: dict = {}
        models = [("student", self.model.segmentor)]
        if teacher_too and self.teacher is not None:
            models.append(("teacher", self.teacher.module.segmentor))
        for who, segmentor in models:
            for position, (spec, dataset) in enumerate(self.val_sets):
                result = evaluate(segmentor, dataset, self.cfg.eval, self.cfg.model.num_classes, self.device,
                                  list(dataset.classes.names), progress=self.progress, desc=f"eval {spec.name}")
                tag = f"{who}/{spec.name}:{spec.split}"
                if tag in summary:
                    tag = f"{tag}#{position}"
                self.logger.log(self.iteration, "eval", {"model": who, "dataset": spec.name, "split": spec.split,
                                                         "set": tag.split("/", 1)[1], "miou": result["miou"],
                                                         "iou": result["iou"]})
                if who == "student" and "miou" not in summary:
                    summary.update(miou=result["miou"], dataset=spec.name, iteration=self.iteration)
                summary[tag] = result
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

    def save(self, metric: Optional[float] = None) -> None:
        if dist.is_main():
            self.checkpoints.save(self.iteration, self.state(), metric=metric)
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
