"""64 px fake source/target folders (one class per quadrant): HRDA's context crop must hold a
32 px detail crop and a MiT context pass of at least 32 px."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _domain(root: Path, shift: int, seed: int, size: int = 64, count: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            classes = np.concatenate([[0, 1 + i % 2], rng.integers(0, 3, 2)])
            rng.shuffle(classes)
            label = np.kron(classes.reshape(2, 2), np.ones((size // 2, size // 2))).astype(np.uint8)
            image = rng.integers(0, 40, (size, size, 3)) + label[..., None] * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["background", "box", "bar"], "ignore_index": 255}))
    return root


@pytest.fixture(scope="session")
def hrda_domains(tmp_path_factory):
    base = tmp_path_factory.mktemp("hrda_domains")
    return _domain(base / "source", 0, 1), _domain(base / "target", 90, 2)
