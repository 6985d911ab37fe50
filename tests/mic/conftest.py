"""Tiny fake source/target folders (32 px, one class per quadrant) and presets shrunk to them."""

import pytest

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig


@pytest.fixture(scope="session")
def mic_domains(tmp_path_factory, fake_domain):
    base = tmp_path_factory.mktemp("mic_domains")
    return fake_domain(base / "source", 0, 1), fake_domain(base / "target", 90, 2)


def tiny_preset(preset, domains, work_dir, iterations=2, extra=()):
    """The preset on 32 px fake data with a tiny network and 8 px mask blocks (a 4x4 grid)."""
    model = "deeplabv2_tiny" if "deeplabv2" in preset or preset.startswith("digits") else "daformer_tiny"
    overrides = [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"train.iterations={iterations}", f"train.work_dir={work_dir}", "train.eval_interval=1000",
        "train.checkpoint_interval=1000", "train.log_interval=1", "data.batch_size=2", "data.workers=0",
        "optim.warmup_iters=1", "eval.protocol=all", "method.self_training.ignore_top=0",
        "method.self_training.ignore_bottom=0", "method.mic.block_size=8",
        "method.self_training.feature_distance.classes=[1, 2]",
    ]
    if load_config(preset).method.mic.base == "t2sda":
        # On 32 px crops MiT's stride-32 stage is one cell; the projector reads stride 8 instead.
        overrides += ["method.t2sda.feature=enc2", "method.t2sda.proj_dim=16", "method.t2sda.base_queries=8",
                      "method.t2sda.negatives=32"]
    cfg = load_config(preset, [*overrides, *extra])
    source, target = domains
    for spec, root in ((cfg.data.source, source), (cfg.data.target, target)):
        spec.name, spec.root, spec.split = "folder", str(root), "train"
        spec.resize, spec.crop_size, spec.rcs.enabled = None, None, False
    cfg.data.val = [DatasetConfig(name="folder", root=str(target), split="val", normalization=cfg.data.source.normalization)]
    return cfg
