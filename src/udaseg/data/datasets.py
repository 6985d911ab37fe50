"""Segmentation datasets in their official layouts, and the registry that builds them by name.

Every dataset is a :class:`SegmentationDataset`: a list of :class:`Sample` (image file, optional
label file, name), a :class:`~udaseg.data.labels.ClassSet`, the rule that turns label files into
trainIds, and a :class:`~udaseg.data.transforms.Pipeline`. An item is a dict::

    image  float32 3×H×W, normalised      label  int64 H×W trainIds, 255 = ignore (labelled only)
    name   str, image path relative to the dataset root      index  int

Images and labels are paired by their file stem (with the dataset's suffixes removed). Mistakes in
the data a user can fix (missing folders, unpaired files, unreadable files) raise ``UserError``;
label values the id table does not define become 255 and are reported once per dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import yaml
from PIL import Image

from udaseg.config.schema import DatasetConfig
from udaseg.data.labels import (
    CITYSCAPES_CLASSES,
    ID_TABLES,
    IGNORE_INDEX,
    MAPILLARY_V12_LABELS,
    ClassSet,
    map_ids,
    palette_lookup,
    trainid_table,
)
from udaseg.data.transforms import Pipeline
from udaseg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TRAINID_SUFFIX = "_labelTrainIds.png"
_SHOW = 3  # how many file names an error message lists

# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_image(path: Path) -> np.ndarray:
    """An image file as ``H×W×3 uint8`` RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except _READ_ERRORS as err:
        raise UserError(f"cannot read image {path}: {_one_line(err)}") from None


def _read_png16_rgb(im: Image.Image) -> np.ndarray:
    """Full 16-bit channels of a 48/64-bit PNG. Pillow keeps only the high byte of each sample in
    mode RGB, so the file is decoded twice, once per byte, and the halves are combined."""
    tile = im.tile[0]
    high = np.asarray(im).astype(np.uint16)
    with Image.open(im.filename) as again:
        raw = tile.args if isinstance(tile.args, str) else tile.args[0]
        low_mode = raw.replace(";16B", ";16L")
        again.tile = [tile._replace(args=low_mode if isinstance(tile.args, str) else (low_mode,))]
        low = np.asarray(again).astype(np.uint16)
    return (high << 8) | low


def _is_png16_rgb(im: Image.Image) -> bool:
    if im.format != "PNG" or im.mode not in ("RGB", "RGBA") or not im.tile:
        return False
    args = im.tile[0].args
    raw = args if isinstance(args, str) else (args[0] if args else "")
    return isinstance(raw, str) and raw.endswith(";16B")


def _index_values(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in ("L", "P"):
        return np.asarray(im)
    if im.mode.startswith("I"):
        return np.asarray(im).astype(np.int64)
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return rgb[..., 0].copy()
        raise UserError(f"label file {path} is a colour image; expected one class index per pixel")
    raise UserError(f"label file {path} has image mode {im.mode}; expected an 8- or 16-bit index PNG")


def _synthia_values(im: Image.Image, path: Path) -> np.ndarray:
    """SYNTHIA ``GT/LABELS`` files are 16-bit 3-channel PNGs whose first (R) channel is the class
    id (the second holds instance ids)."""
    if _is_png16_rgb(im):
        return _read_png16_rgb(im)[..., 0]
    if im.mode in ("RGB", "RGBA"):
        return np.asarray(im)[..., 0].copy()
    return _index_values(im, path)


_MAPILLARY_COLOURS = [colour for _, colour in MAPILLARY_V12_LABELS]


def _mapillary_values(im: Image.Image, path: Path) -> np.ndarray:
    """Mapillary labels are palette PNGs whose indices are label ids; colour-coded copies are
    decoded through the v1.2 colour list (unknown colours give an id outside the table)."""
    if im.mode in ("RGB", "RGBA"):
        ids, known = palette_lookup(np.asarray(im.convert("RGB")), _MAPILLARY_COLOURS)
        return np.where(known, ids, 65535).astype(np.int64)
    return _index_values(im, path)


LABEL_READERS: dict[str, Callable[[Image.Image, Path], np.ndarray]] = {
    "index": _index_values,
    "synthia": _synthia_values,
    "mapillary": _mapillary_values,
}


def read_label_values(path: Path, reader: str = "index") -> np.ndarray:
    """The raw values of a label file (before any id mapping)."""
    try:
        with Image.open(path) as im:  # decoded by the reader (the 16-bit check needs the undecoded tile)
            return LABEL_READERS[reader](im, path)
    except FileNotFoundError:
        raise UserError(f"label file not found: {path}") from None
    except _READ_ERRORS as err:
        raise UserError(f"cannot read label {path}: {_one_line(err)}") from None


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Write an ``H×W uint8`` label as an 8-bit grayscale PNG, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(tmp, format="PNG")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Samples and the base dataset
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One image, the label file read on load and how to turn it into trainIds.

    ``label_table`` names an entry of ``udaseg.data.labels.ID_TABLES`` (None: already class
    indices). ``raw_label`` (read with ``raw_reader``, mapped with ``raw_table``) is the dataset's
    original label file and ``converted`` the ``*_labelTrainIds.png`` file ``udaseg prepare`` writes
    for it (None when no conversion applies).
    """

    image: Path
    name: str
    label: Optional[Path] = None
    label_reader: str = "index"
    label_table: Optional[str] = None
    raw_label: Optional[Path] = None
    raw_reader: str = "index"
    raw_table: Optional[str] = None
    converted: Optional[Path] = None
    extra_images: dict[str, Path] = field(default_factory=dict)


class SegmentationDataset(torch.utils.data.Dataset):
    """A list of samples with a class set, a label id rule and a pipeline.

    ``strict_labels``: label values outside the class set are a ``UserError`` (user datasets)
    instead of being set to 255 with a warning.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: ClassSet,
        pipeline: Pipeline,
        root: Path,
        labelled: bool = True,
        dataset_name: str = "dataset",
        strict_labels: bool = False,
        trainid_lookup: Optional[np.ndarray] = None,
    ) -> None:
        if not samples:
            raise UserError(f"{dataset_name}: no images found under {root}")
        self.samples = list(samples)
        self.classes = classes
        self.pipeline = pipeline
        self.root = Path(root)
        self.labelled = labelled
        self.dataset_name = dataset_name
        self.strict_labels = strict_labels
        self._trainid_lookup = trainid_lookup if trainid_lookup is not None else trainid_table(classes.num_classes)
        self._warned_unmapped = False
        self._warned_size = False
        self.resized_cache: Optional[Path] = None  # see udaseg.data.resized_cache

    def __len__(self) -> int:
        return len(self.samples)

    def stats_key(self, index: int) -> str:
        """The file name that identifies this sample in the class-statistics JSON files."""
        sample = self.samples[index]
        target = sample.converted or sample.label
        if target is None:
            raise UserError(f"{self.dataset_name}: sample {sample.name} has no label")
        return target.name

    def load_label(self, index: int) -> np.ndarray:
        """The sample's label as ``H×W uint8`` trainIds (255 = ignore)."""
        sample = self.samples[index]
        if sample.label is None:
            raise UserError(f"{self.dataset_name}: sample {sample.name} has no label file")
        values = read_label_values(sample.label, sample.label_reader)
        table = ID_TABLES[sample.label_table] if sample.label_table else self._trainid_lookup
        label, n_unmapped = map_ids(values, table)
        if n_unmapped:
            self._report_unmapped(sample.label, values, table, n_unmapped)
        return label

    def _report_unmapped(self, path: Path, values: np.ndarray, table: np.ndarray, count: int) -> None:
        inside = (values >= 0) & (values < table.size)
        bad = np.unique(values[~inside | (table[np.where(inside, values, 0)] < 0)])
        shown = ", ".join(str(v) for v in bad[:5])
        if self.strict_labels:
            raise UserError(
                f"{self.dataset_name}: label {path} holds values {shown} but the class list has "
                f"{self.classes.num_classes} classes (0..{self.classes.num_classes - 1}, "
                f"ignore {self.classes.ignore_index})")
        if not self._warned_unmapped:
            self._warned_unmapped = True
            warnings.warn(
                f"{self.dataset_name}: {count} pixels of {path} have label values outside the id map "
                f"({shown}); they are ignored (255). Other files are not reported.", stacklevel=2)

    def _report_size_mismatch(self, sample: Sample, image_size: tuple, label_size: tuple) -> None:
        """A label of another size than its image: an error for user datasets (``strict_labels``); for
        the public datasets a warning (once), and the label is resized with the image as mmseg does."""
        text = (f"{self.dataset_name}: label {sample.label} is {label_size[1]}x{label_size[0]} but its image "
                f"{sample.image} is {image_size[1]}x{image_size[0]} (width x height)")
        if self.strict_labels:
            raise UserError(text)
        if not self._warned_size:
            self._warned_size = True
            warnings.warn(text + "; the label is resized to the image. Other files are not reported.", stacklevel=3)

    def load_arrays(self, index: int) -> dict[str, Any]:
        """The decoded image (and label, extra images) of a sample, before the pipeline.

        With a resized cache, the cached arrays (already resized, ``presized`` set) when they exist.
        """
        sample = self.samples[index]
        if self.resized_cache is not None:
            from udaseg.data.resized_cache import read_cached

            cached = read_cached(self.resized_cache, sample.name, self.labelled, tuple(sample.extra_images))
            if cached is not None:
                return cached
        arrays: dict[str, Any] = {"image": read_image(sample.image)}
        if self.labelled:
            arrays["label"] = self.load_label(index)
            image_size, label_size = arrays["image"].shape[:2], arrays["label"].shape[:2]
            if image_size != label_size:
                self._report_size_mismatch(sample, image_size, label_size)
        arrays["extra_images"] = {key: read_image(path) for key, path in sample.extra_images.items()}
        return arrays

    def transform(self, arrays: dict[str, Any], index: int) -> dict[str, Any]:
        """Run the pipeline (fresh random crop / flip) on decoded arrays and build the item."""
        item: dict[str, Any] = dict(self.pipeline(arrays["image"], arrays.get("label"),
                                                  extra_images=arrays.get("extra_images"),
                                                  presized=bool(arrays.get("presized"))))
        item["name"] = self.samples[index].name
        item["index"] = index
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.load_arrays(index), index)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

DatasetFactory = Callable[[DatasetConfig, Sequence[float], Sequence[float]], torch.utils.data.Dataset]
DATASETS: dict[str, DatasetFactory] = {}


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Register a dataset class or factory under ``name``; it is called as
    ``factory(cfg: DatasetConfig, mean, std)`` and returns a ``torch.utils.data.Dataset``."""

    def decorator(factory: DatasetFactory) -> DatasetFactory:
        if name in DATASETS and DATASETS[name] is not factory:
            raise ValueError(f"dataset name '{name}' is registered twice")
        DATASETS[name] = factory
        return factory

    return decorator


class MonitorLabels(torch.utils.data.Dataset):
    """An unlabelled view of a labelled dataset: each item's ``label`` becomes ``monitor_label``.

    No objective reads ``monitor_label``; it only measures how accurate the pseudo-labels are on a
    target whose labels exist (the digits benchmark), which adaptation itself never uses.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["monitor_label"] = item.pop("label")
        return item


def build_dataset(cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> torch.utils.data.Dataset:
    """Build the dataset ``cfg.name``. Rare class sampling (``cfg.rcs``) is not applied here: the
    trainer wraps the source in ``udaseg.data.sampling.RareClassSampledDataset``."""
    cfg.validate()
    if cfg.name not in DATASETS and cfg.name.startswith("digits"):
        try:
            importlib.import_module("udaseg.data.digits")
        except ModuleNotFoundError as err:
            if err.name != "udaseg.data.digits":
                raise
            raise UserError(f"dataset '{cfg.name}' needs udaseg.data.digits, which this installation lacks") from None
    if cfg.name not in DATASETS:
        match = difflib.get_close_matches(cfg.name, list(DATASETS), n=1, cutoff=0.5)
        hint = f"; did you mean '{match[0]}'?" if match else f"; known datasets: {', '.join(sorted(DATASETS))}"
        raise UserError(f"unknown dataset '{cfg.name}'{hint}")
    if cfg.monitor_labels and not cfg.labelled:
        return MonitorLabels(_with_cache(DATASETS[cfg.name](dataclasses.replace(cfg, labelled=True), mean, std), cfg))
    return _with_cache(DATASETS[cfg.name](cfg, mean, std), cfg)


def _with_cache(dataset: torch.utils.data.Dataset, cfg: DatasetConfig) -> torch.utils.data.Dataset:
    """Attach ``cfg.resized_cache`` (checked against ``cfg.resize``) to a file-based dataset."""
    if not cfg.resized_cache:
        return dataset
    if not isinstance(dataset, SegmentationDataset):
        raise UserError(f"{cfg.name}: resized_cache applies to file datasets only")
    from udaseg.data.resized_cache import check_cache

    dataset.resized_cache = check_cache(Path(cfg.resized_cache), cfg)
    return dataset


# --------------------------------------------------------------------------------------------
# Discovering files
# --------------------------------------------------------------------------------------------


def _root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset '{cfg.name}' needs a root folder (config key 'root' is empty)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"{cfg.name}: dataset root not found: {root}")
    return root


def _require_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{dataset}: folder not found: {path} (expected layout: {layout})")
    return path


def _files(folder: Path, suffixes: Iterable[str], recursive: bool = True,
           exclude: Sequence[str] = ()) -> list[Path]:
    """Files under ``folder`` whose name ends with one of ``suffixes`` (case-insensitive), sorted."""
    ends = tuple(s.lower() for s in suffixes)
    pattern = "**/*" if recursive else "*"
    found = [p for p in folder.glob(pattern)
             if p.name.lower().endswith(ends) and not p.name.endswith(tuple(exclude)) and not p.name.startswith(".")
             and p.is_file()]
    return sorted(found)


def _keyed(files: Iterable[Path], folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map each file to its pairing key: the path relative to ``folder`` without the suffix."""
    keyed: dict[str, Path] = {}
    for path in files:
        rel = path.relative_to(folder).as_posix()
        for suffix in suffixes:
            if rel.lower().endswith(suffix.lower()):
                rel = rel[: len(rel) - len(suffix)]
                break
        keyed[rel] = path
    return keyed


def _pair(dataset: str, images: dict[str, Path], labels: dict[str, Path], image_dir: Path,
          label_dir: Path) -> list[tuple[str, Path, Path]]:
    missing_labels = sorted(set(images) - set(labels))
    if missing_labels:
        shown = ", ".join(images[k].name for k in missing_labels[:_SHOW])
        raise UserError(f"{dataset}: {len(missing_labels)} images in {image_dir} have no label in {label_dir} "
                        f"(first: {shown})")
    missing_images = sorted(set(labels) - set(images))
    if missing_images:
        shown = ", ".join(labels[k].name for k in missing_images[:_SHOW])
        raise UserError(f"{dataset}: {len(missing_images)} labels in {label_dir} have no image in {image_dir} "
                        f"(first: {shown})")
    return [(key, images[key], labels[key]) for key in sorted(images)]


def _nonempty(files: dict[str, Path], dataset: str, folder: Path, what: str = "images") -> dict[str, Path]:
    if not files:
        raise UserError(f"{dataset}: no {what} found in {folder} (empty split?)")
    return files


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _list_file_filter(images: dict[str, Path], root: Path, split: str, dataset: str,
                      default_splits: Sequence[str] = ("train", "all")) -> dict[str, Path]:
    """GTA5 / SYNTHIA have no official split: ``train``/``all`` use every image, any other split
    name reads ``<root>/<split>.txt`` (one image stem per line)."""
    if split in default_splits:
        return images
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise UserError(f"{dataset}: split '{split}' needs a list file {list_file} (one image stem per line); "
                        f"use split 'train' for all images")
    wanted = [Path(line.strip()).stem for line in list_file.read_text().splitlines() if line.strip()]
    unknown = [w for w in wanted if w not in images]
    if unknown:
        raise UserError(f"{dataset}: {list_file} names {len(unknown)} images that do not exist "
                        f"(first: {', '.join(unknown[:_SHOW])})")
    return {w: images[w] for w in wanted}


def _converted_samples(
    dataset: str, root: Path, pairs: list[tuple[str, Path, Path]], reader: str, table: str,
    converted_path: Callable[[Path], Path], existing: set[Path],
) -> list[Sample]:
    """Samples whose raw labels map through ``table``; a prepared trainId file is used when present."""
    samples = []
    for _, image, raw in pairs:
        converted = converted_path(raw)
        done = converted in existing
        samples.append(Sample(
            image=image, name=_rel(image, root),
            label=converted if done else raw,
            label_reader="index" if done else reader,
            label_table=None if done else table,
            raw_label=raw, raw_reader=reader, raw_table=table, converted=converted))
    return samples


def _unlabelled(dataset: str, root: Path, images: dict[str, Path]) -> list[Sample]:
    return [Sample(image=path, name=_rel(path, root)) for _, path in sorted(images.items())]


def _trainid_suffix(raw: Path) -> Path:
    return raw.with_name(raw.name[: -len(".png")] + TRAINID_SUFFIX)


def _pipeline(cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    return Pipeline.from_config(cfg, mean, std)


# --------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------


@register_dataset("gta5")
class GTA5Dataset(SegmentationDataset):
    """GTA5 (Richter et al. 2016): ``images/00001.png``, ``labels/00001.png`` in Cityscapes
    labelIds (``labels/00001_labelTrainIds.png`` once prepared)."""

    LAYOUT = "<root>/images/*.png and <root>/labels/*.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        image_dir = _require_dir(root / "images", "gta5", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, IMAGE_SUFFIXES, recursive=False), image_dir, IMAGE_SUFFIXES),
                           "gta5", image_dir)
        images = _list_file_filter(images, root, cfg.split, "gta5")
        if cfg.labelled:
            label_dir = _require_dir(root / "labels", "gta5", self.LAYOUT)
            pairs, existing = _raw_label_pairs("gta5", images, image_dir, label_dir, cfg.split)
            samples = _converted_samples("gta5", root, pairs, "index", "gta5", _trainid_suffix, existing)
        else:
            samples = _unlabelled("gta5", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "gta5")


def _raw_label_pairs(dataset: str, images: dict[str, Path], image_dir: Path, label_dir: Path, split: str):
    """Pair images with the raw label PNGs of ``label_dir`` (GTA5, SYNTHIA); also return the
    ``*_labelTrainIds.png`` files ``udaseg prepare`` has already written there."""
    all_pngs = _files(label_dir, [".png"], recursive=False)
    existing = {p for p in all_pngs if p.name.endswith(TRAINID_SUFFIX)}
    raw = _keyed([p for p in all_pngs if p not in existing], label_dir, [".png"])
    if split not in ("train", "all"):
        raw = {k: v for k, v in raw.items() if k in images}
    return _pair(dataset, images, raw, image_dir, label_dir), existing


@register_dataset("synthia")
class SynthiaDataset(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/0000000.png``, ``GT/LABELS/0000000.png`` (16-bit, class id in
    the first channel; ``GT/LABELS/0000000_labelTrainIds.png`` once prepared)."""

    LAYOUT = "<root>/RGB/*.png and <root>/GT/LABELS/*.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        image_dir = _require_dir(root / "RGB", "synthia", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, IMAGE_SUFFIXES, recursive=False), image_dir, IMAGE_SUFFIXES),
                           "synthia", image_dir)
        images = _list_file_filter(images, root, cfg.split, "synthia")
        if cfg.labelled:
            label_dir = _require_dir(root / "GT" / "LABELS", "synthia", self.LAYOUT)
            pairs, existing = _raw_label_pairs("synthia", images, image_dir, label_dir, cfg.split)
            samples = _converted_samples("synthia", root, pairs, "synthia", "synthia", _trainid_suffix, existing)
        else:
            samples = _unlabelled("synthia", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "synthia")


@register_dataset("cityscapes")
class CityscapesDataset(SegmentationDataset):
    """Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` (or ``*_gtFine_labelIds.png``, mapped)."""

    LAYOUT = "<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png and <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"
    IMAGE_SUFFIX = "_leftImg8bit.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        image_dir = _require_dir(root / "leftImg8bit" / cfg.split, "cityscapes", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, [self.IMAGE_SUFFIX]), image_dir, [self.IMAGE_SUFFIX]),
                           "cityscapes", image_dir)
        if cfg.labelled:
            label_dir = _require_dir(root / "gtFine" / cfg.split, "cityscapes", self.LAYOUT)
            train_ids = _keyed(_files(label_dir, ["_gtFine_labelTrainIds.png"]), label_dir,
                               ["_gtFine_labelTrainIds.png"])
            label_ids = _keyed(_files(label_dir, ["_gtFine_labelIds.png"]), label_dir, ["_gtFine_labelIds.png"])
            labels = {**label_ids, **train_ids}
            pairs = _pair("cityscapes", images, labels, image_dir, label_dir)
            samples = []
            for key, image, label in pairs:
                raw = label_ids.get(key)
                converted = label_dir / f"{key}_gtFine_labelTrainIds.png"
                done = key in train_ids
                samples.append(Sample(
                    image=image, name=_rel(image, root), label=label,
                    label_table=None if done else "cityscapes", raw_label=raw, raw_table="cityscapes",
                    converted=converted))
        else:
            samples = _unlabelled("cityscapes", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "cityscapes")


def _read_corresp(corresp_dir: Path) -> dict[str, str]:
    """Dark Zurich night -> day keys from ``corresp/train/night/*.csv``: each row holds a night
    key ``train/night/<seq>/<frame>`` and a day key ``train/day/<seq>/<frame>``."""
    pairs: dict[str, str] = {}
    for csv_file in sorted(corresp_dir.glob("*.csv")):
        with open(csv_file, newline="") as handle:
            for row in csv.reader(handle):
                cells = [c.strip() for c in row if c.strip()]
                if len(cells) < 2 or "/" not in cells[0]:
                    continue
                night, day = (c.removesuffix(".png").removesuffix("_rgb_anon") for c in cells[:2])
                pairs[night] = day
    return pairs


@register_dataset("darkzurich")
class DarkZurichDataset(SegmentationDataset):
    """Dark Zurich: ``rgb_anon/{split}/{night|day|twilight}/GOPRxxxx/*_rgb_anon.png``; val labels in
    ``gt/val/night/GOPRxxxx/*_gt_labelTrainIds.png``; train and test are unlabelled.

    Options: ``time`` (night | day | twilight, default night); ``paired_day`` (train night only):
    also return the corresponding day image (``corresp/train/night/*.csv``) as ``day_image``, resized,
    cropped and flipped with the night image.
    """

    LAYOUT = "<root>/rgb_anon/<split>/<night|day|twilight>/GOPRxxxx/*_rgb_anon.png"
    IMAGE_SUFFIX = "_rgb_anon.png"
    LABEL_SUFFIX = "_gt_labelTrainIds.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        time = str(cfg.options.get("time", "night"))
        if time not in ("night", "day", "twilight"):
            raise UserError(f"darkzurich: option 'time' must be night, day or twilight, got {time!r}")
        image_dir = _require_dir(root / "rgb_anon" / cfg.split / time, "darkzurich", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, [self.IMAGE_SUFFIX]), image_dir, [self.IMAGE_SUFFIX]),
                           "darkzurich", image_dir)
        if cfg.labelled:
            label_dir = root / "gt" / cfg.split / time
            if not label_dir.is_dir():
                raise UserError(f"darkzurich: split '{cfg.split}/{time}' has no labels ({label_dir} not found); "
                                f"set labelled: false for an unlabelled target")
            labels = _keyed(_files(label_dir, [self.LABEL_SUFFIX]), label_dir, [self.LABEL_SUFFIX])
            pairs = _pair("darkzurich", images, labels, image_dir, label_dir)
            samples = [Sample(image=i, name=_rel(i, root), label=lbl) for _, i, lbl in pairs]
        else:
            samples = _unlabelled("darkzurich", root, images)
        if cfg.options.get("paired_day", False):
            self._attach_day_images(samples, root, cfg.split, time)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "darkzurich")

    def _attach_day_images(self, samples: list[Sample], root: Path, split: str, time: str) -> None:
        if (split, time) != ("train", "night"):
            raise UserError("darkzurich: option 'paired_day' needs split 'train' with time 'night'")
        corresp_dir = _require_dir(root / "corresp" / "train" / "night", "darkzurich",
                                   "<root>/corresp/train/night/*.csv")
        pairs = _read_corresp(corresp_dir)
        for sample in samples:
            night_key = sample.name.removeprefix("rgb_anon/").removesuffix(self.IMAGE_SUFFIX)
            if night_key not in pairs:
                raise UserError(f"darkzurich: {corresp_dir} has no day image for {night_key}")
            day = root / "rgb_anon" / f"{pairs[night_key]}{self.IMAGE_SUFFIX}"
            if not day.is_file():
                raise UserError(f"darkzurich: day image not found: {day} (paired with {night_key})")
            sample.extra_images["day_image"] = day


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@register_dataset("acdc")
class ACDCDataset(SegmentationDataset):
    """ACDC: ``rgb_anon/{condition}/{split}/{seq}/*_rgb_anon.png`` and
    ``gt/{condition}/{split}/{seq}/*_gt_labelTrainIds.png``; the test split is unlabelled.

    Option ``conditions``: a list (or one name) of fog, night, rain, snow; default all four.
    """

    LAYOUT = "<root>/rgb_anon/<condition>/<split>/<seq>/*_rgb_anon.png"
    IMAGE_SUFFIX = "_rgb_anon.png"
    LABEL_SUFFIX = "_gt_labelTrainIds.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        conditions = cfg.options.get("conditions", list(ACDC_CONDITIONS))
        conditions = [conditions] if isinstance(conditions, str) else list(conditions)
        for cond in conditions:
            if cond not in ACDC_CONDITIONS:
                raise UserError(f"acdc: unknown condition {cond!r} in option 'conditions' "
                                f"(choose from {', '.join(ACDC_CONDITIONS)})")
        samples: list[Sample] = []
        for cond in conditions:
            image_dir = _require_dir(root / "rgb_anon" / cond / cfg.split, "acdc", self.LAYOUT)
            images = _nonempty(_keyed(_files(image_dir, [self.IMAGE_SUFFIX]), image_dir, [self.IMAGE_SUFFIX]),
                               "acdc", image_dir)
            if cfg.labelled:
                label_dir = root / "gt" / cond / cfg.split
                if not label_dir.is_dir():
                    raise UserError(f"acdc: split '{cond}/{cfg.split}' has no labels ({label_dir} not found); "
                                    f"set labelled: false for an unlabelled target")
                labels = _keyed(_files(label_dir, [self.LABEL_SUFFIX]), label_dir, [self.LABEL_SUFFIX])
                pairs = _pair("acdc", images, labels, image_dir, label_dir)
                samples += [Sample(image=i, name=_rel(i, root), label=lbl) for _, i, lbl in pairs]
            else:
                samples += _unlabelled("acdc", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "acdc")


@register_dataset("bdd100k")
class BDD100KDataset(SegmentationDataset):
    """BDD100K semantic segmentation (labels already trainIds): ``images/10k/{split}/*.jpg`` with
    ``labels/sem_seg/masks/{split}/*.png``, or the older ``seg/images/{split}/*.jpg`` with
    ``seg/labels/{split}/*_train_id.png``."""

    LAYOUT = "<root>/images/10k/<split>/*.jpg and <root>/labels/sem_seg/masks/<split>/*.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        if (root / "images" / "10k").is_dir():
            image_dir = root / "images" / "10k" / cfg.split
            label_dir = root / "labels" / "sem_seg" / "masks" / cfg.split
            label_suffix = ".png"
        elif (root / "seg" / "images").is_dir():
            image_dir = root / "seg" / "images" / cfg.split
            label_dir = root / "seg" / "labels" / cfg.split
            label_suffix = "_train_id.png"
        else:
            raise UserError(f"bdd100k: neither {root / 'images' / '10k'} nor {root / 'seg' / 'images'} exists "
                            f"(expected layout: {self.LAYOUT})")
        _require_dir(image_dir, "bdd100k", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, IMAGE_SUFFIXES, recursive=False), image_dir, IMAGE_SUFFIXES),
                           "bdd100k", image_dir)
        if cfg.labelled:
            _require_dir(label_dir, "bdd100k", self.LAYOUT)
            labels = _keyed(_files(label_dir, [label_suffix], recursive=False), label_dir, [label_suffix])
            pairs = _pair("bdd100k", images, labels, image_dir, label_dir)
            samples = [Sample(image=i, name=_rel(i, root), label=lbl) for _, i, lbl in pairs]
        else:
            samples = _unlabelled("bdd100k", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "bdd100k")


MAPILLARY_SPLITS = {"train": "training", "val": "validation", "test": "testing"}


@register_dataset("mapillary")
class MapillaryDataset(SegmentationDataset):
    """Mapillary Vistas v1.2, mapped to the 19 Cityscapes classes: ``{training|validation}/images/*.jpg``
    with ``.../v1.2/labels/*.png`` (or ``.../labels/*.png``) palette PNGs of label ids
    (``*_labelTrainIds.png`` next to them once prepared)."""

    LAYOUT = "<root>/<training|validation>/images/*.jpg and <root>/<training|validation>/v1.2/labels/*.png"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        split_dir = root / MAPILLARY_SPLITS.get(cfg.split, cfg.split)
        image_dir = _require_dir(split_dir / "images", "mapillary", self.LAYOUT)
        images = _nonempty(_keyed(_files(image_dir, IMAGE_SUFFIXES, recursive=False), image_dir, IMAGE_SUFFIXES),
                           "mapillary", image_dir)
        if cfg.labelled:
            label_dir = split_dir / "v1.2" / "labels"
            if not label_dir.is_dir():
                label_dir = _require_dir(split_dir / "labels", "mapillary", self.LAYOUT)
            all_pngs = _files(label_dir, [".png"], recursive=False)
            existing = {p for p in all_pngs if p.name.endswith(TRAINID_SUFFIX)}
            raw = _keyed([p for p in all_pngs if p not in existing], label_dir, [".png"])
            pairs = _pair("mapillary", images, raw, image_dir, label_dir)
            samples = _converted_samples("mapillary", root, pairs, "mapillary", "mapillary", _trainid_suffix,
                                         existing)
        else:
            samples = _unlabelled("mapillary", root, images)
        super().__init__(samples, CITYSCAPES_CLASSES, _pipeline(cfg, mean, std), root, cfg.labelled, "mapillary")


def load_class_file(path: Path) -> tuple[ClassSet, int]:
    """A user class list from ``classes.yaml``: ``classes: [...]``, optional ``palette: [[r,g,b],...]``
    and ``ignore_index`` (default 255). Returns the class set (whose ignore index is 255, the value
    items carry) and the ignore value the label files use."""
    if not path.is_file():
        raise UserError(f"folder dataset: class file not found: {path} (it lists 'classes: [...]')")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"cannot parse {path}: {_one_line(err)}") from None
    if not isinstance(data, dict) or "classes" not in data:
        raise UserError(f"{path}: expected a mapping with a 'classes' list")
    names = data["classes"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: 'classes' must be a non-empty list of names")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not len(names) <= ignore <= 255:
        raise UserError(f"{path}: 'ignore_index' must be an int in {len(names)}..255, got {ignore!r}")
    if len(names) > 255:
        raise UserError(f"{path}: at most 255 classes are supported, got {len(names)}")
    palette = data.get("palette")
    if palette is None:
        palette = _default_palette(len(names))
    if (not isinstance(palette, list) or len(palette) != len(names)
            or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                       for c in palette)):
        raise UserError(f"{path}: 'palette' must list one [r, g, b] (0-255) per class ({len(names)} entries)")
    classes = ClassSet(name=path.parent.name, names=tuple(names), palette=tuple(tuple(c) for c in palette))
    return classes, ignore


def _default_palette(n: int) -> list[list[int]]:
    """Distinct colours for user classes: the Cityscapes palette, then a fixed pseudo-random one."""
    colours = [list(c) for c in CITYSCAPES_CLASSES.palette]
    rng = np.random.default_rng(0)
    while len(colours) < n:
        colours.append([int(v) for v in rng.integers(0, 256, 3)])
    return colours[:n]


@register_dataset("folder")
class FolderDataset(SegmentationDataset):
    """A user dataset: ``images/`` (any common image format), ``labels/`` (PNG of class indices,
    same stem) and ``classes.yaml``; ``images/<split>`` and ``labels/<split>`` are used when present."""

    LAYOUT = "<root>/images/*, <root>/labels/*.png, <root>/classes.yaml"

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        root = _root(cfg)
        classes, ignore = load_class_file(root / "classes.yaml")
        image_dir = _require_dir(root / "images", "folder", self.LAYOUT)
        label_dir = root / "labels"
        if (image_dir / cfg.split).is_dir():
            image_dir, label_dir = image_dir / cfg.split, label_dir / cfg.split
        images = _nonempty(_keyed(_files(image_dir, IMAGE_SUFFIXES, recursive=False), image_dir, IMAGE_SUFFIXES),
                           "folder", image_dir)
        if cfg.labelled:
            _require_dir(label_dir, "folder", self.LAYOUT)
            labels = _keyed(_files(label_dir, [".png"], recursive=False), label_dir, [".png"])
            pairs = _pair("folder", images, labels, image_dir, label_dir)
            samples = [Sample(image=i, name=_rel(i, root), label=lbl) for _, i, lbl in pairs]
        else:
            samples = _unlabelled("folder", root, images)
        lookup = trainid_table(classes.num_classes, ignore_index=ignore)
        super().__init__(samples, classes, _pipeline(cfg, mean, std), root, cfg.labelled, "folder",
                         strict_labels=True, trainid_lookup=lookup)
        self.class_file = root / "classes.yaml"
