"""DAFormer decode head with context-aware feature fusion (Hoyer et al., CVPR 2022).

Spec: sepico.md §1.1.2, pgpc.md §2.1.

1. Per stage ``i``: a linear embedding ``C_i → E`` (E = 256; plain ``Linear``, no norm/activation),
   bilinearly resized (align_corners=False) to stage 1's size (stride 4); concatenate → ``4E`` channels.
2. Context fusion, a depth-wise separable ASPP without image pooling: a 1×1 conv (dilation 1) and
   depth-wise separable 3×3 convs at dilations 6/12/18, each ``4E → C`` with BN and ReLU (the depth-wise
   part too); concatenate (``4C``), then a 3×3 conv ``4C → C`` + BN + ReLU (the "bottleneck").
3. ``Dropout2d(0.1)`` and a 1×1 classifier ``C → K`` (with bias). Logits at stride 4.

The ``decoder`` feature is the bottleneck output (``C`` channels, stride 4). Module names equal those of
the mmseg ``DAFormerHead`` (``embed_layers.{i}.proj``, ``fuse_layer.aspp_modules.{j}``,
``fuse_layer.bottleneck``, ``conv_seg``), so DAFormer/SePiCo checkpoints load by prefix only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..layers import ConvBNReLU, DepthwiseSeparableConvBNReLU, channel_linear, resize
from .base import DecodeHead


class LinearEmbed(nn.Module):
    """Per-pixel linear map ``C_in → C_out`` (key ``proj``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return channel_linear(x, self.proj)


class SeparableASPP(nn.Module):
    """ASPP without image pooling; dilation 1 is a 1×1 conv, others are depth-wise separable 3×3 convs."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1 else DepthwiseSeparableConvBNReLU(in_channels, channels, 3, d)
            for d in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class DAFormerHead(DecodeHead):
    """``stages: [B×C_i×h_i×w_i] -> logits B×K×h_1×w_1``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_strides: Sequence[int],
                 embed_dim: int = 256, channels: int = 256, dilations: Sequence[int] = (1, 6, 12, 18),
                 dropout: float = 0.1, fusion: str = "aspp") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = channels
        self.feature_stride = int(in_strides[0])
        self.embed_layers = nn.ModuleDict({str(i): LinearEmbed(c, embed_dim) for i, c in enumerate(in_channels)})
        if fusion not in ("aspp", "conv"):
            raise ValueError(f"fusion must be 'aspp' or 'conv', got {fusion!r}")
        fused = embed_dim * len(in_channels)
        # "conv": one 1x1 conv + BN + ReLU, the context fusion of HRDA's scale-attention head
        self.fuse_layer = SeparableASPP(fused, channels, dilations) if fusion == "aspp" else ConvBNReLU(fused, channels, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward_features(self, stages: Sequence[Tensor]) -> Tensor:
        size = stages[0].shape[-2:]
        embedded = [resize(self.embed_layers[str(i)](x), size) for i, x in enumerate(stages)]
        return self.fuse_layer(torch.cat(embedded, dim=1))

    def classify(self, feature: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(feature))
