"""DAFormer (Hoyer et al., CVPR 2022): DACS plus rare class sampling, thing-class ImageNet feature
distance (FD) and learning-rate warm-up.

RCS lives in the data layer (``data.sampling``) and the warm-up in the schedule
(``optim.warmup_iters``); this file holds the FD loss.

**Feature distance.** With ``F_S`` the student's last encoder features on the source and ``F_I``
those of a frozen copy of the ImageNet-initialised encoder,

    d_j = || F_S(j) − F_I(j) ||_2,       L_FD = λ_FD · mean_{j ∈ M} d_j

where ``M`` are the feature cells whose source label, downsampled with the 75% majority rule, is a
*thing* class (trainIds 6, 7, 11–18 for Cityscapes). λ_FD = 0.005. Shapes: ``F`` is ``B×C×h×w``;
labels ``B×H×W`` with ``H/h`` an integer.

Example::

    fd = feature_distance(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from udaseg.adapt.downsample import downscale_label_ratio
from udaseg.adapt.step import Need, Objective, StepContext
from udaseg.config.schema import Config, FeatureDistanceConfig
from udaseg.methods import Method, register_method


def feature_distance(student: Tensor, imagenet: Tensor, mask: Tensor) -> Tensor:
    """Mean L2 distance over the masked cells; 0 (with gradient) when the mask is empty."""
    distance = torch.linalg.vector_norm(student - imagenet, dim=1)
    if not bool(mask.any()):
        return distance.sum() * 0.0
    return distance[mask].mean()


def thing_class_mask(labels: Tensor, feature_size: Sequence[int], classes: Sequence[int], num_classes: int,
                     min_ratio: float) -> Tensor:
    scale = labels.shape[-1] // feature_size[-1]
    small = downscale_label_ratio(labels, scale, min_ratio, num_classes)
    return torch.isin(small, torch.as_tensor(list(classes), device=small.device))


class ImageNetFeatureDistance(Objective):
    """DAFormer's FD on the student's source view, against a frozen copy of the initial encoder."""

    name = "feature_distance"

    def __init__(self, cfg: FeatureDistanceConfig, initial_segmentor: nn.Module, num_classes: int,
                 view: str = "source", tap: str = "enc_last"):
        super().__init__()
        self.cfg = cfg
        self.view = view
        self.tap = tap
        self.num_classes = num_classes
        frozen = copy.deepcopy(initial_segmentor).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        # Kept out of the module tree: it never trains and never needs saving (it is the init).
        self._imagenet = [frozen]

    def needs(self, iteration: int) -> list[Need]:
        return [Need("student", self.view, taps=(self.tap,))]

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != self.view:
            return {}
        view = ctx.view(self.view)
        student = ctx.student(self.view).features[self.tap]
        imagenet_model = self._imagenet[0]
        if next(imagenet_model.parameters()).device != view.image.device:
            imagenet_model.to(view.image.device)
        with torch.no_grad():
            imagenet = imagenet_model(view.image, taps=(self.tap,)).features[self.tap].float()
        mask = thing_class_mask(view.label, student.shape[-2:], self.cfg.classes, self.num_classes,
                                self.cfg.scale_min_ratio)
        return {"fd": self.cfg.weight * feature_distance(student, imagenet, mask)}


@register_method("daformer")
def build_daformer(cfg: Config, segmentor: nn.Module) -> Method:
    from udaseg.methods.dacs import self_training_objectives

    fd = cfg.method.self_training.feature_distance.enabled
    return Method(self_training_objectives(cfg, segmentor, feature_distance=fd), uses_teacher=True,
                  uses_target=True)
