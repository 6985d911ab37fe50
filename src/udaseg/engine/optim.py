"""Optimiser construction and the mmcv-style poly learning-rate schedule with linear warm-up.

Parameter groups (mmcv ``paramwise_cfg.custom_keys`` semantics, as in DAFormer's configs):

* key ``"head"`` → lr × ``head_lr_mult`` (decay unchanged);
* each key of ``no_decay_keys`` (default ``norm``, ``pos_block``) → weight decay 0 (lr unchanged).

A parameter takes the rule of **one** key only: the longest key contained in its name, ties broken
alphabetically (mmcv sorts the keys that way and stops at the first match). Hence a head parameter
called ``decode_head.…norm.weight`` gets lr × 10 *and keeps* its weight decay, exactly as in the
official runs. Parameters with ``requires_grad=False`` are left out.

For SGD the no-decay keys are ignored by default (the DeepLab SGD configs of the field decay every
parameter); pass ``sgd_no_decay=True`` to apply them to SGD as well.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from udaseg.config.schema import OptimConfig
from udaseg.errors import UserError

HEAD_KEY = "head"


def _matching_key(name: str, keys: list[str]) -> Optional[str]:
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def parameter_groups(
    model: nn.Module, cfg: OptimConfig, apply_no_decay: bool = True
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr multiplier, decay multiplier), in model order.

    Each group carries ``lr`` (= cfg.lr × lr_mult), ``weight_decay``, ``base_lr`` (what the schedule
    scales), ``lr_mult``, ``decay_mult`` and ``param_names``.
    """
    no_decay_keys = list(cfg.no_decay_keys) if apply_no_decay else []
    keys = [HEAD_KEY] + [k for k in no_decay_keys if k != HEAD_KEY]
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = _matching_key(name, keys)
        lr_mult = cfg.head_lr_mult if key == HEAD_KEY else 1.0
        decay_mult = 0.0 if key is not None and key != HEAD_KEY else 1.0
        group = groups.setdefault(
            (lr_mult, decay_mult),
            {
                "params": [],
                "param_names": [],
                "lr": cfg.lr * lr_mult,
                "base_lr": cfg.lr * lr_mult,
                "weight_decay": cfg.weight_decay * decay_mult,
                "lr_mult": lr_mult,
                "decay_mult": decay_mult,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, sgd_no_decay: bool = False
) -> torch.optim.Optimizer:
    """AdamW (``betas``, decoupled ``weight_decay``) or SGD (``momentum``, ``weight_decay``).

    See the module docstring for the parameter groups.
    """
    if cfg.lr <= 0:
        raise UserError(f"config key 'optim.lr' must be > 0, got {cfg.lr}")
    if cfg.name == "adamw":
        if len(cfg.betas) != 2:
            raise UserError(f"config key 'optim.betas' expects two floats, got {cfg.betas!r}")
        groups = parameter_groups(model, cfg, apply_no_decay=True)
        _require_params(groups)
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
    if cfg.name == "sgd":
        groups = parameter_groups(model, cfg, apply_no_decay=sgd_no_decay)
        _require_params(groups)
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise UserError(f"config key 'optim.name' must be 'adamw' or 'sgd', got {cfg.name!r}")


def _require_params(groups: list[dict[str, Any]]) -> None:
    if not groups:
        raise ValueError("the model has no trainable parameters")


def poly_warmup_lr(
    base_lr: float,
    iteration: int,
    max_iters: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
) -> float:
    """mmcv's poly schedule with linear warm-up, at 0-based ``iteration``:

        lr_poly(t) = (base − min_lr)·(1 − t/T)^power + min_lr,   t clamped to [0, T]
        lr(t)      = lr_poly(t)·(1 − (1 − t/W)(1 − warmup_ratio))   for t < W, else lr_poly(t)
    """
    t = min(max(iteration, 0), max_iters)
    lr = (base_lr - min_lr) * (1.0 - t / max_iters) ** power + min_lr
    if warmup_iters > 0 and iteration < warmup_iters:
        lr *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def schedule_length(cfg: OptimConfig, iterations: int) -> int:
    """The iteration at which the poly decay reaches ``min_lr``: ``round(iterations · schedule_horizon)``."""
    return max(int(round(iterations * cfg.schedule_horizon)), iterations)


class PolyWarmupSchedule:
    """Sets every group's lr from its own ``base_lr`` with :func:`poly_warmup_lr`.

    Call ``step(t)`` before the optimiser step of 0-based iteration t (mmcv updates the lr in
    ``before_train_iter``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_iters: int) -> None:
        if max_iters < 1:
            raise UserError(f"the number of iterations must be >= 1, got {max_iters}")
        if cfg.warmup_iters < 0:
            raise UserError(f"config key 'optim.warmup_iters' must be >= 0, got {cfg.warmup_iters}")
        self.optimizer = optimizer
        self.max_iters = max_iters
        self.power = cfg.power
        self.min_lr = cfg.min_lr
        self.warmup_iters = cfg.warmup_iters
        self.warmup_ratio = cfg.warmup_ratio
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.last_iter = -1

    def lr_at(self, iteration: int, base_lr: float) -> float:
        return poly_warmup_lr(
            base_lr, iteration, self.max_iters, self.power, self.min_lr,
            self.warmup_iters, self.warmup_ratio,
        )

    def step(self, iteration: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(iteration, group["base_lr"])
        self.last_iter = iteration

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_iters": self.max_iters,
            "last_iter": self.last_iter,
            "base_lrs": [group["base_lr"] for group in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base_lrs = list(state["base_lrs"])
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise UserError(
                f"scheduler state has {len(base_lrs)} parameter groups, "
                f"the optimiser {len(self.optimizer.param_groups)}"
            )
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
            group["base_lr"] = float(base_lr)
        self.max_iters = int(state["max_iters"])
        self.last_iter = int(state["last_iter"])
        if self.last_iter >= 0:
            self.step(self.last_iter)
