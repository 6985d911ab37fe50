"""The HRDA segmentor: named outputs, crops, the teacher's sliding pseudo-labels, fused sliding
inference, the loss, and the registered models."""

import pytest
import torch
import torch.nn.functional as F

from udaseg.adapt.geometry import CropBox
from udaseg.adapt.multires import context_downscale
from udaseg.adapt.pseudo_label import pseudo_labels
from udaseg.adapt.teacher import EMATeacher
from udaseg.methods.hrda import hrda_segmentation_loss
from udaseg.models import build_model, count_parameters, predict_logits
from udaseg.models.hrda import HRDAOutput, HRDASegmentor, ScaleAttentionHead


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32])


def _record_backbone_inputs(model):
    inputs = []
    model.backbone.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    return inputs


def test_training_forward_returns_named_outputs_of_the_two_crops(model):
    x = torch.randn(2, 3, 64, 64)
    inputs = _record_backbone_inputs(model)
    box = CropBox.from_corners(8, 40, 24, 56)
    out = model(x, taps=("enc_last", "enc1"), mode="train", detail_box=box)
    assert isinstance(out, HRDAOutput) and out.fused is out.logits and out.detail_box == box
    assert out.logits.shape == (2, 3, 16, 16)  # stride 4 of the 64x64 context crop
    assert out.low_res.shape == out.attention.shape == (2, 3, 8, 8)  # context grid, stride 8
    assert out.high_res.shape == (2, 3, 8, 8)  # the 32x32 detail crop at stride 4
    assert len(inputs) == 2
    torch.testing.assert_close(inputs[0], context_downscale(x, 0.5))  # context: the whole crop at 0.5
    assert torch.equal(inputs[1], box.crop(x))  # detail: full resolution, the same box for the batch
    # Taps are of the context pass: the last MiT stage at stride 32 of 32x32 -> 1x1, i.e. stride 64.
    assert out.features["enc_last"].shape[-2:] == (1, 1) and model.tap_stride("enc_last") == 64
    assert out.features["enc1"].shape[-2:] == (8, 8) and model.tap_stride("enc1") == 8
    # The attention is zero outside the box's context cells [1, 5) x [3, 7).
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:5, 3:7] = False
    assert bool((out.attention[..., outside] == 0).all()) and bool((out.attention[..., ~outside] > 0).all())


def test_detail_box_is_redrawn_every_forward_and_decided_by_the_state(model):
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(3)
    boxes = {model(x).detail_box for _ in range(8)}  # train mode, gradients on: the student
    assert None not in boxes and len(boxes) > 1
    assert all(b.top % 8 == 0 and b.left % 8 == 0 and b.height == 32 for b in boxes)
    with torch.no_grad():  # the EMA teacher: train mode under no_grad -> sliding inference
        assert model(x).detail_box is None
    model.eval()
    assert model(x).detail_box is None


def test_attention_starts_near_one_half(model):
    out = model(torch.randn(2, 3, 64, 64), mode="slide")
    assert float((out.attention.detach() - 0.5).abs().max()) < 0.05


def test_teacher_pseudo_labels_match_a_hand_assembled_sliding_reference(model):
    model.eval()  # BN on running statistics, so windows can be run one by one in the reference
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        # Reference: context pass, then the 9 detail windows at offsets {0, 16, 32}^2 one at a time.
        stages = model.backbone(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
        low = model.decode_head(stages)
        att = torch.sigmoid(model.attention_head(stages))
        canvas = torch.zeros(2, 3, 16, 16)
        count = torch.zeros(16, 16)
        for y in (0, 16, 32):
            for xo in (0, 16, 32):
                logits = model.decode_head(model.backbone(x[:, :, y:y + 32, xo:xo + 32]))
                canvas[:, :, y // 4:y // 4 + 8, xo // 4:xo // 4 + 8] += logits
                count[y // 4:y // 4 + 8, xo // 4:xo // 4 + 8] += 1
        assert float(count.max()) == 4 and float(count.min()) == 1  # centre cells: 4 windows
        detail = canvas / count
        up = lambda t: F.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731
        reference = up(att) * detail + up((1 - att) * low)
    torch.testing.assert_close(out.high_res, detail, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, reference, rtol=1e-5, atol=1e-5)
    labels = pseudo_labels(out.logits, (64, 64)).labels
    expected = pseudo_labels(reference, (64, 64)).labels
    assert float((labels == expected).float().mean()) > 0.999


def test_teacher_runs_all_windows_of_the_batch_in_one_forward(model):
    teacher = EMATeacher(model)
    inputs = _record_backbone_inputs(teacher.module)
    out = teacher(torch.randn(2, 3, 64, 64))
    assert out.detail_box is None and out.logits.shape == (2, 3, 16, 16)
    assert [tuple(t.shape) for t in inputs] == [(2, 3, 32, 32), (18, 3, 32, 32)]  # context, 9 windows x 2


def test_fused_sliding_window_evaluation_averages_the_windows_logits(model):
    model.eval()
    image = torch.randn(1, 3, 64, 128)
    logits = predict_logits(model, image, mode="slide", crop_size=64, stride=32)
    with torch.no_grad():
        windows = [F.interpolate(model(image[:, :, :, x:x + 64]).logits, size=(64, 64), mode="bilinear",
                                 align_corners=False) for x in (0, 32, 64)]
    canvas = torch.zeros(1, 3, 64, 128)
    count = torch.zeros(128)
    for x, window in zip((0, 32, 64), windows):
        canvas[..., x:x + 64] += window
        count[x:x + 64] += 1
    torch.testing.assert_close(logits, canvas / count, rtol=1e-5, atol=1e-5)


def test_inference_on_sizes_off_the_grid_is_padded_and_cropped(model):
    model.eval()
    out = model(torch.randn(1, 3, 60, 90))
    assert out.logits.shape == (1, 3, 15, 23)
    logits = predict_logits(model, torch.randn(1, 3, 60, 90))
    assert logits.shape == (1, 3, 60, 90)


def test_fixed_attention_zero_is_the_context_prediction(model):
    zero = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32], fixed_attention=0.0)
    zero.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("attention_head")})
    zero.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = zero(x)
        low = zero.decode_head(zero.backbone(context_downscale(x, 0.5)))
    torch.testing.assert_close(out.logits, F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False))
    assert zero.attention_head is None


def test_gradients_follow_the_fusion(model):
    x = torch.randn(2, 3, 64, 64)
    out = model(x, mode="train", detail_box=CropBox.from_corners(0, 32, 0, 32))
    # Fused pixels far from the box (rows/cols >= 12 of 16) are pure context: no gradient to the
    # attention head; the whole fused map reaches it.
    out.logits[..., 12:, 12:].sum().backward(retain_graph=True)
    assert all(float(p.grad.abs().sum()) == 0 for p in model.attention_head.parameters() if p.grad is not None)
    assert float(model.decode_head.conv_seg.weight.grad.abs().sum()) > 0
    model.zero_grad()
    out.logits.sum().backward()
    assert float(model.attention_head.conv_seg.weight.grad.abs().sum()) > 0


def test_loss_is_0_9_fused_plus_0_1_detail_on_the_cropped_labels(model):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 64, 64), generator=g)
    labels[:, :4] = 255
    weight = torch.rand(2, 64, 64, generator=g)
    box = CropBox.from_corners(16, 48, 8, 40)
    out = model(torch.randn(2, 3, 64, 64), mode="train", detail_box=box)
    terms = hrda_segmentation_loss(out, labels, weight)
    assert set(terms) == {"fused", "detail"}

    def ce(logits, y, w):
        up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        per_pixel = -torch.log_softmax(up, dim=1).gather(1, y.clamp(max=2).unsqueeze(1)).squeeze(1)
        return (per_pixel * w * (y != 255)).sum() / y.numel()  # ignored pixels in the denominator

    fused = ce(out.logits, labels, weight)
    detail = ce(out.high_res, labels[:, 16:48, 8:40], weight[:, 16:48, 8:40])
    torch.testing.assert_close(terms["fused"], 0.9 * fused)
    torch.testing.assert_close(terms["detail"], 0.1 * detail)
    with_low = hrda_segmentation_loss(out, labels, weight, detail_weight=0.1, low_res_weight=0.1)
    torch.testing.assert_close(with_low["fused"], 0.8 * fused)
    torch.testing.assert_close(with_low["low_res"], 0.1 * ce(out.weighted_low_res(), labels, weight))


def test_registered_paper_model_is_daformer_mitb5_plus_the_attention_head():
    with torch.device("meta"):
        hrda = build_model("hrda_daformer_mitb5", 19)
        base = build_model("daformer_mitb5", 19)
    assert isinstance(hrda, HRDASegmentor) and isinstance(hrda.attention_head, ScaleAttentionHead)
    assert hrda.detail_crop_size == (512, 512) and hrda.context_scale == 0.5 and hrda.crop_divisible == 8
    head = hrda.attention_head
    # Linear embeds 64/128/320/512 -> 256, a 1x1 conv 1024 -> 256 with BN, a 256 -> 19 classifier.
    expected = sum(c * 256 + 256 for c in (64, 128, 320, 512)) + 1024 * 256 + 2 * 256 + 256 * 19 + 19
    assert count_parameters(head) == expected
    assert count_parameters(hrda) == count_parameters(base) + expected
    assert all("head" in name for name, _ in hrda.named_parameters() if not name.startswith("backbone."))
    single = build_model("hrda_daformer_tiny", 3, attention_classwise=False)
    assert single.attention_head.conv_seg.out_channels == 1


def test_projection_tap_reads_the_context_pass_at_its_full_resolution_stride():
    model = build_model("hrda_daformer_tiny", 3, detail_crop_size=[32, 32], projection="conv", projection_input="enc2")
    out = model(torch.randn(2, 3, 64, 64), taps=("proj", "enc2"), mode="train")
    assert model.tap_stride("proj") == model.tap_stride("enc2") == 16
    assert out.features["proj"].shape[-2:] == out.features["enc2"].shape[-2:] == (4, 4)


def test_the_step_model_output_carries_the_named_outputs_and_the_detail_box(model):
    from udaseg.adapt.step import UDAModel

    out = UDAModel(model)(torch.randn(2, 3, 64, 64))  # training mode with gradients: a detail crop
    assert set(out.outputs) == {"lr", "hr", "attention"} and out.output("hr").shape == (2, 3, 8, 8)
    box = out.boxes["hr"]
    assert (box.height, box.width) == (32, 32) and box.top % 8 == 0 and box.left % 8 == 0
    with torch.no_grad():
        slid = UDAModel(model)(torch.randn(2, 3, 64, 64))
    assert slid.boxes == {} and slid.output("hr").shape == (2, 3, 16, 16)
