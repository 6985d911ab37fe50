"""Optimisers of modules that objectives own (a discriminator), beside the segmentor's optimiser.

Each :class:`~udaseg.adapt.step.OwnedOptimizer` an objective declares gets its own optimiser and
poly/warm-up schedule over the run's iterations (times its own ``schedule_horizon``). The trainer
zeroes, schedules, averages (across ranks) and steps them together with the segmentor's optimiser; their states go into checkpoints
under ``owned_optimizers``. The modules themselves are submodules of their objective, so their
weights are saved with the objective's state, and they are neither in the EMA teacher nor in the
segmentor's parameter groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from udaseg.adapt.step import Objective
from udaseg.engine import distributed as dist
from udaseg.engine.optim import PolyWarmupSchedule, build_optimizer, schedule_length
from udaseg.errors import UserError


@dataclass
class _Entry:
    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: PolyWarmupSchedule


class OwnedOptimizers:
    """All objective-owned optimisers of a run, keyed ``<objective name>.<name>``."""

    def __init__(self, objectives: Sequence[Objective], iterations: int) -> None:
        self.entries: dict[str, _Entry] = {}
        for objective in objectives:
            for name, spec in objective.owned_optimizers().items():
                key = f"{objective.name}.{name}"
                if key in self.entries:
                    raise ValueError(f"two owned optimisers are called '{key}'")
                if not any(module is spec.module for module in objective.modules()):
                    raise ValueError(f"the module of owned optimiser '{key}' is not a submodule of its objective, "
                                     "so it would not be saved in checkpoints")
                optimizer = build_optimizer(spec.module, spec.optim)
                schedule = PolyWarmupSchedule(optimizer, spec.optim, schedule_length(spec.optim, iterations))
                self.entries[key] = _Entry(spec.module, optimizer, schedule)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def parameters(self) -> list[nn.Parameter]:
        return [p for entry in self.entries.values() for p in entry.module.parameters() if p.requires_grad]

    def begin_iteration(self, iteration: int) -> None:
        for entry in self.entries.values():
            entry.schedule.step(iteration)
            entry.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if not self.entries:
            return
        dist.average_gradients(self.parameters())
        for entry in self.entries.values():
            entry.optimizer.step()

    def lrs(self) -> dict[str, float]:
        return {f"lr.{key}": entry.optimizer.param_groups[0]["lr"] for key, entry in self.entries.items()}

    def state_dict(self) -> dict[str, Any]:
        return {key: {"optimizer": entry.optimizer.state_dict(), "schedule": entry.schedule.state_dict()}
                for key, entry in self.entries.items()}

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint") -> None:
        missing = sorted(set(self.entries) - set(state))
        if missing:
            raise UserError(f"{path} holds no optimiser state for '{missing[0]}' (saved by another method?)")
        for key, entry in self.entries.items():
            entry.optimizer.load_state_dict(state[key]["optimizer"])
            entry.schedule.load_state_dict(state[key]["schedule"])
