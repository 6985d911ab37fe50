"""Small building blocks shared by backbones and heads."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``B×C×H×W`` to ``size`` (align_corners=False); a no-op at the same size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def channel_linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """Apply ``layer`` to the channel vector of every pixel: ``B×C×H×W -> B×C'×H×W``.

    The same as a 1×1 convolution with the linear layer's weight; kept as a ``Linear`` so its parameter
    names match the official checkpoints (``...proj.weight`` of shape ``C'×C``).
    """
    return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def init_like_conv_module(conv: nn.Conv2d, norm: nn.Module | None = None) -> None:
    """mmcv ``ConvModule``'s initialisation, which every official head built from it starts with.

    The conv weight is He-normal over the fan-out (``std = sqrt(2 / (C_out·k·k))``, PyTorch's fan-out,
    which does not divide by the groups), its bias 0; the norm gets weight 1, bias 0. mmcv uses the
    ReLU gain even for modules without an activation. PyTorch's default conv init (Kaiming-uniform
    with ``a=sqrt(5)``) has a ``sqrt(6·fan_in/fan_out)`` times smaller std (4.9 for ``1024→256``).
    """
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    if norm is not None:
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


class ConvBNReLU(nn.Module):
    """``conv -> BatchNorm -> ReLU`` (the conv has no bias); submodules ``conv``, ``bn`` as in mmcv's
    ``ConvModule``, so checkpoint keys read ``<name>.conv.weight`` and ``<name>.bn.*``. Initialised as
    ``ConvModule`` is (:func:`init_like_conv_module`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        padding = (kernel_size // 2) * dilation
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()
        init_like_conv_module(self.conv, self.bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConvBNReLU(nn.Module):
    """Depth-wise 3×3 conv (+BN+ReLU) followed by a point-wise 1×1 conv (+BN+ReLU).

    Submodules ``depthwise_conv`` and ``pointwise_conv`` as in mmcv's ``DepthwiseSeparableConvModule``
    (whose default gives the depth-wise part the same norm and activation as the point-wise part).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and scale the
    kept ones by ``1/(1-p)``; identity in evaluation."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
