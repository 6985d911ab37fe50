"""The HRDA segmentor under a single-scale method (daformer): the student crops, the teacher and
evaluation slide (mode "auto"), the feature distance reads context features, and only the fused
output is trained (the hrda method adds the detail term; tests/hrda/test_method.py)."""

import math

from udaseg.config import load_config
from udaseg.config.schema import DatasetConfig
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer


def test_hrda_model_trains_and_evaluates_in_the_daformer_step(hrda_domains, tmp_path):
    source, target = hrda_domains
    cfg = load_config("daformer_mitb5_gta2cs", [
        "model.name=hrda_daformer_tiny", "model.num_classes=3", "model.pretrained=",
        "model.options={detail_crop_size: [32, 32]}", "train.iterations=2", f"train.work_dir={tmp_path / 'run'}",
        "train.eval_interval=1000", "train.log_interval=1", "data.workers=0", "optim.warmup_iters=1",
        "eval.protocol=all", "method.self_training.ignore_top=0", "method.self_training.ignore_bottom=0",
        "eval.mode=slide", "eval.crop_size=[64,64]", "eval.stride=[32,32]",
        "method.self_training.feature_distance.classes=[1, 2]"])
    for spec, root in ((cfg.data.source, source), (cfg.data.target, target)):
        spec.name, spec.root, spec.split = "folder", str(root), "train"
        spec.resize, spec.crop_size, spec.rcs.enabled = None, None, False
    cfg.data.val = [DatasetConfig(name="folder", root=str(target), split="val", normalization=cfg.data.source.normalization)]
    trainer = Trainer(cfg, progress=False)
    summary = trainer.train()
    assert 0.0 <= summary["miou"] <= 1.0
    records = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))
    assert all(math.isfinite(r["source.fd"]) and math.isfinite(r["mixed.pseudo_ce"]) for r in records)
    assert any(n.startswith("attention_head.") for n, _ in trainer.model.segmentor.named_parameters())
