"""Two tiny labelled folder domains and checkpoints trained on them for a few iterations."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig

SIZE = 32
CLASSES = {"classes": ["background", "box", "bar"], "palette": [[90, 90, 90], [200, 30, 30], [30, 160, 30]],
           "ignore_index": 255}


def make_domain(root: Path, shift: int, seed: int, count: int = 4, labels: bool = True) -> Path:
    """Images with a box (class 1) and a bar (class 2) on background; ``labels=False``: images only."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        if labels:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = np.zeros((SIZE, SIZE), np.uint8)
            top, left = rng.integers(0, SIZE // 2, 2)
            label[top:top + 12, left:left + 14] = 1
            label[SIZE - 8:, : SIZE // 2] = 2
            image = rng.integers(0, 40, (SIZE, SIZE, 3)) + label[..., None] * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            if labels:
                Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    return root


def tiny_run(preset: str, source: Path, target: Path, work_dir: Path, extra=()):
    cfg = load_config(preset, [
        "model.name=deeplabv2_tiny", "model.num_classes=3", "model.pretrained=", "train.iterations=2",
        f"train.work_dir={work_dir}", "train.eval_interval=1000", "train.checkpoint_interval=1000",
        "train.log_interval=1", "data.batch_size=2", "data.workers=0", "optim.warmup_iters=1", "train.device=cpu",
        *extra,
    ])
    for spec, root in ((cfg.data.source, source), (cfg.data.target, target)):
        spec.name, spec.root, spec.split = "folder", str(root), "train"
    cfg.data.val = [DatasetConfig(name="folder", root=str(target), split="val", normalization=cfg.data.source.normalization)]
    return cfg


@pytest.fixture(scope="session")
def domains(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis_domains")
    return make_domain(base / "source", 0, seed=1), make_domain(base / "target", 90, seed=2)


@pytest.fixture(scope="session")
def checkpoints(domains, tmp_path_factory):
    """``{'source_only': path, 'sepico': path}`` of 2-iteration runs (SePiCo with its projection head)."""
    from udaseg.engine.trainer import Trainer

    base = tmp_path_factory.mktemp("analysis_runs")
    runs = {"source_only": tiny_run("digits_source_only", *domains, base / "so"),
            "sepico": tiny_run("digits_sepico_distcl", *domains, base / "sepico",
                               ["method.sepico.warmup_iters=0", "method.sepico.proj_dim=8"])}
    paths = {}
    for name, cfg in runs.items():
        Trainer(cfg, progress=False).train()
        paths[name] = Path(cfg.train.work_dir) / "latest.pt"
    return paths
