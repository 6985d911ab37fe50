"""One UDA training iteration: named views, cached forwards, objectives, grouped backward.

A step works on named **views** of the batch (``source``, ``target``, ``mixed``, ...). Objectives
declare which model outputs they need on which view (:class:`Need`), then read them from the
:class:`StepContext`. Every forward runs once per view and iteration and is cached, so two
objectives that read the same features do not pay twice.

Losses are returned per **group** (the student view whose graph they use). With
``backward_per_group`` the step back-propagates after each group and frees its graph, which keeps
peak memory at one view's activations as in the official SePiCo/DAFormer code; gradients add up
before the optimiser step.

Example::

    step = TrainStep(model, teacher, [SupervisedSource(view="source")])
    out = step.run(batch, iteration=0, generator=torch.Generator().manual_seed(0))
    out.losses  # {'source.ce': 2.39}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from udaseg.errors import UserError


@dataclass(frozen=True)
class Need:
    """An objective's request for a model output on a view."""

    model: str  # "student" or "teacher"
    view: str
    taps: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    logits: bool = True  # False: encoder features are enough, the decode head may be skipped


@dataclass
class ModelOutput:
    logits: Optional[Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)
    projections: dict[str, Tensor] = field(default_factory=dict)


class UDAModel(nn.Module):
    """The segmentor plus the extra heads a method trains (projection heads).

    Kept as one module so that the EMA teacher, checkpoints and gradient averaging cover the
    heads as well. A head is registered with the encoder tap it reads.
    """

    def __init__(self, segmentor: nn.Module, heads: Optional[dict[str, tuple[nn.Module, str]]] = None):
        super().__init__()
        self.segmentor = segmentor
        self.heads = nn.ModuleDict()
        self.head_taps: dict[str, str] = {}
        for name, (module, tap) in (heads or {}).items():
            self.heads[name] = module
            self.head_taps[name] = tap

    def forward(self, x: Tensor, taps: Sequence[str] = (), heads: Sequence[str] = (),
                decode: bool = True) -> ModelOutput:
        all_taps = tuple(dict.fromkeys(list(taps) + [self.head_taps[h] for h in heads]))
        out = self.segmentor(x, taps=all_taps, decode=decode)
        projections = {h: self.heads[h](out.features[self.head_taps[h]]) for h in heads}
        return ModelOutput(out.logits, dict(out.features), projections)


@dataclass
class View:
    image: Tensor
    label: Optional[Tensor] = None  # B×H×W trainIds, 255 = ignore
    weight: Optional[Tensor] = None  # B×H×W per-pixel loss weight


class StepContext:
    """What objectives see during one iteration."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], iteration: int,
                 generator: torch.Generator, needs: Iterable[Need], num_classes: int,
                 autocast: Optional[torch.dtype] = None, channels_last: bool = False):
        self.student_model = student
        self.teacher_model = teacher
        self.iteration = iteration
        self.generator = generator
        self.num_classes = num_classes
        self.autocast = autocast
        self.channels_last = channels_last
        self.views: dict[str, View] = {}
        self.state: dict[str, object] = {}  # values objectives share within the iteration
        self.metrics: dict[str, float] = {}
        self._requests: dict[tuple[str, str], tuple[set, set, list]] = {}
        for need in needs:
            taps, heads, decode = self._requests.setdefault((need.model, need.view), (set(), set(), [False]))
            taps.update(need.taps)
            heads.update(need.heads)
            decode[0] = decode[0] or need.logits
        self._cache: dict[tuple[str, str], ModelOutput] = {}

    @property
    def device(self) -> torch.device:
        return next(self.student_model.parameters()).device

    def add_view(self, name: str, image: Tensor, label: Optional[Tensor] = None,
                 weight: Optional[Tensor] = None) -> View:
        view = View(image, label, weight)
        self.views[name] = view
        for key in [k for k in self._cache if k[1] == name]:
            del self._cache[key]
        return view

    def view(self, name: str) -> View:
        if name not in self.views:
            raise KeyError(f"view '{name}' does not exist in this step; views: {sorted(self.views)}")
        return self.views[name]

    def _forward(self, model_name: str, view_name: str) -> ModelOutput:
        key = (model_name, view_name)
        if key in self._cache:
            return self._cache[key]
        model = self.student_model if model_name == "student" else self.teacher_model
        if model is None:
            raise RuntimeError(f"an objective needs the {model_name}, but this method has none")
        taps, heads, decode = self._requests.get(key, (set(), set(), [True]))
        image = self.view(view_name).image
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        grad = torch.enable_grad() if model_name == "student" else torch.no_grad()
        with grad, _autocast(image.device, self.autocast):
            out = model(image, taps=tuple(sorted(taps)), heads=tuple(sorted(heads)), decode=decode[0])
        out = ModelOutput(
            out.logits.float() if out.logits is not None else None,
            {k: v.float() for k, v in out.features.items()},
            {k: v.float() for k, v in out.projections.items()},
        )
        self._cache[key] = out
        return out

    def student(self, view: str) -> ModelOutput:
        return self._forward("student", view)

    def teacher(self, view: str) -> ModelOutput:
        return self._forward("teacher", view)

    def release(self, view: str) -> None:
        """Drop cached outputs of a view (after its group was back-propagated)."""
        self._cache.pop(("student", view), None)

    def student_groups(self) -> list[str]:
        return [view for (model, view) in self._requests if model == "student"]


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class Objective(nn.Module):
    """Base class of everything that contributes losses to a step.

    Subclasses override :meth:`needs`, optionally :meth:`prepare` (build views, run the teacher,
    make pseudo-labels; no gradients), and :meth:`losses` (return named, already weighted losses
    for one group). An objective is an ``nn.Module`` so its state (class statistics, queues) is
    saved in checkpoints.
    """

    name: str = "objective"

    def needs(self, iteration: int) -> list[Need]:
        return []

    def prepare(self, ctx: StepContext, batch: dict) -> None:
        pass

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        return {}


@dataclass
class StepResult:
    losses: dict[str, float]
    metrics: dict[str, float]


class NonFiniteLoss(UserError):
    """A loss became NaN or Inf."""


class TrainStep:
    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], objectives: Sequence[Objective],
                 num_classes: int, backward_per_group: bool = True, autocast: Optional[torch.dtype] = None,
                 channels_last: bool = False):
        self.student = student
        self.teacher = teacher
        self.objectives = list(objectives)
        self.num_classes = num_classes
        self.backward_per_group = backward_per_group
        self.autocast = autocast
        self.channels_last = channels_last

    def run(self, batch: dict, iteration: int, generator: torch.Generator) -> StepResult:
        needs = [n for obj in self.objectives for n in obj.needs(iteration)]
        ctx = StepContext(self.student, self.teacher, iteration, generator, needs, self.num_classes,
                          self.autocast, self.channels_last)
        for name, item in batch.items():
            ctx.add_view(name, item["image"], item.get("label"))
        for obj in self.objectives:
            obj.prepare(ctx, batch)
        logged: dict[str, float] = {}
        pending: list[Tensor] = []
        for group in ctx.student_groups():
            group_losses: dict[str, Tensor] = {}
            for obj in self.objectives:
                for name, value in obj.losses(ctx, group).items():
                    group_losses[f"{group}.{name}" if "." not in name else name] = value
            for name, value in group_losses.items():
                number = float(value.detach())
                if not math.isfinite(number):
                    raise NonFiniteLoss(f"loss '{name}' is {number} at iteration {iteration}; stopping "
                                        f"(the last saved checkpoint is intact)")
                logged[name] = number
            trainable = [v.reshape(()) for v in group_losses.values() if v.requires_grad]
            if trainable:
                total = torch.stack(trainable).sum()
                if self.backward_per_group:
                    total.backward()
                else:
                    pending.append(total)
            if self.backward_per_group:
                ctx.release(group)
        if pending:
            torch.stack([p.reshape(()) for p in pending]).sum().backward()
        return StepResult(logged, dict(ctx.metrics))
