"""Loading official checkpoint files into udaseg models, with a report of what did not fit.

Supported formats (``fmt``; ``"auto"`` detects them from the key names):

``mit``
    SegFormer's ImageNet ``mit_b*.pth``: a plain state dict (or one under ``state_dict``) with keys such
    as ``patch_embed1.proj.weight`` and ``block1.0.attn.kv.weight``; the classifier ``head.*`` is dropped.
``torchvision_resnet``
    torchvision ImageNet ResNets (``resnet101-5d3b4d8f.pth``): ``conv1``/``bn1``/``layerX.Y...``; onto the
    ``plain``-stem ResNet; ``fc.*`` is dropped.
``mmcv_resnet``
    OpenMMLab ``resnet*_v1c`` checkpoints: ``stem.{0,1,3,4,6,7}`` + ``layerX.Y``, possibly prefixed
    ``backbone.`` and/or under ``state_dict``; onto the ``v1c`` ResNet; ``fc.*`` is dropped.
``mmseg``
    an mmseg segmentor state dict (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``).
``uda``
    released DAFormer / SePiCo UDA checkpoints: ``state_dict`` with ``model.*`` (the student),
    ``ema_model.*`` (the teacher; pick it with ``use_ema=True``) and ``imnet_model.*`` (DAFormer's frozen
    ImageNet model for the feature distance, ignored). Inside, ``backbone.*`` and ``decode_head.*`` map to
    the segmentor's ``backbone`` and ``decode_head`` (the module names of our DAFormer, SegFormer and
    DeepLab-V2 heads equal mmseg's), ``auxiliary_head.*`` (SePiCo's projection head) maps to
    ``proj_head`` when the model has one and is ignored otherwise.

    Released HRDA / MIC(HRDA) checkpoints are ``uda`` files too. Their ``decode_head`` is mmseg's
    ``HRDAHead``, which holds no weights of its own: ``decode_head.head.*`` (the single-scale head shared by
    both scales) maps to ``decode_head.*`` and ``decode_head.scale_attention.*`` (the scale attention) to
    ``attention_head.*`` of :class:`udaseg.models.hrda.HRDASegmentor`. Into a single-scale segmentor the
    shared head loads as its decode head and the attention is ignored. A MIC file's separate teacher
    (``mic.teacher.ema_model.*``, present only when it used one) is ignored like ``imnet_model.*``.

Backbone formats load into ``module.backbone`` when given a :class:`Segmentor` (the heads are then not
counted as missing), or into the module itself. Segmentor formats load into a full :class:`Segmentor`, or
only their ``backbone.*`` part into a bare backbone. A leading ``module.`` (DDP) is removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import UserError
from .heads.segformer import SegFormerHead
from .segmentor import Segmentor

FORMATS = ("mit", "torchvision_resnet", "mmcv_resnet", "mmseg", "uda")
BACKBONE_FORMATS = ("mit", "torchvision_resnet", "mmcv_resnet")
_IGNORED_BUFFERS = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """Outcome of :func:`load_pretrained`.

    Attributes:
        path: the file read.  format: the detected or requested format.
        loaded: target keys that received a tensor.
        missing: target keys the checkpoint did not provide (BN ``num_batches_tracked`` excluded).
        unexpected: checkpoint keys (after mapping) the target has no slot for.
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present in both with other shapes;
            these are not loaded.
        ignored: checkpoint keys dropped on purpose (ImageNet classifiers, other sub-models).
    """

    path: str
    format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def expected(self) -> int:
        """How many target weights there were to fill."""
        return len(self.loaded) + len(self.missing) + len(self.mismatched)

    def mostly_loaded(self) -> bool:
        """At least half of the target's weights came from the file."""
        return self.expected > 0 and len(self.loaded) * 2 >= self.expected

    def summary(self) -> str:
        return (f"{self.path} ({self.format}): {len(self.loaded)} loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches, "
                f"{len(self.ignored)} ignored")


# ------------------------------------------------------------------------------------- reading
def read_state_dict(path: str) -> Dict[str, Tensor]:
    """Read a checkpoint file and return its tensor state dict (``state_dict``/``model`` unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a torch file
        reason = str(error).splitlines()[0] if str(error) else ""
        if reason.startswith("Weights only load failed"):
            reason = "torch cannot read it with weights_only=True (damaged, or it holds pickled objects)"
        raise UserError(f"cannot read checkpoint {path}: {type(error).__name__}: {reason}") from None
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            inner = content.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
                content = inner
                break
    if not isinstance(content, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(content).__name__}, not a state dict")
    tensors = {str(k): v for k, v in content.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UserError(f"checkpoint {path} contains no tensors")
    return {_strip(k, "module."): v for k, v in tensors.items()}


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def detect_format(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """Guess the checkpoint format from its keys; ``None`` when nothing matches."""
    keys = list(state_dict)
    if any(k.startswith(("model.", "ema_model.")) for k in keys):
        return "uda"
    if any(k.startswith("decode_head.") for k in keys):
        return "mmseg"
    bare = {_strip(k, "backbone.") for k in keys}
    if "patch_embed1.proj.weight" in bare:
        return "mit"
    if "stem.0.weight" in bare:
        return "mmcv_resnet"
    if "conv1.weight" in bare and "layer1.0.conv1.weight" in bare:
        return "torchvision_resnet"
    return None


# ------------------------------------------------------------------------------------- mapping
def _map_backbone_format(state_dict: Mapping[str, Tensor], fmt: str) -> Tuple[Dict[str, Tensor], List[str]]:
    dropped_prefix = "head." if fmt == "mit" else "fc."
    mapped, ignored = {}, []
    for key, value in state_dict.items():
        bare = _strip(key, "backbone.")
        if key.startswith(("decode_head.", "auxiliary_head.", "neck.")) or bare.startswith(dropped_prefix):
            ignored.append(key)
        else:
            mapped[bare] = value
    return mapped, ignored


def _select_uda_model(state_dict: Mapping[str, Tensor], use_ema: bool, path: str) -> Tuple[Dict[str, Tensor], List[str]]:
    prefix = "ema_model." if use_ema else "model."
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        which = "EMA teacher (ema_model.*)" if use_ema else "student (model.*)"
        raise UserError(f"checkpoint {path} has no {which} weights")
    return selected, [k for k in state_dict if not k.startswith(prefix)]


HRDA_SHARED_HEAD = "decode_head.head."
HRDA_ATTENTION = "decode_head.scale_attention."


def _map_hrda_key(key: str, has_attention: bool) -> Optional[str]:
    """An mmseg ``HRDAHead`` key -> the udaseg key (``None``: no slot for it); other keys unchanged."""
    if key.startswith(HRDA_SHARED_HEAD):
        return "decode_head." + key[len(HRDA_SHARED_HEAD):]
    if key.startswith(HRDA_ATTENTION):
        return "attention_head." + key[len(HRDA_ATTENTION):] if has_attention else None
    return key


def _map_segmentor_keys(state_dict: Mapping[str, Tensor], target: nn.Module) -> Tuple[Dict[str, Tensor], List[str]]:
    """mmseg segmentor keys -> udaseg Segmentor keys (HRDA's ``HRDAHead`` included)."""
    has_proj = isinstance(target, Segmentor) and target.proj_head is not None
    segformer = isinstance(target, Segmentor) and isinstance(target.decode_head, SegFormerHead)
    has_attention = getattr(target, "attention_head", None) is not None
    mapped, ignored = {}, []
    for original, value in state_dict.items():
        key = _map_hrda_key(original, has_attention)
        if key is None:
            ignored.append(original)
        elif key.startswith("auxiliary_head."):
            if has_proj:
                mapped["proj_head." + key[len("auxiliary_head."):]] = value
            else:
                ignored.append(key)
        elif key.startswith("decode_head.conv_seg.") and segformer:
            ignored.append(key)  # DAFormer's SegFormerHead builds conv_seg but classifies with linear_pred
        else:
            mapped[key] = value
    return mapped, ignored


# ------------------------------------------------------------------------------------- loading
def load_pretrained(module: nn.Module, path: str, fmt: str = "auto", strict: bool = False,
                    use_ema: bool = False) -> LoadReport:
    """Load checkpoint ``path`` into ``module`` (a :class:`Segmentor` or a bare backbone).

    Only tensors whose key and shape match are copied. With ``strict=True`` any missing, unexpected or
    shape-mismatched key raises :class:`UserError` before anything is loaded; otherwise the returned
    :class:`LoadReport` lists them.
    """
    path = os.fspath(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown checkpoint format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    state_dict = read_state_dict(path)
    if fmt == "auto":
        fmt = detect_format(state_dict) or ""
        if not fmt:
            sample = ", ".join(list(state_dict)[:4])
            raise UserError(f"cannot tell the format of checkpoint {path} (first keys: {sample}); it is none of "
                            f"{', '.join(FORMATS)}")

    ignored: List[str] = []
    if fmt in BACKBONE_FORMATS:
        mapped, ignored = _map_backbone_format(state_dict, fmt)
        target = module.backbone if isinstance(module, Segmentor) else module
        key_prefix = "backbone." if isinstance(module, Segmentor) else ""
    else:
        key_prefix = ""
        if fmt == "uda":
            state_dict, ignored = _select_uda_model(state_dict, use_ema, path)
        if isinstance(module, Segmentor):
            mapped, more = _map_segmentor_keys(state_dict, module)
            target = module
        else:  # a bare backbone takes the segmentor's backbone part
            mapped = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            more = [k for k in state_dict if not k.startswith("backbone.")]
            target = module
        ignored += more

    report = _compare(mapped, target.state_dict(), path, fmt, ignored)
    if strict and not report.ok:
        raise UserError(_strict_message(_with_prefix(report, key_prefix), module, len(target.state_dict())))
    if report.loaded:
        target.load_state_dict({k: mapped[k] for k in report.loaded}, strict=False)
    return _with_prefix(report, key_prefix)


def _with_prefix(report: LoadReport, prefix: str) -> LoadReport:
    """Name the target's keys as seen from the module the caller passed (e.g. ``backbone.stem.0.weight``)."""
    if not prefix:
        return report
    return LoadReport(
        path=report.path,
        format=report.format,
        loaded=[prefix + k for k in report.loaded],
        missing=[prefix + k for k in report.missing],
        unexpected=[prefix + k for k in report.unexpected],
        mismatched=[(prefix + k, a, b) for k, a, b in report.mismatched],
        ignored=report.ignored,
    )


def _compare(mapped: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: str, fmt: str,
             ignored: List[str]) -> LoadReport:
    report = LoadReport(path=path, format=fmt, ignored=sorted(ignored))
    for key, value in mapped.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(expected[key].shape)))
        else:
            report.loaded.append(key)
    report.missing = [k for k in expected if k not in mapped and not k.endswith(_IGNORED_BUFFERS)]
    return report


def _examples(keys: List[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", …" if len(keys) > n else "")


def _strict_message(report: LoadReport, module: nn.Module, n_expected: int) -> str:
    num_classes = getattr(module, "num_classes", None)
    classifier = [m for m in report.mismatched
                  if m[0].startswith("decode_head.") and m[2][0] == num_classes and m[1][0] != num_classes]
    if classifier and len(classifier) == len(report.mismatched) and not report.missing and not report.unexpected:
        key, ckpt_shape, model_shape = classifier[0]
        return (f"checkpoint {report.path} predicts {ckpt_shape[0]} classes but the model has {model_shape[0]} "
                f"({key}: checkpoint {list(ckpt_shape)} vs model {list(model_shape)})")
    if len(report.missing) > n_expected // 2:
        name = getattr(module, "name", "") or type(module).__name__
        return (f"checkpoint {report.path} ({report.format}) does not fit the architecture of {name}: "
                f"{len(report.missing)} of {n_expected} weights missing (e.g. {_examples(report.missing)}), "
                f"{len(report.unexpected)} unexpected (e.g. {_examples(report.unexpected)})")
    parts = []
    if report.missing:
        parts.append(f"missing {len(report.missing)} ({_examples(report.missing)})")
    if report.unexpected:
        parts.append(f"unexpected {len(report.unexpected)} ({_examples(report.unexpected)})")
    if report.mismatched:
        shown = ", ".join(f"{k}: {list(a)} vs {list(b)}" for k, a, b in report.mismatched[:3])
        parts.append(f"shape mismatch {len(report.mismatched)} ({shown})")
    return f"checkpoint {report.path} ({report.format}) does not match the model: " + "; ".join(parts)


def require_mostly_loaded(report: LoadReport, key: str = "model.pretrained") -> None:
    """Refuse a file that fills less than half of the target's weights (the wrong file, most likely)."""
    if report.mostly_loaded():
        return
    parts = [f"{len(report.missing)} missing" + (f", e.g. {_examples(report.missing, 2)}" if report.missing else "")]
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected, e.g. {_examples(report.unexpected, 2)}")
    if report.mismatched:
        parts.append(f"{len(report.mismatched)} of another shape, e.g. {report.mismatched[0][0]}")
    raise UserError(f"{key}={report.path} does not fit this model: {len(report.loaded)} of {report.expected} "
                    f"weights loaded ({'; '.join(parts)}); is it the file for this architecture?")
