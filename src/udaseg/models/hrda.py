"""HRDA: context-aware high-resolution segmentation (Hoyer, Dai, Van Gool; ECCV 2022, arXiv 2204.13132).

One encoder and one decode head (shared weights) predict two views of the context crop ``x``
(``H×W``, full resolution): the context ``x_c = ζ(x, s_c)`` (``s_c = 0.5``) and a detail crop
``x_d = x[b_d]`` (see :mod:`udaseg.adapt.multires`). A **scale-attention** head ``f^A`` on the
context features weights the two predictions per pixel and class:

    ŷ_c = f^S(f^E(x_c))      B×K×(H/8)×(W/8)      (context logits, stride o/s_c = 8)
    ŷ_d = f^S(f^E(x_d))      B×K×(h_d/4)×(w_d/4)  (detail logits, stride o = 4)
    a   = σ(f^A(f^E(x_c)))   B×K×(H/8)×(W/8)      (K channels; 1 with ``attention_classwise=False``)

Training (a detail box ``b_d``), in the official order:

1. ``a ← a · 1[b_d/8]``: the attention is 0 outside the detail region, which is therefore pure
   context prediction; ``f^A`` gets gradient only inside it;
2. ``ŷ_c ← (1 − a) · ŷ_c`` on the context grid, **before** upsampling;
3. ``ŷ_F = ζ(a, 1/s_c) · ins(ŷ_d, b_d/4) + ζ((1 − a) · ŷ_c, 1/s_c)``, ``B×K×(H/4)×(W/4)``, where
   ``ζ`` is bilinear (``align_corners=False``) and ``ins`` pastes the detail logits into zeros.

Inference (pseudo-labels and test, no box): the attention is not masked and ``ŷ_d`` covers the
whole crop by an overlapping sliding window (``h_d×w_d`` windows at stride ``h_d/2``, all windows
of the batch in **one** forward, so train-mode BN sees them together), whose **logits** are
averaged where windows overlap; then ``ŷ_F = ζ(a)·ŷ_d + ζ((1 − a)·ŷ_c)``. Softmax is taken once,
by the caller, on the fused logits. ``fixed_attention`` replaces ``a`` by a constant (ablation;
0 = context only, 1 = detail only).

The forward mode follows what the official code does with the module's state: ``"auto"`` is
``"train"`` (random detail crop) when the module is in training mode and gradients are enabled
(the student), and ``"slide"`` otherwise (the EMA teacher, which runs in train mode under
``no_grad``, and evaluation).

Example::

    >>> model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32])
    >>> out = model(torch.randn(2, 3, 64, 64), mode="train", detail_box=CropBox(top=8, left=16, height=32, width=32))
    >>> out.logits.shape, out.low_res.shape, out.high_res.shape, out.attention.shape
    (torch.Size([2, 3, 16, 16]), torch.Size([2, 3, 8, 8]), torch.Size([2, 3, 8, 8]), torch.Size([2, 3, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt.geometry import CropBox
from ..adapt.multires import check_detail_crop, context_downscale, draw_detail_box, slide_boxes
from ..errors import UserError
from .heads.base import DecodeHead
from .heads.daformer import DAFormerHead
from .heads.deeplabv2 import DeepLabV2Head
from .segmentor import PROJECTION_TAP, Segmentor, fuse_stages

ForwardMode = Literal["auto", "train", "slide"]


class ScaleAttentionHead(DAFormerHead):
    """HRDA's scale attention for MiT encoders: a DAFormer head whose context fusion is one 1×1 conv.

    Per stage a linear embedding ``C_i → E`` (E = 256), bilinear resize to stage 1's size,
    concatenation (``4E``), a 1×1 conv ``4E → E`` + BN + ReLU, ``Dropout2d(0.1)`` and a 1×1
    classifier ``E → K`` (``K = 1`` for class-agnostic attention). The classifier starts at
    ``N(0, 0.01)`` weights and zero bias, so ``σ(f^A) ≈ 0.5`` at initialisation. Module names
    follow the official ``DAFormerHead`` (``embed_layers``, ``fuse_layer``, ``conv_seg``).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, in_strides: Sequence[int],
                 embed_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__(in_channels, out_channels, in_strides, embed_dim=embed_dim, channels=embed_dim,
                         dropout=dropout, fusion="conv")


@dataclass
class HRDAOutput:
    """Named outputs of one HRDA forward.

    Attributes:
        logits: the fused prediction ``ŷ_F``, ``B×K×(H/o)×(W/o)`` (``o`` = the head's stride) on the
            full-resolution context crop; ``None`` with ``decode=False``.
        low_res: the context head's logits ``ŷ_c`` (before the ``(1 − a)`` weighting), ``B×K×(H/8)×(W/8)``.
        high_res: the detail logits: the detail crop's (training) or the slid canvas over the whole
            crop (inference).
        attention: ``a`` on the context grid, masked to the detail box in training.
        detail_box: the box of the detail crop (``None`` at inference).
        features: the requested taps, all of the **context** (low-resolution) pass.
    """

    logits: Optional[Tensor]
    low_res: Optional[Tensor] = None
    high_res: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    detail_box: Optional[CropBox] = None
    features: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def fused(self) -> Optional[Tensor]:
        return self.logits

    @property
    def outputs(self) -> Dict[str, Tensor]:
        """The further named outputs, as the training step's ``ModelOutput.outputs``: ``lr``, ``hr``,
        ``attention`` (empty with ``decode=False``)."""
        named = {"lr": self.low_res, "hr": self.high_res, "attention": self.attention}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def boxes(self) -> Dict[str, CropBox]:
        """``{"hr": detail box}`` when the detail output covers part of the input only (training)."""
        return {"hr": self.detail_box} if self.detail_box is not None else {}

    def weighted_low_res(self) -> Tensor:
        """``(1 − a) · ŷ_c``, the context term as the official code returns it (used by ``lr_loss_weight``)."""
        return (1 - self.attention) * self.low_res


def attention_region_mask(attention: Tensor, box_on_grid: CropBox) -> Tensor:
    """``B×1×h×w`` mask that is 1 on the box (in cells of the attention grid) and 0 elsewhere."""
    mask = attention.new_zeros((attention.shape[0], 1, *attention.shape[-2:]))
    mask[:, :, box_on_grid.top:box_on_grid.bottom, box_on_grid.left:box_on_grid.right] = 1
    return mask


def fuse_scales(low_res: Tensor, high_res: Tensor, attention: Tensor, detail_box: Optional[CropBox],
                output_stride: int, context_scale: float = 0.5) -> tuple[Tensor, Tensor]:
    """HRDA's fusion (module docstring): ``(fused logits, the attention actually used)``.

    Args:
        low_res: ``B×K×h×w`` context logits on the context grid (stride ``output_stride / context_scale``).
        high_res: detail logits: ``B×K×(h_d/o)×(w_d/o)`` of the box (training) or the full
            ``B×K×(h/s_c)×(w/s_c)`` canvas (``detail_box=None``).
        attention: ``B×K×h×w`` or ``B×1×h×w`` attention in [0, 1].
        detail_box: the detail box in full-resolution pixels; ``None`` = inference (no mask).
    """
    if detail_box is not None:
        attention = attention * attention_region_mask(attention, detail_box.scaled(context_scale / output_stride))
    weighted_low_res = (1 - attention) * low_res
    up_low_res = F.interpolate(weighted_low_res, scale_factor=1 / context_scale, mode="bilinear", align_corners=False)
    up_attention = F.interpolate(attention, scale_factor=1 / context_scale, mode="bilinear", align_corners=False)
    if detail_box is None:
        inserted = high_res
    else:
        inserted = detail_box.scaled(1 / output_stride).paste(torch.zeros_like(up_low_res), high_res)
    if inserted.shape[-2:] != up_low_res.shape[-2:]:
        raise ValueError(f"detail logits {tuple(inserted.shape[-2:])} do not match the upsampled context grid "
                         f"{tuple(up_low_res.shape[-2:])}")
    return up_attention * inserted + up_low_res, attention


class HRDASegmentor(Segmentor):
    """An encoder–decoder with HRDA's multi-resolution forward (see the module docstring).

    ``backbone`` and ``decode_head`` are shared by both scales; ``attention_head`` is the scale
    attention (its name contains ``head``, so it trains at the head learning rate as in the official
    code, where it lives inside the decode head).

    Args:
        detail_crop_size: ``[h_d, w_d]`` of the detail crop and of the sliding windows (512×512).
        context_scale: ``s_c`` (0.5).
        crop_divisible: the detail offsets are multiples of this (8 = o / s_c).
        slide_overlapping: sliding windows at half their size (True) or edge to edge.
        hr_slide_inference: False runs the detail branch on the whole crop at once at inference.
        fixed_attention: a constant attention instead of the head (ablation).
    """

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead, attention_head: Optional[nn.Module],
                 detail_crop_size: Sequence[int] = (512, 512), context_scale: float = 0.5, crop_divisible: int = 8,
                 slide_overlapping: bool = True, hr_slide_inference: bool = True,
                 fixed_attention: Optional[float] = None, name: str = "") -> None:
        super().__init__(backbone, decode_head, name=name)
        if len(detail_crop_size) != 2 or min(int(v) for v in detail_crop_size) < 1:
            raise UserError(f"config key 'model.options.detail_crop_size' expects two positive ints, got "
                            f"{list(detail_crop_size)!r}")
        if not 0 < context_scale <= 1:
            raise UserError(f"config key 'model.options.context_scale' must lie in (0, 1], got {context_scale}")
        if fixed_attention is None and attention_head is None:
            raise ValueError("an attention head is needed unless fixed_attention is set")
        self.attention_head = attention_head if fixed_attention is None else None
        self.detail_crop_size = (int(detail_crop_size[0]), int(detail_crop_size[1]))
        self.context_scale = float(context_scale)
        self.crop_divisible = int(crop_divisible)
        self.slide_overlapping = bool(slide_overlapping)
        self.hr_slide_inference = bool(hr_slide_inference)
        self.fixed_attention = fixed_attention
        # The training step's per-iteration stream for the detail-crop draws (set by the hrda method).
        self.crop_generator: Optional[torch.Generator] = None

    # ----------------------------------------------------------------------------------- geometry
    @property
    def context_stride(self) -> float:
        """Stride of the context grid relative to the full-resolution crop (8 for DAFormer at 0.5)."""
        return self.output_stride / self.context_scale

    def tap_stride(self, tap: str) -> int:
        """Taps come from the context pass, so their stride in the full-resolution crop is scaled."""
        if tap == PROJECTION_TAP:
            self._check_tap(tap)
            return self.tap_stride(self.proj_input)
        return int(round(super().tap_stride(tap) / self.context_scale))

    def resolve_mode(self, mode: ForwardMode) -> Literal["train", "slide"]:
        if mode == "auto":
            return "train" if self.training and torch.is_grad_enabled() else "slide"
        if mode not in ("train", "slide"):
            raise ValueError(f"HRDA forward mode must be 'auto', 'train' or 'slide', got {mode!r}")
        return mode

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, taps: Sequence[str] = (), decode: bool = True, mode: ForwardMode = "auto",
                detail_box: Optional[CropBox] = None, generator: Optional[torch.Generator] = None) -> HRDAOutput:
        """``x``: ``B×3×H×W`` context crops at full resolution -> :class:`HRDAOutput`.

        ``mode="train"`` uses ``detail_box`` or draws one, from ``generator``, else from
        ``crop_generator`` (the training step's stream), else from torch's global RNG;
        ``decode=False`` runs only the context encoder (for encoder taps such as the feature distance).
        """
        if isinstance(taps, str):
            taps = (taps,)
        for tap in taps:
            self._check_tap(tap)
        mode = self.resolve_mode(mode)
        height, width = x.shape[-2:]
        padded = x
        if mode == "train":
            self._check_context_grid(height, width)
            check_detail_crop((height, width), self.detail_crop_size)
        else:
            padded = self._pad_to_grid(x)
        stages = self.backbone(context_downscale(padded, self.context_scale))
        wanted = set(taps)
        need_decoder = decode or "decoder" in wanted or (PROJECTION_TAP in wanted and self.proj_input == "decoder")
        decoded = self.decode_head.forward_features(stages) if need_decoder else None
        features = self._features(stages, decoded, taps)
        if not decode:
            return HRDAOutput(logits=None, features=features)
        low_res = self.decode_head.classify(decoded)
        attention = self._attention(stages, low_res)
        if mode == "train":
            box = detail_box or draw_detail_box(height, width, self.detail_crop_size, self.crop_divisible,
                                                generator if generator is not None else self.crop_generator)
            check_detail_crop((height, width), (box.height, box.width))
            high_res = self.decode_head(self.backbone(box.crop(x)))
        else:
            box = None
            high_res = self._slide_high_res(padded)
        fused, attention = fuse_scales(low_res, high_res, attention, box, self.output_stride, self.context_scale)
        if padded is not x:
            rows, cols = -(-height // self.output_stride), -(-width // self.output_stride)
            fused = fused[..., :rows, :cols]
        return HRDAOutput(logits=fused, low_res=low_res, high_res=high_res, attention=attention, detail_box=box,
                          features=features)

    def _attention(self, stages: Sequence[Tensor], low_res: Tensor) -> Tensor:
        if self.attention_head is None:
            return low_res.new_full((low_res.shape[0], 1, *low_res.shape[-2:]), float(self.fixed_attention))
        return torch.sigmoid(self.attention_head(stages))

    def _slide_high_res(self, x: Tensor) -> Tensor:
        """Detail logits over the whole crop: overlapping windows, one batched forward, logits averaged."""
        if not self.hr_slide_inference:
            return self.decode_head(self.backbone(x))
        batch, _, height, width = x.shape
        boxes = slide_boxes(height, width, self.detail_crop_size, self.slide_overlapping)
        window_logits = self.decode_head(self.backbone(torch.cat([b.crop(x) for b in boxes], dim=0)))
        stride = self.output_stride
        canvas = window_logits.new_zeros((batch, window_logits.shape[1], height // stride, width // stride))
        count = window_logits.new_zeros((1, 1, height // stride, width // stride))
        for i, box in enumerate(boxes):
            cell = box.scaled(1 / stride)
            canvas[..., cell.top:cell.bottom, cell.left:cell.right] += window_logits[i * batch:(i + 1) * batch]
            count[..., cell.top:cell.bottom, cell.left:cell.right] += 1
        return canvas / count

    def _check_context_grid(self, height: int, width: int) -> None:
        grid = int(self.context_stride)
        if grid != self.context_stride or height % grid or width % grid:
            raise UserError(f"HRDA context crop {height}x{width} must be a multiple of {self.context_stride:g} px "
                            "(the context prediction grid); set the data crop_size accordingly")

    def _pad_to_grid(self, x: Tensor) -> Tensor:
        """Zero-pad (the mean colour) bottom/right to whole context-grid cells for inference."""
        grid = int(round(self.context_stride))
        pad_h, pad_w = -x.shape[-2] % grid, -x.shape[-1] % grid
        if not (pad_h or pad_w):
            return x
        return F.pad(x, (0, pad_w, 0, pad_h))

    def _features(self, stages: Sequence[Tensor], decoded: Optional[Tensor], taps: Sequence[str]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for tap in taps:
            if tap.startswith("enc") and tap[3:].isdigit():
                out[tap] = stages[int(tap[3:]) - 1]
            elif tap == "enc_last":
                out[tap] = stages[-1]
            elif tap == "enc_fused":
                out[tap] = fuse_stages(stages)
            elif tap == "decoder":
                out[tap] = decoded
        if PROJECTION_TAP in taps:
            source = out.get(self.proj_input)
            if source is None:
                source = self._features(stages, decoded, (self.proj_input,))[self.proj_input]
            out[PROJECTION_TAP] = self.proj_head(source)  # type: ignore[misc]
        return out


def build_attention_head(decode_head: DecodeHead, in_channels: Sequence[int], in_strides: Sequence[int],
                         num_classes: int, classwise: bool = True, embed_dim: int = 256,
                         dropout: float = 0.1) -> nn.Module:
    """The scale-attention head for a decode head: the 1×1-fusion DAFormer head for MiT models, a
    second DeepLab-V2 head (same dilations) for ResNet ones."""
    out_channels = num_classes if classwise else 1
    if isinstance(decode_head, DeepLabV2Head):
        dilations = [int(branch.conv.dilation[0]) for branch in decode_head.aspp_modules]
        return DeepLabV2Head(in_channels, out_channels, in_strides, dilations=dilations)
    return ScaleAttentionHead(in_channels, out_channels, in_strides, embed_dim=embed_dim, dropout=dropout)


def hrda_from_segmentor(segmentor: Segmentor, classwise: bool = True, attention_embed_dim: int = 256,
                        **options) -> HRDASegmentor:
    """Wrap a built single-scale segmentor (its backbone and decode head) into HRDA."""
    head = None
    if options.get("fixed_attention") is None:
        head = build_attention_head(segmentor.decode_head, segmentor.backbone.out_channels,
                                    segmentor.backbone.out_strides, segmentor.num_classes, classwise,
                                    attention_embed_dim)
    return HRDASegmentor(segmentor.backbone, segmentor.decode_head, head, **options)


def _register_hrda_models() -> None:
    from .registry import _REGISTRY, register_model

    def make(base_name: str, attention_dim: int):
        base_factory = _REGISTRY[base_name]

        def factory(num_classes: int, detail_crop_size: Sequence[int] = (512, 512), context_scale: float = 0.5,
                    crop_divisible: int = 8, slide_overlapping: bool = True, hr_slide_inference: bool = True,
                    attention_classwise: bool = True, attention_embed_dim: int = attention_dim,
                    fixed_attention: Optional[float] = None, drop_path_rate: float = 0.1,
                    dropout: float = 0.1) -> Segmentor:
            base = base_factory(num_classes, drop_path_rate=drop_path_rate, dropout=dropout)
            return hrda_from_segmentor(base, attention_classwise, attention_embed_dim,
                                       detail_crop_size=detail_crop_size, context_scale=context_scale,
                                       crop_divisible=crop_divisible, slide_overlapping=slide_overlapping,
                                       hr_slide_inference=hr_slide_inference, fixed_attention=fixed_attention)

        return factory

    for variant in ("b0", "b1", "b2", "b3", "b4", "b5"):
        register_model(f"hrda_daformer_mit{variant}")(make(f"daformer_mit{variant}", 256))
    register_model("hrda_daformer_tiny")(make("daformer_tiny", 64))


_register_hrda_models()
