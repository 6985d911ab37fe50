"""Checks a run passes before it writes anything: data against the model, sizes, batch size.

Each check raises a one-line :class:`UserError` that names the config key, the file or the value
to fix. They are cheap: image sizes are read from the file headers, and one item per dataset is
decoded fully, so a broken label or a size mismatch shows up before the run folder is touched.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from udaseg.config.schema import Config, DatasetConfig
from udaseg.errors import UserError

_WORKER_ERROR = re.compile(r"udaseg\.errors\.UserError: (.+)$")


def unwrap_worker_error(error: UserError) -> UserError:
    """A ``UserError`` raised in a data-loader worker comes back with the worker's traceback in its
    message; keep the original one line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        match = _WORKER_ERROR.search(line)
        if match:
            return UserError(match.group(1))
    return error if len(lines) <= 1 else UserError(lines[-1])


def check_class_count(dataset: Any, key: str, spec: DatasetConfig, num_classes: int,
                      fix: Optional[str] = None) -> None:
    """The model predicts as many classes as the dataset's class list holds (``fix``: the advice)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return
    count = classes.num_classes
    if count == num_classes:
        return
    class_file: Optional[Path] = getattr(dataset, "class_file", None)
    where = f"{class_file} lists" if class_file is not None else f"{key} ({spec.name}) has"
    names = ", ".join(list(classes.names)[:4]) + (", ..." if count > 4 else "")
    raise UserError(f"model.num_classes={num_classes} but {where} {count} classes ({names}); "
                    f"{fix or f'set model.num_classes={count}'}")


def check_batch_fits(dataset: Any, key: str, batch_size: int) -> None:
    if len(dataset) < batch_size:
        raise UserError(f"data.batch_size={batch_size} is larger than {key}, which holds {len(dataset)} images "
                        f"({getattr(dataset, 'root', '')}); lower data.batch_size")


def _header_size(path: Path) -> Optional[tuple[int, int]]:
    try:
        with Image.open(path) as im:
            return im.size  # (width, height)
    except (OSError, ValueError):
        return None  # decoding errors are reported when the item is loaded


def check_uniform_size(dataset: Any, key: str, spec: DatasetConfig, batch_size: int) -> None:
    """Without a crop, the images of a batch must come out of the pipeline at one size."""
    if spec.crop_size is not None or batch_size < 2:
        return
    samples = getattr(dataset, "samples", None)
    pipeline = getattr(dataset, "pipeline", None)
    if samples is None or pipeline is None:
        return
    first: Optional[tuple[tuple[int, int], Path]] = None
    for sample in samples:
        size = _header_size(sample.image)
        if size is None:
            continue
        height, width = pipeline.output_size(size[1], size[0])
        if first is None:
            first = ((height, width), sample.image)
        elif (height, width) != first[0]:
            (h0, w0), path0 = first
            raise UserError(f"{key}: images of different sizes cannot share a batch ({path0} gives {w0}x{h0}, "
                            f"{sample.image} gives {width}x{height}); set {key}.crop_size, or {key}.resize "
                            f"with {key}.keep_ratio=false")


def check_first_item(dataset: Any, key: str) -> None:
    """Decode one item (image, label, pipeline) so that a broken file fails before training starts."""
    if len(dataset) == 0:
        raise UserError(f"{key}: the dataset is empty")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the check leaves every random stream as it was
        dataset[0]
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def check_training_data(cfg: Config, streams: dict, batch_size: int) -> None:
    specs = {"source": ("data.source", cfg.data.source), "target": ("data.target", cfg.data.target)}
    for name, stream in streams.items():
        key, spec = specs[name]
        base = getattr(stream.dataset, "dataset", stream.dataset)  # under rare class sampling, the dataset it wraps
        if getattr(base, "labelled", True):
            check_class_count(base, key, spec, cfg.model.num_classes)
        check_batch_fits(base, key, batch_size)
        check_uniform_size(base, key, spec, batch_size)
        check_first_item(base, key)


def check_val_data(cfg: Config, val_sets: list) -> None:
    for position, (spec, dataset) in enumerate(val_sets):
        key = f"data.val[{position}]"
        check_class_count(dataset, key, spec, cfg.model.num_classes)
        check_first_item(dataset, key)
