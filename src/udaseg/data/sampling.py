"""Rare class sampling (RCS, DAFormer) and the class statistics it reads.

Statistics files (DAFormer's format, written by ``udaseg prepare``), with trainIds as string keys:

* ``sample_class_stats.json``: ``[{"<c>": pixels, ..., "file": "<label path>"}, ...]``, one dict
  per labelled image, only classes with at least one pixel, counts at the original resolution;
* ``sample_class_stats_dict.json``: ``{"<label path>": {"<c>": pixels}}``;
* ``samples_with_class.json``: ``{"<c>": [["<label path>", pixels], ...]}``.

Sampling: with ``n_c`` the summed pixel count of class ``c`` and ``f_c = n_c / Σ n``,

    P(c) = softmax_c((1 - f_c) / T)

over the classes that occur (sorted by ascending frequency). An item draws ``c ~ P``, then a file
uniformly from the files with more than ``min_pixels`` pixels of ``c``, and re-runs the pipeline
(new random crop) up to 10 times until the crop holds more than ``min_pixels * min_crop_ratio``
pixels of ``c``. The index the loader asks for is ignored; all draws use torch's RNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import numpy as np
import torch

from udaseg.errors import UserError

if TYPE_CHECKING:
    from udaseg.config.schema import RCSConfig

STATS_FILE = "sample_class_stats.json"
STATS_DICT_FILE = "sample_class_stats_dict.json"
SAMPLES_WITH_CLASS_FILE = "samples_with_class.json"
RECROP_TRIES = 10


def class_pixel_counts(label: np.ndarray, num_classes: int = 19) -> dict[int, int]:
    """``{class: pixels}`` for every class ``0..num_classes-1`` present in a trainId label."""
    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=256)[:num_classes]
    return {c: int(n) for c, n in enumerate(counts) if n > 0}


def stats_entry(counts: Mapping[int, int], file: str) -> dict[str, Any]:
    """One ``sample_class_stats.json`` record: ascending class keys as strings, then ``file``."""
    entry: dict[str, Any] = {str(c): int(counts[c]) for c in sorted(counts) if counts[c] > 0}
    entry["file"] = file
    return entry


def build_stats_files(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The three JSON documents (keyed by file name) from the ``sample_class_stats`` records."""
    sample_class_stats = [dict(e) for e in entries]
    stats_dict: dict[str, dict[str, int]] = {}
    for entry in sample_class_stats:
        stats_dict[entry["file"]] = {k: v for k, v in entry.items() if k != "file"}
    samples_with_class: dict[str, list[list[Any]]] = {}
    for file, counts in stats_dict.items():
        for c, n in counts.items():
            samples_with_class.setdefault(c, []).append([file, n])
    return {STATS_FILE: sample_class_stats, STATS_DICT_FILE: stats_dict, SAMPLES_WITH_CLASS_FILE: samples_with_class}


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"rare class sampling needs {path}; write it with 'udaseg prepare <dataset> --root ...'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"cannot parse {path}: {err.msg} at line {err.lineno}") from None


def rcs_class_probabilities(sample_class_stats: Iterable[Mapping[str, Any]],
                            temperature: float) -> tuple[list[int], np.ndarray]:
    """Classes (ascending total frequency) and their probabilities ``softmax((1 - f) / T)``."""
    totals: dict[int, int] = {}
    for entry in sample_class_stats:
        for key, n in entry.items():
            if key == "file":
                continue
            totals[int(key)] = totals.get(int(key), 0) + int(n)
    if not totals:
        raise UserError("rare class sampling: the class statistics hold no labelled pixels")
    ordered = sorted(totals.items(), key=lambda kv: kv[1])
    classes = [c for c, _ in ordered]
    freq = torch.tensor([n for _, n in ordered], dtype=torch.float64)
    freq = 1 - freq / freq.sum()
    probs = torch.softmax(freq / temperature, dim=-1)
    return classes, probs.numpy()


def files_per_class(samples_with_class: Mapping[str, Iterable[Any]], classes: Iterable[int],
                    min_pixels: int) -> dict[int, list[str]]:
    """For each class, the base names of the files with more than ``min_pixels`` pixels of it."""
    per_class: dict[int, list[str]] = {}
    by_class = {int(k): v for k, v in samples_with_class.items()}
    for c in classes:
        names = [Path(str(file).replace("\\", "/")).name for file, n in by_class.get(c, []) if n > min_pixels]
        if not names:
            raise UserError(f"rare class sampling: no image has more than {min_pixels} pixels of class {c}; "
                            f"lower rcs.min_pixels")
        per_class[c] = names
    return per_class


class RareClassSampledDataset(torch.utils.data.Dataset):
    """Wraps a labelled dataset so that every item is drawn by rare class sampling.

    The wrapped dataset must provide ``stats_key(index)`` (the label file name used in the
    statistics); ``load_arrays(index)`` / ``transform(arrays, index)`` are used when present so that
    a re-crop does not decode the files again.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, stats_dir: Path, cfg: "RCSConfig") -> None:
        if not hasattr(dataset, "stats_key"):
            raise UserError(f"rare class sampling is not supported for {type(dataset).__name__}")
        if not getattr(dataset, "labelled", True):
            raise UserError("rare class sampling needs a labelled dataset")
        self.dataset = dataset
        self.cfg = cfg
        stats_dir = Path(stats_dir)
        stats = _load_json(stats_dir / STATS_FILE)
        self.classes, probs = rcs_class_probabilities(stats, cfg.temperature)
        self.probabilities = torch.as_tensor(probs, dtype=torch.float64)
        per_class = files_per_class(_load_json(stats_dir / SAMPLES_WITH_CLASS_FILE), self.classes, cfg.min_pixels)
        key_to_index = {dataset.stats_key(i): i for i in range(len(dataset))}
        self.indices_per_class: dict[int, list[int]] = {}
        for c, names in per_class.items():
            unknown = [n for n in names if n not in key_to_index]
            if unknown:
                raise UserError(f"rare class sampling: {stats_dir / SAMPLES_WITH_CLASS_FILE} names {unknown[0]}, "
                                f"which is not in the dataset (stale statistics? run 'udaseg prepare' again)")
            self.indices_per_class[c] = [key_to_index[n] for n in names]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def draw(self) -> tuple[int, int]:
        """``(class, dataset index)``: ``c ~ P``, then a file uniformly among those rich in ``c``."""
        c = self.classes[int(torch.multinomial(self.probabilities, 1).item())]
        candidates = self.indices_per_class[c]
        return c, candidates[int(torch.randint(len(candidates), ()).item())]

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, source_index = self.draw()
        load = getattr(self.dataset, "load_arrays", None)
        transform = getattr(self.dataset, "transform", None)
        arrays: Optional[dict[str, Any]] = load(source_index) if load and transform else None

        def sample() -> dict[str, Any]:
            return transform(arrays, source_index) if arrays is not None else self.dataset[source_index]

        item = sample()
        if self.cfg.min_crop_ratio > 0:
            for _ in range(RECROP_TRIES):
                if int((item["label"] == c).sum()) > self.cfg.min_pixels * self.cfg.min_crop_ratio:
                    break
                item = sample()
        return item
