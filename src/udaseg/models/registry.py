"""Named model configurations: ``build_model(name, num_classes, **options)``.

=====================  =========================================================================
``deeplabv2_r101``      DeepLab-V2, ResNet-101 with the torchvision 7×7 stem (SPCL, RCCR, T2S-DA CNN)
``deeplabv2_r101_v1c``  DeepLab-V2, ResNet-101-V1c deep stem (SePiCo and DAFormer CNN runs)
``deeplabv2_r50``       DeepLab-V2, ResNet-50-V1c
``deeplabv2_r18``       DeepLab-V2, ResNet-18-V1c
``deeplabv2_tiny``      DeepLab-V2 on a ResNet-18 of width 8 (CPU tests and the digits demo)
``daformer_mitb0..b5``  DAFormer head on MiT-B0 … B5 (the paper's network is ``daformer_mitb5``)
``segformer_mitb0..b5`` SegFormer all-MLP head on MiT-B0 … B5
``daformer_tiny``       DAFormer head (64 channels) on ``mit_tiny``
``segformer_tiny``      SegFormer head (64 channels) on ``mit_tiny``
=====================  =========================================================================

Common options: ``pretrained`` (path of an ImageNet backbone checkpoint, loaded with
:func:`udaseg.models.weights.load_pretrained`), ``projection`` (``"sepico"``, ``"conv"``, ``"mlp"`` or
``None``), ``projection_input`` (the tap feeding it) and ``projection_options`` (a dict for the head).
ResNet models also take ``frozen_bn`` and ``freeze_bn_affine``; MiT models ``drop_path_rate``; heads with
dropout take ``dropout``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from ..errors import UserError
from .backbones.mit import MixTransformer
from .backbones.resnet import ResNet
from .heads.daformer import DAFormerHead
from .heads.deeplabv2 import DeepLabV2Head
from .heads.projection import build_projection_head
from .heads.segformer import SegFormerHead
from .segmentor import Segmentor

ModelFactory = Callable[..., Segmentor]
_REGISTRY: Dict[str, ModelFactory] = {}
_COMMON_OPTIONS = ("pretrained", "projection", "projection_input", "projection_options")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(num_classes, **options) -> Segmentor`` under ``name``."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> List[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def _closest(name: str, choices: List[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def build_model(name: str, num_classes: int, **options: Any) -> Segmentor:
    """Build the named segmentor with ``num_classes`` outputs (see the module docstring for options)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}{_closest(name, list_models())} (valid: {', '.join(list_models())})")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    factory = _REGISTRY[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    for option in options:
        if option not in accepted and option not in _COMMON_OPTIONS:
            valid = accepted + list(_COMMON_OPTIONS)
            raise UserError(f"unknown option {option!r} for model {name!r}{_closest(option, valid)}")
    common = {key: options.pop(key) for key in _COMMON_OPTIONS if key in options}
    model = factory(num_classes, **options)
    model.name = name
    model.num_classes = num_classes
    if common.get("projection"):
        _attach_projection(model, common["projection"], common.get("projection_input"),
                           common.get("projection_options") or {})
    if common.get("pretrained"):
        from .weights import load_pretrained

        load_pretrained(model, common["pretrained"])
    return model


def _attach_projection(model: Segmentor, kind: str, input_tap: Optional[str], head_options: Dict[str, Any]) -> None:
    input_tap = input_tap or _default_projection_input(model)
    if input_tap == "proj":
        raise UserError("projection_input cannot be 'proj'")
    try:
        in_channels = model.tap_channels(input_tap)
    except ValueError as error:
        raise UserError(f"projection_input: {error}") from None
    head = build_projection_head(kind, in_channels, **_projection_defaults(kind, input_tap, model, head_options))
    model.set_projection_head(head, input_tap)


def _default_projection_input(model: Segmentor) -> str:
    """SePiCo's choice: layer4 for ResNet, the four-stage fusion for MiT."""
    return "enc_last" if isinstance(model.backbone, ResNet) else "enc_fused"


def _projection_defaults(kind: str, input_tap: str, model: Segmentor, options: Dict[str, Any]) -> Dict[str, Any]:
    options = dict(options)
    if kind == "sepico" and "hidden_channels" not in options:
        options["hidden_channels"] = sepico_hidden_channels(model, input_tap)
    return options


def sepico_hidden_channels(model: Segmentor, input_tap: str) -> int:
    """SePiCo's hidden width: C_in, or C_in / number of stages on the resize-concat ``enc_fused``
    input (sepico.md §1.1.3)."""
    channels = model.tap_channels(input_tap)
    return channels // len(model.backbone.out_channels) if input_tap == "enc_fused" else channels


# ------------------------------------------------------------------------------------ DeepLab-V2
# Output stride -> (stage strides, stage dilations) of the dilated ResNet.
_RESNET_LAYOUTS = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 4: ((1, 1, 1, 1), (1, 2, 4, 8))}


def _deeplabv2(num_classes: int, depth: int, stem: str, base_width: int = 64, frozen_bn: bool = False,
               freeze_bn_affine: bool = False, output_stride: int = 8,
               head_dilations: Sequence[int] = (6, 12, 18, 24)) -> Segmentor:
    if output_stride not in _RESNET_LAYOUTS:
        raise UserError(f"output_stride must be one of {sorted(_RESNET_LAYOUTS)}, got {output_stride}")
    strides, dilations = _RESNET_LAYOUTS[output_stride]
    backbone = ResNet(depth, stem=stem, base_width=base_width, frozen_bn=frozen_bn, freeze_bn_affine=freeze_bn_affine,
                      strides=strides, dilations=dilations)
    if not head_dilations or any(int(d) < 1 for d in head_dilations):
        raise UserError(f"model option 'head_dilations' must be positive ints, got {list(head_dilations)}")
    head = DeepLabV2Head(backbone.out_channels, num_classes, backbone.out_strides,
                         dilations=tuple(int(d) for d in head_dilations))
    return Segmentor(backbone, head)


@register_model("deeplabv2_r101")
def deeplabv2_r101(num_classes: int, frozen_bn: bool = False, freeze_bn_affine: bool = False) -> Segmentor:
    return _deeplabv2(num_classes, 101, "plain", frozen_bn=frozen_bn, freeze_bn_affine=freeze_bn_affine)


@register_model("deeplabv2_r101_v1c")
def deeplabv2_r101_v1c(num_classes: int, frozen_bn: bool = False, freeze_bn_affine: bool = False) -> Segmentor:
    return _deeplabv2(num_classes, 101, "v1c", frozen_bn=frozen_bn, freeze_bn_affine=freeze_bn_affine)


@register_model("deeplabv2_r50")
def deeplabv2_r50(num_classes: int, frozen_bn: bool = False, freeze_bn_affine: bool = False) -> Segmentor:
    return _deeplabv2(num_classes, 50, "v1c", frozen_bn=frozen_bn, freeze_bn_affine=freeze_bn_affine)


@register_model("deeplabv2_r18")
def deeplabv2_r18(num_classes: int, frozen_bn: bool = False, freeze_bn_affine: bool = False) -> Segmentor:
    return _deeplabv2(num_classes, 18, "v1c", frozen_bn=frozen_bn, freeze_bn_affine=freeze_bn_affine)


@register_model("deeplabv2_tiny")
def deeplabv2_tiny(num_classes: int, frozen_bn: bool = False, freeze_bn_affine: bool = False, base_width: int = 8,
                   output_stride: int = 8, head_dilations: Sequence[int] = (6, 12, 18, 24)) -> Segmentor:
    """ResNet-18 layout of width ``base_width``; ``output_stride=4`` keeps layers 2-4 at stride 4
    (dilations 2/4/8), which small images such as the digits benchmark need. ``head_dilations`` are
    the ASPP branches' dilations: the paper's 6/12/18/24 see mostly zero padding on a 16×16 map."""
    return _deeplabv2(num_classes, 18, "v1c", base_width=base_width, frozen_bn=frozen_bn,
                      freeze_bn_affine=freeze_bn_affine, output_stride=output_stride, head_dilations=head_dilations)


# ------------------------------------------------------------------------------ MiT based models
_SEGFORMER_EMBED = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768, "tiny": 64}


def _register_mit_models(variant: str) -> None:
    config = f"mit_{variant}" if variant != "tiny" else "mit_tiny"
    suffix = f"mit{variant}" if variant != "tiny" else "tiny"
    head_width = 64 if variant == "tiny" else 256

    def daformer(num_classes: int, drop_path_rate: float = 0.1, dropout: float = 0.1) -> Segmentor:
        backbone = MixTransformer(config, drop_path_rate=drop_path_rate)
        head = DAFormerHead(backbone.out_channels, num_classes, backbone.out_strides, embed_dim=head_width,
                            channels=head_width, dropout=dropout)
        return Segmentor(backbone, head)

    def segformer(num_classes: int, drop_path_rate: float = 0.1, dropout: float = 0.1) -> Segmentor:
        backbone = MixTransformer(config, drop_path_rate=drop_path_rate)
        head = SegFormerHead(backbone.out_channels, num_classes, backbone.out_strides,
                             embed_dim=_SEGFORMER_EMBED[variant], dropout=dropout)
        return Segmentor(backbone, head)

    register_model(f"daformer_{suffix}")(daformer)
    register_model(f"segformer_{suffix}")(segformer)


for _variant in ("b0", "b1", "b2", "b3", "b4", "b5", "tiny"):
    _register_mit_models(_variant)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works for modules on the ``meta`` device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
