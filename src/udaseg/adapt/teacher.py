"""Mean teacher: an exponential moving average (EMA) of the student's parameters.

The update follows the DACS / DAFormer code, which every contrastive method here builds on:

    t = 0:   θ' ← θ                                   (exact copy)
    t > 0:   θ' ← α_t θ' + (1 − α_t) θ,   α_t = min(1 − 1/(t + 1), α_max)

with α_max = 0.999 (DAFormer) or 0.99 (DACS). A module may follow the student at a rate of its
own (RCCR's momentum projector): ``rates`` maps a parameter-name prefix to its α_max, and the same
warm-up ``min(1 − 1/(t + 1), ·)`` applies to it. The teacher module stays in train mode, so its BN
layers normalise with the statistics of the batch they see, while dropout and DropPath are disabled:
this is the "inference condition" of the official code, which never calls ``.eval()`` on the teacher.

The BN *running* statistics therefore never take part in training; they matter only when the teacher
is evaluated (or exported). The official code lets the teacher's own forward passes update them, so
they describe the weak target batches alone, which is not the normalisation its averaged weights
were trained under (on the night digits the final teacher lost 1–2 mIoU to that alone: with the
student's statistics it scored above the student). udaseg freezes them against the teacher's forwards
and averages the student's into them with the main α_t, so an evaluated teacher is the EMA of the
student in every respect. Pseudo-labels are unaffected.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_dropout_like(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.dropout._DropoutNd)
        or hasattr(module, "drop_prob")
        or "DropPath" in type(module).__name__
    )


def disable_dropout(module: nn.Module) -> list[nn.Module]:
    """Switch off every stochastic-depth / dropout layer inside ``module``; return those layers.

    A layer counts as dropout-like when it is an ``nn.Dropout*`` (any ``_DropoutNd``), has a
    ``drop_prob`` attribute, or its class name contains ``DropPath``. Each such layer gets
    ``training = False``; in addition its drop probability (``p`` or ``drop_prob``) is set to 0, so
    the layer stays an identity even if a later ``.train()`` call flips its flag back. Other layers
    (BN in particular) keep their mode.
    """
    found = []
    for layer in module.modules():
        if not _is_dropout_like(layer):
            continue
        layer.training = False
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.p = 0.0
        if hasattr(layer, "drop_prob"):
            layer.drop_prob = 0.0
        found.append(layer)
    return found


def freeze_running_statistics(module: nn.Module) -> None:
    """Make BN forwards in train mode leave ``running_mean``/``running_var`` unchanged (momentum 0)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            layer.momentum = 0.0


class EMATeacher:
    """An EMA copy of a student network, run without gradients.

    The teacher holds a deep copy of the (unwrapped) student taken at construction. Its parameters
    never require gradients. Call :meth:`update` at the start of every iteration with the 0-based
    iteration number (before the teacher predicts), then call the teacher like a module.

    Example::

        teacher = EMATeacher(student, alpha_max=0.999)
        for it in range(iterations):
            teacher.update(it)
            logits = teacher(target_images).logits
            ...
    """

    def __init__(self, student: nn.Module, alpha_max: float = 0.999,
                 rates: Optional[dict[str, float]] = None) -> None:
        for value in [alpha_max, *(rates or {}).values()]:
            if not 0.0 <= value < 1.0:
                raise ValueError(f"alpha_max must lie in [0, 1), got {value}")
        self.student = student
        self.alpha_max = alpha_max
        self.rates = dict(rates or {})
        self.module = copy.deepcopy(unwrap_model(student))
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.module.train()
        self._dropout_layers = disable_dropout(self.module)
        freeze_running_statistics(self.module)
        self._groups = self._rate_groups()
        self.last_alpha: float | None = None

    def _rate_groups(self) -> list[tuple[float, list[int]]]:
        """(α_max, parameter indices) per rate; a parameter takes the longest prefix that matches it."""
        names = [name for name, _ in self.module.named_parameters()]
        for prefix in self.rates:
            if not any(name.startswith(prefix) for name in names):
                raise ValueError(f"EMA rate prefix '{prefix}' matches no parameter of the model")
        prefixes = sorted(self.rates, key=len, reverse=True)
        groups: dict[float, list[int]] = {self.alpha_max: []}
        for index, name in enumerate(names):
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            groups.setdefault(self.rates[prefix] if prefix is not None else self.alpha_max, []).append(index)
        return [(rate, indices) for rate, indices in groups.items() if indices]

    def alpha(self, iteration: int, alpha_max: Optional[float] = None) -> float:
        """α_t = min(1 − 1/(t + 1), α_max)."""
        return min(1.0 - 1.0 / (iteration + 1), self.alpha_max if alpha_max is None else alpha_max)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Copy (iteration 0) or average (later iterations) the student's parameters into the teacher."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        teacher_params = list(self.module.parameters())
        student_params = [p.detach() for p in unwrap_model(self.student).parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError(
                f"teacher has {len(teacher_params)} parameters, student {len(student_params)}"
            )
        if iteration == 0:
            for t, s in zip(teacher_params, student_params):
                t.copy_(s)
            self._average_statistics(0.0)
            self.last_alpha = 0.0
            return
        for rate, indices in self._groups:
            alpha = self.alpha(iteration, rate)
            targets = [teacher_params[i] for i in indices]
            torch._foreach_mul_(targets, alpha)
            torch._foreach_add_(targets, [student_params[i] for i in indices], alpha=1.0 - alpha)
        self.last_alpha = self.alpha(iteration)
        self._average_statistics(self.last_alpha)

    def _average_statistics(self, alpha: float) -> None:
        """Running BN statistics ← α·teacher + (1 − α)·student (α = 0 copies them)."""
        student = dict(unwrap_model(self.student).named_buffers())
        for name, buffer in self.module.named_buffers():
            source = student.get(name)
            if source is None or not name.endswith(("running_mean", "running_var")):
                continue
            buffer.mul_(alpha).add_(source.detach(), alpha=1.0 - alpha)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward of the teacher module under ``torch.no_grad`` (train-mode BN, no dropout)."""
        for layer in self._dropout_layers:
            layer.training = False
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "EMATeacher":
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher module's state dict (parameters and buffers)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
        result = self.module.load_state_dict(state, strict=strict)
        for param in self.module.parameters():
            param.requires_grad_(False)
        return result
