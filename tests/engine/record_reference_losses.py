"""Record the per-iteration losses of the shipped methods on tiny fixed-seed runs.

Run from the repository root to (re-)write ``reference_losses.json`` next to this file::

    PYTHONPATH=$PWD/src python tests/engine/record_reference_losses.py

``test_reference_losses.py`` trains the same runs and requires the same numbers, bit for bit, so
a change to the training core that alters any method's trajectory fails loudly. Re-record only
when a change of behaviour is intended.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REFERENCE_FILE = Path(__file__).with_name("reference_losses.json")
ITERATIONS = 20
CROP = 32
TARGET_SIZE = (32, 64)  # uncropped target images, twice as wide as the crops

# name -> (preset, model, overrides). SePiCo warms up for 5 iterations so both phases are covered.
CASES: dict[str, tuple[str, str, list[str]]] = {
    "dacs": ("dacs_deeplabv2_gta2cs", "deeplabv2_tiny", []),
    "daformer": ("daformer_mitb5_gta2cs", "daformer_tiny", ["method.self_training.feature_distance.classes=[0, 1, 2]",
                                                            "method.self_training.feature_distance.scale_min_ratio=0.0"]),
    "sepico_proto": ("sepico_protocl_daformer_gta2cs", "daformer_tiny", []),
    "sepico_bank": ("sepico_bankcl_deeplabv2_gta2cs", "deeplabv2_tiny", []),
    "sepico_dist": ("sepico_distcl_daformer_gta2cs", "daformer_tiny", []),
    "t2sda": ("t2sda_daformer_gta2cs", "daformer_tiny", ["method.t2sda.feature=enc2"]),
}

SEPICO_OVERRIDES = ["method.sepico.warmup_iters=5", "method.sepico.proj_dim=16",
                    f"method.sepico.target_crop_size=[{CROP}, {CROP}]", "method.sepico.bank_size=8"]
T2SDA_OVERRIDES = ["method.t2sda.proj_dim=16", "method.t2sda.base_queries=8", "method.t2sda.negatives=32"]


def _block_label(rng: np.random.Generator, height: int, width: int, block: int = 8) -> np.ndarray:
    cells = rng.integers(0, 3, (height // block, width // block))
    cells.flat[:3] = [0, 1, 2]
    label = np.kron(cells, np.ones((block, block))).astype(np.uint8)
    label[0, 0] = 255
    return label


def make_domain(root: Path, height: int, width: int, shift: int, seed: int, count: int = 4) -> Path:
    """A folder dataset with 8×8-block labels of 3 classes and images that follow them."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = _block_label(rng, height, width)
            image = rng.integers(0, 40, label.shape + (3,)) + label[..., None].clip(0, 2).astype(int) * 70 + shift
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": ["background", "box", "bar"], "ignore_index": 255}))
    return root


def case_config(name: str, data_root: Path, work_dir: Path, iterations: int = ITERATIONS, extra=()):
    from udaseg.config import load_config

    preset, model, overrides = CASES[name]
    if name.startswith("sepico"):
        overrides = overrides + SEPICO_OVERRIDES
    if name.startswith("t2sda"):
        overrides = overrides + T2SDA_OVERRIDES
    cfg = load_config(preset, [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"train.iterations={iterations}", f"train.work_dir={work_dir}", "train.eval_interval=1000000",
        "train.checkpoint_interval=1000000", "train.log_interval=1", "train.seed=3", "data.batch_size=2",
        "data.workers=0", "data.val=[]", "optim.warmup_iters=3", "method.self_training.ignore_top=0",
        "method.self_training.ignore_bottom=0", *overrides, *extra,
    ])
    source, target = cfg.data.source, cfg.data.target
    source.name, source.root, source.split = "folder", str(data_root / "source"), "train"
    source.resize, source.crop_size, source.rcs.enabled = None, [CROP, CROP], False
    target.name, target.root, target.split = "folder", str(data_root / "target"), "train"
    target.resize, target.crop_size = None, (None if name.startswith("sepico") else [CROP, CROP])
    return cfg


def make_data(root: Path) -> Path:
    make_domain(root / "source", CROP, CROP, 0, seed=1)
    make_domain(root / "target", *TARGET_SIZE, 90, seed=2)
    return root


def record_case(name: str, data_root: Path, work_dir: Path) -> dict:
    """Train one case; return its per-iteration losses and metrics and a checksum of the final student."""
    from udaseg.engine.trainer import Trainer

    trainer = Trainer(case_config(name, data_root, work_dir), progress=False)
    iterations: list[dict] = []
    run_iteration = trainer.train_iteration

    def recording(it: int):
        result = run_iteration(it)
        iterations.append({"losses": dict(result.losses), "metrics": dict(result.metrics)})
        return result

    trainer.train_iteration = recording
    trainer.train()
    checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
    return {"iterations": iterations, "student_param_sum": checksum}


def record_all(cases=tuple(CASES)) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_data(Path(tmp) / "data")
            return {name: record_case(name, data, Path(tmp) / "runs" / name) for name in cases}
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    reference = record_all()
    REFERENCE_FILE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(reference)} cases x {ITERATIONS} iterations to {REFERENCE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
