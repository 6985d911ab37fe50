"""Pixel embeddings of a trained model: loading a checkpoint with its method heads, choosing a
feature tap, and streaming a labelled dataset through it.

Taps (``--tap``):

============== ==================================================================================
``encoder``    the last encoder stage (``enc_last``)
``decoder``    the decode head's feature before the classifier
``projection`` the method's projection head (SePiCo, T2S-DA) on its encoder tap; ``projection:NAME``
               picks one head when a method has several
``enc1..enc4``, ``enc_fused``: any other segmentor tap
============== ==================================================================================

A feature map has the tap's stride ``s``; the label map is brought to its grid with DAFormer's
majority-ratio rule (a cell keeps class ``c`` when ``c`` covers at least ``min_ratio`` of its s×s
block, as the contrastive losses do) or, with ``label_rule="nearest"`` (and whenever the label size
is not an integer multiple of the grid), by nearest-neighbour sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from udaseg.adapt.downsample import downscale_label_nearest, downscale_label_ratio
from udaseg.adapt.step import UDAModel
from udaseg.analysis.distances import ClassFeatureStatistics
from udaseg.analysis.sampling import ClassBalancedReservoir
from udaseg.config.schema import Config
from udaseg.errors import UserError

TAP_ALIASES = {"encoder": "enc_last", "decoder": "decoder"}
PROJECTION = "projection"
LabelRule = Literal["ratio", "nearest"]


@dataclass
class AnalysisModel:
    """A checkpoint's network (segmentor + method heads) in eval mode, and its EMA teacher if saved."""

    label: str
    path: Path
    cfg: Config
    student: UDAModel
    teacher: Optional[UDAModel]
    iteration: Optional[int]

    @property
    def method(self) -> str:
        return self.cfg.method.name


@dataclass(frozen=True)
class FeatureTap:
    """Where embeddings are read: a segmentor tap, or a method head (then ``head`` is set)."""

    requested: str
    tap: str
    head: Optional[str] = None

    def describe(self) -> str:
        return f"{self.requested} (head '{self.head}' on {self.tap})" if self.head else f"{self.requested} ({self.tap})"


def load_analysis_model(path: Path, cfg_override: Optional[Config] = None, overrides: Iterable[str] = (),
                        label: Optional[str] = None) -> AnalysisModel:
    """Build the checkpoint's model from its own config (``cfg_override`` when it has none)."""
    from udaseg.engine.checkpoint import load_checkpoint
    from udaseg.engine.commands import config_from_checkpoint
    from udaseg.engine.trainer import build_segmentor, check_compatible
    from udaseg.methods import build_method

    state = load_checkpoint(path)
    if "config" in state:
        cfg = config_from_checkpoint(state, path, list(overrides))
    elif cfg_override is not None:
        cfg = copy.deepcopy(cfg_override)
    else:
        raise UserError(f"{path} holds no config; pass --config")
    check_compatible(state, cfg, path)
    cfg.model.pretrained = ""
    segmentor = build_segmentor(cfg)
    method = build_method(cfg, segmentor)
    student = UDAModel(segmentor, method.heads)
    _load_weights(student, state["model"], path, "model")
    teacher = None
    if state.get("teacher"):
        teacher = copy.deepcopy(student)
        _load_weights(teacher, state["teacher"], path, "teacher")
        teacher.eval()
    name = label or cfg.name or path.parent.name
    return AnalysisModel(name, path, cfg, student.eval(), teacher, state.get("iteration"))


def _load_weights(module: nn.Module, weights: dict, path: Path, entry: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{path}: '{entry}' weights do not match the model of its config "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys; {detail})")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"{path}: '{entry}' weight {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(own[key].shape)}")
    module.load_state_dict(weights)


def available_taps(model: UDAModel) -> list[str]:
    taps = list(TAP_ALIASES) + [t for t in model.segmentor.valid_taps() if t != "proj"]
    if len(model.heads) == 1 or "proj" in model.segmentor.valid_taps():
        taps.append(PROJECTION)
    taps += [f"{PROJECTION}:{name}" for name in model.heads]
    return list(dict.fromkeys(taps))


def resolve_tap(model: AnalysisModel, requested: str) -> FeatureTap:
    """The :class:`FeatureTap` for ``requested``; a one-line ``UserError`` when the checkpoint lacks it."""
    net = model.student
    valid = available_taps(net)
    if requested in TAP_ALIASES:
        return FeatureTap(requested, TAP_ALIASES[requested])
    if requested == PROJECTION or requested.startswith(f"{PROJECTION}:"):
        name = requested.split(":", 1)[1] if ":" in requested else None
        heads = list(net.heads)
        if name is None and len(heads) == 1:
            name = heads[0]
        if name is not None and name in net.heads:
            return FeatureTap(requested, net.head_taps[name], name)
        if name is None and not heads and "proj" in net.segmentor.valid_taps():
            return FeatureTap(requested, "proj")
        if name is None and len(heads) > 1:
            raise UserError(f"{model.path} has several projection heads ({', '.join(heads)}); "
                            f"choose one with --tap projection:NAME")
        raise UserError(f"{model.path} (method '{model.method}') has no projection head"
                        f"{' ' + repr(name) if name else ''}; taps it has: {', '.join(valid)}")
    if requested in net.segmentor.valid_taps():
        return FeatureTap(requested, requested)
    raise UserError(f"{model.path} (model '{model.cfg.model.name}') has no feature tap '{requested}'; "
                    f"taps it has: {', '.join(valid)}")


def tap_channels(model: UDAModel, tap: FeatureTap) -> int:
    if tap.head is None:
        return model.segmentor.tap_channels(tap.tap)
    head = model.heads[tap.head]
    channels = getattr(head, "out_channels", None)
    if channels is None:  # last conv of the head
        channels = [m.out_channels for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
    return int(channels)


@torch.no_grad()
def features_of(model: UDAModel, images: Tensor, tap: FeatureTap) -> Tensor:
    """``B×D×h×w`` features of ``images`` at ``tap``."""
    if tap.head is not None:
        return model(images, heads=(tap.head,), decode=False).projections[tap.head]
    return model(images, taps=(tap.tap,), decode=False).features[tap.tap]


def labels_on_grid(label: Tensor, grid: tuple[int, int], rule: LabelRule = "ratio", min_ratio: float = 0.75,
                   num_classes: int = 19, ignore_index: int = 255) -> Tensor:
    """``label: H×W`` -> ``h×w`` labels of the feature grid (see the module docstring)."""
    height, width = label.shape[-2:]
    h, w = grid
    scale = height // h
    exact = height % h == 0 and width % w == 0 and width // w == scale
    if rule == "ratio" and exact:
        if scale == 1:
            return label
        return downscale_label_ratio(label[None], scale, min_ratio, num_classes, ignore_index)[0]
    return downscale_label_nearest(label[None], size=(h, w))[0]


@dataclass
class DomainFeatures:
    """What one pass over a domain's images collected."""

    name: str
    images: int
    statistics: ClassFeatureStatistics
    reservoir: ClassBalancedReservoir
    pixels: list[int] = field(default_factory=list)  # labelled feature cells per class


def require_labels(item: dict, dataset_name: str, purpose: str) -> Tensor:
    if "label" not in item:
        raise UserError(f"dataset {dataset_name} has no labels, which {purpose} needs; "
                        f"choose a labelled split")
    return item["label"]


@torch.no_grad()
def extract_features(model: UDAModel, dataset, indices: list[int], tap: FeatureTap, device: torch.device,
                     *, name: str, num_classes: int, capacity: int, seed: int, label_rule: LabelRule = "ratio",
                     min_ratio: float = 0.75, progress: bool = True, desc: str = "features") -> DomainFeatures:
    """Stream ``dataset[indices]`` through ``model`` at ``tap``: exact class statistics of every
    labelled cell, plus a class-balanced uniform sample of up to ``capacity`` cells per class."""
    model.eval()
    dim = tap_channels(model, tap)
    stats = ClassFeatureStatistics(num_classes, dim)
    reservoir = ClassBalancedReservoir(num_classes, dim, capacity, seed)
    ignore = 255
    for index in tqdm(indices, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        item = dataset[index]
        label = require_labels(item, name, "the feature analysis").to(device)
        feats = features_of(model, item["image"].unsqueeze(0).to(device), tap)[0]
        grid_labels = labels_on_grid(label, tuple(feats.shape[-2:]), label_rule, min_ratio, num_classes, ignore)
        h, w = grid_labels.shape
        flat = feats[:, :h, :w].reshape(feats.shape[0], -1).T.float()
        cells = grid_labels.reshape(-1)
        valid = (cells != ignore) & (cells >= 0) & (cells < num_classes)
        stats.update(flat[valid], cells[valid])
        reservoir.add(flat[valid], cells[valid])
    return DomainFeatures(name, len(indices), stats, reservoir, stats.pixel_counts())
