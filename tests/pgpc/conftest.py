"""Tiny fake domains and configs that run the PGPC presets on them."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors run fastest on one intra-op thread, above all on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_domain(root: Path, shift: int, seed: int, count: int = 4) -> Path:
    """32 px images of 8 x 8 blocks of classes 0..2 (every feature cell passes the 75% rule)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cells = rng.integers(0, 3, (SIZE // 8, SIZE // 8))
            cells.flat[:3] = [0, 1, 2]
            label = np.kron(cells, np.ones((8, 8))).astype(np.uint8)
            image = rng.integers(0, 40, (SIZE, SIZE, 3)) + label[..., None] * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c"], "ignore_index": 255}))
    return root


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    base = tmp_path_factory.mktemp("pgpc_domains")
    return {"source": make_domain(base / "source", 0, 1), "target": make_domain(base / "target", 90, 2)}


def tiny_config(preset, domains, work_dir, iterations=2, extra=()):
    """The preset on the fake domains with a tiny network, tiny banks and contrast from iteration 1."""
    model = "deeplabv2_tiny" if preset.startswith("digits") else "daformer_tiny"
    cfg = load_config(preset, [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"train.iterations={iterations}", f"train.work_dir={work_dir}", "train.eval_interval=1000",
        "train.checkpoint_interval=1000", "train.log_interval=1", "data.batch_size=2", "data.workers=0",
        "optim.warmup_iters=1", "eval.protocol=all", "method.self_training.ignore_top=0",
        "method.self_training.ignore_bottom=0", "method.pgpc.warmup_iters=1", "method.pgpc.proj_dim=16",
        "method.pgpc.rank=1", "method.pgpc.anchors_per_class=8", "method.pgpc.negatives=16",
        "method.pgpc.source_bank_size=12", "method.pgpc.source_enqueue_per_class=5",
        "method.pgpc.target_bank_size=40", "method.pgpc.target_enqueue_per_image=12", *extra,
    ])
    for spec, root in ((cfg.data.source, domains["source"]), (cfg.data.target, domains["target"])):
        spec.name, spec.root, spec.split, spec.options = "folder", str(root), "train", {}
        spec.resize, spec.crop_size, spec.rcs.enabled = None, [SIZE, SIZE], False
    cfg.data.target.labelled = False
    cfg.data.val = [DatasetConfig(name="folder", root=str(domains["target"]), split="val")]
    return cfg
