"""SegFormer all-MLP decode head (Xie et al., NeurIPS 2021), the source-only baseline of SePiCo Table 4.

Per stage a linear embedding ``C_i → E`` (E = 256 for MiT-B0/B1, 768 for B2–B5), bilinear resize to
stage 1's size, concatenation (``4E``), a 1×1 fuse conv ``4E → E`` with BN and ReLU, ``Dropout2d(0.1)``
and a 1×1 classifier ``E → K``. The stages are concatenated in order 1..4 as in DAFormer's port (the
NVlabs original concatenates 4..1; the order only permutes the fuse conv's input channels).

Keys ``linear_c.{i}.proj``, ``linear_fuse.conv``, ``linear_fuse.bn``, ``linear_pred`` match DAFormer's
``SegFormerHead``. The ``decoder`` feature is the fuse output (``E`` channels, stride 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..layers import ConvBNReLU, resize
from .base import DecodeHead
from .daformer import LinearEmbed


class SegFormerHead(DecodeHead):
    def __init__(self, in_channels: Sequence[int], num_classes: int, in_strides: Sequence[int],
                 embed_dim: int = 768, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = embed_dim
        self.feature_stride = int(in_strides[0])
        self.linear_c = nn.ModuleDict({str(i): LinearEmbed(c, embed_dim) for i, c in enumerate(in_channels)})
        self.linear_fuse = ConvBNReLU(embed_dim * len(in_channels), embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        nn.init.normal_(self.linear_pred.weight, 0.0, 0.01)
        nn.init.zeros_(self.linear_pred.bias)

    def forward_features(self, stages: Sequence[Tensor]) -> Tensor:
        size = stages[0].shape[-2:]
        embedded = [resize(self.linear_c[str(i)](x), size) for i, x in enumerate(stages)]
        return self.linear_fuse(torch.cat(embedded, dim=1))

    def classify(self, feature: Tensor) -> Tensor:
        return self.linear_pred(self.dropout(feature))
