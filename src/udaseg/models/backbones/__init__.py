"""Encoders: ResNet (V1c deep stem or torchvision stem) and Mix Transformer."""

from .mit import MIT_CONFIGS, MiTConfig, MixTransformer
from .resnet import RESNET_DEPTHS, ResNet

__all__ = ["ResNet", "RESNET_DEPTHS", "MixTransformer", "MiTConfig", "MIT_CONFIGS"]
