r"""SPCL: semantic prototype-based contrastive learning (Xie, Yin, Li, Cheng; seed 001, spec spcl.md).

SPCL trains in four stages, a pipeline (:mod:`udaseg.engine.pipeline`) whose training stages are
this method with ``method.spcl.stage`` set, and whose offline passes are the generic
``class_prototypes`` and ``pseudo_labels`` passes (:mod:`udaseg.engine.offline`):

| stage | ``method.spcl.stage`` / pass | loss |
|---|---|---|
| A | ``warmup`` | :math:`L_{seg}(O_s/T) + \lambda_{adv} L_G`, and :math:`L_D` for the discriminator |
| B1 | ``class_prototypes`` pass | initial prototypes μ from the source train set |
| B2 | ``pseudo_labels`` pass | per-class median thresholds, hard target pseudo-labels (mask M_t) |
| C | ``contrast`` | :math:`L_{seg}(O_s/T) + \lambda (L^s_{cl} + L^t_{cl})` (Eq. 7), online μ update |
| C→D | ``pseudo_labels`` pass | the same rule on the stage-C weights (labels Ŷ_t) |
| D | ``selftrain`` | :math:`L_{ssl} = CE(O_t, Ŷ_t)` (Eq. 9), target only |

Defaults follow the official code; each place where the paper reads otherwise is a switch of
:class:`SPCLConfig` (``docs/methods/spcl.md``). All cross-entropies here average over the valid
pixels (PyTorch's ``ignore_index`` mean, as the official code), after upsampling the logits
bilinearly with ``align_corners=True`` to the label size.

Flattening convention: a ``B×C×h×w`` feature map becomes ``(B·h·w)×C`` with pixel (b, i, j) at
row ``b·h·w + i·w + j``; ``B×h×w`` masks flatten the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from udaseg.adapt.adversarial import FCDiscriminator, adversarial_losses
from udaseg.adapt.prototypes import PrototypeMemory
from udaseg.adapt.step import Need, Objective, OwnedOptimizer, StepContext
from udaseg.config.schema import Config, OptimConfig, require, require_range
from udaseg.errors import UserError
from udaseg.methods import Method, register_method

IGNORE_INDEX = 255
SOURCE, TARGET = "source", "target"
DISCRIMINATOR_SOURCE_INPUT = "spcl_discriminator_source_input"
STAGES = ("warmup", "contrast", "selftrain")


@dataclass
class SPCLConfig:
    """The section ``method.spcl``. Defaults: the official code (spec §1–2); switches: spec §5."""

    stage: Literal["warmup", "contrast", "selftrain"] = "warmup"
    # Source CE on logits / T (stages A and C; FADA's 1.8). 1.0: the paper's Eq. 7 (spec §5.8).
    seg_temperature: float = 1.8
    # -- stage A: output-space adversarial warm-up (AdaptSegNet, single level)
    adv_weight: float = 0.001  # lambda_adv
    discriminator_width: int = 64  # ndf
    discriminator_lr: float = 1.0e-4  # Adam, its own poly schedule
    discriminator_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    # D sees softmax(O_s / T) on the source (the code, spec §5.22) or softmax(O_s) ("raw")
    discriminator_source_input: Literal["scaled", "raw"] = "scaled"
    # -- stage C: prototype contrast
    prototypes: str = ""  # prototypes.pt of the class_prototypes pass (B1)
    feature: str = "enc_last"  # encoder tap: DeepLab-V2's layer4 output, no projection head
    cl_weight: float = 1.0  # lambda
    cl_temperature: float = 100.0  # z = <f, mu> / tau; the code divides by 100 (spec §5.1)
    source_contrast: bool = True  # L_cl^s (Table 4 ablation rows)
    target_contrast: bool = True  # L_cl^t
    alpha: float = 0.1  # mu <- alpha mu + (1 - alpha) batch mean
    absent_classes: Literal["decay", "keep"] = "decay"  # the code's zero-fill / Eq. 3 (spec §5.4)
    sync_prototypes: bool = False  # all-reduce the batch means across ranks (the code does not)
    # M_s: downsampled label where it equals the argmax (the code) or the label alone (Eq. 2, spec §5.2)
    source_mask: Literal["label_and_prediction", "label"] = "label_and_prediction"
    # M_t: the offline pseudo-labels of B2 (the code) or the student's current argmax (Eq. 5, spec §5.3)
    target_mask: Literal["offline", "online"] = "offline"
    online_threshold: float = 0.0  # target_mask=online: pixels whose max softmax is below it are ignored

    def validate(self, path: str = "method.spcl") -> None:
        require_range(path, "seg_temperature", self.seg_temperature, 0.0, low_open=True)
        require_range(path, "adv_weight", self.adv_weight, 0.0)
        require_range(path, "discriminator_width", self.discriminator_width, 1)
        require_range(path, "discriminator_lr", self.discriminator_lr, 0.0, low_open=True)
        require(len(self.discriminator_betas) == 2 and all(0.0 <= b < 1.0 for b in self.discriminator_betas), path,
                "discriminator_betas", self.discriminator_betas, "expects two values in [0, 1)")
        require_range(path, "cl_weight", self.cl_weight, 0.0)
        require_range(path, "cl_temperature", self.cl_temperature, 0.0, low_open=True)
        require_range(path, "alpha", self.alpha, 0.0, 1.0)
        require_range(path, "online_threshold", self.online_threshold, 0.0, 1.0)


# ============================================================================  losses
def spcl_cross_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    r"""CE of the official code: :math:`\frac{1}{|V|}\sum_{p\in V} -\log \mathrm{softmax}(\mathrm{up}(O)/T)_{p,y_p}`.

    ``logits`` B×K×h×w are upsampled bilinearly (``align_corners=True``) to the size of ``labels``
    (B×H×W, 255 = ignore), divided by ``temperature`` and averaged over the valid pixels V
    (0 when there is none, instead of PyTorch's NaN). Example: K = 2, logits 0, any label: ln 2.
    """
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=True)
    labels = labels.long()
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits / temperature, labels, ignore_index=IGNORE_INDEX)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A B×H×W label map at ``size`` by legacy nearest (the top-left pixel of each cell, as the code)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.long()
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()


def source_contrast_mask(labels: Tensor, logits: Tensor, size: tuple[int, int], rule: str) -> Tensor:
    """M_s on the feature grid ``size``: the nearest-downsampled label, and 255 where it differs from
    the argmax of ``logits`` (resized bilinearly to ``size`` if needed) under ``label_and_prediction``.

    Example: labels [[1, 1], [0, 2]] with predictions [[1, 0], [0, 2]] give [[1, 255], [0, 2]].
    """
    mask = resize_mask(labels, size)
    if rule == "label":
        return mask
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
    return torch.where(logits.argmax(dim=1) == mask, mask, IGNORE_INDEX)


class PrototypeContrastLoss(nn.Module):
    r"""Pixel-to-prototype contrast, SPCL Eq. 1 (``PixelCLLoss`` of the code).

    .. math::
        z_{p,k} = \langle \hat f_p, \mu_k \rangle / \tau, \qquad
        L_{cl} = \frac{1}{|V|} \sum_{p \in V} -\log \frac{\exp z_{p,y_p}}{\sum_{k=1}^{K} \exp z_{p,k}}

    with :math:`\hat f_p = f_p / \lVert f_p \rVert_2` (gradients flow through it), the prototypes μ
    used as they are (not normalised, no gradient) and V the pixels whose mask is not 255: a K-way
    softmax with the own prototype as positive and the K − 1 others as negatives.

    Shapes: ``features`` B×C×h×w, ``mask`` B×h×w, ``prototypes`` K×C → a scalar (0 without a valid
    pixel). Example: τ = 100 and μ of unit-norm rows give a loss close to ln K (the code's almost
    flat softmax, spec §1.5).
    """

    def __init__(self, temperature: float = 100.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, features: Tensor, mask: Tensor, prototypes: Tensor) -> Tensor:
        flat = F.normalize(features, dim=1).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        labels = mask.reshape(-1).long()
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return features.sum() * 0.0
        logits = flat[valid] @ prototypes.detach().T / self.temperature
        return F.cross_entropy(logits, labels[valid])


# ============================================================================  objectives
class SPCLSourceSegmentation(Objective):
    """L_seg: :func:`spcl_cross_entropy` of the student's source logits divided by ``temperature``."""

    name = "spcl_source"

    def __init__(self, temperature: float = 1.8) -> None:
        super().__init__()
        self.temperature = temperature

    def needs(self, iteration: int) -> list[Need]:
        return [Need("student", SOURCE)]

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != SOURCE:
            return {}
        return {"ce": spcl_cross_entropy(ctx.student(SOURCE).logits, ctx.view(SOURCE).label, self.temperature)}


class OutputSpaceAdversarial(Objective):
    r"""Stage A's single-level output-space alignment (AdaptSegNet), spec §1.2.

    .. math::
        L_G = \lambda_{adv}\, \mathrm{BCE}(D(p_t), 0), \qquad
        L_D = \tfrac12 \mathrm{BCE}(D(p_s), 0) + \tfrac12 \mathrm{BCE}(D(p_t), 1)

    with :math:`p_t = \mathrm{softmax}(\mathrm{up}(O_t))` at the target input size and
    :math:`p_s = \mathrm{softmax}(\mathrm{up}(O_s)/T)` at the source input size (``T = 1`` with
    ``source_input="raw"``); source = 0, target = 1; BCE-with-logits averaged over D's patch map.
    D is frozen while L_G is formed and sees detached inputs in L_D
    (:func:`udaseg.adapt.adversarial.adversarial_losses`), so the segmentor gets gradients from
    L_G only and D from L_D only. D (:class:`~udaseg.adapt.adversarial.FCDiscriminator`) is
    trained by its own Adam with a poly schedule.
    """

    name = "spcl_adversarial"

    def __init__(self, num_classes: int, weight: float = 0.001, width: int = 64, temperature: float = 1.8,
                 source_input: str = "scaled", optim: Optional[OptimConfig] = None) -> None:
        super().__init__()
        self.weight = weight
        self.temperature = temperature if source_input == "scaled" else 1.0
        self.discriminator = FCDiscriminator(num_classes, width)
        self.optim = optim or OptimConfig(name="adamw", lr=1e-4, betas=[0.9, 0.99], weight_decay=0.0,
                                          warmup_iters=0, power=0.9, head_lr_mult=1.0)

    def needs(self, iteration: int) -> list[Need]:
        return [Need("student", SOURCE), Need("student", TARGET)]

    def owned_optimizers(self) -> dict[str, OwnedOptimizer]:
        return {"discriminator": OwnedOptimizer(self.discriminator, self.optim)}

    @staticmethod
    def probabilities(logits: Tensor, size: tuple[int, int], temperature: float = 1.0) -> Tensor:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return F.softmax(logits / temperature, dim=1)

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group == SOURCE:
            view = ctx.view(SOURCE)
            ctx.state[DISCRIMINATOR_SOURCE_INPUT] = self.probabilities(
                ctx.student(SOURCE).logits.detach(), tuple(view.image.shape[-2:]), self.temperature)
            return {}
        if group != TARGET:
            return {}
        if DISCRIMINATOR_SOURCE_INPUT not in ctx.state:
            raise RuntimeError("the source group must come before the target group")
        target = self.probabilities(ctx.student(TARGET).logits, tuple(ctx.view(TARGET).image.shape[-2:]))
        generator, discriminator = adversarial_losses(self.discriminator, ctx.state.pop(DISCRIMINATOR_SOURCE_INPUT),
                                                      target)
        return {"adv_g": self.weight * generator, "adv_d": discriminator}


class PrototypeContrast(Objective):
    r"""Stage C's prototype contrast, :math:`\lambda (L^s_{cl} + L^t_{cl})` (Eq. 7 without L_seg).

    Per iteration (spec §1.5), on the encoder features F of the student (tap ``feature``):

    1. M_s (:func:`source_contrast_mask`) on the source feature grid;
    2. the prototypes are updated **before** the loss from the normalised, detached source
       features (:class:`~udaseg.adapt.prototypes.PrototypeMemory`, α weighting the old value);
    3. :math:`L^s_{cl}` on (F_s, M_s) and :math:`L^t_{cl}` on (F_t, M_t) with the updated μ
       (:class:`PrototypeContrastLoss`); M_t is the target view's offline pseudo-label resized
       to the feature grid by nearest (``target_mask="offline"``) or the student's current
       argmax on it (``"online"``).

    The prototypes are a buffer of this objective, saved in checkpoints (the release keeps them in
    memory only, so its resumed runs restart from the B1 prototypes).
    """

    name = "spcl_contrast"

    def __init__(self, prototypes: Tensor, weight: float = 1.0, temperature: float = 100.0, alpha: float = 0.1,
                 absent: str = "decay", sync: bool = False, feature: str = "enc_last",
                 source_mask: str = "label_and_prediction", target_mask: str = "offline",
                 online_threshold: float = 0.0, use_source: bool = True, use_target: bool = True) -> None:
        super().__init__()
        self.memory = PrototypeMemory(prototypes, alpha, absent, sync)
        self.loss = PrototypeContrastLoss(temperature)
        self.weight = weight
        self.feature = feature
        self.source_mask = source_mask
        self.target_mask = target_mask
        self.online_threshold = online_threshold
        self.use_source = use_source
        self.use_target = use_target

    def needs(self, iteration: int) -> list[Need]:
        # the source logits are needed for M_s and L_seg; the target logits only for an online M_t
        needs = [Need("student", SOURCE, taps=(self.feature,))]
        if self.use_target:
            needs.append(Need("student", TARGET, taps=(self.feature,), logits=self.target_mask == "online"))
        return needs

    def target_contrast_mask(self, ctx: StepContext, size: tuple[int, int]) -> Tensor:
        if self.target_mask == "online":
            logits = ctx.student(TARGET).logits.detach()
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
            confidence, label = F.softmax(logits, dim=1).max(dim=1)
            return torch.where(confidence >= self.online_threshold, label, IGNORE_INDEX)
        label = ctx.view(TARGET).label
        if label is None:
            raise UserError("method.spcl.stage=contrast with target_mask=offline needs target pseudo-labels: set "
                            "data.target.pseudo_labels to the folder of a pseudo_labels pass")
        return resize_mask(label, size)

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group == SOURCE:
            out = ctx.student(SOURCE)
            features = out.features[self.feature]
            size = tuple(features.shape[-2:])
            mask = source_contrast_mask(ctx.view(SOURCE).label, out.logits.detach(), size, self.source_mask)
            present = self.memory.update(F.normalize(features.detach(), dim=1), mask)
            ctx.metrics["spcl.classes_in_batch"] = float(present.sum())
            if not self.use_source:
                return {}
            return {"cl_source": self.weight * self.loss(features, mask, self.memory.prototypes.clone())}
        if group == TARGET and self.use_target:
            features = ctx.student(TARGET).features[self.feature]
            mask = self.target_contrast_mask(ctx, tuple(features.shape[-2:]))
            return {"cl_target": self.weight * self.loss(features, mask, self.memory.prototypes.clone())}
        return {}


class PseudoLabelSegmentation(Objective):
    """Stage D's L_ssl (Eq. 9): :func:`spcl_cross_entropy` of the student's target logits against
    the offline pseudo-labels the target view carries (no temperature, no source term)."""

    name = "spcl_selftrain"

    def needs(self, iteration: int) -> list[Need]:
        return [Need("student", TARGET)]

    def losses(self, ctx: StepContext, group: str) -> dict[str, Tensor]:
        if group != TARGET:
            return {}
        return {"ssl_ce": spcl_cross_entropy(ctx.student(TARGET).logits, ctx.view(TARGET).label)}


# ============================================================================  the method
def load_prototypes(path: str, num_classes: int, channels: int) -> Tensor:
    """The K×C prototypes of a ``class_prototypes`` pass file, checked against the model."""
    key = "method.spcl.prototypes"
    if not path:
        raise UserError(f"config key '{key}' is empty: stage 'contrast' needs the prototypes.pt of a "
                        "class_prototypes pass (e.g. \"{work_dir}/prototypes/prototypes.pt\")")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config key '{key}': prototype file not found: {file} (run the class_prototypes pass)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"config key '{key}': cannot read {file}: {error}") from None
    prototypes = state.get("prototypes") if isinstance(state, dict) else None
    if not isinstance(prototypes, Tensor) or tuple(prototypes.shape) != (num_classes, channels):
        shape = tuple(prototypes.shape) if isinstance(prototypes, Tensor) else None
        raise UserError(f"config key '{key}': {file} holds prototypes of shape {shape}, the model needs "
                        f"({num_classes}, {channels}) (classes x feature channels)")
    return prototypes.float()


@register_method("spcl", config=SPCLConfig)
def build_spcl(cfg: Config, segmentor: nn.Module) -> Method:
    """One SPCL training stage, chosen by ``method.spcl.stage`` (module docstring)."""
    spcl = cfg.method.spcl
    num_classes = cfg.model.num_classes
    if spcl.stage == "selftrain":
        return Method([PseudoLabelSegmentation()], uses_target=True, target_labelled=True)
    source = SPCLSourceSegmentation(spcl.seg_temperature)
    if spcl.stage == "warmup":
        optim = OptimConfig(name="adamw", lr=spcl.discriminator_lr, betas=list(spcl.discriminator_betas),
                            weight_decay=0.0, warmup_iters=0, power=cfg.optim.power, head_lr_mult=1.0,
                            schedule_horizon=cfg.optim.schedule_horizon, no_decay_keys=[])
        adversarial = OutputSpaceAdversarial(num_classes, spcl.adv_weight, spcl.discriminator_width,
                                             spcl.seg_temperature, spcl.discriminator_source_input, optim)
        return Method([source, adversarial], uses_target=True)
    if spcl.target_contrast and spcl.target_mask == "offline" and not (cfg.data.target and cfg.data.target.pseudo_labels):
        raise UserError("method.spcl.stage=contrast reads the target mask M_t from offline pseudo-labels: set "
                        "data.target.pseudo_labels to the folder of a pseudo_labels pass (or method.spcl.target_mask=online)")
    channels = segmentor.tap_channels(spcl.feature)
    contrast = PrototypeContrast(load_prototypes(spcl.prototypes, num_classes, channels), spcl.cl_weight,
                                 spcl.cl_temperature, spcl.alpha, spcl.absent_classes, spcl.sync_prototypes,
                                 spcl.feature, spcl.source_mask, spcl.target_mask, spcl.online_threshold,
                                 spcl.source_contrast, spcl.target_contrast)
    return Method([source, contrast], uses_target=True)
