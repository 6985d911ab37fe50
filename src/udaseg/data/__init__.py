"""Datasets, labels, transforms, rare class sampling and dataset preparation."""

from udaseg.data.datasets import DATASETS, SegmentationDataset, build_dataset, register_dataset
from udaseg.data.labels import CITYSCAPES_CLASSES, PROTOCOLS, ClassSet, colorize
from udaseg.data.transforms import Pipeline

__all__ = [
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "PROTOCOLS",
    "ClassSet",
    "Pipeline",
    "SegmentationDataset",
    "build_dataset",
    "colorize",
    "register_dataset",
]
