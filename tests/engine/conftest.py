"""Tiny fake source/target datasets in the generic folder layout and configs that train on them."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from udaseg.config import load_config

SIZE = 32


def make_folder_dataset(root: Path, shift: int, count: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = np.zeros((SIZE, SIZE), np.uint8)
            top, left = rng.integers(0, SIZE // 2, 2)
            label[top:top + 12, left:left + 14] = 1
            label[SIZE - 8:, : SIZE // 3] = 2
            label[0, 0] = 255
            image = rng.integers(0, 40, (SIZE, SIZE, 3)) + label[..., None].clip(0, 2) * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump(
        {"classes": ["background", "box", "bar"], "palette": [[0, 0, 0], [200, 30, 30], [30, 200, 30]],
         "ignore_index": 255}))
    return root


@pytest.fixture(scope="session")
def fake_domains(tmp_path_factory):
    base = tmp_path_factory.mktemp("domains")
    return make_folder_dataset(base / "source", 0, seed=1), make_folder_dataset(base / "target", 90, seed=2)


def tiny_config(preset, source: Path, target: Path, work_dir: Path, iterations: int = 2, model: str = "daformer_tiny",
                extra=()):
    cfg = load_config(preset, [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}", f"train.iterations={iterations}",
        f"train.work_dir={work_dir}", "train.eval_interval=1000", "train.checkpoint_interval=1000",
        "train.log_interval=1", "data.batch_size=2", "data.workers=0", "optim.warmup_iters=1", "eval.protocol=all",
        "method.self_training.ignore_top=0", "method.self_training.ignore_bottom=0",
        "method.self_training.feature_distance.classes=[1]", *extra,
    ])
    for spec, root in ((cfg.data.source, source), (cfg.data.target, target)):
        if spec is not None:
            spec.name, spec.root, spec.split = "folder", str(root), "train"
            spec.resize, spec.crop_size, spec.rcs.enabled = None, None, False
    from udaseg.config.schema import DatasetConfig

    cfg.data.val = [DatasetConfig(name="folder", root=str(target), split="val", normalization=cfg.data.source.normalization)]
    return cfg
