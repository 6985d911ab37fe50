"""MIC's separate masking teacher (official mask_alpha / mask_pseudo_threshold)."""


import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.step import StepContext, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.config import load_config
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import build_method
from udaseg.methods.mic import MASKED_VIEW, MaskedImageConsistency, MaskingTeacher
from udaseg.models import build_model

from .conftest import tiny_preset
from .test_objective import _batch


def _mic(method):
    return next(o for o in method.objectives if isinstance(o, MaskedImageConsistency))


def _step(cfg, iteration=0, seed=3, model=None, method=None):
    if model is None:
        torch.manual_seed(0)
        segmentor = build_model(cfg.model.name, cfg.model.num_classes)
        method = build_method(cfg, segmentor)
        model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model, 0.999)
    teacher.update(0)
    needs = [n for o in method.objectives for n in o.needs(iteration)]
    ctx = StepContext(model, teacher, iteration, torch.Generator().manual_seed(seed), needs, 3)
    batch = _batch()
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    for objective in method.objectives:
        objective.prepare(ctx, batch)
    return ctx, method, model, batch


def test_defaults_are_same_and_share_the_base_teacher(mic_domains, tmp_path):
    cfg = load_config("mic_hrda_daformer_gta2cs")
    assert cfg.method.mic.mask_alpha == "same" and cfg.method.mic.mask_pseudo_threshold == "same"
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path)
    assert _mic(build_method(cfg, build_model(cfg.model.name, 3))).teacher is None


@pytest.mark.parametrize("extra, alpha, threshold", [
    (["method.mic.mask_alpha=0.9"], 0.9, 0.968),
    (["method.mic.mask_pseudo_threshold=0.5"], 0.999, 0.5),
    (["method.mic.mask_pseudo_threshold=null"], 0.999, None),
])
def test_either_switch_creates_an_own_teacher_and_same_resolves_to_the_base_values(extra, alpha, threshold,
                                                                                   mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path, extra=extra)
    teacher = _mic(build_method(cfg, build_model(cfg.model.name, 3))).teacher
    assert isinstance(teacher, MaskingTeacher)
    assert teacher.alpha == alpha and teacher.threshold == threshold
    assert not any(p.requires_grad for p in teacher.parameters())


def test_own_teacher_labels_and_weight_come_from_its_own_ema_and_threshold(mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path, extra=[
        "method.mic.mask_alpha=0.5", "method.mic.mask_pseudo_threshold=0.4", "method.mic.color_augmentation=false"])
    ctx, method, model, batch = _step(cfg)
    mic = _mic(method)
    # Iteration 0 copies the student; the labels are the copy's argmax on the clean target.
    for a, b in zip(mic.teacher.module.parameters(), model.segmentor.parameters()):
        assert torch.equal(a, b)
    logits = mic.teacher._ema(batch["target"]["image"]).logits  # train-mode BN, no dropout
    probs = torch.softmax(F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False), dim=1)
    confidence, labels = probs.max(dim=1)
    masked = ctx.view(MASKED_VIEW)
    assert torch.equal(masked.label, labels)
    assert torch.allclose(masked.weight, torch.full((2, 32, 32), float((confidence >= 0.4).float().mean())))
    # Iteration 1: psi <- 0.5 psi + 0.5 theta (the ramp min(1 - 1/2, 0.5) = 0.5).
    before = [p.clone() for p in mic.teacher.module.parameters()]
    with torch.no_grad():
        for p in model.segmentor.parameters():
            p.add_(0.25)
    _step(cfg, iteration=1, model=model, method=method)
    for old, new, student in zip(before, mic.teacher.module.parameters(), model.segmentor.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * student)


def test_alpha_zero_is_the_current_student_and_null_threshold_weighs_one(mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path, extra=[
        "method.mic.mask_alpha=0", "method.mic.mask_pseudo_threshold=null"])
    ctx, method, model, _ = _step(cfg)
    with torch.no_grad():
        for p in model.segmentor.parameters():
            p.mul_(1.5)
    ctx, *_ = _step(cfg, iteration=5, model=model, method=method)
    for a, b in zip(_mic(method).teacher.module.parameters(), model.segmentor.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ctx.view(MASKED_VIEW).weight, torch.ones(2, 32, 32))


def test_own_teacher_trains_is_saved_and_resumes(mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path / "run", extra=["method.mic.mask_alpha=0.9"])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    resumed = Trainer(cfg, resume="latest", progress=False)
    ours, theirs = _mic(trainer.method).teacher, _mic(resumed.method).teacher
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), resumed.model.segmentor.parameters()))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("override, key", [
    ("method.mic.mask_alpha=1.0", "method.mic.mask_alpha"),
    ("method.mic.mask_alpha=fast", "method.mic.mask_alpha"),
    ("method.mic.mask_pseudo_threshold=1.5", "method.mic.mask_pseudo_threshold"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(UserError) as info:
        load_config("mic_daformer_gta2cs", [override])
    assert key in str(info.value) and len(str(info.value).splitlines()) == 1
