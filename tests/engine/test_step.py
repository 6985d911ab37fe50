"""The training step: cached forwards, grouped backward, non-finite losses."""

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from udaseg.adapt.step import Need, NonFiniteLoss, Objective, TrainStep, UDAModel
from udaseg.methods.base import segmentation_cross_entropy


@dataclass
class _Out:
    logits: torch.Tensor
    features: dict = field(default_factory=dict)


class TinySegmentor(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)
        self.decode_head = nn.Conv2d(4, classes, 1)
        self.calls = 0

    def forward(self, x, taps=(), decode=True):
        self.calls += 1
        f = torch.relu(self.backbone(x))
        return _Out(self.decode_head(f) if decode else None, {t: f for t in taps})


class CE(Objective):
    def __init__(self, view, scale=1.0):
        super().__init__()
        self.view, self.scale = view, scale

    def needs(self, iteration):
        return [Need("student", self.view, taps=("enc_last",))]

    def losses(self, ctx, group):
        if group != self.view:
            return {}
        v = ctx.view(self.view)
        return {"ce": self.scale * segmentation_cross_entropy(ctx.student(self.view).logits, v.label)}


class FeatureNorm(Objective):
    """Reads the same cached forward as CE: must not cost a second forward."""

    def needs(self, iteration):
        return [Need("student", "source", taps=("enc_last",))]

    def losses(self, ctx, group):
        if group != "source":
            return {}
        return {"feat": ctx.student("source").features["enc_last"].pow(2).mean()}


def _batch():
    g = torch.Generator().manual_seed(0)
    return {
        "source": {"image": torch.randn(2, 3, 8, 8, generator=g), "label": torch.randint(0, 3, (2, 8, 8), generator=g)},
        "target": {"image": torch.randn(2, 3, 8, 8, generator=g), "label": torch.randint(0, 3, (2, 8, 8), generator=g)},
    }


def _grads(per_group):
    torch.manual_seed(0)
    seg = TinySegmentor()
    model = UDAModel(seg)
    step = TrainStep(model, None, [CE("source"), FeatureNorm(), CE("target", 0.5)], 3, backward_per_group=per_group)
    result = step.run(_batch(), 0, torch.Generator().manual_seed(0))
    return seg, result, [p.grad.clone() for p in model.parameters()]


def test_forward_runs_once_per_view_and_losses_are_named():
    seg, result, _ = _grads(True)
    assert seg.calls == 2  # source and target, although two objectives read source
    assert set(result.losses) == {"source.ce", "source.feat", "target.ce"}


def test_grouped_backward_equals_single_backward():
    _, r1, g1 = _grads(True)
    _, r2, g2 = _grads(False)
    assert r1.losses == r2.losses
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_gradient_matches_manual_total():
    seg, _, grads = _grads(True)
    torch.manual_seed(0)
    ref = TinySegmentor()
    batch = _batch()
    out_s, out_t = ref(batch["source"]["image"]), ref(batch["target"]["image"])
    total = (segmentation_cross_entropy(out_s.logits, batch["source"]["label"])
             + torch.relu(ref.backbone(batch["source"]["image"])).pow(2).mean()
             + 0.5 * segmentation_cross_entropy(out_t.logits, batch["target"]["label"]))
    total.backward()
    for a, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_non_finite_loss_names_loss_and_iteration():
    model = UDAModel(TinySegmentor())
    step = TrainStep(model, None, [CE("source", scale=float("nan"))], 3)
    with pytest.raises(NonFiniteLoss, match=r"'source\.ce' is nan at iteration 7"):
        step.run(_batch(), 7, torch.Generator())


def test_mmseg_cross_entropy_averages_over_all_pixels():
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 255], [255, 255]]])
    # one valid pixel with CE ln 2, three ignored pixels add 0, mean over 4 pixels
    assert segmentation_cross_entropy(logits, labels).item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 4)


class EncoderOnly(Objective):
    def needs(self, iteration):
        return [Need("student", "target", taps=("enc_last",), logits=False)]

    def losses(self, ctx, group):
        if group != "target":
            return {}
        return {"feat": ctx.student("target").features["enc_last"].mean()}


def test_encoder_only_needs_skip_the_decode_head_unless_another_objective_wants_logits():
    model = UDAModel(TinySegmentor())
    step = TrainStep(model, None, [EncoderOnly()], 3)
    step.run(_batch(), 0, torch.Generator())
    assert model.segmentor.decode_head.weight.grad is None and model.segmentor.backbone.weight.grad is not None
    step = TrainStep(model, None, [EncoderOnly(), CE("target")], 3)
    result = step.run(_batch(), 0, torch.Generator())
    assert set(result.losses) == {"target.feat", "target.ce"} and model.segmentor.calls == 2
