"""Networks: backbones, decode and projection heads, the segmentor, named configs, inference, weights.

``build_model(name, num_classes, **options) -> Segmentor``; ``list_models()``.
"""

from .inference import predict_logits, window_grid
from .registry import build_model, count_parameters, list_models, register_model
from .segmentor import Segmentor, SegmentorOutput, fuse_stages
from .weights import LoadReport, detect_format, load_pretrained, read_state_dict
from . import hrda  # noqa: E402,F401  (registers the hrda_* models)

__all__ = [
    "build_model",
    "list_models",
    "register_model",
    "count_parameters",
    "Segmentor",
    "SegmentorOutput",
    "fuse_stages",
    "predict_logits",
    "window_grid",
    "load_pretrained",
    "LoadReport",
    "detect_format",
    "read_state_dict",
]
