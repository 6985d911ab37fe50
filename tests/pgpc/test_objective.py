"""PGPC inside the shared training step: presets end to end, selection, banks, gradients, resume, switches."""

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
from udaseg.methods.dacs import MIX_MASKS, PseudoLabelSelfTraining
from udaseg.methods.pgpc import (
    MIXED_VIEW, PLAN, PROJECTION_HEAD, TARGET_STRONG_VIEW, PGPCContrast, flatten_pixels, full_cells,
    labels_at_grid, reliable_pixel_mask, teacher_pixel_maps,
)
from udaseg.models import build_model

from .conftest import SIZE, tiny_config

PGPC_PRESETS = ["pgpc_daformer_gta2cs", "pgpc_daformer_synthia2cs", "pgpc_daformer_cs2dz", "pgpc_daformer_cs2acdc",
                "digits_pgpc"]


def contrast_of(objectives) -> PGPCContrast:
    return next(obj for obj in objectives if isinstance(obj, PGPCContrast))


# ------------------------------------------------------------------------------------- presets
def test_preset_list_and_paper_values():
    # PGPC on the HRDA bases: tests/hrda/test_method.py
    assert {p for p in list_presets() if "pgpc" in p and "hrda" not in p} == set(PGPC_PRESETS)
    for preset in PGPC_PRESETS:
        cfg = load_config(preset)
        p = cfg.method.pgpc
        assert cfg.method.name == "pgpc" and cfg.method.self_training.mix == "class"
        assert (p.temperature, p.weight, p.target_weight, p.proportion, p.rank) == (0.5, 0.1, 1.0, 0.5, 4)
        assert (p.anchors_per_class, p.negatives, list(p.negative_pools)) == (256, 512, ["source", "target"])
        assert (p.positive, p.selection) == ("source_proto", "global_entropy")
        if preset.startswith("pgpc_"):
            assert cfg.train.iterations == 60000 and p.warmup_iters == 20000 and p.proj_dim == 256
            assert cfg.method.self_training.feature_distance.enabled and cfg.method.self_training.ema_alpha == 0.999
            assert cfg.model.name == "daformer_mitb5" and cfg.data.source.crop_size == [512, 512]
            assert cfg.reference["miou"] > 0
        else:  # the digits budget: L_c on after a third of it, as 20k of 60k
            assert p.warmup_iters * 3 == cfg.train.iterations
    gta = load_config("pgpc_daformer_gta2cs")
    assert (gta.method.self_training.ignore_top, gta.method.self_training.ignore_bottom) == (15, 120)
    for preset in ("pgpc_daformer_cs2dz", "pgpc_daformer_cs2acdc"):
        cfg = load_config(preset)
        assert cfg.data.source.name == "cityscapes" and cfg.method.self_training.ignore_bottom == 0
        assert cfg.data.target.resize == [960, 540] and cfg.reference["split"] == "test"


@pytest.mark.parametrize("preset", PGPC_PRESETS)
def test_preset_trains_end_to_end_with_reloadable_checkpoint(preset, domains, tmp_path):
    cfg = tiny_config(preset, domains, tmp_path / "run", iterations=3)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert "target_strong.pgpc_cl" not in records[0]  # iteration 0 is inside the warm-up
    assert all("target_strong.pgpc_cl" in r and math.isfinite(r["target_strong.pgpc_cl"]) for r in records[1:])
    assert all(r["pgpc.anchors"] > 0 for r in records[1:])
    contrast = contrast_of(trainer.objectives)
    assert int(contrast.source_bank.length.sum()) > 0 and int(contrast.target_bank.length) > 0
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["iteration"] == 3 and any(k.endswith("source_bank.features") for k in state["objectives"])
    resumed = Trainer(cfg, resume=str(tmp_path / "run" / "latest.pt"), progress=False)
    for key, value in trainer.objectives.state_dict().items():
        assert torch.equal(resumed.objectives.state_dict()[key], value), key


def test_resume_continues_bit_exactly_with_the_banks(domains, tmp_path):
    extra = ["method.pgpc.source_bank_size=4", "method.pgpc.target_bank_size=30"]  # the banks wrap around
    straight = Trainer(tiny_config("pgpc_daformer_gta2cs", domains, tmp_path / "a", 4, extra), progress=False)
    straight.train()
    half_cfg = tiny_config("pgpc_daformer_gta2cs", domains, tmp_path / "b", 4, [*extra, "train.checkpoint_interval=2"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert second.iteration == 2
    second.train()
    expected, got = straight.objectives.state_dict(), second.objectives.state_dict()
    assert any("target_bank" in k for k in expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert int(contrast_of(straight.objectives).source_bank.length.max()) == 4
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.teacher.module.parameters(), second.teacher.module.parameters()):
        assert torch.equal(a, b)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl", "train")
    assert [r["target_strong.pgpc_cl"] for r in a[1:]] == [r["target_strong.pgpc_cl"] for r in b[1:]]


# ----------------------------------------------------------------------------- one step, by hand
def step_config(extra=()):
    return load_config("pgpc_daformer_gta2cs", [
        "model.name=daformer_tiny", "model.num_classes=3", "model.pretrained=", "model.options={}",
        f"data.source.crop_size=[{SIZE}, {SIZE}]", f"data.target.crop_size=[{SIZE}, {SIZE}]",
        "method.pgpc.warmup_iters=1", "method.pgpc.proj_dim=16", "method.pgpc.rank=1",
        "method.pgpc.anchors_per_class=6", "method.pgpc.negatives=10", "method.pgpc.source_bank_size=20",
        "method.pgpc.target_bank_size=64", "method.pgpc.target_enqueue_per_image=16",
        "method.self_training.ignore_top=8", "method.self_training.ignore_bottom=0", "method.self_training.feature_distance.classes=[1]",
        *extra,
    ])


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 3, (2, SIZE // 8, SIZE // 8))
    cells[:, 0, :3] = [0, 1, 2]
    labels = torch.from_numpy(np.kron(cells, np.ones((1, 8, 8)))).long()
    return {"source": {"image": torch.randn(2, 3, SIZE, SIZE, generator=gen), "label": labels},
            "target": {"image": torch.randn(2, 3, SIZE, SIZE, generator=gen)}}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    segmentor = build_model(cfg.model.name, cfg.model.num_classes)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model)
    teacher.update(0)
    return model, teacher, method


def prepared(model, teacher, method, batch, iteration, seed=0):
    needs = [n for obj in method.objectives for n in obj.needs(iteration)]
    ctx = StepContext(model, teacher, iteration, torch.Generator().manual_seed(seed), needs, 3)
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    for obj in method.objectives:
        obj.prepare(ctx, batch)
    return ctx


def test_method_layout():
    cfg = step_config()
    segmentor = build_model("daformer_tiny", 3)
    method = build_method(cfg, segmentor)
    head, tap = method.heads[PROJECTION_HEAD]
    assert tap == "enc_fused" and method.uses_teacher and method.uses_target
    c_in = segmentor.tap_channels("enc_fused")
    assert head.convs[0].conv.weight.shape[:2] == (c_in // 4, c_in) and head.convs[1].conv.weight.shape[0] == 16
    kinds = [type(o).__name__ for o in method.objectives]
    assert kinds == ["SupervisedSegmentation", "ImageNetFeatureDistance", "PseudoLabelSelfTraining", "PGPCContrast"]


def test_anchors_are_reliable_pseudo_labelled_target_pixels_outside_the_ignore_band():
    cfg = step_config()
    model, teacher, method = build(cfg)
    batch = make_batch()
    ctx = prepared(model, teacher, method, batch, 1)
    plan = ctx.state[PLAN]
    # independent recomputation from the teacher's softmax on the weak target
    with torch.no_grad():
        logits = teacher.module(batch["target"]["image"]).logits
    probs = torch.softmax(torch.nn.functional.interpolate(logits, size=(SIZE, SIZE), mode="bilinear",
                                                          align_corners=False), 1)
    maps = teacher_pixel_maps(probs, (SIZE // 4, SIZE // 4), 1)
    band = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    band[:, :8] = False  # ignore_top = 8 rows = the first 2 feature rows
    valid = full_cells(band, maps.labels.shape[-2:])
    assert not valid[:, :2].any() and valid[:, 2:].all()
    reliable = reliable_pixel_mask(maps, valid, "global_entropy", 0.5)
    assert int(reliable.sum()) == 2 * (6 * 8) // 2  # half of each image's valid cells
    flat_labels, flat_reliable = maps.labels.reshape(-1), reliable.reshape(-1)
    assert plan.anchors
    for cls, rows in plan.anchors.items():
        assert bool((flat_labels[rows] == cls).all()) and bool(flat_reliable[rows].all())
        assert rows.numel() == min(6, int((flat_reliable & (flat_labels == cls)).sum()))
    assert ctx.metrics["pgpc.reliable"] == pytest.approx(float(reliable.float().mean()))
    assert TARGET_STRONG_VIEW in ctx.views and ctx.views[TARGET_STRONG_VIEW].image.shape == (2, 3, SIZE, SIZE)


def test_negatives_come_from_the_banks_before_the_update_and_prototypes_after():
    cfg = step_config()
    model, teacher, method = build(cfg)
    contrast = contrast_of(method.objectives)
    prepared(model, teacher, method, make_batch(0), 0)  # fills the banks (iteration 0: warm-up)
    source_before = contrast.source_bank.features.clone()
    source_occupied = contrast.source_bank.occupied().clone()
    target_before = contrast.target_bank.features.clone()
    target_classes = contrast.target_bank.top_classes.clone()
    ctx = prepared(model, teacher, method, make_batch(1), 1)
    plan = ctx.state[PLAN]
    for cls, negatives in plan.negatives.items():
        assert negatives.shape[0] == 10 and not negatives.requires_grad
        for row in negatives:
            in_source = [(source_before[k, s] == row).all() for k in range(3) for s in range(20)
                         if source_occupied[k, s] and k != cls]
            in_target = [(target_before[s] == row).all() for s in range(64) if not (target_classes[s] == cls).any()]
            assert any(in_source) or any(in_target)  # an old entry of another class / not in top-r
    assert not torch.equal(contrast.source_bank.features, source_before)  # then the banks were updated
    # the prototype is the mean of the bank after the update (current batch included)
    prototypes, valid = contrast.prototypes()
    for cls in range(3):
        if valid[cls]:
            torch.testing.assert_close(prototypes[cls], contrast.source_bank.entries(cls).mean(0))


def test_source_bank_holds_teacher_projections_of_the_weak_source():
    cfg = step_config(["method.pgpc.source_enqueue_per_class=1000", "method.pgpc.source_bank_size=200"])
    model, teacher, method = build(cfg)
    batch = make_batch()
    prepared(model, teacher, method, batch, 0)
    with torch.no_grad():
        features = teacher.module(batch["source"]["image"], heads=(PROJECTION_HEAD,)).projections[PROJECTION_HEAD]
    labels = labels_at_grid(batch["source"]["label"], features.shape[-2:], 3, 0.75).reshape(-1)
    flat = flatten_pixels(features)
    bank = contrast_of(method.objectives).source_bank
    for cls in range(3):
        expected = flat[labels == cls]
        assert int(bank.length[cls]) == expected.shape[0]
        torch.testing.assert_close(bank.entries(cls), expected)  # all pixels, in order, when under the cap


def test_gradients_reach_the_student_encoder_and_head_never_the_teacher_or_decoder():
    cfg = step_config()
    model, teacher, method = build(cfg)
    prepared(model, teacher, method, make_batch(0), 0)
    ctx = prepared(model, teacher, method, make_batch(1), 1)
    loss = contrast_of(method.objectives).losses(ctx, TARGET_STRONG_VIEW)["pgpc_cl"]
    assert loss.requires_grad and float(loss.detach()) > 0
    loss.backward()
    head_grads = [p.grad for p in model.heads[PROJECTION_HEAD].parameters()]
    assert all(g is not None for g in head_grads) and any(float(g.abs().sum()) > 0 for g in head_grads)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.segmentor.backbone.parameters())
    assert all(p.grad is None for p in model.segmentor.decode_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    # a full step: still no gradient anywhere in the teacher, and the teacher's head is EMA-tracked
    result = TrainStep(model, teacher, method.objectives, 3).run(make_batch(2), 2, torch.Generator().manual_seed(0))
    assert "target_strong.pgpc_cl" in result.losses
    assert all(p.grad is None for p in teacher.module.parameters())
    assert PROJECTION_HEAD in teacher.module.heads


def test_warmup_keeps_the_student_head_idle_but_fills_the_banks():
    cfg = step_config(["method.pgpc.warmup_iters=3"])
    model, teacher, method = build(cfg)
    contrast = contrast_of(method.objectives)
    assert not any(n.model == "student" and n.heads for n in contrast.needs(2))
    result = TrainStep(model, teacher, method.objectives, 3).run(make_batch(), 2, torch.Generator().manual_seed(0))
    assert not any("pgpc" in k for k in result.losses)
    assert all(p.grad is None for p in model.heads[PROJECTION_HEAD].parameters())
    assert int(contrast.source_bank.length.sum()) > 0 and int(contrast.target_bank.length) == 32
    late = load_config("pgpc_daformer_gta2cs", ["method.pgpc.bank_start_iter=5", "method.pgpc.warmup_iters=10"])
    late_contrast = PGPCContrast(late.method.pgpc, late.method.self_training, 19, late.data.mean, late.data.std)
    assert late_contrast.needs(4) == [] and late_contrast.needs(5)


def test_lambda_t_scales_only_the_target_pixels_of_the_mixed_view():
    batch = make_batch()
    views = {}
    for weight in (1.0, 0.5):
        cfg = step_config([f"method.pgpc.target_weight={weight}"])
        model, teacher, method = build(cfg)
        ctx = prepared(model, teacher, method, batch, 1)
        views[weight] = (ctx.view(MIXED_VIEW).weight.clone(), ctx.state[MIX_MASKS])
    (full, masks), (half, _) = views[1.0], views[0.5]
    assert torch.equal(half[masks], full[masks])
    torch.testing.assert_close(half[~masks], 0.5 * full[~masks])


@pytest.mark.parametrize("switch", [
    "method.pgpc.positive=target_proto", "method.pgpc.negative_pools=[source]", "method.pgpc.negative_pools=[target]",
    "method.pgpc.selection=global_confidence", "method.pgpc.selection=classwise_entropy",
    "method.pgpc.selection=classwise_confidence", "method.pgpc.selection_scope=batch",
    "method.pgpc.bank_features=student", "method.pgpc.anchor_view=mixed", "method.pgpc.reduction=paper",
    "method.pgpc.exclude_ignored=false",
])
def test_every_switch_runs_a_step(switch):
    cfg = step_config([switch])
    model, teacher, method = build(cfg)
    step = TrainStep(model, teacher, method.objectives, 3)
    step.run(make_batch(0), 0, torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    result = step.run(make_batch(1), 1, torch.Generator().manual_seed(1))
    group = MIXED_VIEW if "anchor_view" in switch else TARGET_STRONG_VIEW
    assert math.isfinite(result.losses[f"{group}.pgpc_cl"]) and result.losses[f"{group}.pgpc_cl"] > 0
    assert all(p.grad is not None for p in model.heads[PROJECTION_HEAD].parameters())


def test_negative_pools_and_positive_switches_select_the_right_banks():
    model, teacher, method = build(step_config(["method.pgpc.negative_pools=[target]"]))
    prepared(model, teacher, method, make_batch(0), 0)
    contrast = contrast_of(method.objectives)
    negatives = contrast.sample_negatives(0, torch.Generator().manual_seed(0))
    target_rows = {tuple(r.tolist()) for r in contrast.target_bank.features[contrast.target_bank.excluding(0)]}
    assert negatives.shape[0] > 0 and all(tuple(r.tolist()) in target_rows for r in negatives)
    model, teacher, method = build(step_config(["method.pgpc.positive=target_proto"]))
    prepared(model, teacher, method, make_batch(0), 0)
    contrast = contrast_of(method.objectives)
    torch.testing.assert_close(contrast.prototypes()[0], contrast.target_proto_bank.prototypes()[0])


def test_mixed_anchor_view_uses_only_cells_that_are_wholly_target():
    cfg = step_config(["method.pgpc.anchor_view=mixed"])
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, make_batch(), 1)
    target_cells = full_cells(~ctx.state[MIX_MASKS], (SIZE // 4, SIZE // 4)).reshape(-1)
    plan = ctx.state[PLAN]
    assert plan.anchors and all(bool(target_cells[rows].all()) for rows in plan.anchors.values())
    assert TARGET_STRONG_VIEW not in ctx.views


@pytest.mark.parametrize("override, key", [
    ("method.pgpc.rank=3", "rank"), ("method.pgpc.negative_pools=[source, bogus]", "negative_pools"),
    ("method.pgpc.proportion=1.5", "proportion"), ("method.pgpc.temperature=0", "temperature"),
    ("method.pgpc.anchors_per_class=0", "anchors_per_class"), ("method.pgpc.target_bank_size=0", "target_bank_size"),
    ("method.self_training.mix=none", "mix"), ("method.pgpc.feature=enc9", "feature"),
])
def test_bad_settings_are_one_line_user_errors(override, key):
    cfg = step_config([override])
    with pytest.raises(UserError, match=key) as error:
        build_method(cfg, build_model("daformer_tiny", 3))
    assert "\n" not in str(error.value)


def test_crop_not_divisible_by_the_projection_stride_is_rejected():
    cfg = step_config(["data.source.crop_size=[30, 32]"])
    with pytest.raises(UserError, match="data.source.crop_size"):
        build_method(cfg, build_model("daformer_tiny", 3))


def test_cli_reports_a_bad_pgpc_setting_in_one_line_with_exit_2(tmp_path, capsys):
    from udaseg.cli import main

    argv = ["train", "--config", "pgpc_daformer_gta2cs", "model.name=daformer_tiny", "model.pretrained=",
            f"train.work_dir={tmp_path / 'run'}", "method.pgpc.rank=19"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "method.pgpc.rank=19" in err and len(err.splitlines()) == 1
    assert main(["train", "--config", "pgpc_daformer_gta2cs", "method.pgpc.rnak=3"]) == 2
    assert "method.pgpc.rank" in capsys.readouterr().err


def test_contrast_skips_classes_without_prototype_and_follows_the_reduction():
    from udaseg.methods.pgpc import ContrastPlan, PixelPrototypeContrastLoss

    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(1, 16, 2, 4, generator=gen), dim=1).requires_grad_()
    negatives = {0: torch.randn(5, 16, generator=gen), 2: torch.randn(3, 16, generator=gen)}
    plan = ContrastPlan({0: torch.tensor([1, 6, 3]), 2: torch.tensor([0, 2])}, negatives)
    for reduction in ("mean", "paper"):
        cfg = step_config([f"method.pgpc.reduction={reduction}"])
        contrast = PGPCContrast(cfg.method.pgpc, cfg.method.self_training, 3, cfg.data.mean, cfg.data.std)
        bank_features = torch.randn(4, 16, generator=gen)
        contrast.source_bank.push(bank_features, torch.tensor([0, 0, 1, 1]), per_class=10)  # class 2: no prototype
        loss, metrics = contrast.contrast(features, plan)
        anchors = features.detach().permute(0, 2, 3, 1).reshape(-1, 16)[torch.tensor([1, 6, 3])]
        per_anchor = PixelPrototypeContrastLoss(0.5, "none")(anchors, torch.zeros(3, dtype=torch.long),
                                                             bank_features[:2].mean(0, keepdim=True),
                                                             negatives[0].unsqueeze(0))
        expected = per_anchor.mean() if reduction == "mean" else per_anchor.sum() / (3 * 6)
        torch.testing.assert_close(loss.detach(), expected)
        assert metrics["pgpc.classes"] == 1 and metrics["pgpc.anchors"] == 3
    loss.backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0


def test_eta_zero_selects_no_anchor_and_the_term_vanishes():
    cfg = step_config(["method.pgpc.proportion=0"])
    model, teacher, method = build(cfg)
    step = TrainStep(model, teacher, method.objectives, 3)
    step.run(make_batch(0), 0, torch.Generator().manual_seed(0))
    result = step.run(make_batch(1), 1, torch.Generator().manual_seed(1))
    assert result.losses["target_strong.pgpc_cl"] == 0.0 and result.metrics["pgpc.anchors"] == 0
