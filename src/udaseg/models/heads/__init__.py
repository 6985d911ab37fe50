"""Decode heads (DeepLab-V2, DAFormer, SegFormer) and projection heads."""

from .base import DecodeHead
from .daformer import DAFormerHead
from .deeplabv2 import DeepLabV2Head
from .projection import (
    PROJECTION_HEADS,
    ConvProjectionHead,
    MLPProjectionHead,
    SePiCoProjectionHead,
    build_projection_head,
)
from .segformer import SegFormerHead

__all__ = [
    "DecodeHead",
    "DAFormerHead",
    "DeepLabV2Head",
    "SegFormerHead",
    "SePiCoProjectionHead",
    "ConvProjectionHead",
    "MLPProjectionHead",
    "PROJECTION_HEADS",
    "build_projection_head",
]
