"""Heads start as the official (mmcv) ones: He-normal fan-out convs, zero biases."""

import math

import torch
from torch import nn

from udaseg.models.heads.daformer import DAFormerHead
from udaseg.models.heads.deeplabv2 import DeepLabV2Head
from udaseg.models.heads.projection import ConvProjectionHead, SePiCoProjectionHead
from udaseg.models.layers import ConvBNReLU


def _fan_out_std(conv: nn.Conv2d) -> float:
    return math.sqrt(2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))


def _assert_he_fan_out(conv: nn.Conv2d, rel_tol: float = 0.05) -> None:
    std = conv.weight.std().item()
    assert abs(std - _fan_out_std(conv)) < rel_tol * _fan_out_std(conv), (std, _fan_out_std(conv))
    assert abs(conv.weight.mean().item()) < 0.1 * _fan_out_std(conv)


def test_conv_bn_relu_is_he_normal_fan_out():
    torch.manual_seed(0)
    block = ConvBNReLU(256, 128, 3)
    _assert_he_fan_out(block.conv)
    assert block.conv.bias is None
    assert torch.all(block.bn.weight == 1) and torch.all(block.bn.bias == 0)
    # normal, not uniform: the excess kurtosis of a normal sample is ~0 (uniform: -1.2)
    w = block.conv.weight.flatten()
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2 - 3
    assert abs(kurtosis.item()) < 0.1


def test_sepico_projection_head_matches_official_scale():
    torch.manual_seed(0)
    head = SePiCoProjectionHead(1024, 256, 512)
    first, second = head.convs[0].conv, head.convs[1].conv
    _assert_he_fan_out(first)
    _assert_he_fan_out(second)
    # PyTorch's default would be sqrt(6·fan_in/fan_out) times smaller: 4.9x and 1.7x here
    default = nn.Conv2d(1024, 256, 1, bias=False)
    assert first.weight.std() / default.weight.std() > 4.5


def test_t2sda_projector_and_depthwise_convs():
    torch.manual_seed(0)
    head = ConvProjectionHead(64, 256, 256, kernel_size=3)
    _assert_he_fan_out(head.convs[0].conv)
    daformer = DAFormerHead([32, 64, 160, 256], 19, [4, 8, 16, 32], embed_dim=64, channels=64)
    depthwise = daformer.fuse_layer.aspp_modules[1].depthwise_conv.conv
    assert depthwise.groups == depthwise.in_channels
    _assert_he_fan_out(depthwise, rel_tol=0.1)  # PyTorch's fan-out: C_out·k·k, not divided by groups
    _assert_he_fan_out(daformer.fuse_layer.bottleneck.conv)
    assert torch.all(daformer.conv_seg.bias == 0)
    assert abs(daformer.conv_seg.weight.std().item() - 0.01) < 0.001


def test_deeplabv2_classifier_weight_and_zero_bias():
    torch.manual_seed(0)
    head = DeepLabV2Head([256, 512, 1024, 2048], 19, [4, 8, 8, 8])
    for branch in head.aspp_modules:
        assert torch.all(branch.conv.bias == 0)
        assert abs(branch.conv.weight.std().item() - 0.01) < 0.0005
