"""Tiny fake domains and configs that run the PGPC presets on them."""

import pytest

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig

SIZE = 32


@pytest.fixture(scope="module")
def domains(tmp_path_factory, fake_domain):
    """32 px images of 8 x 8 blocks of classes 0..2 (every feature cell passes the 75% rule)."""
    base = tmp_path_factory.mktemp("pgpc_domains")

    def make(name: str, shift: int, seed: int):
        return fake_domain(base / name, shift, seed, size=SIZE, layout="blocks", class_names=("a", "b", "c"))

    return {"source": make("source", 0, 1), "target": make("target", 90, 2)}


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
        "method.pgpc.target_bank_size=40", "method.pgpc.target_enqueue_per_image=12", "method.self_training.feature_distance.classes=[1]",
        *extra,
    ])
    for spec, root in ((cfg.data.source, domains["source"]), (cfg.data.target, domains["target"])):
        spec.name, spec.root, spec.split, spec.options = "folder", str(root), "train", {}
        spec.resize, spec.crop_size, spec.rcs.enabled = None, [SIZE, SIZE], False
    cfg.data.target.labelled = False
    cfg.data.val = [DatasetConfig(name="folder", root=str(domains["target"]), split="val", normalization=cfg.data.source.normalization)]
    return cfg
