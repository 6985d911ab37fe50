"""Evaluate a segmentor on a labelled dataset: confusion matrix, per-class IoU, mIoU.

Returns ``miou`` (fraction, over the protocol's classes), ``iou`` (per class, NaN where a class is
absent from both prediction and label), ``names``, ``classes`` and ``pixel_accuracy``; also
``accuracy`` (per-class recall, NaN for classes without labelled pixels), ``macc`` (its mean over the
protocol's classes) and ``confusion_matrix`` (K×K pixel counts, rows = ground truth).

Images are evaluated one at a time at the dataset pipeline's resolution (whole image or sliding
window); logits are upsampled to the label's size before the argmax, as mmseg does. Under
``torch.distributed`` every rank evaluates a strided shard and the confusion matrices are summed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from udaseg.config.schema import EvalConfig
from udaseg.engine import distributed as dist
from udaseg.evaluation.metrics import ConfusionMatrix
from udaseg.models.inference import predict_logits


def protocol_classes(protocol: str, num_classes: int) -> Optional[list[int]]:
    if protocol == "all":
        return None
    from udaseg.data.labels import PROTOCOLS

    classes = list(PROTOCOLS[protocol])
    if max(classes) >= num_classes:
        raise ValueError(f"protocol {protocol} needs 19 classes, the model has {num_classes}")
    return classes


def inference_model(segmentor: nn.Module, cfg: EvalConfig, num_classes: int) -> nn.Module:
    """The segmentor as evaluated: wrapped with the class-prior re-weighting when configured."""
    if cfg.class_prior_scale is None:
        return segmentor
    from udaseg.errors import UserError
    from udaseg.methods.sepico import ClassPriorReweighting, dark_zurich_class_weights

    if num_classes != 19:
        raise UserError(f"eval.class_prior_scale needs the 19 Cityscapes classes, the model has {num_classes}")
    weights = dark_zurich_class_weights(cfg.class_prior_scale)
    return ClassPriorReweighting(segmentor, weights).to(next(segmentor.parameters()).device)


@torch.no_grad()
def evaluate(segmentor: nn.Module, dataset, cfg: EvalConfig, num_classes: int, device: torch.device,
             class_names: Optional[Sequence[str]] = None, progress: bool = True, desc: str = "eval") -> dict:
    was_training = segmentor.training
    segmentor.eval()
    model = inference_model(segmentor, cfg, num_classes)
    matrix = ConfusionMatrix(num_classes, device=device)
    rank, world = dist.rank(), dist.world_size()
    indices = range(rank, len(dataset), world)
    bar = tqdm(indices, desc=desc, leave=False, disable=not progress or rank != 0, dynamic_ncols=True)
    for index in bar:
        item = dataset[index]
        image = item["image"].unsqueeze(0).to(device)
        label = item["label"].to(device)
        logits = predict_logits(model, image, mode=cfg.mode, crop_size=cfg.crop_size, stride=cfg.stride,
                                flip=cfg.flip, out_size=tuple(label.shape[-2:]), batch_windows=cfg.batch_windows)
        matrix.update(logits.argmax(1), label.unsqueeze(0))
    dist.all_reduce_sum(matrix.matrix)
    segmentor.train(was_training)
    classes = protocol_classes(cfg.protocol, num_classes)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return {
        "miou": matrix.miou(classes),
        "iou": [float(v) for v in matrix.iou().tolist()],
        "names": names,
        "classes": classes if classes is not None else list(range(num_classes)),
        "pixel_accuracy": matrix.pixel_accuracy(),
        "accuracy": [float(v) for v in matrix.class_accuracy().tolist()],
        "macc": matrix.mean_accuracy(classes),
        "confusion_matrix": matrix.matrix.cpu().tolist(),
    }
