"""Suite-wide settings and fake data.

The tests use tiny tensors, where one intra-op thread is fastest and does not degrade badly when the
machine is shared (multi-threaded spinning on tiny ops can cost 10x).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

torch.set_num_threads(1)


def _quadrant_label(rng: np.random.Generator, index: int, size: int, ignore_corner: bool) -> np.ndarray:
    """One class per quadrant, at least two classes per image; pixel (0, 0) is 255 if asked."""
    classes = np.concatenate([[0, 1 + index % 2], rng.integers(0, 3, 2)])
    rng.shuffle(classes)
    label = np.kron(classes.reshape(2, 2), np.ones((size // 2, size // 2))).astype(np.uint8)
    if ignore_corner:
        label[0, 0] = 255
    return label


def _block_label(rng: np.random.Generator, size: int, block: int = 8) -> np.ndarray:
    """``block`` px cells of classes 0..2, the first three cells 0, 1, 2."""
    cells = rng.integers(0, 3, (size // block, size // block))
    cells.flat[:3] = [0, 1, 2]
    return np.kron(cells, np.ones((block, block))).astype(np.uint8)


def write_fake_domain(root: Path, shift: int, seed: int, size: int = 32, count: int = 4, layout: str = "quadrants",
                      ignore_corner: bool = True, class_names=("background", "box", "bar")) -> Path:
    """A 3-class ``folder`` dataset (train and val) whose image brightness follows the label.

    ``layout``: ``"quadrants"`` (one class per quadrant) or ``"blocks"`` (8 px cells, every stride-8
    feature cell passes the 75 % label rule). ``shift`` offsets the brightness: a domain shift.
    """
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = (_quadrant_label(rng, i, size, ignore_corner) if layout == "quadrants"
                     else _block_label(rng, size))
            image = rng.integers(0, 40, (size, size, 3)) + label[..., None].clip(0, 2) * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": list(class_names), "ignore_index": 255}))
    return root


@pytest.fixture(scope="session")
def fake_domain():
    """:func:`write_fake_domain`, for tests in any folder."""
    return write_fake_domain
