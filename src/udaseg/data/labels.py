"""Class sets, palettes and the id -> trainId tables of every supported dataset.

Every dataset is mapped onto the 19 Cityscapes training classes (trainIds 0..18, 255 = ignore),
except user ``folder`` datasets, which bring their own class list.

An id table is a 1-D ``int16`` array indexed by the dataset's raw label value: ``table[v]`` is the
trainId of ``v``, 255 for values the dataset defines but the benchmark ignores, and ``UNMAPPED``
(-1) for values the dataset does not define at all. ``map_ids`` counts the latter, so a loader can
tell a user that their label files hold unexpected values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

IGNORE_INDEX = 255
UNMAPPED = -1
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ClassSet:
    """The classes a model predicts: names, a colour per class and the ignore index."""

    name: str
    names: tuple[str, ...]
    palette: tuple[RGB, ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(f"class set '{self.name}': {len(self.names)} names but {len(self.palette)} colours")
        if self.ignore_index < len(self.names):
            raise ValueError(f"class set '{self.name}': ignore index {self.ignore_index} is a class index")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette_array(self) -> np.ndarray:
        """The palette as a ``uint8`` array of shape ``K×3``."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)


CITYSCAPES_CLASSES = ClassSet(
    name="cityscapes",
    names=(
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ),
    palette=(
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ),
)

# Class subsets the mIoU is averaged over. SYNTHIA has no terrain, truck or train ("16"); its
# "13" protocol (mIoU*) also drops wall, fence and pole.
_ALL_19 = tuple(range(19))
PROTOCOLS: dict[str, tuple[int, ...]] = {
    "19": _ALL_19,
    "16": tuple(c for c in _ALL_19 if c not in (9, 14, 16)),
    "13": tuple(c for c in _ALL_19 if c not in (9, 14, 16, 3, 4, 5)),
}


def make_id_table(mapping: Mapping[int, int], known: Sequence[int], size: int = 256) -> np.ndarray:
    """An id table of ``size`` entries: ``mapping`` gives trainIds, other ``known`` ids map to 255,
    every remaining value is ``UNMAPPED``."""
    table = np.full(size, UNMAPPED, dtype=np.int16)
    for raw in known:
        table[raw] = IGNORE_INDEX
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


# Cityscapes labelIds (cityscapesScripts); GTA5 uses the same ids. 0..33 are defined, 255 is the
# value the license-plate id (-1) takes in 8-bit label files.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_ID_TABLE = make_id_table(CITYSCAPES_ID_TO_TRAINID, known=list(range(34)) + [255])

# SYNTHIA-RAND-CITYSCAPES class ids (0 void, 1..22); terrain, truck and train never occur in the
# data but keep their standard entries.
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
SYNTHIA_ID_TABLE = make_id_table(SYNTHIA_ID_TO_TRAINID, known=range(23))

# Mapillary Vistas v1.2: the 66 labels of config_v1.2.json in id order (name, colour).
MAPILLARY_V12_LABELS: tuple[tuple[str, RGB], ...] = (
    ("animal--bird", (165, 42, 42)), ("animal--ground-animal", (0, 192, 0)),
    ("construction--barrier--curb", (196, 196, 196)), ("construction--barrier--fence", (190, 153, 153)),
    ("construction--barrier--guard-rail", (180, 165, 180)),
    ("construction--barrier--other-barrier", (90, 120, 150)),
    ("construction--barrier--wall", (102, 102, 156)), ("construction--flat--bike-lane", (128, 64, 255)),
    ("construction--flat--crosswalk-plain", (140, 140, 200)),
    ("construction--flat--curb-cut", (170, 170, 170)), ("construction--flat--parking", (250, 170, 160)),
    ("construction--flat--pedestrian-area", (96, 96, 96)),
    ("construction--flat--rail-track", (230, 150, 140)), ("construction--flat--road", (128, 64, 128)),
    ("construction--flat--service-lane", (110, 110, 110)),
    ("construction--flat--sidewalk", (244, 35, 232)),
    ("construction--structure--bridge", (150, 100, 100)),
    ("construction--structure--building", (70, 70, 70)),
    ("construction--structure--tunnel", (150, 120, 90)), ("human--person", (220, 20, 60)),
    ("human--rider--bicyclist", (255, 0, 0)), ("human--rider--motorcyclist", (255, 0, 100)),
    ("human--rider--other-rider", (255, 0, 200)), ("marking--crosswalk-zebra", (200, 128, 128)),
    ("marking--general", (255, 255, 255)), ("nature--mountain", (64, 170, 64)),
    ("nature--sand", (230, 160, 50)), ("nature--sky", (70, 130, 180)), ("nature--snow", (190, 255, 255)),
    ("nature--terrain", (152, 251, 152)), ("nature--vegetation", (107, 142, 35)),
    ("nature--water", (0, 170, 30)), ("object--banner", (255, 255, 128)), ("object--bench", (250, 0, 30)),
    ("object--bike-rack", (100, 140, 180)), ("object--billboard", (220, 220, 220)),
    ("object--catch-basin", (220, 128, 128)), ("object--cctv-camera", (222, 40, 40)),
    ("object--fire-hydrant", (100, 170, 30)), ("object--junction-box", (40, 40, 40)),
    ("object--mailbox", (33, 33, 33)), ("object--manhole", (100, 128, 160)),
    ("object--phone-booth", (142, 0, 0)), ("object--pothole", (70, 100, 150)),
    ("object--street-light", (210, 170, 100)), ("object--support--pole", (153, 153, 153)),
    ("object--support--traffic-sign-frame", (128, 128, 128)),
    ("object--support--utility-pole", (0, 0, 80)), ("object--traffic-light", (250, 170, 30)),
    ("object--traffic-sign--back", (192, 192, 192)), ("object--traffic-sign--front", (220, 220, 0)),
    ("object--trash-can", (140, 140, 20)), ("object--vehicle--bicycle", (119, 11, 32)),
    ("object--vehicle--boat", (150, 0, 255)), ("object--vehicle--bus", (0, 60, 100)),
    ("object--vehicle--car", (0, 0, 142)), ("object--vehicle--caravan", (0, 0, 90)),
    ("object--vehicle--motorcycle", (0, 0, 230)), ("object--vehicle--on-rails", (0, 80, 100)),
    ("object--vehicle--other-vehicle", (128, 64, 64)), ("object--vehicle--trailer", (0, 0, 110)),
    ("object--vehicle--truck", (0, 0, 70)), ("object--vehicle--wheeled-slow", (0, 0, 192)),
    ("void--car-mount", (32, 32, 32)), ("void--ego-vehicle", (120, 10, 10)),
    ("void--unlabeled", (0, 0, 0)),
)

# The Mapillary -> Cityscapes mapping used by the domain-generalisation literature (the openseg
# converter that RobustNet-style evaluations and mmseg DG code bases share): road absorbs bike
# lane, plain crosswalk, parking, service lane and lane markings; sidewalk absorbs curb, curb cut
# and pedestrian area; all three rider kinds are rider; street lights and utility poles are poles;
# every traffic-sign part (front, back, frame) is a traffic sign; "on rails" is train.
MAPILLARY_LABEL_TO_TRAINID: dict[str, int] = {
    "construction--flat--road": 0, "construction--flat--bike-lane": 0,
    "construction--flat--crosswalk-plain": 0, "construction--flat--parking": 0,
    "construction--flat--service-lane": 0, "marking--crosswalk-zebra": 0, "marking--general": 0,
    "construction--flat--sidewalk": 1, "construction--barrier--curb": 1,
    "construction--flat--curb-cut": 1, "construction--flat--pedestrian-area": 1,
    "construction--structure--building": 2,
    "construction--barrier--wall": 3,
    "construction--barrier--fence": 4,
    "object--support--pole": 5, "object--support--utility-pole": 5, "object--street-light": 5,
    "object--traffic-light": 6,
    "object--traffic-sign--front": 7, "object--traffic-sign--back": 7,
    "object--support--traffic-sign-frame": 7,
    "nature--vegetation": 8,
    "nature--terrain": 9,
    "nature--sky": 10,
    "human--person": 11,
    "human--rider--bicyclist": 12, "human--rider--motorcyclist": 12, "human--rider--other-rider": 12,
    "object--vehicle--car": 13,
    "object--vehicle--truck": 14,
    "object--vehicle--bus": 15,
    "object--vehicle--on-rails": 16,
    "object--vehicle--motorcycle": 17,
    "object--vehicle--bicycle": 18,
}
MAPILLARY_ID_TO_TRAINID: dict[int, int] = {
    label_id: MAPILLARY_LABEL_TO_TRAINID[name]
    for label_id, (name, _) in enumerate(MAPILLARY_V12_LABELS)
    if name in MAPILLARY_LABEL_TO_TRAINID
}
MAPILLARY_ID_TABLE = make_id_table(MAPILLARY_ID_TO_TRAINID, known=range(len(MAPILLARY_V12_LABELS)))


def trainid_table(num_classes: int = 19, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The table of a dataset whose labels are already class indices (BDD100K, Dark Zurich,
    ACDC, prepared files): identity on ``0..num_classes-1``, ``ignore_index`` -> 255."""
    return make_id_table({c: c for c in range(num_classes)}, known=[ignore_index])


ID_TABLES: dict[str, np.ndarray] = {
    "cityscapes": CITYSCAPES_ID_TABLE,
    "gta5": CITYSCAPES_ID_TABLE,
    "synthia": SYNTHIA_ID_TABLE,
    "mapillary": MAPILLARY_ID_TABLE,
    "trainid": trainid_table(19),
}


def map_ids(array: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, int]:
    """Map raw label values to trainIds with ``table``.

    Returns the ``uint8`` trainId array (same shape) and the number of pixels whose value the table
    does not define (outside the table or ``UNMAPPED``); those pixels become 255.
    """
    values = np.asarray(array)
    if values.dtype.kind not in "ui":
        raise TypeError(f"label arrays must hold integers, got {values.dtype}")
    lut = np.where(table < 0, IGNORE_INDEX, table).astype(np.uint8)
    if values.dtype == np.uint8 and table.size >= 256:
        counts = np.bincount(values.ravel(), minlength=256)
        n_unmapped = int(counts[:256][table[:256] < 0].sum())
        return lut[values], n_unmapped
    inside = (values >= 0) & (values < table.size)
    safe = np.where(inside, values, 0).astype(np.intp)
    mapped = table[safe]
    unknown = ~inside | (mapped < 0)
    out = lut[safe]
    out[unknown] = IGNORE_INDEX
    return out, int(np.count_nonzero(unknown))


def colorize(label: np.ndarray, palette: Sequence[RGB] | np.ndarray) -> np.ndarray:
    """Colour a label map: ``H×W`` class indices -> ``H×W×3`` ``uint8``. Ignore (255) and values
    without a colour are black."""
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(len(colours), 255)] = colours[:255]
    values = np.asarray(label)
    if values.dtype != np.uint8:
        values = np.where((values >= 0) & (values < 256), values, IGNORE_INDEX).astype(np.uint8)
    return lut[values]


def palette_lookup(rgb: np.ndarray, colours: Sequence[RGB]) -> tuple[np.ndarray, np.ndarray]:
    """Turn an ``H×W×3`` colour-coded label into indices of ``colours``.

    Returns ``(indices int64 H×W, known bool H×W)``; pixels of an unknown colour get index 0 and
    ``known = False``.
    """
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = np.asarray([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
    order = np.argsort(table)
    sorted_codes = table[order]
    pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(table) - 1)
    known = sorted_codes[pos] == codes
    return np.where(known, order[pos], 0), known


def protocol_classes(protocol: str, num_classes: Optional[int] = None) -> tuple[int, ...]:
    """The class indices of an evaluation protocol ("19", "16", "13"; "all" = every class)."""
    if protocol == "all":
        return tuple(range(num_classes if num_classes is not None else 19))
    return PROTOCOLS[protocol]
