"""T2S-DA inside the shared training step: presets end to end, views, gradients, DG."""

import math

import numpy as np
import pytest
import torch

from udaseg.adapt.step import TrainStep
from udaseg.config import list_presets, load_config
from udaseg.config.schema import DatasetConfig
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import build_method
from udaseg.methods.base import SupervisedSegmentation
from udaseg.methods.dacs import PseudoLabelSelfTraining
from udaseg.methods.t2sda import (PSEUDO_TARGET_VIEW, PullingLoss, T2SDAPulling, fda_pseudo_target,
                                  translate_normalised)
from udaseg.models import build_model

T2SDA_PRESETS = ["t2sda_daformer_gta2cs", "t2sda_deeplabv2_gta2cs", "t2sda_daformer_synthia2cs",
                 "t2sda_deeplabv2_synthia2cs", "t2sda_dg_daformer_mitb5_gta", "digits_t2sda"]


@pytest.fixture(scope="module")
def domains(tmp_path_factory, fake_domain):
    base = tmp_path_factory.mktemp("t2sda_domains")
    return {"source": fake_domain(base / "source", 0, 1), "target": fake_domain(base / "target", 90, 2),
            "other": fake_domain(base / "other", 150, 3), "source64": fake_domain(base / "source64", 0, 1, 64),
            "target64": fake_domain(base / "target64", 90, 2, 64)}


def tiny_config(preset, domains, work_dir, iterations=2, extra=(), size=32):
    """The preset on tiny fake data. 32 px images keep the tests fast; on them MiT's stride-32 last
    stage is a single cell, so the projector then reads ``enc2`` (stride 8) instead."""
    model = "deeplabv2_tiny" if "deeplabv2" in preset else "daformer_tiny"
    if model == "daformer_tiny" and size == 32 and load_config(preset).method.t2sda.feature == "enc_last":
        extra = ["method.t2sda.feature=enc2", *extra]
    cfg = load_config(preset, [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}", f"train.iterations={iterations}",
        f"train.work_dir={work_dir}", "train.eval_interval=1000", "train.checkpoint_interval=1000",
        "train.log_interval=1", "data.batch_size=2", "data.workers=0", "optim.warmup_iters=1", "eval.protocol=all",
        "method.self_training.ignore_top=0", "method.self_training.ignore_bottom=0", "method.t2sda.proj_dim=16",
        "method.t2sda.base_queries=8", "method.t2sda.negatives=32", "method.self_training.feature_distance.classes=[1]",
        *extra,
    ])
    suffix = "" if size == 32 else str(size)
    for spec, root in ((cfg.data.source, domains["source" + suffix]), (cfg.data.target, domains["target" + suffix])):
        if spec is not None:
            spec.name, spec.root, spec.split = "folder", str(root), "train"
            spec.resize, spec.crop_size, spec.rcs.enabled = None, None, False
    cfg.data.val = [DatasetConfig(name="folder", root=str(domains["target" + suffix]), split="val", normalization=cfg.data.source.normalization)]
    return cfg


def named_grads(module, prefix):
    return {n: p.grad for n, p in module.named_parameters() if n.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# Presets end to end
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", T2SDA_PRESETS)
def test_preset_trains_and_saves_a_reloadable_checkpoint(preset, domains, tmp_path):
    assert preset in list_presets()
    cfg = tiny_config(preset, domains, tmp_path / "run")
    dg = cfg.method.t2sda.domain_generalisation
    if dg:
        cfg.data.val.append(DatasetConfig(name="folder", root=str(domains["other"]), split="val"))
    trainer = Trainer(cfg, progress=False)
    assert ("target" in trainer.streams) is not dg
    summary = trainer.train()
    assert 0.0 <= summary["miou"] <= 1.0

    records = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))
    assert len(records) == 2
    for record in records:
        assert math.isfinite(record["pseudo_target.pull"]) and record["pseudo_target.pull"] >= 0
        assert math.isfinite(record["source.ce"])
        assert ("mixed.pseudo_ce" in record) is not dg
        assert record["pull_classes"] >= 1
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "eval") if r["model"] == "student"]
    assert len(evals) == (2 if dg else 1)  # the DG run evaluates both target sets in one run

    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["iteration"] == 2 and state["method"] == "t2sda"
    assert any(k.startswith("heads.proj_head.") for k in state["model"])
    assert any(k.startswith("heads.proj_head.") for k in state["teacher"])
    resumed = Trainer(cfg, resume="latest", progress=False)
    assert resumed.iteration == 2
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.teacher.module.parameters(), trainer.teacher.module.parameters()):
        assert torch.equal(a, b)


def test_reference_numbers_are_the_published_ones():
    expected = {"t2sda_daformer_gta2cs": 70.0, "t2sda_deeplabv2_gta2cs": 60.4, "t2sda_daformer_synthia2cs": 62.8,
                "t2sda_deeplabv2_synthia2cs": 57.6, "t2sda_dg_daformer_mitb5_gta": 48.6}
    for preset, miou in expected.items():
        cfg = load_config(preset)
        assert cfg.reference["miou"] == miou and cfg.method.name == "t2sda"
        assert cfg.method.t2sda.weight == 0.1
    synthia = load_config("t2sda_daformer_synthia2cs")
    assert synthia.data.source.name == "synthia" and synthia.data.source.resize == [1280, 760]
    assert synthia.eval.protocol == "16" and synthia.model.num_classes == 19
    dg = load_config("t2sda_dg_daformer_mitb5_gta")
    assert dg.method.t2sda.domain_generalisation and dg.data.target is None
    assert [v.name for v in dg.data.val] == ["cityscapes", "bdd100k", "mapillary"]


# --------------------------------------------------------------------------------------------
# The method and its gradients
# --------------------------------------------------------------------------------------------

def test_method_layout_and_head_learning_rate(domains, tmp_path):
    cfg = tiny_config("t2sda_daformer_gta2cs", domains, tmp_path / "run", size=64)
    trainer = Trainer(cfg, progress=False)
    kinds = [type(o).__name__ for o in trainer.method.objectives]
    assert kinds == ["SupervisedSegmentation", "ImageNetFeatureDistance", "PseudoLabelSelfTraining", "T2SDAPulling"]
    assert trainer.method.uses_teacher and trainer.method.uses_target
    assert trainer.model.head_taps == {"proj_head": "enc_last"}
    lr_of = {name: group["lr_mult"] for group in trainer.optimizer.param_groups for name in group["param_names"]}
    assert lr_of["heads.proj_head.convs.0.conv.weight"] == 10.0
    assert min(v for k, v in lr_of.items() if k.startswith("segmentor.backbone")) == 1.0


@pytest.mark.parametrize("dg", [False, True])
def test_pulling_loss_trains_encoder_and_projector_only(dg, domains, tmp_path):
    extra = ["method.t2sda.domain_generalisation=true"] if dg else []
    cfg = tiny_config("t2sda_daformer_gta2cs", domains, tmp_path / "run", extra=extra, size=64)
    trainer = Trainer(cfg, progress=False)
    assert trainer.model.head_taps == {"proj_head": "enc_last"}
    pulling = trainer.method.objectives[-1]
    assert isinstance(pulling, T2SDAPulling)
    trainer.teacher.update(0)
    step = TrainStep(trainer.model, trainer.teacher, [pulling], 3)
    result = step.run(trainer._next_batch(), 0, torch.Generator().manual_seed(0))
    assert result.losses["pseudo_target.pull"] > 0
    head = named_grads(trainer.model, "heads.proj_head.")
    assert head and all(g is not None and bool(g.abs().sum() > 0) for n, g in head.items() if "conv.weight" in n)
    backbone = named_grads(trainer.model, "segmentor.backbone.")
    assert any(g is not None and bool(g.abs().sum() > 0) for g in backbone.values())
    decoder = named_grads(trainer.model, "segmentor.decode_head.")
    assert decoder and all(g is None or not bool(g.abs().sum() > 0) for g in decoder.values())
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.module.parameters())


def test_full_step_leaves_the_teacher_without_gradients_and_moves_it_by_ema(domains, tmp_path):
    cfg = tiny_config("digits_t2sda", domains, tmp_path / "run", iterations=2)
    trainer = Trainer(cfg, progress=False)
    trainer.train_iteration(0)
    before = [p.detach().clone() for p in trainer.teacher.module.parameters()]
    trainer.train_iteration(1)
    after = list(trainer.teacher.module.parameters())
    assert all(p.grad is None for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    head = trainer.teacher.module.heads["proj_head"].convs[0].conv.weight
    student_head = trainer.model.heads["proj_head"].convs[0].conv.weight
    assert not torch.equal(head, student_head)  # an EMA, not a copy, after the first update


def test_ce_on_pseudo_target_is_an_option(domains, tmp_path):
    cfg = tiny_config("digits_t2sda", domains, tmp_path / "run", iterations=1,
                      extra=["method.t2sda.source_ce_on_pseudo_target=true", "method.t2sda.loss=mse",
                             "method.t2sda.reweight=false", "method.t2sda.class_balanced_queries=false",
                             "method.t2sda.target_negatives=false"])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    record = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))[-1]
    assert math.isfinite(record["pseudo_target.pseudo_target_ce"])
    assert 0 <= record["pseudo_target.pull"] <= 0.1 * 4  # MSE of unit vectors is at most 4


# --------------------------------------------------------------------------------------------
# Views and the loss wiring, against plain references
# --------------------------------------------------------------------------------------------

MEAN, STD = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]


def plain_fda(source_raw: np.ndarray, target_raw: np.ndarray, beta: float) -> np.ndarray:
    """FDA of one 3xHxW image with numpy's FFT and the official square window."""
    height, width = source_raw.shape[-2:]
    src, tgt = np.fft.fftshift(np.fft.fft2(source_raw), axes=(-2, -1)), np.fft.fftshift(np.fft.fft2(target_raw), axes=(-2, -1))
    amp, phase = np.abs(src), np.angle(src)
    b = math.floor(beta * min(height, width))
    ch, cw = height // 2, width // 2
    amp[:, ch - b:ch + b + 1, cw - b:cw + b + 1] = np.abs(tgt)[:, ch - b:ch + b + 1, cw - b:cw + b + 1]
    out = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * phase), axes=(-2, -1))).real
    return np.clip(out, 0, 255)


def test_fda_pseudo_target_uses_a_random_target_of_the_batch():
    torch.manual_seed(0)
    source = (torch.rand(3, 3, 16, 20, dtype=torch.float64) * 255)
    target = (torch.rand(2, 3, 16, 20, dtype=torch.float64) * 255)
    norm = lambda x: (x - torch.tensor(MEAN, dtype=x.dtype).view(3, 1, 1)) / torch.tensor(STD, dtype=x.dtype).view(3, 1, 1)
    out, index = fda_pseudo_target(norm(source), norm(target), MEAN, STD, 0.1, "official", torch.Generator().manual_seed(3))
    assert out.shape == source.shape and index.shape == (3,) and int(index.max()) < 2
    expected = torch.from_numpy(np.stack([plain_fda(source[i].numpy(), target[int(index[i])].numpy(), 0.1)
                                          for i in range(3)]))
    torch.testing.assert_close(out, norm(expected), atol=1e-6, rtol=0)
    again, same_index = fda_pseudo_target(norm(source), norm(target), MEAN, STD, 0.1, "official",
                                          torch.Generator().manual_seed(3))
    assert torch.equal(index, same_index) and torch.equal(out, again)


def test_dg_translation_view_is_the_translated_source():
    images = torch.randn(2, 3, 8, 8)
    invert = lambda image, generator: 255 - image
    out = translate_normalised(images, invert, MEAN, STD, torch.Generator())
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    raw = (images * std + mean).clamp(0, 255)
    torch.testing.assert_close(out, (255 - raw - mean) / std)


def plain_majority(labels: torch.Tensor, scale: int, min_ratio: float, num_classes: int) -> torch.Tensor:
    b, height, width = labels.shape
    out = torch.full((b, height // scale, width // scale), 255, dtype=torch.long)
    for n in range(b):
        for i in range(height // scale):
            for j in range(width // scale):
                block = labels[n, i * scale:(i + 1) * scale, j * scale:(j + 1) * scale].reshape(-1).tolist()
                counts = [block.count(c) for c in range(num_classes)]
                best = max(range(num_classes), key=lambda c: counts[c])
                if counts[best] >= block.count(255) and counts[best] >= min_ratio * len(block) and counts[best] > 0:
                    out[n, i, j] = best
    return out


def test_pull_loss_wiring_matches_a_plain_computation():
    torch.manual_seed(1)
    cfg = load_config("t2sda_daformer_gta2cs").method
    cfg.t2sda.negatives, cfg.t2sda.base_queries = 16, 6
    num_classes, scale = 4, 4
    objective = T2SDAPulling(cfg.t2sda, cfg.self_training, num_classes, MEAN, STD)
    queries = torch.randn(2, 8, 3, 5, requires_grad=True)
    source_keys, target_keys = torch.randn(2, 8, 3, 5), torch.randn(2, 8, 3, 5)
    labels = torch.randint(0, num_classes, (2, 3, 5)).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    labels[0, :2] = 255
    labels[1, :, :3] = 1  # an impure block in column 0 of image 1 (3 of 4 columns are 1)
    probs = torch.softmax(3 * torch.randn(2, num_classes, 12, 20), dim=1)
    loss, _ = objective.pull_loss(queries, source_keys, labels, probs, target_keys, torch.Generator().manual_seed(7))

    labels_ds = plain_majority(labels, scale, 0.75, num_classes)
    pooled = probs.reshape(2, num_classes, 3, scale, 5, scale).mean(dim=(3, 5))
    conf_ds, pseudo_ds = pooled.max(dim=1)
    gamma = np.percentile(conf_ds.flatten().numpy(), 50)
    unreliable = conf_ds < float(gamma)
    conf, pseudo = probs.max(dim=1)
    mean_conf = [float(conf[pseudo == c].mean()) if bool((pseudo == c).any()) else 0.0 for c in range(num_classes)]
    raw = [(1 - m) / max(1 - x for x in mean_conf) for m in mean_conf]
    weights = torch.tensor([r ** 0.5 for r in raw])
    weights = weights / weights.sum()
    reference = PullingLoss(num_classes, 0.2, 16, 6)
    expected, _ = reference(queries, source_keys, labels_ds, target_keys, pseudo_ds, unreliable, weights,
                            torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert 0.1 * loss.item() == pytest.approx(0.1 * expected.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Domain generalisation and user errors
# --------------------------------------------------------------------------------------------

def test_dg_method_has_no_target_and_reports_skipped_translations(capsys):
    cfg = load_config("t2sda_dg_daformer_mitb5_gta", ["model.name=daformer_tiny", "model.num_classes=3",
                                                       "model.pretrained=", "model.options={}", "method.t2sda.proj_dim=8"])
    method = build_method(cfg, build_model("daformer_tiny", 3))
    assert not method.uses_target and method.uses_teacher
    assert not any(isinstance(o, PseudoLabelSelfTraining) for o in method.objectives)
    assert isinstance(method.objectives[0], SupervisedSegmentation)
    err = capsys.readouterr().err
    for name in ("fda", "adain", "style_augmentation"):
        assert f"image translation '{name}' skipped" in err
    needs = method.objectives[-1].needs(0)
    assert {(n.model, n.view) for n in needs} == {("student", PSEUDO_TARGET_VIEW), ("teacher", "source")}


def test_dg_with_reference_folder_uses_fda(domains):
    cfg = load_config("t2sda_dg_daformer_mitb5_gta", [
        "model.name=daformer_tiny", "model.num_classes=3", "model.pretrained=", "model.options={}", "method.t2sda.dg_translations=[fda]",
        f"method.t2sda.dg_reference_dir={domains['target'] / 'images' / 'train'}"])
    pulling = build_method(cfg, build_model("daformer_tiny", 3)).objectives[-1]
    assert type(pulling.translator.translators[0]).__name__ == "FDATranslator"


@pytest.mark.parametrize("override, message", [
    ("method.t2sda.feature=enc9", "t2sda.feature"),
    ("method.t2sda.dg_translations=[adain]", "t2sda.dg_translations"),
    ("method.t2sda.weight=-1", "t2sda.weight"),
    ("method.t2sda.unreliable_quantile=2", "t2sda.unreliable_quantile"),
    ("method.t2sda.fda_beta=0.7", "t2sda.fda_beta"),
])
def test_bad_settings_raise_user_errors(override, message):
    extra = ["method.t2sda.domain_generalisation=true"] if "dg_" in override else []
    cfg = load_config("t2sda_daformer_gta2cs", ["model.name=daformer_tiny", "model.num_classes=3",
                                                "model.pretrained=", "model.options={}", override, *extra,
                                                "method.self_training.feature_distance.classes=[1]"])
    with pytest.raises(UserError, match=message):
        build_method(cfg, build_model("daformer_tiny", 3))


def test_crop_that_does_not_fit_the_feature_grid_is_a_user_error(domains, tmp_path):
    cfg = tiny_config("t2sda_daformer_gta2cs", domains, tmp_path / "run", iterations=1, size=64)
    cfg.data.source.crop_size = cfg.data.target.crop_size = [48, 48]
    with pytest.raises(UserError, match=r"crop_size \[48, 48\] is not a multiple of the stride 32"):
        Trainer(cfg, progress=False)
    cfg.data.source.crop_size = None  # only the images are 48 px: caught when the loss sees the grid
    objective = Trainer(tiny_config("t2sda_daformer_gta2cs", domains, tmp_path / "b", size=64),
                        progress=False).method.objectives[-1]
    with pytest.raises(UserError, match="not a multiple of the projector"):
        objective.pull_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.zeros(1, 48, 48, dtype=torch.long))
