"""The embedded "digits" domain-shift benchmark.

A small semantic-segmentation benchmark built on first use from data that ships inside installed
packages, so the whole pipeline runs without downloads:

* objects: the 1797 real handwritten 8×8 digits of scikit-learn (``load_digits``, 17 grey levels);
* textures: the colour photographs shipped with scikit-image (``skimage.data``).

Each image is a ``S×S`` RGB scene (``S = 64`` by default) with 2–5 digits, each a smooth (bicubic)
upsampling of one 8×8 digit to a random size. The stroke intensity ``a ∈ [0, 1]`` of a scene (the
maximum over its digits) decides both the rendering and the labels:

* label ``1 + d`` (digit ``d``) where ``a > 0.5`` for that digit, ``0`` (background) where every
  digit has ``a ≤ 0.25``, and ``255`` (ignore) in the thin band ``0.25 < a ≤ 0.5`` around strokes;
* ``digits-clean`` (source): ``x = (1 - a)·bg + a·fg`` with a light, mildly textured, tinted
  background ``bg`` and a dark ink colour ``fg``;
* ``digits-photo`` (target, MNIST-M style, Ganin & Lempitsky 2015): ``x = |P - 255·a|`` per channel
  for a photo patch ``P``, i.e. the photo is the background and its colour inversion is the digit;
* ``digits-night`` (target, mirrors Cityscapes → Dark Zurich): a clean-style scene lit by a dim,
  vignetted ambient light and a few coloured light sources, with sensor noise.

Splits: ``train`` and ``val`` per domain. They use disjoint digit instances (contiguous index blocks
of ``load_digits``: the first 80 % for train, the rest for val; writer ids are not shipped with the
data) and disjoint photo regions (the left 70 % of every photo's columns for train, the right 30 %
for val). Every image records its provenance (digit instance indices, photo index and crop box).

The arrays are cached as compressed ``.npz`` files (byte-for-byte deterministic, written atomically)
with one manifest JSON per domain holding the generator version, seed, shapes and SHA-256 of each
file. A damaged or mismatching cache is detected on load and rebuilt with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from PIL import Image

from udaseg.config.schema import DatasetConfig
from udaseg.data.datasets import register_dataset
from udaseg.data.labels import ClassSet
from udaseg.data.transforms import Pipeline
from udaseg.errors import UserError

GENERATOR_VERSION = 1
DOMAINS = ("digits-clean", "digits-photo", "digits-night")
SPLITS = ("train", "val")
CLASS_NAMES = ("background",) + tuple(str(d) for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
# background grey, then ten well separated hues
PALETTE = (
    (128, 128, 128),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (170, 110, 40),
    (0, 0, 128),
)

# Pixels of a digit with stroke intensity above this are labelled as that digit ...
LABEL_THRESHOLD = 0.5
# ... and pixels between this and LABEL_THRESHOLD (not covered by another digit) are ignored.
IGNORE_THRESHOLD = 0.25

TRAIN_DIGIT_FRACTION = 0.8
TRAIN_PHOTO_FRACTION = 0.7
MAX_DIGITS = 5
DIGIT_SIZE_RANGE = (14, 30)
MAX_BOX_OVERLAP = 0.2  # overlap area / smaller box area allowed between two digits of a scene
# colour photographs of skimage.data: (name, loader function name)
PHOTOS = (
    ("astronaut", "astronaut"),
    ("coffee", "coffee"),
    ("chelsea", "chelsea"),
    ("rocket", "rocket"),
    ("motorcycle", "stereo_motorcycle"),
    ("immunohistochemistry", "immunohistochemistry"),
)

_DOMAIN_CODES = {name: i for i, name in enumerate(DOMAINS)}
_SPLIT_CODES = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class BenchmarkSize:
    """Number of images per split and the side length of the square images."""

    train: int = 2000
    val: int = 300
    image_size: int = 64

    def __post_init__(self) -> None:
        for key in ("train", "val"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"digits option '{key}_size' must be a positive int, got {value!r}")
        if not isinstance(self.image_size, int) or not 32 <= self.image_size <= 512:
            raise UserError(f"digits option 'image_size' must be an int in [32, 512], got {self.image_size!r}")

    def count(self, split: str) -> int:
        return self.train if split == "train" else self.val


@dataclass
class DigitsSplit:
    """The arrays of one domain/split.

    ``images`` N×S×S×3 uint8 RGB, ``labels`` N×S×S uint8 (0 background, 1+d digit d, 255 ignore),
    ``digit_index`` N×5 int16 (``load_digits`` indices of the scene's digits, -1 padded),
    ``photo_index`` N int16 (index into ``PHOTOS``, -1 for none), ``photo_box`` N×4 int16 (x0, y0, x1, y1
    of the photo crop, -1 for none).
    """

    images: np.ndarray
    labels: np.ndarray
    digit_index: np.ndarray
    photo_index: np.ndarray
    photo_box: np.ndarray

    ARRAYS = ("images", "labels", "digit_index", "photo_index", "photo_box")

    def __len__(self) -> int:
        return len(self.images)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {key: getattr(self, key) for key in self.ARRAYS}


# --------------------------------------------------------------------------------------------
# Source data (optional packages)
# --------------------------------------------------------------------------------------------


def _import_optional(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"the digits benchmark needs '{module.split('.')[0]}'; install it with: pip install udaseg[bench]"
        ) from None


@functools.lru_cache(maxsize=1)
def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (N×8×8 float32 intensities in [0, 1], N int64 classes)."""
    datasets = _import_optional("sklearn.datasets")
    bunch = datasets.load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    return images, np.asarray(bunch.target, dtype=np.int64)


def digit_pool(split: str, total: int) -> np.ndarray:
    """Indices of the ``load_digits`` instances a split draws from (contiguous, disjoint blocks)."""
    cut = int(round(total * TRAIN_DIGIT_FRACTION))
    return np.arange(0, cut) if split == "train" else np.arange(cut, total)


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The colour photographs of ``PHOTOS`` as H×W×3 uint8 arrays."""
    data = _import_optional("skimage.data")
    photos = []
    for name, loader in PHOTOS:
        image = getattr(data, loader)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] < 3:
            raise RuntimeError(f"skimage.data.{loader} is not an RGB image")
        photos.append(np.ascontiguousarray(image[..., :3].astype(np.uint8)))
    return tuple(photos)


def photo_region(width: int, split: str) -> tuple[int, int]:
    """Column range ``[x0, x1)`` of a photo of this width that a split may crop from."""
    cut = int(width * TRAIN_PHOTO_FRACTION)
    return (0, cut) if split == "train" else (cut, width)


# --------------------------------------------------------------------------------------------
# Geometry: digit layouts and stroke maps
# --------------------------------------------------------------------------------------------


def _cubic_weights(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5)."""
    t = np.abs(distance)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


@functools.lru_cache(maxsize=None)
def resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``out×in`` matrix ``M`` with ``M @ v`` the bicubic resampling of ``v`` (zero outside it).

    Output pixel ``i`` samples the input at ``(i + 0.5)·in/out - 0.5`` (pixel-centre alignment).
    A 2-D image ``X`` resizes as ``M_h @ X @ M_w.T``.
    """
    centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    matrix = _cubic_weights(centres[:, None] - np.arange(in_size)[None, :])
    return matrix.astype(np.float32)


def render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """Upsample one 8×8 digit (intensities in [0, 1]) smoothly to ``size×size``, clipped to [0, 1]."""
    matrix = resize_matrix(size, digit.shape[0])
    return np.clip(matrix @ digit @ matrix.T, 0.0, 1.0)


def _box_overlap_ok(box: tuple[int, int, int], placed: list[tuple[int, int, int]]) -> bool:
    y, x, s = box
    for py, px, ps in placed:
        dy = min(y + s, py + ps) - max(y, py)
        dx = min(x + s, px + ps) - max(x, px)
        if dy > 0 and dx > 0 and dy * dx > MAX_BOX_OVERLAP * min(s, ps) ** 2:
            return False
    return True


def _size_range(count: int, image_size: int) -> tuple[int, int]:
    """Digit sizes for a scene of ``count`` digits: crowded scenes get smaller digits."""
    scale = image_size / 64.0
    low, high = DIGIT_SIZE_RANGE
    high = high - 2 * (count - 2)  # 30 for two digits ... 24 for five
    return max(4, int(round(low * scale))), max(5, int(round(high * scale)))


def sample_layouts(
    rng: np.random.Generator, count: int, pool: np.ndarray, digits: np.ndarray, targets: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place 2–5 digits per scene.

    Returns the stroke intensity ``a`` (N×S×S float32, maximum over the scene's digits), the labels
    (N×S×S uint8) and the digit instance indices (N×5 int16, -1 padded). Later digits are drawn on
    top: where a later digit's stroke is confident (``a > 0.5``) its label wins.
    """
    alpha = np.zeros((count, image_size, image_size), np.float32)
    labels = np.zeros((count, image_size, image_size), np.uint8)
    instances = np.full((count, MAX_DIGITS), -1, np.int16)
    for n in range(count):
        wanted = int(rng.integers(2, MAX_DIGITS + 1))
        low, high = _size_range(wanted, image_size)
        placed: list[tuple[int, int, int]] = []
        for _ in range(wanted):
            for _attempt in range(30):
                size = int(rng.integers(low, high + 1))
                y, x = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
                if _box_overlap_ok((y, x, size), placed):
                    break
            else:
                continue
            index = int(rng.choice(pool))
            stamp = render_digit(digits[index], size)
            _draw_stamp(alpha[n], labels[n], stamp, y, x, 1 + int(targets[index]))
            instances[n, len(placed)] = index
            placed.append((y, x, size))
    return alpha, labels, instances


def _draw_stamp(alpha: np.ndarray, labels: np.ndarray, stamp: np.ndarray, y: int, x: int, label: int) -> None:
    size = stamp.shape[0]
    window = (slice(y, y + size), slice(x, x + size))
    np.maximum(alpha[window], stamp, out=alpha[window])
    region = labels[window]
    region[(stamp > IGNORE_THRESHOLD) & (stamp <= LABEL_THRESHOLD) & (region == 0)] = IGNORE_INDEX
    region[stamp > LABEL_THRESHOLD] = label


# --------------------------------------------------------------------------------------------
# Appearance: one renderer per domain
# --------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, count: int, image_size: int, cells: int) -> np.ndarray:
    """Low-frequency noise: N×S×S, a bicubic upsampling of ``cells×cells`` standard normals."""
    matrix = resize_matrix(image_size, cells)
    coarse = rng.standard_normal((count, cells, cells)).astype(np.float32)
    # resampling zero-pads outside the grid, so renormalise by the weight sum to keep the borders alive
    norm = matrix.sum(axis=1)
    return (matrix @ coarse @ matrix.T) / (norm[:, None] * norm[None, :])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _clean_scene(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Dark ink on a light, tinted, mildly textured paper: float N×S×S×3 in 0–255 units."""
    count, size, _ = alpha.shape
    paper = rng.uniform(175.0, 240.0, size=(count, 1, 1, 3)).astype(np.float32)
    ink = rng.uniform(10.0, 80.0, size=(count, 1, 1, 3)).astype(np.float32)
    texture = 10.0 * smooth_noise(rng, count, size, 6)[..., None]
    texture = texture + 8.0 * smooth_noise(rng, count, size, 16)[..., None]
    background = paper + texture
    a = alpha[..., None]
    return (1.0 - a) * background + a * ink


def render_clean(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """The source domain: the clean scene plus a little pixel noise (N×S×S×3 uint8)."""
    scene = _clean_scene(rng, alpha)
    scene += 3.0 * rng.standard_normal(scene.shape, dtype=np.float32)
    return _to_uint8(scene)


def render_photo(
    rng: np.random.Generator, alpha: np.ndarray, photos: Sequence[np.ndarray], split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-M style blend ``|P - 255·a|`` with a photo patch ``P`` from the split's photo region.

    Returns the images (N×S×S×3 uint8), the photo indices (N) and the crop boxes (N×4, x0 y0 x1 y1).
    """
    count, size, _ = alpha.shape
    sources = [Image.fromarray(photo) for photo in photos]
    patches = np.empty((count, size, size, 3), np.float32)
    photo_index = rng.integers(0, len(photos), size=count).astype(np.int16)
    boxes = np.empty((count, 4), np.int16)
    for n in range(count):
        height, width = photos[photo_index[n]].shape[:2]
        x_low, x_high = photo_region(width, split)
        largest = min(x_high - x_low, height, int(2.5 * size))
        crop = int(rng.integers(min(size, largest), largest + 1))
        x0 = int(rng.integers(x_low, x_high - crop + 1))
        y0 = int(rng.integers(0, height - crop + 1))
        box = (x0, y0, x0 + crop, y0 + crop)
        patch = sources[photo_index[n]].resize((size, size), Image.BILINEAR, box=box)
        patches[n] = np.asarray(patch, np.float32)
        boxes[n] = box
    images = np.abs(patches - 255.0 * alpha[..., None])
    return _to_uint8(images), photo_index, boxes


# Colours of night light sources: sodium orange, cool white LED, red tail light, green sign.
_LIGHT_COLOURS = np.array(
    [[1.0, 0.62, 0.25], [0.75, 0.85, 1.0], [1.0, 0.25, 0.2], [0.35, 1.0, 0.55]], np.float32
)


def _night_illumination(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Per-pixel RGB gain N×S×S×3: dim vignetted ambient light plus 1–3 coloured Gaussian lights."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # in (0, 1)
    radius2 = (coords[:, None] - 0.5) ** 2 + (coords[None, :] - 0.5) ** 2
    vignette = np.clip(1.0 - 1.6 * radius2, 0.1, 1.0)
    ambient_tint = rng.uniform(0.7, 1.0, size=(count, 1, 1, 3)).astype(np.float32)
    ambient = rng.uniform(0.1, 0.22, size=(count, 1, 1, 1)).astype(np.float32) * ambient_tint
    gain = ambient * vignette[None, :, :, None]

    lights = 3
    active = np.arange(lights)[None, :] < rng.integers(1, lights + 1, size=(count, 1))
    centre = rng.uniform(-0.1, 1.1, size=(count, lights, 2)).astype(np.float32)
    sigma = rng.uniform(0.08, 0.3, size=(count, lights)).astype(np.float32)
    strength = rng.uniform(0.25, 0.8, size=(count, lights)).astype(np.float32) * active
    colour = _LIGHT_COLOURS[rng.integers(0, len(_LIGHT_COLOURS), size=(count, lights))]
    gy = np.exp(-((coords[None, None, :] - centre[..., 0:1]) ** 2) / (2 * sigma[..., None] ** 2))
    gx = np.exp(-((coords[None, None, :] - centre[..., 1:2]) ** 2) / (2 * sigma[..., None] ** 2))
    weighted = (strength[..., None] * colour).astype(np.float32)  # N×K×3
    # sum_k w_kc · gy_kh · gx_kw as one batched matmul: (N×H×K) @ (N×K×(W·3))
    lights_map = np.matmul(
        np.swapaxes(gy, 1, 2), (gx[..., None] * weighted[:, :, None, :]).reshape(count, lights, size * 3)
    ).reshape(count, size, size, 3)
    gain = gain + lights_map
    return gain.astype(np.float32)


def render_night(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """The night domain: a clean-style scene, lowered contrast, dark coloured lighting, sensor noise."""
    count, size, _ = alpha.shape
    scene = _clean_scene(rng, alpha)
    haze = rng.uniform(0.0, 0.35, size=(count, 1, 1, 1)).astype(np.float32)  # veiling glare
    scene = (1.0 - haze) * scene + haze * scene.mean(axis=(1, 2, 3), keepdims=True)
    lit = scene * _night_illumination(rng, count, size)
    noise_sigma = rng.uniform(2.0, 5.0, size=(count, 1, 1, 1)).astype(np.float32)
    shot = np.sqrt(np.maximum(lit, 0.0)) * 0.6  # photon noise grows with the signal
    lit += rng.standard_normal(lit.shape, dtype=np.float32) * np.sqrt(noise_sigma**2 + shot**2)
    return _to_uint8(lit)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _check_domain_split(domain: str, split: Optional[str] = None) -> None:
    if domain not in DOMAINS:
        raise UserError(f"unknown digits domain '{domain}'; expected one of {', '.join(DOMAINS)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split '{split}' for dataset '{domain}'; expected one of {', '.join(SPLITS)}")


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"digits seed must be a non-negative int, got {seed!r}")
    return seed


def generate_split(domain: str, split: str, seed: int = 0, size: BenchmarkSize = BenchmarkSize()) -> DigitsSplit:
    """Render one domain/split from scratch (deterministic in ``seed``, ``domain``, ``split``, ``size``)."""
    _check_domain_split(domain, split)
    _check_seed(seed)
    digits, targets = load_source_digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DOMAIN_CODES[domain], _SPLIT_CODES[split]]))
    count = size.count(split)
    alpha, labels, instances = sample_layouts(
        rng, count, digit_pool(split, len(digits)), digits, targets, size.image_size
    )
    photo_index = np.full(count, -1, np.int16)
    photo_box = np.full((count, 4), -1, np.int16)
    if domain == "digits-clean":
        images = render_clean(rng, alpha)
    elif domain == "digits-photo":
        images, photo_index, photo_box = render_photo(rng, alpha, load_photos(), split)
    else:
        images = render_night(rng, alpha)
    return DigitsSplit(images, labels, instances, photo_index, photo_box)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def default_root() -> Path:
    """``$XDG_CACHE_HOME/udaseg/digits``, or ``~/.cache/udaseg/digits``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "udaseg" / "digits"


def cache_dir(seed: int = 0, root: Optional[Path] = None, size: BenchmarkSize = BenchmarkSize()) -> Path:
    """The folder holding one (version, seed, size) build of the benchmark."""
    root = Path(root) if root else default_root()
    return root / f"v{GENERATOR_VERSION}-seed{seed}-{size.train}x{size.val}-{size.image_size}px"


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` with fixed zip timestamps, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; the cache is shared like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _manifest_path(directory: Path, domain: str) -> Path:
    return directory / f"{domain}.json"


def _split_path(directory: Path, domain: str, split: str) -> Path:
    return directory / f"{domain}-{split}.npz"


def _expected_manifest(domain: str, seed: int, size: BenchmarkSize) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "domain": domain,
        "seed": seed,
        "sizes": {"train": size.train, "val": size.val, "image_size": size.image_size},
        "classes": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "ignore_index": IGNORE_INDEX,
    }


def _provenance(domain: str, total_digits: int, photos: Sequence[np.ndarray]) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        pool = digit_pool(split, total_digits)
        entry: dict[str, Any] = {"digit_index_range": [int(pool[0]), int(pool[-1]) + 1]}
        if domain == "digits-photo":
            entry["photo_columns"] = {
                name: list(photo_region(photo.shape[1], split)) for (name, _), photo in zip(PHOTOS, photos)
            }
        splits[split] = entry
    return splits


def build_domain(
    domain: str, seed: int = 0, root: Optional[Path] = None, size: BenchmarkSize = BenchmarkSize()
) -> Path:
    """Generate both splits of a domain and write them (and the manifest, last) into the cache."""
    _check_domain_split(domain)
    directory = cache_dir(seed, root, size)
    manifest = _expected_manifest(domain, seed, size)
    files = {}
    for split in SPLITS:
        arrays = generate_split(domain, split, seed, size)
        data = _npz_bytes(arrays.as_dict())
        path = _split_path(directory, domain, split)
        _write_atomic(path, data)
        files[path.name] = {
            "split": split,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "shapes": {key: list(value.shape) for key, value in arrays.as_dict().items()},
        }
    photos = load_photos() if domain == "digits-photo" else ()
    manifest["photos"] = [name for name, _ in PHOTOS] if photos else []
    manifest["splits"] = _provenance(domain, len(load_source_digits()[0]), photos)
    manifest["files"] = files
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _write_atomic(_manifest_path(directory, domain), text.encode())
    return directory


class _InvalidCache(Exception):
    pass


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(
    domain: str, seed: int = 0, root: Optional[Path] = None, size: BenchmarkSize = BenchmarkSize()
) -> dict[str, Any]:
    """The manifest of a cached domain (building the domain first if needed)."""
    load_split(domain, "train", seed, root, size)
    return json.loads(_manifest_path(cache_dir(seed, root, size), domain).read_text())


def _load_verified(directory: Path, domain: str, split: str, seed: int, size: BenchmarkSize) -> DigitsSplit:
    manifest_path = _manifest_path(directory, domain)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise _InvalidCache(f"unreadable manifest {manifest_path.name}: {err}") from None
    expected = _expected_manifest(domain, seed, size)
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise _InvalidCache(f"manifest {manifest_path.name} has {key}={manifest.get(key)!r}, expected {value!r}")
    path = _split_path(directory, domain, split)
    entry = manifest.get("files", {}).get(path.name)
    if not isinstance(entry, dict):
        raise _InvalidCache(f"manifest {manifest_path.name} does not list {path.name}")
    try:
        if _sha256_file(path) != entry.get("sha256"):
            raise _InvalidCache(f"{path.name} does not match its SHA-256 in the manifest")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in DigitsSplit.ARRAYS}
    except _InvalidCache:
        raise
    except Exception as err:  # a truncated or garbled archive fails in many ways
        raise _InvalidCache(f"cannot read {path.name}: {err}") from None
    count = size.count(split)
    image_shape = (count, size.image_size, size.image_size, 3)
    if arrays["images"].shape != image_shape or arrays["labels"].shape != image_shape[:3]:
        raise _InvalidCache(f"{path.name} holds arrays of unexpected shape {arrays['images'].shape}")
    return DigitsSplit(**arrays)


def load_split(
    domain: str, split: str, seed: int = 0, root: Optional[Path] = None, size: BenchmarkSize = BenchmarkSize()
) -> DigitsSplit:
    """Load a domain/split from the cache, building (or rebuilding a damaged cache) first if needed."""
    _check_domain_split(domain, split)
    _check_seed(seed)
    directory = cache_dir(seed, root, size)
    if _manifest_path(directory, domain).exists():
        try:
            return _load_verified(directory, domain, split, seed, size)
        except _InvalidCache as why:
            warnings.warn(f"digits cache in {directory} is invalid ({why}); rebuilding {domain}", RuntimeWarning)
    try:
        build_domain(domain, seed, root, size)
    except OSError as err:
        raise UserError(f"cannot write the digits benchmark to {directory}: {err.strerror or err}") from None
    try:
        return _load_verified(directory, domain, split, seed, size)
    except _InvalidCache as why:
        raise UserError(f"the digits cache in {directory} cannot be read back after building it ({why})") from None


# --------------------------------------------------------------------------------------------
# Datasets (registered as digits-clean / digits-photo / digits-night)
# --------------------------------------------------------------------------------------------

DIGITS_CLASSES = ClassSet(name="digits", names=CLASS_NAMES, palette=PALETTE, ignore_index=IGNORE_INDEX)
DATASET_OPTIONS = ("seed", "train_size", "val_size", "image_size", "dev_fraction")
DEV_SPLIT = "dev"


def _int_option(options: dict, key: str, default: int, dataset: str) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{dataset}: option '{key}' must be an int, got {value!r}")
    return value


def options_from_config(cfg: DatasetConfig) -> tuple[int, BenchmarkSize]:
    """``(seed, size)`` from a dataset config's ``options`` (seed, train_size, val_size, image_size)."""
    options = dict(cfg.options or {})
    for key in options:
        if key not in DATASET_OPTIONS:
            raise UserError(
                f"{cfg.name}: unknown option '{key}'; digits datasets take {', '.join(DATASET_OPTIONS)}"
            )
    default = BenchmarkSize()
    seed = _check_seed(_int_option(options, "seed", 0, cfg.name))
    size = BenchmarkSize(
        train=_int_option(options, "train_size", default.train, cfg.name),
        val=_int_option(options, "val_size", default.val, cfg.name),
        image_size=_int_option(options, "image_size", default.image_size, cfg.name),
    )
    return seed, size


def dev_fraction_option(cfg: DatasetConfig) -> float:
    value = (cfg.options or {}).get("dev_fraction", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 0.5:
        raise UserError(f"{cfg.name}: option 'dev_fraction' must be a number in [0, 0.5], got {value!r}")
    return float(value)


def dev_holdout(count: int, fraction: float) -> int:
    """How many of ``count`` train images the ``dev`` split holds out (the last ones)."""
    return min(int(round(count * fraction)), count - 1) if fraction > 0 else 0


class DigitsDataset(torch.utils.data.Dataset):
    """One domain/split of the digits benchmark, with the shared resize/crop/flip/normalise pipeline.

    With ``options.dev_fraction = f > 0`` the last ``round(f·N)`` of the N train images form the
    ``dev`` split and ``train`` keeps the others: a labelled held-out part of the train distribution
    for choosing settings, so that the ``val`` split stays untouched until the report.

    Items follow the dataset contract: ``image`` float32 3×S×S, ``label`` int64 S×S (labelled only),
    ``name`` ``"<domain>/<split>/<index>.png"`` and ``index``. ``cfg.root`` is the cache root (empty:
    :func:`default_root`); ``cfg.options`` may set ``seed``, ``train_size``, ``val_size``, ``image_size``.
    """

    def __init__(self, cfg: DatasetConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        _check_domain_split(cfg.name, "train" if cfg.split == DEV_SPLIT else cfg.split)
        self.seed, self.size = options_from_config(cfg)
        dev_fraction = dev_fraction_option(cfg)
        if cfg.split == DEV_SPLIT and dev_fraction == 0:
            raise UserError(f"{cfg.name}: split 'dev' needs options.dev_fraction > 0")
        self.dataset_name = cfg.name
        self.split = cfg.split
        self.labelled = cfg.labelled
        self.classes = DIGITS_CLASSES
        cache_root = Path(cfg.root).expanduser() if cfg.root else None
        self.root = cache_dir(self.seed, cache_root, self.size)
        self.pipeline = Pipeline.from_config(cfg, mean, std)
        stored_split = "train" if cfg.split == DEV_SPLIT else cfg.split
        data = load_split(cfg.name, stored_split, self.seed, cache_root, self.size)
        self.images, self.labels = data.images, data.labels
        if stored_split == "train":
            held_out = dev_holdout(len(self.images), dev_fraction)
            keep = slice(len(self.images) - held_out, None) if cfg.split == DEV_SPLIT else slice(0, len(self.images) - held_out)
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.first_index = len(data.images) - len(self.images) if cfg.split == DEV_SPLIT else 0

    def __len__(self) -> int:
        return len(self.images)

    def sample_name(self, index: int) -> str:
        return f"{self.dataset_name}/{self.split}/{self.first_index + index:05d}.png"

    def stats_key(self, index: int) -> str:
        return self.sample_name(index)

    def load_label(self, index: int) -> np.ndarray:
        """The label of sample ``index``: S×S uint8 (0 background, 1+d digit d, 255 ignore)."""
        return self.labels[index]

    def load_arrays(self, index: int) -> dict[str, Any]:
        arrays: dict[str, Any] = {"image": self.images[index]}
        if self.labelled:
            arrays["label"] = self.labels[index]
        return arrays

    def transform(self, arrays: dict[str, Any], index: int) -> dict[str, Any]:
        item: dict[str, Any] = dict(self.pipeline(arrays["image"], arrays.get("label")))
        item["name"] = self.sample_name(index)
        item["index"] = index
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset_name}: index {index} out of range ({len(self)} items)")
        return self.transform(self.load_arrays(index), index)


for _domain in DOMAINS:
    register_dataset(_domain)(DigitsDataset)


# --------------------------------------------------------------------------------------------
# Export as folder datasets, and an overview picture
# --------------------------------------------------------------------------------------------


def _label_png(label: np.ndarray) -> Image.Image:
    """A palette PNG: pixel values are class indices (255 ignore), colours are the class palette."""
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:NUM_CLASSES] = PALETTE
    palette[IGNORE_INDEX] = (255, 255, 255)
    image.putpalette(palette.ravel().tolist())
    return image


def export_folder(
    out_dir: Path, seed: int = 0, root: Optional[Path] = None, size: BenchmarkSize = BenchmarkSize()
) -> None:
    """Write every domain/split as a generic ``folder`` dataset.

    Layout: ``out_dir/<domain>/images/<split>/NNNNN.png`` (RGB), ``out_dir/<domain>/labels/<split>/NNNNN.png``
    (palette PNG of class indices, 255 ignore), ``out_dir/<domain>/classes.yaml`` (``classes``,
    ``palette``, ``ignore_index``) and ``out_dir/<domain>/digits_manifest.json`` (generation record).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"digits export: {out_dir} exists and is not a folder")
    class_file = {"classes": list(CLASS_NAMES), "palette": [list(c) for c in PALETTE], "ignore_index": IGNORE_INDEX}
    for domain in DOMAINS:
        domain_dir = out_dir / domain
        for split in SPLITS:
            data = load_split(domain, split, seed, root, size)
            image_dir = domain_dir / "images" / split
            label_dir = domain_dir / "labels" / split
            try:
                image_dir.mkdir(parents=True, exist_ok=True)
                label_dir.mkdir(parents=True, exist_ok=True)
                for index in range(len(data)):
                    Image.fromarray(data.images[index]).save(image_dir / f"{index:05d}.png")
                    _label_png(data.labels[index]).save(label_dir / f"{index:05d}.png")
            except OSError as err:
                raise UserError(f"digits export: cannot write to {domain_dir}: {err.strerror or err}") from None
        (domain_dir / "classes.yaml").write_text(yaml.safe_dump(class_file, sort_keys=False))
        manifest = _manifest_path(cache_dir(seed, root, size), domain).read_text()
        (domain_dir / "digits_manifest.json").write_text(manifest)


def example_grid(
    seed: int = 0, root: Optional[Path] = None, columns: int = 6, size: BenchmarkSize = BenchmarkSize()
) -> np.ndarray:
    """An overview picture (uint8 H×W×3): for each domain, a row of val images and a row of labels."""
    rows = []
    palette = np.zeros((256, 3), np.uint8)
    palette[:NUM_CLASSES] = PALETTE
    palette[IGNORE_INDEX] = (255, 255, 255)
    for domain in DOMAINS:
        data = load_split(domain, "val", seed, root, size)
        count = min(columns, len(data))
        rows.append(np.concatenate(list(data.images[:count]), axis=1))
        rows.append(np.concatenate(list(palette[data.labels[:count]]), axis=1))
    return np.concatenate(rows, axis=0)
