"""SePiCo inside the shared training step: every preset end to end, views, gradients, statistics, resume."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from udaseg.adapt.pseudo_label import pseudo_labels
from udaseg.adapt.stats import OnlineClassStatistics
from udaseg.adapt.step import StepContext, TrainStep, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.config import list_presets, load_config
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import build_method
from udaseg.methods.base import SupervisedSegmentation
from udaseg.methods.dacs import PSEUDO, PseudoLabelSelfTraining
from udaseg.methods.sepico import (
    CROP_BOXES, DAY_VIEW, PROJECTION_HEAD, SOURCE_STRONG_VIEW, TARGET_STRONG_VIEW, ClassPriorReweighting,
    SePiCoContrast, TargetCropping, class_balanced_crop_boxes, dark_zurich_class_weights, flatten_valid,
    fuse_day_night, _downscale_labels,
)
from udaseg.models import build_model

H, W = 32, 64  # target images: uncropped, twice as wide as the 32 x 32 crops (like 1280 x 640 -> 640)
CROP = 32
SEPICO_PRESETS = [
    "sepico_distcl_deeplabv2_gta2cs", "sepico_bankcl_deeplabv2_gta2cs", "sepico_protocl_deeplabv2_gta2cs",
    "sepico_distcl_daformer_gta2cs", "sepico_bankcl_daformer_gta2cs", "sepico_protocl_daformer_gta2cs",
    "sepico_distcl_deeplabv2_synthia2cs", "sepico_distcl_daformer_synthia2cs",
    "sepico_distcl_deeplabv2_cs2dz", "sepico_distcl_daformer_cs2dz",
    "digits_sepico_distcl", "digits_sepico_bankcl", "digits_sepico_protocl", "digits_sepico_distcl_t01",
]


def block_label(rng, height, width, block=8):
    """Labels constant on 8 x 8 blocks, so every feature cell passes the 75% rule; classes 0..2."""
    cells = rng.integers(0, 3, (height // block, width // block))
    cells.flat[:3] = [0, 1, 2]
    return np.kron(cells, np.ones((block, block))).astype(np.uint8)


def save_pair(root: Path, split: str, name: str, label: np.ndarray, shift: int, rng) -> None:
    image = rng.integers(0, 40, label.shape + (3,)) + label[..., None].astype(int) * 70 + shift
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / split / f"{name}.png")
    Image.fromarray(label).save(root / "labels" / split / f"{name}.png")


def make_folder(root: Path, height: int, width: int, shift: int, seed: int, count: int = 4,
                num_classes: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        save_pair(root, "train", f"{i:03d}", block_label(rng, height, width), shift, rng)
    names = ["a", "b", "c"] + [f"class{i}" for i in range(3, num_classes)]
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": names, "ignore_index": 255}))
    return root


def make_dark_zurich(root: Path, count: int = 2) -> Path:
    """rgb_anon/train/{night,day}/... and corresp/train/night/*.csv pairing each night frame with a day frame."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(count):
        for time, seq, shift in (("night", "GOPR0001", 0), ("day", "GOPR0002", 120)):
            folder = root / "rgb_anon" / "train" / time / seq
            folder.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 60, (H, W, 3)) + shift
            Image.fromarray(image.astype(np.uint8)).save(folder / f"{seq}_frame_{i:06d}_rgb_anon.png")
        rows.append(f"train/night/GOPR0001/GOPR0001_frame_{i:06d},train/day/GOPR0002/GOPR0002_frame_{i:06d}")
    corresp = root / "corresp" / "train" / "night"
    corresp.mkdir(parents=True)
    (corresp / "GOPR0001.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread avoids thread start-up and contention on shared machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    base = tmp_path_factory.mktemp("sepico_domains")
    return {"source": make_folder(base / "source", CROP, CROP, 0, 1),
            "source19": make_folder(base / "source19", CROP, CROP, 0, 1, num_classes=19),
            "target": make_folder(base / "target", H, W, 90, 2),
            "dark": make_dark_zurich(base / "dark")}


def preset_config(preset, domains, work_dir, iterations=2, extra=()):
    dark = "cs2dz" in preset
    model = "deeplabv2_tiny" if "deeplabv2" in preset else "daformer_tiny"
    cfg = load_config(preset, [
        f"model.name={model}", f"model.num_classes={19 if dark else 3}", "model.pretrained=", "model.options={}",
        f"train.iterations={iterations}", f"train.work_dir={work_dir}", "train.eval_interval=1000",
        "train.checkpoint_interval=1000", "train.log_interval=1", "data.batch_size=2", "data.workers=0",
        "data.val=[]", "optim.warmup_iters=1", "method.sepico.warmup_iters=1", "method.sepico.proj_dim=16",
        f"method.sepico.target_crop_size=[{CROP}, {CROP}]", *extra,
    ])
    source = cfg.data.source
    source.name, source.root, source.split = "folder", str(domains["source19" if dark else "source"]), "train"
    source.resize, source.crop_size, source.rcs.enabled = None, [CROP, CROP], False
    target = cfg.data.target
    if dark:
        target.root, target.resize = str(domains["dark"]), None
    else:
        target.name, target.root, target.split = "folder", str(domains["target"]), "train"
        target.resize, target.crop_size = None, None
    return cfg


# ------------------------------------------------------------------------------- presets end to end
def test_preset_list_is_complete():
    available = {p for p in list_presets() if "sepico" in p and "hrda" not in p}  # HRDA ones: tests/hrda
    assert available == set(SEPICO_PRESETS)
    for preset in SEPICO_PRESETS:
        cfg = load_config(preset)
        assert cfg.method.name == "sepico"
        if preset.startswith("sepico_"):
            assert cfg.reference["miou"] > 0 and cfg.method.sepico.warmup_iters == 3000
            assert cfg.data.source.crop_size == [640, 640] and cfg.data.target.crop_size is None
            assert cfg.method.sepico.temperature == 100.0 and cfg.method.sepico.dark == ("cs2dz" in preset)
        else:
            assert 0 < cfg.method.sepico.warmup_iters < cfg.train.iterations


@pytest.mark.parametrize("preset", SEPICO_PRESETS)
def test_preset_trains_end_to_end_with_reloadable_checkpoint(preset, domains, tmp_path):
    cfg = preset_config(preset, domains, tmp_path / "run")
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    losses = {k: v for r in records for k, v in r.items() if k.endswith(("ce", "sepico_cl"))}
    assert {"source_strong.ce", "mixed.pseudo_ce", "source_strong.sepico_cl", "target_strong.sepico_cl"} <= set(losses)
    assert all(math.isfinite(r[k]) for r in records for k in r if k.endswith(("ce", "sepico_cl")))
    assert records[0]["iteration"] == 0 and "source_strong.sepico_cl" not in records[0]  # warm-up
    stats = trainer.objectives[3].stats
    assert int(stats.count.sum()) > 0
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert state["iteration"] == 2
    resumed = Trainer(cfg, resume=str(tmp_path / "run" / "latest.pt"), progress=False)
    for a, b in zip(resumed.objectives.state_dict().values(), trainer.objectives.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_resume_restores_statistics_and_queues_exactly(domains, tmp_path):
    extra = ["method.sepico.bank_size=3"]  # queues wrap around within 4 iterations
    straight = Trainer(preset_config("digits_sepico_bankcl", domains, tmp_path / "a", 4, extra), progress=False)
    straight.train()
    half_cfg = preset_config("digits_sepico_bankcl", domains, tmp_path / "b", 4, [*extra, "train.checkpoint_interval=2"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 2
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    assert second.iteration == 2
    torch.testing.assert_close(second.objectives[3].stats.mean, first.objectives[3].stats.mean, rtol=0, atol=0)
    second.train()
    expected, got = straight.objectives[3].stats.state_dict(), second.objectives[3].stats.state_dict()
    assert set(expected) == {"mean", "var", "count", "bank", "bank_length", "bank_next"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert int(expected["bank_length"].max()) == 3
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ one step, by hand
def step_config(preset="sepico_distcl_daformer_gta2cs", extra=()):
    model = "deeplabv2_tiny" if "deeplabv2" in preset else "daformer_tiny"
    return load_config(preset, [
        f"model.name={model}", "model.num_classes=3", "model.pretrained=", "model.options={}", f"data.source.crop_size=[{CROP}, {CROP}]",
        f"method.sepico.target_crop_size=[{CROP}, {CROP}]", "method.sepico.warmup_iters=1",
        "method.sepico.proj_dim=16", "method.self_training.ignore_top=0", "method.self_training.ignore_bottom=0",
        *extra,
    ])


def make_batch(seed=0, classes=3):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    source_label = torch.from_numpy(np.stack([block_label(rng, CROP, CROP) for _ in range(2)])).long()
    return {"source": {"image": torch.randn(2, 3, CROP, CROP, generator=gen), "label": source_label},
            "target": {"image": torch.randn(2, 3, H, W, generator=gen)}}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    segmentor = build_model(cfg.model.name, cfg.model.num_classes)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model)
    teacher.update(0)
    return model, teacher, method


def prepared(model, teacher, method, batch, iteration, seed=0):
    """A StepContext after every objective's prepare (what TrainStep.run does before the losses)."""
    needs = [n for obj in method.objectives for n in obj.needs(iteration)]
    ctx = StepContext(model, teacher, iteration, torch.Generator().manual_seed(seed), needs, 3)
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    for obj in method.objectives:
        obj.prepare(ctx, batch)
    return ctx


def contrast_of(method) -> SePiCoContrast:
    return next(obj for obj in method.objectives if isinstance(obj, SePiCoContrast))


def test_method_layout_and_projection_tap():
    for preset, tap, widths in [("sepico_distcl_daformer_gta2cs", "enc_fused", None),
                                ("sepico_distcl_deeplabv2_gta2cs", "enc4", None)]:
        cfg = step_config(preset)
        segmentor = build_model(cfg.model.name, 3)
        method = build_method(cfg, segmentor)
        head, head_tap = method.heads[PROJECTION_HEAD]
        assert head_tap == tap and method.uses_teacher and method.uses_target
        c_in = segmentor.tap_channels(tap)
        hidden = c_in // 4 if tap == "enc_fused" else c_in
        assert head.convs[0].conv.weight.shape[:2] == (hidden, c_in)
        assert head.convs[1].conv.weight.shape[0] == 16
        kinds = [type(o) for o in method.objectives]
        assert kinds[0] is TargetCropping and kinds[-1] is PseudoLabelSelfTraining and SePiCoContrast in kinds
        source_ce = next(o for o in method.objectives if isinstance(o, SupervisedSegmentation))
        assert source_ce.view == SOURCE_STRONG_VIEW
    explicit = build_method(step_config(extra=["method.sepico.feature=enc2"]), build_model("daformer_tiny", 3))
    assert explicit.heads[PROJECTION_HEAD][1] == "enc2"


def test_warmup_keeps_student_projection_head_idle():
    cfg = step_config(extra=["method.sepico.warmup_iters=3"])
    model, teacher, method = build(cfg)
    contrast = contrast_of(method)
    assert all(not n.heads for n in contrast.needs(2) if n.model == "student")
    assert any(n.model == "student" and n.heads for n in contrast.needs(3))
    head_bn = model.heads[PROJECTION_HEAD].convs[0].bn
    before = head_bn.running_mean.clone()
    TrainStep(model, teacher, method.objectives, 3).run(make_batch(), 2, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.heads[PROJECTION_HEAD].parameters())
    assert torch.equal(head_bn.running_mean, before)
    assert int(contrast.stats.count.sum()) > 0  # statistics start at iteration 0
    model.zero_grad(set_to_none=True)
    result = TrainStep(model, teacher, method.objectives, 3).run(make_batch(), 3, torch.Generator().manual_seed(0))
    assert {"source_strong.sepico_cl", "target_strong.sepico_cl"} <= set(result.losses)
    assert all(p.grad is not None for p in model.heads[PROJECTION_HEAD].parameters())


def test_contrastive_gradients_reach_student_head_and_encoder_never_teacher():
    cfg = step_config()
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, make_batch(), 1)
    contrast = contrast_of(method)
    loss = contrast.losses(ctx, SOURCE_STRONG_VIEW)["sepico_cl"]
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    loss.backward()
    head_grads = [p.grad for p in model.heads[PROJECTION_HEAD].parameters()]
    assert all(g is not None for g in head_grads) and any(float(g.abs().sum()) > 0 for g in head_grads)
    encoder_grads = [p.grad for p in model.segmentor.backbone.parameters() if p.grad is not None]
    assert encoder_grads and any(float(g.abs().sum()) > 0 for g in encoder_grads)
    assert all(p.grad is None for p in model.segmentor.decode_head.parameters())  # CL never touches the decoder
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    target_loss = contrast.losses(ctx, TARGET_STRONG_VIEW)
    assert set(target_loss) == {"sepico_cl"}


def test_statistics_come_from_the_teacher_on_the_weak_source_only():
    cfg = step_config(extra=["method.sepico.variant=bank"])
    batch = make_batch()
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, batch, 1)
    stats = contrast_of(method).stats

    # independent reference: teacher projection of the weak source -> 75% labels -> fresh statistics
    with torch.no_grad():
        features = teacher.module(batch["source"]["image"], heads=(PROJECTION_HEAD,)).projections[PROJECTION_HEAD]
    small = _downscale_labels(batch["source"]["label"], features.shape[-2:], 0.75, 3)
    reference = OnlineClassStatistics(3, 16, bank_size=cfg.method.sepico.bank_size)
    reference.update(*flatten_valid(features, small))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(stats.state_dict()[key], value)

    # perturbing the student's head leaves the statistics alone; perturbing the teacher's does not
    model2, teacher2, method2 = build(cfg)
    with torch.no_grad():
        for p in model2.heads[PROJECTION_HEAD].parameters():
            p.add_(torch.randn_like(p))
    prepared(model2, teacher2, method2, batch, 1)
    for key, value in stats.state_dict().items():
        torch.testing.assert_close(contrast_of(method2).stats.state_dict()[key], value)
    model3, teacher3, method3 = build(cfg)
    with torch.no_grad():
        for p in teacher3.module.heads[PROJECTION_HEAD].parameters():
            p.add_(torch.randn_like(p))
    prepared(model3, teacher3, method3, batch, 1)
    assert not torch.allclose(contrast_of(method3).stats.mean, stats.mean)


def test_class_balanced_crop_and_regenerated_pseudo_labels():
    cfg = step_config()
    batch = make_batch()
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, batch, 1, seed=3)
    target = ctx.view("target")
    assert target.image.shape == (2, 3, CROP, CROP)
    boxes = ctx.state[CROP_BOXES]
    # the boxes are CBC's choice on the teacher's full-image pseudo-label (first draws of the generator)
    full = pseudo_labels(teacher(batch["target"]["image"]).logits, (H, W)).labels
    assert boxes == class_balanced_crop_boxes(full, (CROP, CROP), generator=torch.Generator().manual_seed(3))
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        assert torch.equal(target.image[i], batch["target"]["image"][i, :, y1:y2, x1:x2])
    # pseudo-labels are predicted again on the crop (not cut out of the full-image prediction)
    pseudo = ctx.state[PSEUDO]
    assert pseudo["image"] is target.image and pseudo["labels"].shape == (2, CROP, CROP)
    regenerated = pseudo_labels(teacher(target.image).logits, (CROP, CROP)).labels
    assert torch.equal(pseudo["labels"], regenerated)
    # the mix and the contrastive target view use the crop
    assert ctx.view("mixed").image.shape[-2:] == (CROP, CROP)
    assert ctx.view(TARGET_STRONG_VIEW).image.shape[-2:] == (CROP, CROP)


def test_target_contrast_labels_ignore_zero_weight_rows():
    cfg = step_config(extra=["method.self_training.ignore_top=8", "method.self_training.pseudo_threshold=0.0"])
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, make_batch(), 1)
    labels = ctx.view(TARGET_STRONG_VIEW).label
    pseudo = ctx.state[PSEUDO]
    assert bool((labels[:, :8] == 255).all())
    assert torch.equal(labels[:, 8:], pseudo["labels"][:, 8:])
    # with no confident pixel the weight is 0 everywhere and every target pixel is ignored (official)
    cfg = step_config(extra=["method.self_training.pseudo_threshold=1.1"])
    model, teacher, method = build(cfg)
    ctx = prepared(model, teacher, method, make_batch(), 1)
    assert bool((ctx.view(TARGET_STRONG_VIEW).label == 255).all())
    loss = contrast_of(method).losses(ctx, TARGET_STRONG_VIEW)["sepico_cl"]
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_dark_zurich_fusion_class_weights_and_missing_day_image():
    cfg = step_config("sepico_distcl_daformer_cs2dz", ["model.num_classes=19"])
    torch.manual_seed(0)
    segmentor = build_model("daformer_tiny", 19)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    teacher = EMATeacher(model)
    teacher.update(0)
    batch = make_batch()
    batch["target"]["day_image"] = torch.randn(2, 3, H, W)
    needs = [n for obj in method.objectives for n in obj.needs(1)]
    ctx = StepContext(model, teacher, 1, torch.Generator().manual_seed(0), needs, 19)
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    for obj in method.objectives:
        obj.prepare(ctx, batch)
    weights = dark_zurich_class_weights(0.05)
    boxes = ctx.state[CROP_BOXES]
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        assert torch.equal(ctx.view(DAY_VIEW).image[i], batch["target"]["day_image"][i, :, y1:y2, x1:x2])
    night = pseudo_labels(teacher(ctx.view("target").image).logits, (CROP, CROP)).probs
    day = pseudo_labels(teacher(ctx.view(DAY_VIEW).image).logits, (CROP, CROP)).probs
    fused = fuse_day_night(day, night, weights)
    assert torch.equal(ctx.state[PSEUDO]["labels"], fused.argmax(1))
    source_ce = next(o for o in method.objectives if isinstance(o, SupervisedSegmentation))
    self_training = next(o for o in method.objectives if isinstance(o, PseudoLabelSelfTraining))
    torch.testing.assert_close(source_ce.class_weight, weights)
    torch.testing.assert_close(self_training.class_weight, weights)
    del batch["target"]["day_image"]
    ctx = StepContext(model, teacher, 1, torch.Generator().manual_seed(0), needs, 19)
    for name, item in batch.items():
        ctx.add_view(name, item["image"], item.get("label"))
    with pytest.raises(UserError, match="paired_day"):
        method.objectives[0].prepare(ctx, batch)


def test_test_time_reweighting_matches_the_official_rule():
    torch.manual_seed(0)
    segmentor = build_model("daformer_tiny", 19).eval()
    weights = dark_zurich_class_weights(0.16)
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        scores = ClassPriorReweighting(segmentor, weights)(image).logits
        logits = F.interpolate(segmentor(image).logits, size=(32, 48), mode="bilinear", align_corners=False)
    probs = torch.softmax(logits, 1)
    expected = torch.empty(1, 32, 48, dtype=torch.long)
    for y in range(32):
        for x in range(48):
            expected[0, y, x] = max(range(19), key=lambda k: float(probs[0, k, y, x]) * float(weights[k]))
    assert scores.shape == (1, 19, 32, 48)
    assert torch.equal(scores.argmax(1), expected)
    # through the shared inference path: re-weighted probabilities resized to the label size
    from udaseg.models.inference import predict_logits

    resized = predict_logits(ClassPriorReweighting(segmentor, weights), image, out_size=(64, 96))
    official = F.interpolate(probs * weights.view(1, -1, 1, 1), size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.equal(resized.argmax(1), official.argmax(1))


@pytest.mark.parametrize("override, message", [
    (["method.sepico.variant=bank", "method.sepico.bank_size=0"], "bank_size"),
    (["method.sepico.temperature=0"], "temperature"),
    (["method.sepico.target_crop_size=[30, 30]", "data.source.crop_size=[30, 30]"], "multiple of the stride"),
    (["method.sepico.target_crop_size=[16, 16]"], "must equal data.source.crop_size"),
    (["method.sepico.dark=true"], "19 Cityscapes classes"),
    (["method.sepico.feature=nope"], "method.sepico.feature"),
    (["method.self_training.mix=none"], "mix"),
])
def test_bad_settings_raise_user_errors(override, message):
    cfg = step_config(extra=override)
    with pytest.raises(UserError, match=message):
        build_method(cfg, build_model(cfg.model.name, 3))
