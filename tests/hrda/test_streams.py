"""HRDA's detail-crop boxes come from the training step's per-iteration stream: the same step
generator gives the same boxes whatever torch's global RNG holds, and the step's own stream is not
consumed by them."""

import pytest
import torch

import udaseg.models.hrda as hrda_model
from udaseg.adapt.step import TrainStep, UDAModel
from udaseg.adapt.teacher import EMATeacher
from udaseg.methods import build_method
from udaseg.methods.hrda import DetailCropDraws, detail_crop_generator
from udaseg.models import build_model

from .test_method import tiny_preset


def _batch(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.randn(2, 3, size, size, generator=g),
                       "label": torch.randint(0, 3, (2, size, size), generator=g)},
            "target": {"image": torch.randn(2, 3, size, size, generator=g) + 0.5}}


@pytest.fixture
def recorded_boxes(monkeypatch):
    boxes = []
    original = hrda_model.draw_detail_box

    def recording(height, width, size, divisible, generator=None, *args, **kwargs):
        boxes.append((generator is not None, original(height, width, size, divisible, generator, *args, **kwargs)))
        return boxes[-1][1]

    monkeypatch.setattr(hrda_model, "draw_detail_box", recording)
    return boxes


def _run_step(preset, hrda_domains, tmp_path, global_seed, step_seed=5):
    cfg = tiny_preset(preset, hrda_domains, tmp_path)
    torch.manual_seed(0)
    segmentor = build_model(cfg.model.name, 3, **cfg.model.options)
    method = build_method(cfg, segmentor)
    model = UDAModel(segmentor, method.heads)
    step = TrainStep(model, EMATeacher(model, 0.999), method.objectives, 3)
    generator = torch.Generator().manual_seed(step_seed)
    torch.manual_seed(global_seed)
    result = step.run(_batch(), 0, generator)
    step.after_step(result)
    return segmentor, generator


@pytest.mark.parametrize("preset", ["hrda_daformer_gta2cs", "mic_hrda_daformer_gta2cs"])
def test_detail_boxes_follow_the_step_generator_not_the_global_rng(preset, hrda_domains, tmp_path, recorded_boxes):
    segmentor, generator = _run_step(preset, hrda_domains, tmp_path, global_seed=1)
    first = list(recorded_boxes)
    recorded_boxes.clear()
    _, generator_again = _run_step(preset, hrda_domains, tmp_path, global_seed=2)
    views = 3 if "mic" in preset else 2  # source, mixed (and masked): one box per student forward
    assert len(first) == views and all(from_stream for from_stream, _ in first)
    assert [b for _, b in first] == [b for _, b in recorded_boxes]
    stream = detail_crop_generator(torch.Generator().manual_seed(5))
    from udaseg.adapt.multires import draw_detail_box
    assert [b for _, b in first] == [draw_detail_box(64, 64, (32, 32), 8, stream) for _ in range(views)]
    assert torch.equal(generator.get_state(), generator_again.get_state())
    assert segmentor.crop_generator is None  # dropped after the step


def test_the_stream_is_a_method_objective_and_the_model_alone_still_draws(hrda_domains, tmp_path):
    cfg = tiny_preset("hrda_daformer_gta2cs", hrda_domains, tmp_path)
    method = build_method(cfg, build_model(cfg.model.name, 3, **cfg.model.options))
    assert isinstance(method.objectives[-1], DetailCropDraws)
    model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32])
    out = model(torch.randn(1, 3, 64, 64), mode="train", generator=torch.Generator().manual_seed(0))
    assert out.detail_box.height == 32


def test_resumed_hrda_run_repeats_the_straight_trajectory(hrda_domains, tmp_path):
    import copy

    from udaseg.engine.trainer import Trainer

    straight = Trainer(tiny_preset("hrda_daformer_gta2cs", hrda_domains, tmp_path / "straight",
                                   extra=["train.iterations=2"]), progress=False)
    straight.train()
    half_cfg = tiny_preset("hrda_daformer_gta2cs", hrda_domains, tmp_path / "halves",
                           extra=["train.iterations=2", "train.checkpoint_interval=1"])
    first = Trainer(copy.deepcopy(half_cfg), progress=False)
    first.cfg.train.iterations = 1  # stop half-way; the schedule still spans 2 iterations
    first.train()
    second = Trainer(half_cfg, resume="latest", progress=False)
    second.train()
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
