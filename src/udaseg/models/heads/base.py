"""The interface every decode head implements."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class DecodeHead(nn.Module):
    """A decode head maps the encoder's stage outputs to class logits in two steps:

    ``forward_features(stages) -> F`` (the feature right before dropout and the classifier) and
    ``classify(F) -> logits``, so a segmentor can expose ``F`` as its ``decoder`` tap without running
    the head twice.

    Attributes:
        num_classes: output channels of the classifier.
        feature_channels: channels of ``F``.
        feature_stride: stride of ``F`` (and of the logits) relative to the input image.
    """

    num_classes: int
    feature_channels: int
    feature_stride: int

    def forward_features(self, stages: Sequence[Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def classify(self, feature: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        return self.classify(self.forward_features(stages))
