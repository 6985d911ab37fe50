"""Typed view geometry, inference modes in the step's cache, named multi-outputs with their own
inference in `udaseg eval`, and shared or per-view augmentation draws."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.adapt.augment import draw_augmentation_flags
from udaseg.adapt.geometry import CropBox, random_crop_box
from udaseg.adapt.step import Need, Objective, StepContext, TrainStep, UDAModel, View
from udaseg.adapt.teacher import EMATeacher
from udaseg.cli import main
from udaseg.config.schema import SelfTrainingConfig
from udaseg.data import build_dataset
from udaseg.engine.trainer import Trainer
from udaseg.methods import Method, register_method
from udaseg.methods.base import SupervisedSegmentation
from udaseg.methods.dacs import iteration_augmentation_flags
from udaseg.models import build_model
from udaseg.models.inference import predict_logits, sliding_window_mode
from udaseg.models.registry import register_model

from .conftest import tiny_config


@dataclass
class MultiOutput:
    logits: torch.Tensor
    features: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)


class DetailSegmentor(nn.Module):
    """A toy multi-output model: the base prediction plus a 'detail' prediction on the central crop,
    fused by its own inference (the detail averaged into the centre)."""

    inference_calls = 0

    def __init__(self, num_classes: int):
        super().__init__()
        self.base = build_model("deeplabv2_tiny", num_classes)
        self.backbone = self.base.backbone
        self.detail_head = nn.Conv2d(num_classes, num_classes, 1)

    def tap_channels(self, tap):
        return self.base.tap_channels(tap)

    def tap_stride(self, tap):
        return self.base.tap_stride(tap)

    @staticmethod
    def detail_box(height, width):
        return CropBox(height // 4, width // 4, height // 2, width // 2)

    def forward(self, x, taps=(), decode=True):
        out = self.base(x, taps=taps, decode=decode)
        box = self.detail_box(*x.shape[-2:])
        detail = self.detail_head(self.base(box.crop(x)).logits)
        return MultiOutput(out.logits, dict(out.features), {"detail": detail}, {"detail": box})

    def inference_logits(self, images, mode, crop_size, stride, batch_windows):
        type(self).inference_calls += 1
        out = self(images)
        full = F.interpolate(out.logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        box = out.boxes["detail"]
        detail = F.interpolate(out.outputs["detail"], size=(box.height, box.width), mode="bilinear",
                               align_corners=False)
        return box.paste(full, (box.crop(full) + detail) / 2)


@pytest.fixture
def toy_detail_model():
    """The toy model registered for one test only (other tests enumerate the registered models)."""
    from udaseg.models import registry

    register_model("toy_detail")(lambda num_classes, **options: DetailSegmentor(num_classes))
    yield "toy_detail"
    registry._REGISTRY.pop("toy_detail", None)


@register_method("toy_multi_output")
def build_toy_multi_output(cfg, segmentor):
    return Method([SupervisedSegmentation("source", outputs={"logits": 0.9, "detail": 0.1})])


def plain_ce(logits, labels):
    """mean over all pixels of −log softmax at the label (0 on ignored pixels), written out."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    log_probs = logits.log_softmax(1)
    total = 0.0
    for b in range(labels.shape[0]):
        for y in range(labels.shape[1]):
            for x in range(labels.shape[2]):
                k = int(labels[b, y, x])
                if k != 255:
                    total -= float(log_probs[b, k, y, x])
    return total / labels.numel()


def test_crop_box_geometry_and_view_boxes():
    box = CropBox.from_corners(8, 40, 16, 48)
    assert (box.top, box.left, box.height, box.width) == (8, 16, 32, 32) and box.corners() == (8, 40, 16, 48)
    assert box.crop(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 32, 32)
    assert box.scaled(0.25) == CropBox(2, 4, 8, 8)
    pasted = box.paste(torch.zeros(1, 64, 64), torch.ones(1, 32, 32))
    assert pasted.sum() == 32 * 32 and pasted[0, 8, 16] == 1 and pasted[0, 7, 16] == 0
    with pytest.raises(ValueError):
        box.crop(torch.zeros(1, 16, 16))
    view = View(torch.zeros(2, 3, 32, 32), boxes=(box, box), scale=0.5, parent="target")
    assert view.box == box
    with pytest.raises(ValueError, match="different crop boxes"):
        View(torch.zeros(2, 3, 32, 32), boxes=(box, CropBox(0, 0, 32, 32))).box


def test_random_crop_boxes_follow_the_divisibility_rule():
    generator = torch.Generator().manual_seed(0)
    boxes = [random_crop_box((1024, 1024), (512, 512), 8, generator) for _ in range(400)]
    tops = {b.top for b in boxes} | {b.left for b in boxes}
    assert all(t % 8 == 0 for t in tops) and max(tops) == 504 and min(tops) == 0
    assert all((b.height, b.width) == (512, 512) for b in boxes)
    small = random_crop_box((16, 16), (32, 32), 8, generator)
    assert small == CropBox(0, 0, 16, 16)


def test_named_outputs_get_their_own_losses_with_labels_cut_to_their_box():
    torch.manual_seed(0)
    model = UDAModel(DetailSegmentor(3))
    labels = torch.randint(0, 3, (2, 32, 32))
    labels[:, 0, :4] = 255
    image = torch.randn(2, 3, 32, 32)
    step = TrainStep(model, None, [SupervisedSegmentation("source", outputs={"logits": 0.9, "detail": 0.1})], 3)
    result = step.run({"source": {"image": image, "label": labels}}, 0, torch.Generator())
    assert set(result.losses) == {"source.ce_logits", "source.ce_detail"}
    with torch.no_grad():
        out = model(image)
    box = out.boxes["detail"]
    assert box == CropBox(8, 8, 16, 16)
    assert result.losses["source.ce_logits"] == pytest.approx(0.9 * plain_ce(out.logits, labels), rel=1e-5)
    assert result.losses["source.ce_detail"] == pytest.approx(0.1 * plain_ce(out.outputs["detail"], box.crop(labels)),
                                                              rel=1e-5)
    assert out.output("detail") is out.outputs["detail"] and out.output() is out.logits
    with pytest.raises(KeyError, match="no output 'hr'"):
        out.output("hr")


class SlideTeacher(Objective):
    def inference_modes(self):
        return {"slide": sliding_window_mode((16, 16), (8, 8), batch_windows=3)}

    def needs(self, iteration):
        return [Need("teacher", "target"), Need("teacher", "target", mode="slide")]


def test_cache_is_keyed_by_inference_mode():
    torch.manual_seed(0)
    model = UDAModel(build_model("deeplabv2_tiny", 3))
    teacher = EMATeacher(model)
    step = TrainStep(model, teacher, [SlideTeacher()], 3)
    ctx = StepContext(model, teacher, 0, torch.Generator(), [n for o in step.objectives for n in o.needs(0)], 3,
                      inference_modes=step.inference_modes)
    image = torch.randn(2, 3, 32, 32)
    ctx.add_view("target", image)
    whole, slide = ctx.teacher("target"), ctx.teacher("target", mode="slide")
    assert ctx.teacher("target", mode="slide") is slide and ctx.teacher("target") is whole
    assert slide.logits.shape == (2, 3, 32, 32) and whole.logits.shape[-1] < 32
    expected = predict_logits(teacher, image, mode="slide", crop_size=16, stride=8, batch_windows=3)
    torch.testing.assert_close(slide.logits, expected)
    ctx.add_view("target", image * 2)  # a new view drops every mode's cache entry
    assert ctx.teacher("target", mode="slide") is not slide
    with pytest.raises(KeyError, match="inference mode 'fused' is not registered"):
        ctx.teacher("target", mode="fused")


def test_toy_multi_output_model_is_evaluated_with_its_own_inference(toy_detail_model, fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=2, model="toy_detail",
                      extra=["method.name=toy_multi_output"])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    DetailSegmentor.inference_calls = 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "latest.pt"), "--out", str(out)]) == 0
    assert DetailSegmentor.inference_calls == 4  # the four validation images
    (result,) = json.loads(out.read_text())["results"].values()
    # the same numbers from the model's own inference, counted by hand
    segmentor = trainer.model.segmentor.eval()
    dataset = build_dataset(cfg.data.val[0], cfg.data.mean, cfg.data.std)
    confusion = np.zeros((3, 3), np.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            logits = segmentor.inference_logits(item["image"][None], "whole", None, None, 1)
        pred, label = logits.argmax(1)[0].numpy(), item["label"].numpy()
        for p, t in zip(pred[label != 255], label[label != 255]):
            confusion[t, p] += 1
    iou = [confusion[k, k] / (confusion[k].sum() + confusion[:, k].sum() - confusion[k, k])
           for k in range(3) if confusion[k].sum() + confusion[:, k].sum() > 0]
    assert result["miou"] == pytest.approx(float(np.mean(iou)), abs=1e-6)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"source.ce_logits", "source.ce_detail"} <= set(next(r for r in records if r["kind"] == "train"))


def test_augmentation_draws_are_shared_by_default_and_independent_per_view_on_request():
    def flags(draws, views, seed=5):
        ctx = StepContext(nn.Linear(1, 1), None, 0, torch.Generator().manual_seed(seed), [], 3)
        cfg = SelfTrainingConfig(augmentation_draws=draws)
        return [iteration_augmentation_flags(ctx, cfg, view) for view in views]

    shared = flags("shared", ["mixed", "target_strong", "mixed"])
    assert shared[0] == shared[1] == shared[2]
    generator = torch.Generator().manual_seed(5)
    assert shared[0] == draw_augmentation_flags(generator, 0.8, 0.5)
    per_view = flags("per_view", ["mixed", "target_strong", "mixed"])
    generator = torch.Generator().manual_seed(5)
    first, second = draw_augmentation_flags(generator, 0.8, 0.5), draw_augmentation_flags(generator, 0.8, 0.5)
    assert per_view == [first, second, first]
    assert any(flags("per_view", ["a", "b"], seed)[0] != flags("per_view", ["a", "b"], seed)[1] for seed in range(20))
