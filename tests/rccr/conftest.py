"""Tiny fake domains and configs that run the RCCR presets on them."""

import pytest

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig

SIZE = 32


@pytest.fixture(scope="module")
def domains(tmp_path_factory, fake_domain):
    """32 px images of 8 x 8 blocks of classes 0..2."""
    base = tmp_path_factory.mktemp("rccr_domains")

    def make(name: str, shift: int, seed: int):
        return fake_domain(base / name, shift, seed, size=SIZE, layout="blocks", class_names=("a", "b", "c"))

    return {"source": make("source", 0, 1), "target": make("target", 90, 2)}


def tiny_config(preset, domains, work_dir, iterations=2, extra=()):
    """The preset on the fake domains with a tiny network and a small projector."""
    cfg = load_config(preset, [
        "model.name=deeplabv2_tiny", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"train.iterations={iterations}", f"train.work_dir={work_dir}", "train.eval_interval=1000",
        "train.checkpoint_interval=1000", "train.log_interval=1", "data.batch_size=2", "data.workers=0",
        "eval.protocol=all", "method.rccr.proj_dim=8", "method.rccr.proj_hidden=16",
        "method.rccr.confidence_threshold=0.0", "method.self_training.mix_exclude_classes=[255]", *extra,
    ])
    for spec, root in ((cfg.data.source, domains["source"]), (cfg.data.target, domains["target"])):
        spec.name, spec.root, spec.split, spec.options = "folder", str(root), "train", {}
        spec.resize, spec.crop_size, spec.rcs.enabled = None, [SIZE, SIZE], False
    cfg.data.target.labelled = False
    cfg.data.val = [DatasetConfig(name="folder", root=str(domains["target"]), split="val", normalization=cfg.data.source.normalization)]
    return cfg
