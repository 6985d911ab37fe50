"""SPCL's objectives in the training step: the update-before-loss order, both terms, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.adapt.step import TrainStep, UDAModel
from udaseg.methods.spcl import OutputSpaceAdversarial, PrototypeContrast, SPCLSourceSegmentation


class Tiny(nn.Module):
    """Stride-2 features (4 channels) and logits (3 classes)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.decode_head = nn.Conv2d(4, 3, 1)

    def forward(self, x, taps=(), decode=True):
        f = torch.relu(self.backbone(x))
        return type("Out", (), {"logits": self.decode_head(f) if decode else None,
                                "features": {t: f for t in taps}})()


def _loop_contrast(features, mask, prototypes, tau):
    terms = []
    for b in range(features.shape[0]):
        for i in range(features.shape[2]):
            for j in range(features.shape[3]):
                y = int(mask[b, i, j])
                if y == 255:
                    continue
                f = F.normalize(features[b, :, i, j], dim=0)
                z = [float(f @ prototypes[k]) / tau for k in range(prototypes.shape[0])]
                terms.append(-z[y] + math.log(sum(math.exp(v) for v in z)))
    return sum(terms) / len(terms)


def test_contrast_updates_prototypes_before_both_terms_and_matches_explicit_loops():
    torch.manual_seed(0)
    seg = Tiny()
    start = torch.rand(3, 4)
    contrast = PrototypeContrast(start, weight=0.5, temperature=0.5, alpha=0.1, absent="decay", feature="f")
    step = TrainStep(UDAModel(seg), None, [SPCLSourceSegmentation(1.8), contrast], num_classes=3)
    batch = {"source": {"image": torch.randn(2, 3, 8, 8), "label": torch.randint(0, 3, (2, 8, 8))},
             "target": {"image": torch.randn(2, 3, 8, 8), "label": torch.randint(0, 3, (2, 8, 8))}}
    batch["target"]["label"][0, :4] = 255
    result = step.run(batch, iteration=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_s, out_t = seg(batch["source"]["image"], taps=("f",)), seg(batch["target"]["image"], taps=("f",))
    fs, ft = out_s.features["f"], out_t.features["f"]
    m_s = batch["source"]["label"][:, ::2, ::2].clone()
    m_s[out_s.logits.argmax(1) != m_s] = 255
    m_t = batch["target"]["label"][:, ::2, ::2]
    expected = start.clone()
    for k in range(3):  # the batch-pooled mean of the normalised features, classes absent decay
        pixels = F.normalize(fs, dim=1).permute(0, 2, 3, 1)[m_s == k]
        expected[k] = 0.1 * start[k] + (0.9 * pixels.mean(0) if len(pixels) else 0.0)
    torch.testing.assert_close(contrast.memory.prototypes, expected)
    assert result.losses["source.cl_source"] == pytest.approx(0.5 * _loop_contrast(fs, m_s, expected, 0.5), rel=1e-5)
    assert result.losses["target.cl_target"] == pytest.approx(0.5 * _loop_contrast(ft, m_t, expected, 0.5), rel=1e-5)
    assert seg.backbone.weight.grad is not None


def test_adversarial_objective_trains_the_segmentor_with_l_g_and_the_discriminator_with_l_d():
    torch.manual_seed(0)
    seg = Tiny()
    adversarial = OutputSpaceAdversarial(3, weight=0.001, width=2, temperature=1.8)
    step = TrainStep(UDAModel(seg), None, [SPCLSourceSegmentation(1.8), adversarial], num_classes=3)
    batch = {"source": {"image": torch.randn(1, 3, 32, 32), "label": torch.randint(0, 3, (1, 32, 32))},
             "target": {"image": torch.randn(1, 3, 32, 32)}}
    result = step.run(batch, iteration=0, generator=torch.Generator().manual_seed(0))
    assert {"source.ce", "target.adv_g", "target.adv_d"} <= set(result.losses)
    step_d = [p.grad.clone() for p in adversarial.discriminator.parameters()]
    step_seg = [p.grad.clone() for p in seg.parameters()]
    for module in (seg, adversarial):
        module.zero_grad(set_to_none=True)

    def up(logits):
        return F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True)

    disc = adversarial.discriminator
    source_logits, target_logits = seg(batch["source"]["image"]).logits, seg(batch["target"]["image"]).logits
    ps, pt = F.softmax(up(source_logits) / 1.8, 1), F.softmax(up(target_logits), 1)
    # BCE-with-logits against 0 is softplus(x), against 1 softplus(-x)
    l_d = 0.5 * (F.softplus(disc(ps.detach())).mean() + F.softplus(-disc(pt.detach())).mean())
    assert result.losses["target.adv_d"] == pytest.approx(l_d.item(), rel=1e-5)
    l_d.backward()  # D's gradients in the step come from L_D alone
    for a, p in zip(step_d, disc.parameters()):
        torch.testing.assert_close(a, p.grad)
    disc.requires_grad_(False)
    ce = F.cross_entropy(up(source_logits) / 1.8, batch["source"]["label"])
    l_g = 0.001 * F.softplus(disc(pt)).mean()
    assert result.losses["target.adv_g"] == pytest.approx(l_g.item(), rel=1e-5)
    seg.zero_grad(set_to_none=True)
    (ce + l_g).backward()  # the segmentor's gradients come from CE and L_G alone
    for a, p in zip(step_seg, seg.parameters()):
        torch.testing.assert_close(a, p.grad)
