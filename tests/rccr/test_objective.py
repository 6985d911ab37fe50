"""RCCR inside the shared step: presets end to end, the CutMix view, anchors, gradients, momentum, bank, resume."""

import copy
import math

import numpy as np
import pytest
import torch

from udaseg.adapt.step import StepContext, TrainStep, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.config import list_presets, load_config
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import build_method
from udaseg.methods.rccr import CUT_VIEW, PLAN, PROJECTION_HEAD, RegionContrast
from udaseg.models import build_model

from .conftest import SIZE, tiny_config

RCCR_PRESETS = ["rccr_deeplabv2_gta2cs", "rccr_deeplabv2_synthia2cs", "digits_rccr"]


def contrast_of(objectives) -> RegionContrast:
    return next(obj for obj in objectives if isinstance(obj, RegionContrast))


# ------------------------------------------------------------------------------------- presets
def test_preset_list_and_paper_values():
    assert {p for p in list_presets() if "rccr" in p} == set(RCCR_PRESETS)
    for preset in RCCR_PRESETS:
        cfg = load_config(preset)
        r, st = cfg.method.rccr, cfg.method.self_training
        assert cfg.method.name == "rccr" and st.augmentation_draws == "per_view" and st.ema_alpha == 0.99
        assert (r.temperature, r.confidence_threshold, r.weight, r.ramp_exponent, r.bank_batches) == (0.1, 0.75, 0.01, 0.5, 3)
        assert (r.negative_keep, r.proj_dim, r.cut_area) == (0.5, 128, [0.5])
    for preset, protocol, miou in (("rccr_deeplabv2_gta2cs", "19", 53.5), ("rccr_deeplabv2_synthia2cs", "13", 56.8)):
        cfg = load_config(preset)
        o = cfg.optim
        assert (o.name, o.lr, o.head_lr_mult, o.momentum, o.weight_decay, o.power, o.warmup_iters) == (
            "sgd", 2.5e-4, 10.0, 0.9, 5e-4, 0.9, 0)
        assert cfg.model.name == "deeplabv2_r101" and cfg.model.options == {"freeze_bn_affine": True}
        assert cfg.train.iterations == 250000 and cfg.data.batch_size == 2
        assert not cfg.data.source.flip and not cfg.data.target.flip and not cfg.data.source.rcs.enabled
        assert cfg.data.source.crop_size == [512, 512] and cfg.data.target.resize == [1024, 512]
        assert cfg.eval.protocol == protocol and cfg.reference["miou"] == miou
        assert cfg.method.self_training.color_jitter_strength == 0.25
    digits, dacs = load_config("digits_rccr"), load_config("digits_dacs")
    assert digits.train.iterations == dacs.train.iterations == 3000 and digits.model == dacs.model


def test_paper_network_gives_the_8px_grid():
    segmentor = build_model("deeplabv2_r101", 19)
    assert segmentor.tap_stride("enc_last") == 8 and segmentor.tap_channels("enc_last") == 2048
    cfg = load_config("rccr_deeplabv2_gta2cs", ["model.pretrained="])
    head = build_method(cfg, segmentor).heads[PROJECTION_HEAD][0]
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert shapes == [(2048, 2048, 1, 1), (2048,), (128, 2048, 1, 1), (128,)]
    with torch.no_grad():
        features = segmentor.backbone(torch.zeros(1, 3, 64, 64))  # H/8 exactly (a ceil-mode max-pool gives 9)
    assert tuple(features[-1].shape[-2:]) == (8, 8)


@pytest.mark.parametrize("preset", RCCR_PRESETS)
def test_preset_trains_end_to_end_with_reloadable_checkpoint(preset, domains, tmp_path):
    cfg = tiny_config(preset, domains, tmp_path / "run", iterations=3)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert all(math.isfinite(r["region_mixed.rccr_cont"]) and r["rccr.anchors"] > 0 for r in records)
    assert records[0]["rccr.mu"] == pytest.approx(0.01 * math.exp(-5))
    contrast = contrast_of(trainer.objectives)
    assert int(contrast.bank.length) == 3
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert any(k.endswith("bank.features") for k in state["objectives"])
    resumed = Trainer(cfg, resume=str(tmp_path / "run" / "latest.pt"), progress=False)
    for key, value in trainer.objectives.state_dict().items():
        assert torch.equal(resumed.objectives.state_dict()[key], value), key


def test_resume_continues_bit_exactly_with_the_bank(domains, tmp_path):
    straight = Trainer(tiny_config("digits_rccr", domains, tmp_path / "a", 5), progress=False)
    straight.train()
    half_cfg = tiny_config("digits_rccr", domains, tmp_path / "b", 5, ["train.checkpoint_interval=2"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert second.iteration == 2 and int(contrast_of(second.objectives).bank.length) == 2
    second.train()
    expected, got = straight.objectives.state_dict(), second.objectives.state_dict()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl", "train")
    assert [r["region_mixed.rccr_cont"] for r in a] == [r["region_mixed.rccr_cont"] for r in b]


# ----------------------------------------------------------------------------- one step, by hand
def step_config(extra=()):
    return load_config("rccr_deeplabv2_gta2cs", [
        "model.name=deeplabv2_tiny", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"data.source.crop_size=[{SIZE}, {SIZE}]", f"data.target.crop_size=[{SIZE}, {SIZE}]",
        "method.rccr.proj_dim=8", "method.rccr.proj_hidden=16", *extra,
    ])


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 3, (2, SIZE // 8, SIZE // 8))
    labels = torch.from_numpy(np.kron(cells, np.ones((1, 8, 8)))).long()
    return {"source": {"image": torch.randn(2, 3, SIZE, SIZE, generator=gen), "label": labels},
            "target": {"image": torch.randn(2, 3, SIZE, SIZE, generator=gen)}}


def build(cfg, seed=0, alpha=0.99):
    torch.manual_seed(seed)
    segmentor = build_model(cfg.model.name, cfg.model.num_classes)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model, alpha, method.ema_rates)
    teacher.update(0)
    return model, teacher, method


def prepared(model, teacher, method, batch, iteration=1, seed=0):
    needs = [n for obj in method.objectives for n in obj.needs(iteration)]
    ctx = StepContext(model, teacher, iteration, torch.Generator().manual_seed(seed), needs, 3)
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    for obj in method.objectives:
        obj.prepare(ctx, batch)
    return ctx


def test_cut_view_pastes_the_target_square_onto_the_source_on_the_grid():
    cfg = step_config(["method.rccr.augment_cut=false"])
    model, teacher, method = build(cfg)
    batch = make_batch()
    ctx = prepared(model, teacher, method, batch)
    view, plan = ctx.view(CUT_VIEW), ctx.state[PLAN]
    square = plan.square.view(2, SIZE // 8, SIZE // 8)
    pixels = square.repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert int(square[0].sum()) == 4  # r = 0.5 of 32 x 32 -> 16 px = 2 x 2 cells
    inside = pixels.unsqueeze(1).expand_as(view.image)
    assert torch.equal(view.image[inside], batch["target"]["image"][inside])
    assert torch.equal(view.image[~inside], batch["source"]["image"][~inside])
    pseudo = ctx.state["target_pseudo:target"]["labels"]
    assert torch.equal(view.label[pixels], pseudo[pixels]) and torch.equal(view.label[~pixels], batch["source"]["label"][~pixels])
    source_cells = batch["source"]["label"][:, ::8, ::8].reshape(2, -1)
    assert torch.equal(plan.cut_labels[~plan.square], source_cells[~plan.square])
    assert torch.equal(plan.cut_labels[plan.square], plan.teacher_labels[plan.square])


def test_mixed_views_are_augmented_independently():
    cfg = step_config(["method.self_training.color_jitter_prob=1.0", "method.self_training.blur_prob=0.0"])
    model, teacher, method = build(cfg)
    batch = make_batch()
    ctx = prepared(model, teacher, method, batch)
    assert "augmentation_flags:mixed" in ctx.state and "augmentation_flags:region_mixed" in ctx.state
    plain = prepared(model, teacher, build(step_config(["method.rccr.augment_cut=false"]))[2], batch)
    assert not torch.equal(ctx.view(CUT_VIEW).image, plain.view(CUT_VIEW).image)


def test_anchors_are_confident_square_cells():
    model, teacher, method = build(step_config(["method.rccr.confidence_threshold=0.4"]))
    batch = make_batch()
    ctx = prepared(model, teacher, method, batch)
    plan = ctx.state[PLAN]
    with torch.no_grad():
        logits = teacher.module(batch["target"]["image"]).logits
    confidence = torch.softmax(logits, 1).amax(1).reshape(2, -1)
    for b in range(2):
        expected = (plan.square[b] & (confidence[b] > 0.4)).nonzero().squeeze(1)
        assert torch.equal(plan.anchors[b], expected)
    gated = prepared(model, teacher, build(step_config(["method.rccr.confidence_threshold=1.0"]))[2], batch)
    assert all(a.numel() == 0 for a in gated.state[PLAN].anchors)  # nothing above 1: no anchor
    off = prepared(model, teacher, build(step_config(["method.rccr.positive_sampling=false",
                                                      "method.rccr.confidence_threshold=1.0"]))[2], batch)
    assert [a.numel() for a in off.state[PLAN].anchors] == [4, 4]


def test_gradients_reach_projector_and_encoder_only_never_the_teacher():
    cfg = step_config(["method.rccr.weight=1.0", "method.rccr.confidence_threshold=0.0"])
    model, teacher, method = build(cfg)
    contrast = contrast_of(method.objectives)
    ctx = prepared(model, teacher, method, make_batch())
    loss, _ = contrast.contrast(step_features(ctx, contrast), ctx.state[PLAN])
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["heads.proj_head.convs.0.weight"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("segmentor.backbone"))
    assert all(g is None for n, g in grads.items() if "decode_head" in n)  # L_cont never reaches F_seg
    assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())
    result = TrainStep(model, teacher, method.objectives, 3).run(make_batch(), 1, torch.Generator().manual_seed(0))
    assert "region_mixed.rccr_cont" in result.losses
    assert all(p.grad is None for p in teacher.module.parameters())


def step_features(ctx, contrast):
    from udaseg.methods.rccr import flatten_cells

    return flatten_cells(ctx.student(CUT_VIEW).projections[contrast.head])


def test_teacher_projector_moves_only_by_its_momentum():
    cfg = step_config(["method.rccr.projector_momentum=0.9"])
    model, teacher, method = build(cfg, alpha=0.99)
    assert method.ema_rates == {"heads.proj_head": 0.9}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = TrainStep(model, teacher, method.objectives, 3)
    for it in (1, 2):
        before = {n: p.clone() for n, p in teacher.module.named_parameters()}
        result = step.run(make_batch(it), it, torch.Generator().manual_seed(it))
        optimizer.step()
        step.after_step(result)
        optimizer.zero_grad()
        untouched = {n: p for n, p in teacher.module.named_parameters()}
        assert all(torch.equal(before[n], untouched[n]) for n in before)  # the step alone moves nothing
        teacher.update(it + 1)
        student = dict(model.named_parameters())
        for name, param in teacher.module.named_parameters():
            alpha = min(1 - 1 / (it + 2), 0.9 if name.startswith("heads.proj_head") else 0.99)
            assert torch.allclose(param, alpha * before[name] + (1 - alpha) * student[name].detach(), atol=1e-6), name


def test_bank_is_filled_after_the_step_and_feeds_the_next_iteration():
    cfg = step_config(["method.rccr.confidence_threshold=0.0", "method.rccr.random_negatives=false",
                       "method.rccr.class_aware_negatives=false"])
    model, teacher, method = build(cfg)
    contrast = contrast_of(method.objectives)
    step = TrainStep(model, teacher, method.objectives, 3)
    cells = (SIZE // 8) ** 2
    for it in range(5):
        result = step.run(make_batch(it), it, torch.Generator().manual_seed(it))
        plan = result.context.state[PLAN]
        held = min(it, 3)
        assert plan.bank[0].shape[0] == held * 2 * 2 * cells  # 2 images x 2 maps per batch
        assert result.metrics["rccr.negatives"] == 2 * cells - 2 + held * 2 * 2 * cells
        assert int(contrast.bank.length) == held  # not yet pushed: after the optimiser step
        step.after_step(result)
        assert int(contrast.bank.length) == min(it + 1, 3)
    teacher_only = contrast_of(build(step_config(["method.rccr.bank_store=teacher"]))[2].objectives)
    assert teacher_only.bank is not None
    assert contrast_of(build(step_config(["method.rccr.bank_batches=0"]))[2].objectives).bank is None


@pytest.mark.parametrize("extra", [
    ["method.rccr.negative_sampling=per_anchor", "method.rccr.bank_store=sampled"],
    ["method.rccr.negative_sampling=exact", "method.rccr.cross_image_negatives=true",
     "method.rccr.detach_student_negatives=true"],
    ["method.rccr.normalization=square", "method.rccr.ignored_negatives=drop", "method.rccr.target_cell_labels=pooled",
     "method.rccr.source_cell_labels=nearest", "method.rccr.cut_segmentation_loss=true", "method.rccr.cut_area=[0.2, 0.6]",
     "method.rccr.ramp_exponent=2.0"],
])
def test_switches_run(extra):
    model, teacher, method = build(step_config(["method.rccr.confidence_threshold=0.0", *extra]))
    step = TrainStep(model, teacher, method.objectives, 3)
    for it in range(2):
        result = step.run(make_batch(it), it, torch.Generator().manual_seed(it))
        step.after_step(result)
        assert math.isfinite(result.losses["region_mixed.rccr_cont"])
    if "method.rccr.cut_segmentation_loss=true" in extra:
        assert "region_mixed.cut_ce" in result.losses


@pytest.mark.parametrize("override,message", [
    ("method.rccr.cut_area=[0.7, 0.2]", "method.rccr.cut_area"),
    ("method.rccr.temperature=0", "method.rccr.temperature"),
    ("method.rccr.projector_momentum=1.0", "method.rccr.projector_momentum"),
    ("method.rccr.negative_sampling=halves", "method.rccr.negative_sampling"),
    ("method.rccr.bank_batches=-1", "method.rccr.bank_batches"),
])
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(UserError, match=message) as error:
        step_config([override])
    assert "\n" not in str(error.value)


def test_crop_off_the_grid_and_no_mix_are_refused():
    with pytest.raises(UserError, match=r"data.source.crop_size=\[36, 36\] is not a multiple of the stride 8"):
        build_method(step_config(["data.source.crop_size=[36, 36]"]), build_model("deeplabv2_tiny", 3))
    with pytest.raises(UserError, match="method.self_training.mix must be 'class'"):
        build_method(step_config(["method.self_training.mix=none"]), build_model("deeplabv2_tiny", 3))
