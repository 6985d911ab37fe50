"""MIC inside the shared training step: presets end to end, the masked view, the loss, gradients."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.step import StepContext, TrainStep, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.cli import main
from udaseg.config import list_presets, load_config
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import build_method
from udaseg.methods.dacs import PSEUDO, PseudoLabelSelfTraining
from udaseg.methods.mic import MASKED_VIEW, MaskedImageConsistency, masked_consistency_loss
from udaseg.models import build_model

from .conftest import tiny_preset

MIC_PRESETS = ["mic_daformer_gta2cs", "t2sda_mic_daformer_gta2cs", "digits_mic"]


# --------------------------------------------------------------------------------------------
# Presets end to end
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", MIC_PRESETS)
def test_preset_trains_resumes_and_logs_the_masked_loss(preset, mic_domains, tmp_path):
    assert preset in list_presets()
    cfg = tiny_preset(preset, mic_domains, tmp_path / "run")
    trainer = Trainer(cfg, progress=False)
    summary = trainer.train()
    assert 0.0 <= summary["miou"] <= 1.0
    records = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))
    assert len(records) == 2
    for record in records:
        assert math.isfinite(record["masked.mic_ce"]) and record["masked.mic_ce"] >= 0
        assert math.isfinite(record["mixed.pseudo_ce"]) and math.isfinite(record["source.ce"])
        assert 0.0 <= record["mic_masked_fraction"] <= 1.0
        if "t2sda" in preset:
            assert math.isfinite(record["pseudo_target.pull"])
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["iteration"] == 2 and state["method"] == "mic"
    resumed = Trainer(cfg, resume="latest", progress=False)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_resume_continues_the_same_trajectory(mic_domains, tmp_path):
    straight = Trainer(tiny_preset("digits_mic", mic_domains, tmp_path / "straight", iterations=4), progress=False)
    straight.train()
    half_cfg = tiny_preset("digits_mic", mic_domains, tmp_path / "halves", iterations=4,
                           extra=["train.checkpoint_interval=2"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2  # stop half-way; the schedule still spans 4 iterations
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert second.iteration == 2
    second.train()
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.teacher.module.parameters(), second.teacher.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_numbers_and_recipe():
    cfg = load_config("mic_daformer_gta2cs")
    assert cfg.reference["miou"] == 70.6
    assert cfg.method.name == "mic" and cfg.method.mic.base == "daformer"
    assert (cfg.method.mic.block_size, cfg.method.mic.mask_ratio, cfg.method.mic.weight) == (32, 0.7, 1.0)
    assert cfg.data.target.crop_size == [512, 512] and cfg.method.self_training.feature_distance.enabled
    combo = load_config("t2sda_mic_daformer_gta2cs")
    assert combo.method.mic.base == "t2sda" and combo.method.t2sda.weight == 0.1 and "miou" not in combo.reference
    digits = load_config("digits_mic")
    assert digits.method.mic.base == "dacs" and 64 % digits.method.mic.block_size == 0


def test_block_that_does_not_divide_the_crop_fails_before_training(tmp_path, capsys):
    argv = ["train", "--config", "mic_daformer_gta2cs", "model.name=daformer_tiny", "model.pretrained=",
            "method.mic.block_size=48", f"train.work_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "method.mic.block_size" in err and "48" in err and "512x512" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# The masked view and its loss
# --------------------------------------------------------------------------------------------

def _batch(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.randn(2, 3, size, size, generator=g),
                       "label": torch.randint(0, 3, (2, size, size), generator=g)},
            "target": {"image": torch.randn(2, 3, size, size, generator=g) + 0.5}}


def _prepared(preset, mic_domains, tmp_path, extra=(), seed=3, state=None):
    cfg = tiny_preset(preset, mic_domains, tmp_path, extra=extra)
    torch.manual_seed(0)
    segmentor = build_model(cfg.model.name, cfg.model.num_classes)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model, 0.999)
    needs = [n for o in method.objectives for n in o.needs(0)]
    ctx = StepContext(model, teacher, 0, torch.Generator().manual_seed(seed), needs, 3)
    batch = _batch()
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    ctx.state.update(state or {})
    for objective in method.objectives:
        objective.prepare(ctx, batch)
    return ctx, method, model, teacher, batch


def test_masked_view_uses_the_unmixed_teacher_pseudo_labels(mic_domains, tmp_path):
    ctx, method, _, teacher, batch = _prepared("mic_daformer_gta2cs", mic_domains, tmp_path,
                                               extra=["method.mic.color_augmentation=false"])
    assert isinstance(method.objectives[-1], MaskedImageConsistency)
    assert any(isinstance(o, PseudoLabelSelfTraining) for o in method.objectives)
    with torch.no_grad():
        logits = teacher.module(batch["target"]["image"]).logits
    probs = torch.softmax(F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False), dim=1)
    confidence, labels = probs.max(dim=1)
    masked = ctx.view(MASKED_VIEW)
    assert torch.equal(masked.label, labels)
    ratio = float((confidence >= 0.968).float().mean())
    assert torch.allclose(masked.weight, torch.full((2, 32, 32), ratio))  # one scalar, not the ClassMix weight
    assert masked.weight is ctx.state[PSEUDO]["weight"]
    # Without colour augmentation the masked view is the target times a block mask.
    target = batch["target"]["image"]
    kept = (masked.image != 0).all(dim=1, keepdim=True)
    assert torch.equal(masked.image, target * kept)
    blocks = kept.float().reshape(2, 1, 4, 8, 4, 8)
    assert bool((blocks.amin(dim=(3, 5)) == blocks.amax(dim=(3, 5))).all())  # 8 px blocks


def test_colour_augmentation_runs_before_the_mask(mic_domains, tmp_path):
    changed = False
    for seed in range(6):
        ctx, *_, batch = _prepared("digits_mic", mic_domains, tmp_path / str(seed), seed=seed)
        image = ctx.view(MASKED_VIEW).image
        kept = (image != 0).all(dim=1, keepdim=True).expand_as(image)
        assert bool((image[~kept] == 0).all())  # masked pixels stay exactly 0 after augmentation
        changed |= not torch.allclose(image[kept], batch["target"]["image"][kept])
    assert changed


def test_mic_draws_its_own_augmentation_gates(mic_domains, tmp_path):
    from udaseg.methods.dacs import AUG_FLAGS

    augmented = 0
    for seed in range(6):  # ClassMix's jitter and blur are off in this iteration; MIC's are drawn afresh
        ctx, *_, batch = _prepared("digits_mic", mic_domains, tmp_path / str(seed), seed=seed,
                                   state={AUG_FLAGS: (False, False)})
        mixed = ctx.view("mixed").image
        assert bool(((mixed == batch["source"]["image"]) | (mixed == batch["target"]["image"])).all())
        masked = ctx.view(MASKED_VIEW).image
        kept = (masked != 0).all(dim=1, keepdim=True).expand_as(masked)
        augmented += not torch.allclose(masked[kept], batch["target"]["image"][kept])
    assert augmented >= 3  # either gate fires with p = 0.9


def test_source_and_target_images_take_ground_truth_and_pseudo_label(mic_domains, tmp_path):
    ctx, *_, batch = _prepared("mic_daformer_gta2cs", mic_domains, tmp_path,
                               extra=["method.mic.images=source_and_target", "method.mic.color_augmentation=false"])
    masked = ctx.view(MASKED_VIEW)
    pseudo = ctx.state[PSEUDO]
    assert torch.equal(masked.label[0], batch["source"]["label"][0])
    assert torch.equal(masked.label[1], pseudo["labels"][0])
    assert torch.equal(masked.weight[0], torch.ones(32, 32)) and torch.equal(masked.weight[1], pseudo["weight"][0])
    kept = (masked.image != 0).all(dim=1, keepdim=True)
    assert torch.equal(masked.image[0], (batch["source"]["image"][0] * kept[0]))
    assert torch.equal(masked.image[1], (batch["target"]["image"][0] * kept[1]))


def test_without_quality_weight_every_pixel_weighs_one(mic_domains, tmp_path):
    ctx, *_ = _prepared("mic_daformer_gta2cs", mic_domains, tmp_path, extra=["method.mic.quality_weight=false"])
    assert torch.equal(ctx.view(MASKED_VIEW).weight, torch.ones(2, 32, 32))


def test_loss_matches_an_explicit_per_pixel_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[0, 0, :3] = 255
    weight = torch.rand(2, 8, 8, generator=g)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    total = 0.0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if labels[b, i, j] == 255:
                    continue
                row = up[b, :, i, j]
                total += float(weight[b, i, j]) * (math.log(sum(math.exp(float(v)) for v in row)) - float(row[labels[b, i, j]]))
    reference = total / (2 * 8 * 8)  # ignored pixels count in the denominator
    assert math.isclose(float(masked_consistency_loss(logits, labels, weight)), reference, rel_tol=1e-5)


def test_gradient_reaches_the_student_only_and_scales_with_lambda(mic_domains, tmp_path):
    results = {}
    for weight in (1.0, 0.5):
        ctx, method, model, teacher, batch = _prepared("mic_daformer_gta2cs", mic_domains, tmp_path / str(weight),
                                                       extra=[f"method.mic.weight={weight}",
                                                              "method.mic.quality_weight=false"])
        mic = method.objectives[-1]
        loss = mic.losses(ctx, MASKED_VIEW)["mic_ce"]
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
        grads = [p.grad for p in model.segmentor.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
        results[weight] = (float(loss.detach()), torch.cat([g.flatten() for g in grads]))
        assert results[weight][0] > 0
    assert math.isclose(results[0.5][0], 0.5 * results[1.0][0], rel_tol=1e-5)
    assert torch.allclose(results[0.5][1], 0.5 * results[1.0][1], atol=1e-7)


def test_full_step_leaves_the_teacher_without_gradients(mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path)
    torch.manual_seed(0)
    segmentor = build_model(cfg.model.name, cfg.model.num_classes)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model, 0.999)
    before = [p.clone() for p in teacher.module.parameters()]
    result = TrainStep(model, teacher, method.objectives, 3).run(_batch(), 0, torch.Generator().manual_seed(0))
    assert {"source.ce", "source.fd", "mixed.pseudo_ce", "masked.mic_ce"} <= set(result.losses)
    assert all(p.grad is None for p in teacher.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.module.parameters()))


def test_bases_without_a_teacher_or_target_are_refused(mic_domains, tmp_path):
    cfg = tiny_preset("digits_mic", mic_domains, tmp_path)
    cfg.method.mic.base = "source_only"
    with pytest.raises(UserError, match="method.mic.base"):
        build_method(cfg, build_model(cfg.model.name, 3))
    cfg = tiny_preset("t2sda_mic_daformer_gta2cs", mic_domains, tmp_path,
                      extra=["method.t2sda.domain_generalisation=true", "method.t2sda.dg_translations=[weather]"])
    with pytest.raises(UserError, match="method.mic.images"):
        build_method(cfg, build_model(cfg.model.name, 3))


def test_mic_on_sepico_reuses_the_pseudo_labels_of_the_cropped_target(mic_domains, tmp_path):
    cfg = tiny_preset("mic_daformer_gta2cs", mic_domains, tmp_path / "run", extra=[
        "method.mic.base=sepico", "method.self_training.feature_distance.enabled=false",
        "method.sepico.variant=dist", "method.sepico.warmup_iters=0",
        "method.sepico.proj_dim=16", "method.sepico.target_crop_size=[32, 32]"])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    names = [type(o).__name__ for o in trainer.method.objectives]
    assert names[-1] == "MaskedImageConsistency" and len(names) > 4
    records = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))
    assert all(math.isfinite(r["masked.mic_ce"]) for r in records)
    assert {"source_strong.sepico_cl", "target_strong.sepico_cl", "mixed.pseudo_ce"} <= set(records[-1])
