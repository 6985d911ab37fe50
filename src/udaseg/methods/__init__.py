"""Methods: each is a list of objectives over the shared training step, plus the modules it trains.

A method is **one file** that registers itself with :func:`register_method` and, where it has
settings, owns its config section (a dataclass; the section appears as ``method.<section>`` in
presets and is validated like every other config key, typos included)::

    @dataclass
    class MyConfig:
        weight: float = 0.1

    @register_method("my_method", config=MyConfig)
    def build_my_method(cfg: Config, segmentor: nn.Module) -> Method:
        mine = cfg.method.my_method          # a MyConfig
        return Method([SupervisedSegmentation("source"), MyObjective(mine.weight)])

Built-in methods are the modules of this package; the registry imports them on first use.
Third-party packages register through the entry-point group ``udaseg.methods`` (the entry point
names a module, or an object inside one, whose import calls :func:`register_method`)::

    [project.entry-points."udaseg.methods"]
    my_method = "my_package.my_method"

| name | file | objectives |
|---|---|---|
| ``source_only`` | ``base.py`` | CE on the source |
| ``target_oracle`` | ``base.py`` | CE on labelled target images (the upper bound) |
| ``dacs`` | ``dacs.py`` | source CE + ClassMix pseudo-label CE with an EMA teacher |
| ``daformer`` | ``daformer.py`` | DACS + ImageNet feature distance (+ RCS and warm-up from the data/optim config) |
| ``sepico`` | ``sepico.py`` | DAFormer-style self-training + semantic-guided pixel contrast |
| ``t2sda`` | ``t2sda.py`` | self-training + pulling target to source |
| ``pgpc`` | ``pgpc.py`` | DAFormer self-training + pseudo-label guided pixel contrast |
| ``rccr`` | ``rccr.py`` | DACS + region-wise contrast of a CutMix view against the momentum teacher |
| ``mic`` | ``mic.py`` | ``mic.base`` (DAFormer by default) + masked image consistency |
| ``hrda`` | ``hrda.py`` | ``hrda.base`` on an HRDA model, 0.9 fused + 0.1 detail loss |
| ``spcl`` | ``spcl.py`` | one stage of SPCL's pipeline (``method.spcl.stage``): adversarial warm-up, prototype contrast, or self-training on offline pseudo-labels |
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from udaseg.adapt.step import Objective
from udaseg.errors import UserError

ENTRY_POINT_GROUP = "udaseg.methods"


@dataclass
class Method:
    """What a method builder returns.

    ``heads``: extra heads trained with the segmentor (in ``UDAModel``, EMA'd into the teacher, in
    the segmentor's optimiser with the head learning rate), each with the encoder tap it reads.
    ``ema_rates``: α_max per parameter-name prefix of ``UDAModel`` (e.g. ``"heads.momentum_proj"``)
    where a module follows the student at its own rate; the rest uses ``self_training.ema_alpha``.
    Modules that an objective trains with its own optimiser (a discriminator) are not listed here:
    the objective owns them (see :meth:`udaseg.adapt.step.Objective.owned_optimizers`).
    """

    objectives: list[Objective]
    heads: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    uses_teacher: bool = False
    uses_target: bool = False
    target_labelled: bool = False
    ema_rates: dict[str, float] = field(default_factory=dict)


MethodBuilder = Callable[..., Method]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    builder: MethodBuilder
    section: Optional[str] = None  # config key under ``method.``
    config: Optional[type] = None  # the section's dataclass


_REGISTRY: dict[str, MethodEntry] = {}
_SECTIONS: dict[str, type] = {}
_loaded = {"builtins": False, "plugins": False}


def register_method(name: str, config: Optional[type] = None,
                    section: Optional[str] = None) -> Callable[[MethodBuilder], MethodBuilder]:
    """Decorator: register ``builder(cfg, segmentor) -> Method`` as method ``name``.

    ``config`` is the dataclass of the method's settings, read as ``cfg.method.<section>``
    (``section`` defaults to ``name``; methods may share one section by naming it).
    """
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"config of method '{name}' must be a dataclass, got {config!r}")
    key = (section or name) if config is not None else None
    if key is not None and key in _SECTIONS and _SECTIONS[key] is not config:
        raise ValueError(f"config section 'method.{key}' is already owned by {_SECTIONS[key].__name__}")
    if key in ("name", "self_training", "sections"):
        raise ValueError(f"'method.{key}' is reserved")

    def decorator(builder: MethodBuilder) -> MethodBuilder:
        _REGISTRY[name] = MethodEntry(name, builder, key, config)
        if key is not None:
            _SECTIONS[key] = config
        return builder
    return decorator


def _load_builtins() -> None:
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as error:  # a broken plugin must not take the built-in methods down
            warnings.warn(f"method plugin '{entry.name}' ({entry.value}) failed to load: {error}")


def _ensure_loaded(name: Optional[str] = None) -> None:
    _load_builtins()
    if not _loaded["plugins"] or (name is not None and name not in _REGISTRY):
        _loaded["plugins"] = True
        _load_plugins()


def available_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def method_entry(name: str) -> MethodEntry:
    """The registered method ``name``; a ``UserError`` naming the closest one when unknown."""
    _ensure_loaded(name)
    if name not in _REGISTRY:
        from udaseg.config.loader import closest

        hint = closest(name, _REGISTRY)
        suffix = f"; did you mean '{hint}'?" if hint else f"; available: {', '.join(sorted(_REGISTRY))}"
        raise UserError(f"config key 'method.name': unknown method '{name}'{suffix}")
    return _REGISTRY[name]


def method_sections(missing: Optional[str] = None) -> dict[str, type]:
    """Config sections owned by registered methods: ``{section key: dataclass}``.

    ``missing``: a key the caller did not find; plugins are looked up again before giving up on it.
    """
    _ensure_loaded()
    if missing is not None and missing not in _SECTIONS:
        _load_plugins()
    return dict(_SECTIONS)


def build_method(cfg, segmentor: nn.Module) -> Method:
    return method_entry(cfg.method.name).builder(cfg, segmentor)
