"""Encoder–decoder segmentor that returns logits and the feature taps objectives ask for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .heads.base import DecodeHead
from .layers import resize

ENCODER_TAPS: Tuple[str, ...] = ("enc1", "enc2", "enc3", "enc4", "enc_last", "enc_fused")
PROJECTION_TAP = "proj"


@dataclass
class SegmentorOutput:
    """What one forward pass produced.

    Attributes:
        logits: ``B×K×h×w`` at the decode head's stride (``output_stride``), **not** upsampled.
        features: the requested taps, by name (see :meth:`Segmentor.valid_taps`).
    """

    logits: Tensor
    features: Dict[str, Tensor] = field(default_factory=dict)


class Segmentor(nn.Module):
    """``backbone`` (returns 4 stage outputs) + ``decode_head`` (+ optional ``proj_head``).

    Taps (``forward(x, taps=...)``):

    ========== ===============================================================================
    ``enc1..4`` encoder stage outputs
    ``enc_last`` the last encoder stage (= ``enc4``)
    ``enc_fused`` all stages bilinearly resized to stage 1's size and concatenated (Σ C_i channels)
    ``decoder`` the decode head's feature right before dropout and classifier
    ``proj``    the projection head's output on ``proj_input`` (only with a projection head)
    ========== ===============================================================================

    The encoder runs once per call whatever taps are requested; the projection head runs only when
    ``proj`` is requested.

    Attributes:
        name: registry name of the configuration (``""`` when built by hand).
        num_classes: classes the decode head predicts.
    """

    def __init__(self, backbone: nn.Module, decode_head: DecodeHead, name: str = "",
                 proj_head: Optional[nn.Module] = None, proj_input: str = "enc_last") -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.name = name
        self.num_classes = int(decode_head.num_classes)
        self.proj_head: Optional[nn.Module] = None
        self.proj_input = proj_input
        if proj_head is not None:
            self.set_projection_head(proj_head, proj_input)

    # ----------------------------------------------------------------------------------- description
    @property
    def output_stride(self) -> int:
        """Stride of the logits relative to the input."""
        return int(self.decode_head.feature_stride)

    def valid_taps(self) -> List[str]:
        taps = list(ENCODER_TAPS) + ["decoder"]
        if self.proj_head is not None:
            taps.append(PROJECTION_TAP)
        return taps

    def _check_tap(self, tap: str) -> None:
        if tap not in self.valid_taps():
            raise ValueError(f"unknown feature tap {tap!r}; valid taps: {', '.join(self.valid_taps())}")

    def tap_channels(self, tap: str) -> int:
        """Channels of a tap's tensor."""
        self._check_tap(tap)
        channels = self.backbone.out_channels
        if tap.startswith("enc") and tap[3:].isdigit():
            return int(channels[int(tap[3:]) - 1])
        if tap == "enc_last":
            return int(channels[-1])
        if tap == "enc_fused":
            return int(sum(channels))
        if tap == "decoder":
            return int(self.decode_head.feature_channels)
        return int(self.proj_head.out_channels)  # type: ignore[union-attr]

    def tap_stride(self, tap: str) -> int:
        """Stride of a tap's tensor relative to the input (its size is ``ceil(H / stride)``)."""
        self._check_tap(tap)
        strides = self.backbone.out_strides
        if tap.startswith("enc") and tap[3:].isdigit():
            return int(strides[int(tap[3:]) - 1])
        if tap == "enc_last":
            return int(strides[-1])
        if tap == "enc_fused":
            return int(strides[0])
        if tap == "decoder":
            return self.output_stride
        return self.tap_stride(self.proj_input)

    # ------------------------------------------------------------------------------ projection head
    def set_projection_head(self, head: nn.Module, input_tap: str = "enc_last") -> None:
        """Attach a projection head fed by ``input_tap`` (an encoder tap or ``decoder``)."""
        if input_tap not in ENCODER_TAPS + ("decoder",):
            raise ValueError(f"projection input must be one of {', '.join(ENCODER_TAPS + ('decoder',))}, got {input_tap!r}")
        self.proj_head = head
        self.proj_input = input_tap

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, taps: Sequence[str] = (), decode: bool = True) -> SegmentorOutput:
        """``x: B×3×H×W`` -> :class:`SegmentorOutput` with ``logits: B×K×ceil(H/s)×ceil(W/s)``.

        ``decode=False`` runs the encoder only (``logits`` is then ``None``) unless the ``decoder``
        tap is requested: objectives that read encoder features alone skip the decode head.
        """
        if isinstance(taps, str):
            taps = (taps,)
        for tap in taps:
            self._check_tap(tap)
        stages = self.backbone(x)
        wanted = set(taps)
        needs_decoder = decode or "decoder" in wanted or (PROJECTION_TAP in wanted and self.proj_input == "decoder")
        decoded = self.decode_head.forward_features(stages) if needs_decoder else None
        logits = self.decode_head.classify(decoded) if decode else None
        if PROJECTION_TAP in wanted:
            wanted.add(self.proj_input)
        features: Dict[str, Tensor] = {}
        for i, stage in enumerate(stages):
            if f"enc{i + 1}" in wanted:
                features[f"enc{i + 1}"] = stage
        if "enc_last" in wanted:
            features["enc_last"] = stages[-1]
        if "enc_fused" in wanted:
            features["enc_fused"] = fuse_stages(stages)
        if "decoder" in wanted:
            features["decoder"] = decoded
        if PROJECTION_TAP in wanted:
            features[PROJECTION_TAP] = self.proj_head(features[self.proj_input])  # type: ignore[misc]
        return SegmentorOutput(logits=logits, features={name: features[name] for name in taps})


def fuse_stages(stages: Sequence[Tensor]) -> Tensor:
    """Resize every stage bilinearly (align_corners=False) to stage 1's size and concatenate channels."""
    size = stages[0].shape[-2:]
    return torch.cat([resize(stage, size) for stage in stages], dim=1)
