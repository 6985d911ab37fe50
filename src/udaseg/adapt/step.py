"""One UDA training iteration: named views, cached forwards, objectives, grouped backward.

A step works on named **views** of the batch (``source``, ``target``, ``mixed``, ...). Objectives
declare which model outputs they need on which view (:class:`Need`), then read them from the
:class:`StepContext`. Every forward runs once per view and iteration and is cached, so two
objectives that read the same features do not pay twice.

Losses are returned per **group** (the student view whose graph they use). With
``backward_per_group`` the step back-propagates after each group and frees its graph, which keeps
peak memory at one view's activations as in the official SePiCo/DAFormer code; gradients add up
before the optimiser step.

Views carry their geometry (per-image :class:`~udaseg.adapt.geometry.CropBox` in the parent view,
and the scale relative to it). A forward is cached per (model, view, **inference mode**): ``whole``
is the plain forward; other modes (``slide``, or a method's own) are callables registered with the
step (:meth:`Objective.inference_modes`). A model may return several named outputs besides its main
``logits`` (``ModelOutput.outputs``, with the boxes of outputs that cover part of the input); losses
address them by name through :meth:`ModelOutput.output`.

After the optimiser step the trainer calls :meth:`Objective.after_step` (memory banks filled with
this iteration's detached outputs). Modules an objective trains with an optimiser of its own (a
discriminator) are declared by :meth:`Objective.owned_optimizers`; they are not part of the
:class:`UDAModel`, so the EMA teacher and the segmentor's parameter groups never see them.

Example::

    step = TrainStep(model, teacher, [SupervisedSource(view="source")])
    out = step.run(batch, iteration=0, generator=torch.Generator().manual_seed(0))
    out.losses  # {'source.ce': 2.39}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from udaseg.adapt.geometry import CropBox
from udaseg.errors import UserError

WHOLE = "whole"
MAIN_OUTPUT = "logits"


@dataclass(frozen=True)
class Need:
    """An objective's request for a model output on a view."""

    model: str  # "student" or "teacher"
    view: str
    taps: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    logits: bool = True  # False: encoder features are enough, the decode head may be skipped
    mode: str = WHOLE  # inference mode: "whole" (one forward) or a registered one ("slide", ...)


@dataclass
class ModelOutput:
    """What a model returns on a view.

    ``logits`` is the main output (what pseudo-labels and evaluation use); ``outputs`` holds further
    named outputs of a multi-output model (e.g. HRDA's ``lr``, ``hr``, ``attention``), and ``boxes``
    the crop box, in the input's pixel grid, of each output that covers part of the input only.
    """

    logits: Optional[Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)
    projections: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    boxes: dict[str, CropBox] = field(default_factory=dict)

    def output(self, name: str = MAIN_OUTPUT) -> Tensor:
        """The named output; ``"logits"`` is the main one."""
        if name == MAIN_OUTPUT and self.logits is not None:
            return self.logits
        if name not in self.outputs:
            raise KeyError(f"the model has no output '{name}'; outputs: {[MAIN_OUTPUT, *self.outputs]}")
        return self.outputs[name]


InferenceMode = Callable[[nn.Module, Tensor], "ModelOutput"]


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
        return ModelOutput(out.logits, dict(out.features), projections, dict(getattr(out, "outputs", {}) or {}),
                           dict(getattr(out, "boxes", {}) or {}))


@dataclass
class View:
    """A named batch of images with optional labels, weights and geometry.

    ``boxes``: for a view cut out of another one (``parent``), the per-image box in the parent's
    pixel grid; ``scale``: the resize factor relative to the parent (0.5: half resolution).
    """

    image: Tensor
    label: Optional[Tensor] = None  # B×H×W trainIds, 255 = ignore
    weight: Optional[Tensor] = None  # B×H×W per-pixel loss weight
    boxes: Optional[tuple[CropBox, ...]] = None
    scale: float = 1.0
    parent: Optional[str] = None

    @property
    def box(self) -> Optional[CropBox]:
        """The box shared by every image of the view (``None`` when uncropped)."""
        if not self.boxes:
            return None
        if any(b != self.boxes[0] for b in self.boxes):
            raise ValueError("the images of this view have different crop boxes; use .boxes")
        return self.boxes[0]


class StepContext:
    """What objectives see during one iteration."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], iteration: int,
                 generator: torch.Generator, needs: Iterable[Need], num_classes: int,
                 autocast: Optional[torch.dtype] = None, channels_last: bool = False,
                 inference_modes: Optional[dict[str, InferenceMode]] = None):
        self.student_model = student
        self.teacher_model = teacher
        self.iteration = iteration
        self.generator = generator
        self.num_classes = num_classes
        self.autocast = autocast
        self.channels_last = channels_last
        self.views: dict[str, View] = {}
        self.batch: dict[str, dict] = {}  # the data items the views of the batch were made from
        self.state: dict[str, object] = {}  # values objectives share within the iteration
        self.metrics: dict[str, float | Tensor] = {}  # scalar tensors are read once, at the end of the step
        self.inference_modes = dict(inference_modes or {})
        self._requests: dict[tuple[str, str, str], tuple[set, set, list]] = {}
        for need in needs:
            if need.mode != WHOLE and need.mode not in self.inference_modes:
                raise KeyError(f"inference mode '{need.mode}' is not registered; modes: "
                               f"{[WHOLE, *self.inference_modes]}")
            key = (need.model, need.view, need.mode)
            taps, heads, decode = self._requests.setdefault(key, (set(), set(), [False]))
            taps.update(need.taps)
            heads.update(need.heads)
            decode[0] = decode[0] or need.logits
        self._cache: dict[tuple[str, str, str], ModelOutput] = {}

    @property
    def device(self) -> torch.device:
        return next(self.student_model.parameters()).device

    def add_view(self, name: str, image: Tensor, label: Optional[Tensor] = None,
                 weight: Optional[Tensor] = None, boxes: Optional[Sequence[CropBox]] = None,
                 scale: float = 1.0, parent: Optional[str] = None) -> View:
        """Add (or replace) a view; replacing drops its cached forwards."""
        view = View(image, label, weight, tuple(boxes) if boxes is not None else None, scale, parent)
        self.views[name] = view
        for key in [k for k in self._cache if k[1] == name]:
            del self._cache[key]
        return view

    def view(self, name: str) -> View:
        if name not in self.views:
            raise KeyError(f"view '{name}' does not exist in this step; views: {sorted(self.views)}")
        return self.views[name]

    def _forward(self, model_name: str, view_name: str, mode: str = WHOLE) -> ModelOutput:
        key = (model_name, view_name, mode)
        if key in self._cache:
            return self._cache[key]
        model = self.student_model if model_name == "student" else self.teacher_model
        if model is None:
            raise RuntimeError(f"an objective needs the {model_name}, but this method has none")
        if mode != WHOLE and mode not in self.inference_modes:
            raise KeyError(f"inference mode '{mode}' is not registered; modes: {[WHOLE, *self.inference_modes]}")
        taps, heads, decode = self._requests.get(key, (set(), set(), [True]))
        image = self.view(view_name).image
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        grad = torch.enable_grad() if model_name == "student" else torch.no_grad()
        with grad, _autocast(image.device, self.autocast):
            if mode == WHOLE:
                out = model(image, taps=tuple(sorted(taps)), heads=tuple(sorted(heads)), decode=decode[0])
            else:
                out = self.inference_modes[mode](model, image)
        if isinstance(out, Tensor):
            out = ModelOutput(out)
        out = ModelOutput(
            out.logits.float() if out.logits is not None else None,
            {k: v.float() for k, v in out.features.items()},
            {k: v.float() for k, v in out.projections.items()},
            {k: v.float() for k, v in out.outputs.items()},
            dict(out.boxes),
        )
        self._cache[key] = out
        return out

    def student(self, view: str, mode: str = WHOLE) -> ModelOutput:
        return self._forward("student", view, mode)

    def teacher(self, view: str, mode: str = WHOLE) -> ModelOutput:
        return self._forward("teacher", view, mode)

    def release(self, view: str) -> None:
        """Drop cached student outputs of a view (after its group was back-propagated)."""
        for key in [k for k in self._cache if k[0] == "student" and k[1] == view]:
            del self._cache[key]

    def student_groups(self) -> list[str]:
        return list(dict.fromkeys(view for (model, view, _) in self._requests if model == "student"))


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

    def after_step(self, ctx: StepContext) -> None:
        """Called once the optimisers have stepped (e.g. enqueue this iteration's detached outputs)."""

    def inference_modes(self) -> dict[str, InferenceMode]:
        """Inference modes beyond ``whole`` this objective asks for, ``{name: fn(model, image)}``."""
        return {}

    def owned_optimizers(self) -> dict[str, "OwnedOptimizer"]:
        """Modules (submodules of this objective) trained by optimisers of their own."""
        return {}


@dataclass
class OwnedOptimizer:
    """A module an objective trains with its own optimiser and schedule (e.g. a discriminator).

    ``optim`` is an :class:`~udaseg.config.schema.OptimConfig` (name, lr, betas, weight decay, poly
    power, warm-up); the schedule spans the run's iterations. The module must be a submodule of the
    objective, so its weights are saved with the objective's state.
    """

    module: nn.Module
    optim: Any


@dataclass
class StepResult:
    losses: dict[str, float]
    metrics: dict[str, float]
    context: Optional[StepContext] = field(default=None, repr=False, compare=False)


class NonFiniteLoss(UserError):
    """A loss became NaN or Inf."""


def to_numbers(values: dict[str, Any]) -> dict[str, float]:
    """Python floats of scalar tensors and numbers, with one device-to-host copy for all the tensors.

    Reading each loss or metric with ``float()`` would wait for the device once per value, in the
    middle of the step; objectives store tensors and the step reads them all at its end.
    """
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    numbers = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if tensors:
        # float64 holds every float32 / bf16 value exactly, so each number equals float(tensor)
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in tensors.values()])
        numbers.update(zip(tensors, stacked.tolist()))
    return {k: numbers[k] for k in values}


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
        self.inference_modes: dict[str, InferenceMode] = {}
        for obj in self.objectives:
            self.inference_modes.update(obj.inference_modes())

    def run(self, batch: dict, iteration: int, generator: torch.Generator) -> StepResult:
        needs = [n for obj in self.objectives for n in obj.needs(iteration)]
        ctx = StepContext(self.student, self.teacher, iteration, generator, needs, self.num_classes,
                          self.autocast, self.channels_last, self.inference_modes)
        ctx.batch = batch
        for name, item in batch.items():
            ctx.add_view(name, item["image"], item.get("label"))
        for obj in self.objectives:
            obj.prepare(ctx, batch)
        logged: dict[str, Tensor] = {}
        pending: list[Tensor] = []
        for group in ctx.student_groups():
            group_losses: dict[str, Tensor] = {}
            for obj in self.objectives:
                for name, value in obj.losses(ctx, group).items():
                    group_losses[f"{group}.{name}" if "." not in name else name] = value
            logged.update((name, value.detach()) for name, value in group_losses.items())
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
        losses, metrics = to_numbers(logged), to_numbers(ctx.metrics)
        for name, number in losses.items():
            if not math.isfinite(number):  # checked before any optimiser steps
                raise NonFiniteLoss(f"loss '{name}' is {number} at iteration {iteration}; stopping "
                                    f"(the last saved checkpoint is intact)")
        return StepResult(losses, metrics, ctx)

    def after_step(self, result: StepResult) -> None:
        """Run the objectives' post-step hooks on the iteration's context."""
        if result.context is None:
            return
        for obj in self.objectives:
            obj.after_step(result.context)
        result.context = None  # the graphs and cached outputs of the iteration can go
