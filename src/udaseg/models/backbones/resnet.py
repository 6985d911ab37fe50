"""ResNet-18/34/50/101 encoders for DeepLab-V2 style segmentation (output stride 8).

Two stems:

* ``"plain"``: torchvision's 7×7/2 conv + BN + ReLU (keys ``conv1``, ``bn1``), used by SPCL, RCCR and
  T2S-DA's CNN runs with the torchvision ImageNet checkpoints.
* ``"v1c"``: mmseg's ``ResNetV1c`` deep stem, three 3×3 convs ``3→C/2 (stride 2) → C/2 → C`` with BN and
  ReLU after each (keys ``stem.0/1``, ``stem.3/4``, ``stem.6/7``), used by SePiCo and DAFormer's CNN runs
  with the ``open-mmlab://resnet101_v1c`` checkpoint.

Both continue with a 3×3/2 max-pool and four stages ``layer1..layer4``. The stride sits in the 3×3 conv
("pytorch" style). The defaults strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) give output stride 8; with
``contract_dilation`` the first block of a dilated stage uses half the dilation, which is what both
mmseg (``contract_dilation=True`` in the DeepLab-V2 configs) and torchvision
(``replace_stride_with_dilation``) do.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor, nn

RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (ResNet-18/34). Dilation applies to the first conv."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride, dilation), 1×1 expand by 4, residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _deep_stem(in_channels: int, stem_channels: int) -> nn.Sequential:
    """mmseg V1c stem: conv3×3/2 (→C/2), conv3×3 (→C/2), conv3×3 (→C), each followed by BN and ReLU."""
    half = stem_channels // 2
    layers: List[nn.Module] = []
    for c_in, c_out, stride in ((in_channels, half, 2), (half, half, 1), (half, stem_channels, 1)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet encoder returning the outputs of its four stages.

    Args:
        depth: 18, 34, 50 or 101.
        stem: ``"v1c"`` (deep 3×3 stem, mmseg key names) or ``"plain"`` (7×7 stem, torchvision key names).
        strides, dilations: per stage; the defaults give output stride 8 (DeepLab-V2).
        contract_dilation: first block of a stage with dilation ``d > 1`` uses ``d // 2``.
        base_width: planes of ``layer1`` (64 for the standard networks); stage ``i`` has ``base_width·2^i``
            planes, so small values give tiny CPU models.
        stem_channels: output channels of the stem (default ``base_width``).
        frozen_bn: every BatchNorm stays in eval mode (running statistics fixed) and its affine parameters
            get ``requires_grad=False``.
        freeze_bn_affine: only the BN affine parameters are frozen; statistics still update in training
            (the DACS / RCCR setting).

    Shapes: ``x: B×3×H×W`` gives ``[B×C_i×H_i×W_i]`` with ``C = base_width·(1,2,4,8)·expansion`` and
    ``H_i = ceil(H / s_i)``, ``s = (4, 8, 8, 8)`` for the default strides.
    """

    def __init__(
        self,
        depth: int = 101,
        stem: str = "v1c",
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        contract_dilation: bool = True,
        base_width: int = 64,
        stem_channels: int | None = None,
        in_channels: int = 3,
        frozen_bn: bool = False,
        freeze_bn_affine: bool = False,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: {sorted(RESNET_DEPTHS)}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError("strides and dilations need one value per stage (4)")
        block_kind, blocks = RESNET_DEPTHS[depth]
        block = BasicBlock if block_kind == "basic" else Bottleneck
        stem_channels = stem_channels or base_width
        self.depth = depth
        self.stem_kind = stem
        self.frozen_bn = frozen_bn

        if stem == "v1c":
            self.stem = _deep_stem(in_channels, stem_channels)
        elif stem == "plain":
            self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, 2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        else:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: 'v1c', 'plain'")
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)

        channels = stem_channels
        out_channels, out_strides = [], []
        total_stride = 4
        for i, (n_blocks, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            planes = base_width * 2**i
            layer = self._make_stage(block, channels, planes, n_blocks, stride, dilation, contract_dilation)
            self.add_module(f"layer{i + 1}", layer)
            channels = planes * block.expansion
            total_stride *= stride
            out_channels.append(channels)
            out_strides.append(total_stride)
        self.out_channels: Tuple[int, ...] = tuple(out_channels)
        self.out_strides: Tuple[int, ...] = tuple(out_strides)
        self._init_weights()
        if frozen_bn or freeze_bn_affine:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.requires_grad_(False)
                    module.bias.requires_grad_(False)
        if frozen_bn:
            self.train(self.training)

    @staticmethod
    def _make_stage(block, in_channels: int, planes: int, n_blocks: int, stride: int, dilation: int,
                    contract_dilation: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_channels != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first_dilation = dilation // 2 if (contract_dilation and dilation > 1) else dilation
        layers = [block(in_channels, planes, stride, first_dilation, downsample)]
        layers += [block(planes * block.expansion, planes, 1, dilation) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if self.frozen_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward_stem(self, x: Tensor) -> Tensor:
        if self.stem_kind == "v1c":
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.forward_stem(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs
