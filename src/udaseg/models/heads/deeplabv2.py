"""DeepLab-V2 ASPP classifier (Chen et al., TPAMI 2018), as used by SPCL, RCCR, SePiCo and T2S-DA.

Spec: sepico.md §1.1.1 (``DLV2Head``), spcl.md §1.1 (``ASPP_Classifier_V2``), rccr.md §2.1.

Four parallel 3×3 convs on the last encoder stage, ``C_in → K`` with bias, dilation = padding
∈ {6, 12, 18, 24}; their outputs are **summed**. No BN, no activation, no dropout. Weights ~ N(0, 0.01),
biases 0: the official configs initialise ``aspp_modules`` with mmcv's ``Normal(std=0.01)``, whose bias
is 0. Logits come out at the encoder's stride (8 for DeepLab-V2).

The head has no hidden layer, so its ``forward_features`` returns its input (the last encoder stage) and
the ``decoder`` tap of a DeepLab-V2 segmentor equals ``enc_last``. Keys ``aspp_modules.{i}.conv.*``
match the mmseg ``DLV2Head`` of DAFormer/SePiCo checkpoints.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .base import DecodeHead


class _DilatedConv(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=dilation, dilation=dilation, bias=True)
        nn.init.normal_(self.conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DeepLabV2Head(DecodeHead):
    """Sum of dilated 3×3 convs: ``logits = Σ_d conv_d(x)``, ``x: B×C_in×h×w -> B×K×h×w``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, in_strides: Sequence[int],
                 dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = int(in_channels[-1])
        self.feature_stride = int(in_strides[-1])
        self.aspp_modules = nn.ModuleList(_DilatedConv(self.feature_channels, num_classes, d) for d in dilations)

    def forward_features(self, stages: Sequence[Tensor]) -> Tensor:
        return stages[-1]

    def classify(self, feature: Tensor) -> Tensor:
        out = self.aspp_modules[0](feature)
        for branch in self.aspp_modules[1:]:
            out = out + branch(feature)
        return out
