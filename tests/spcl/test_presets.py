"""SPCL presets carry the official code's settings; the truncated poly schedule of every optimiser."""

import pytest
import torch

from udaseg.config import list_presets, load_config
from udaseg.engine.optim import PolyWarmupSchedule, build_optimizer, schedule_length
from udaseg.engine.owned import OwnedOptimizers
from udaseg.engine.pipeline import build_stages
from udaseg.errors import UserError
from udaseg.methods.spcl import OutputSpaceAdversarial, build_spcl

PAPER_PRESETS = ("spcl_deeplabv2_gta2cs", "spcl_deeplabv2_synthia2cs")


def test_preset_list_and_the_official_settings_of_each_stage():
    assert {p for p in list_presets() if "spcl" in p and not p.startswith("_")} == {*PAPER_PRESETS, "digits_spcl"}
    for preset in PAPER_PRESETS:
        stages = {s.name: s for s in build_stages(load_config(preset))}
        assert list(stages) == ["warmup", "contrast", "selftrain"]
        warmup, contrast, selftrain = (stages[n].cfg for n in stages)
        for cfg in (warmup, contrast):
            assert cfg.model.name == "deeplabv2_r101" and cfg.model.options == {"frozen_bn": True}
            assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay) == ("sgd", 2.5e-4, 10.0, 5e-4)
            assert cfg.train.iterations == 40000 and round(cfg.train.iterations * cfg.optim.schedule_horizon) == 62500
            assert cfg.data.batch_size == 4 and cfg.data.source.crop_size is None and not cfg.data.source.flip
            assert cfg.method.spcl.seg_temperature == 1.8
        s = contrast.method.spcl
        assert (s.alpha, s.cl_weight, s.cl_temperature, s.absent_classes, s.source_mask, s.target_mask) == (
            0.1, 1.0, 100.0, "decay", "label_and_prediction", "offline")
        a = warmup.method.spcl
        assert (a.adv_weight, a.discriminator_lr, list(a.discriminator_betas), a.discriminator_width) == (
            0.001, 1e-4, [0.9, 0.99], 64)
        assert selftrain.optim.lr == 5e-4 and selftrain.model.options == {"frozen_bn": False}
        assert selftrain.train.iterations == 20000 and round(20000 * selftrain.optim.schedule_horizon) == 31250
        assert selftrain.data.batch_size == 8 and selftrain.data.target.crop_size == [512, 1024]
        assert [p.kind for p in stages["contrast"].passes] == ["class_prototypes", "pseudo_labels"]
        for spec in (stages["contrast"].passes[1], stages["selftrain"].passes[0]):
            assert spec.options == {"thresholds": "class_quantile", "quantile": 0.5, "cap": 0.9}
        assert stages["contrast"].passes[0].options == {"mask": "label_and_prediction", "average": "images"}
    gta, synthia = (load_config(p) for p in PAPER_PRESETS)
    assert gta.reference["miou"] == 52.1 and gta.reference["stages"]["contrast"] == 49.2
    assert (synthia.reference["miou"], synthia.reference["miou_13"], synthia.eval.protocol) == (47.2, 54.4, "16")
    assert synthia.data.source.resize == [1280, 760]


def test_truncated_poly_schedule_stops_at_40_percent_for_the_segmentor_and_the_discriminator():
    cfg = build_stages(load_config("spcl_deeplabv2_gta2cs"))[0].cfg
    net = torch.nn.Conv2d(19, 2, 1)
    schedule = PolyWarmupSchedule(build_optimizer(net, cfg.optim), cfg.optim, schedule_length(cfg.optim, 40000))
    schedule.step(39999)
    assert schedule.get_lr()[0] / 2.5e-4 == pytest.approx((1 - 39999 / 62500) ** 0.9)
    assert schedule.get_lr()[0] / 2.5e-4 == pytest.approx(0.3987, abs=1e-4)
    method = build_spcl(cfg, net)
    adversarial = next(o for o in method.objectives if isinstance(o, OutputSpaceAdversarial))
    owned = OwnedOptimizers([adversarial], 40000)
    owned.begin_iteration(39999)
    entry = owned.entries["spcl_adversarial.discriminator"]
    assert entry.schedule.max_iters == 62500 and isinstance(entry.optimizer, torch.optim.AdamW)
    assert entry.optimizer.param_groups[0]["betas"] == (0.9, 0.99) and entry.optimizer.param_groups[0]["weight_decay"] == 0
    assert owned.lrs()["lr.spcl_adversarial.discriminator"] == pytest.approx(1e-4 * (1 - 39999 / 62500) ** 0.9)
    with pytest.raises(UserError, match=r"config key 'optim\.schedule_horizon' must be >= 1, got 0\.5"):
        load_config("digits_spcl", ["optim.schedule_horizon=0.5"])


def test_resume_keeps_a_truncated_schedule_and_names_the_planned_iterations():
    from pathlib import Path

    from udaseg.engine.trainer import check_schedule

    cfg = build_stages(load_config("spcl_deeplabv2_gta2cs"))[0].cfg
    state = {"schedule": {"max_iters": 62500}, "iteration": 10}
    check_schedule(state, cfg, Path("latest.pt"))  # 40,000 of a 62,500 horizon: the same plan
    cfg.train.iterations = 30000
    with pytest.raises(UserError, match="planned for 40000 iterations \\(10 done\\)"):
        check_schedule(state, cfg, Path("latest.pt"))
