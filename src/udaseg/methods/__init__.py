"""Methods: each is a list of objectives over the shared training step, plus the heads it trains.

``build_method(cfg, segmentor)`` returns a :class:`Method`. The bases are configs, not forks:

| name | objectives |
|---|---|
| ``source_only`` | CE on the source |
| ``target_oracle`` | CE on labelled target images (the upper bound) |
| ``dacs`` | source CE + ClassMix pseudo-label CE with an EMA teacher |
| ``daformer`` | DACS + ImageNet feature distance (+ RCS and warm-up from the data/optim config) |
| ``sepico`` | DAFormer-style self-training + semantic-guided pixel contrast (``methods.sepico``) |
| ``t2sda`` | self-training + pulling target to source (``methods.t2sda``) |
| ``mic`` | ``mic.base`` (DAFormer by default) + masked image consistency (``methods.mic``) |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from udaseg.adapt.step import Objective
from udaseg.config.schema import Config
from udaseg.errors import UserError


@dataclass
class Method:
    objectives: list[Objective]
    heads: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    uses_teacher: bool = False
    uses_target: bool = False
    target_labelled: bool = False


MethodBuilder = Callable[[Config, nn.Module], Method]
METHODS: dict[str, MethodBuilder] = {}
_LAZY = {"sepico": "udaseg.methods.sepico", "t2sda": "udaseg.methods.t2sda", "mic": "udaseg.methods.mic"}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def decorator(fn: MethodBuilder) -> MethodBuilder:
        METHODS[name] = fn
        return fn
    return decorator


def build_method(cfg: Config, segmentor: nn.Module) -> Method:
    name = cfg.method.name
    if name not in METHODS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in METHODS:
        raise UserError(f"method '{name}' is not available; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg, segmentor)


def _self_training_objectives(cfg: Config, segmentor: nn.Module, feature_distance: bool) -> list[Objective]:
    from udaseg.methods.base import SupervisedSegmentation
    from udaseg.methods.dacs import PseudoLabelSelfTraining
    from udaseg.methods.daformer import ImageNetFeatureDistance

    objectives: list[Objective] = [SupervisedSegmentation("source")]
    if feature_distance:
        objectives.append(ImageNetFeatureDistance(cfg.method.self_training.feature_distance, segmentor,
                                                  cfg.model.num_classes))
    objectives.append(PseudoLabelSelfTraining(cfg.method.self_training, cfg.data.mean, cfg.data.std))
    return objectives


@register_method("source_only")
def _source_only(cfg: Config, segmentor: nn.Module) -> Method:
    from udaseg.methods.base import SupervisedSegmentation
    return Method([SupervisedSegmentation("source")])


@register_method("target_oracle")
def _target_oracle(cfg: Config, segmentor: nn.Module) -> Method:
    from udaseg.methods.base import SupervisedSegmentation
    return Method([SupervisedSegmentation("target", loss_name="oracle_ce")], uses_target=True,
                  target_labelled=True)


@register_method("dacs")
def _dacs(cfg: Config, segmentor: nn.Module) -> Method:
    return Method(_self_training_objectives(cfg, segmentor, feature_distance=False), uses_teacher=True,
                  uses_target=True)


@register_method("daformer")
def _daformer(cfg: Config, segmentor: nn.Module) -> Method:
    fd = cfg.method.self_training.feature_distance.enabled
    return Method(_self_training_objectives(cfg, segmentor, feature_distance=fd), uses_teacher=True,
                  uses_target=True)
