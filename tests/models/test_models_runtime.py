"""Inference modes, mixed precision, memory layout, compilation and projection heads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udaseg.errors import UserError
from udaseg.models import build_model, predict_logits, window_grid
from udaseg.models.heads import ConvProjectionHead, MLPProjectionHead, SePiCoProjectionHead, build_projection_head


class PixelModel(nn.Module):
    """A per-pixel model (1×1 conv) at stride 1: slide and whole inference must agree for any windows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("daformer_tiny", 5).eval()


def test_slide_equals_whole_when_window_covers_image(tiny_model):
    x = torch.randn(2, 3, 45, 70)
    whole = predict_logits(tiny_model, x)
    slide = predict_logits(tiny_model, x, mode="slide", crop_size=(64, 96), stride=32)
    assert whole.shape == (2, 5, 45, 70)
    torch.testing.assert_close(slide, whole)


def test_slide_with_overlaps_normalises_by_count():
    model = PixelModel()
    x = torch.randn(2, 3, 37, 53)
    whole = predict_logits(model, x)
    for batch_windows in (1, 3, 8):
        slide = predict_logits(model, x, mode="slide", crop_size=(16, 24), stride=(10, 7), batch_windows=batch_windows)
        torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_matches_window_by_window_reference(tiny_model):
    x = torch.randn(1, 3, 40, 50)
    crop, stride = 32, 20
    got = predict_logits(tiny_model, x, mode="slide", crop_size=crop, stride=stride, batch_windows=2)
    total = torch.zeros(1, 5, 40, 50)
    count = torch.zeros(1, 1, 40, 50)
    for y1 in (0, 8):  # rows: 0 then the last one shifted back to end at 40
        for x1 in (0, 18):
            window = x[:, :, y1:y1 + 32, x1:x1 + 32]
            logits = tiny_model(window).logits
            total[:, :, y1:y1 + 32, x1:x1 + 32] += F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
            count[:, :, y1:y1 + 32, x1:x1 + 32] += 1
    torch.testing.assert_close(got, total / count, rtol=1e-5, atol=1e-5)


def test_window_grid_covers_every_pixel_inside_the_image():
    windows = window_grid(100, 77, (32, 40), (21, 13))
    covered = torch.zeros(100, 77)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= 100 and 0 <= x1 < x2 <= 77 and (y2 - y1, x2 - x1) == (32, 40)
        covered[y1:y2, x1:x2] = 1
    assert covered.all()


def test_flip_and_out_size():
    model = PixelModel()  # flip-equivariant
    x = torch.randn(1, 3, 33, 21)
    plain = predict_logits(model, x, out_size=(66, 42))
    assert plain.shape == (1, 4, 66, 42)
    torch.testing.assert_close(predict_logits(model, x, flip=True, out_size=(66, 42)), plain)


def test_flip_merge_probs_is_log_of_mean_softmax(tiny_model):
    x = torch.randn(1, 3, 32, 48)
    a = predict_logits(tiny_model, x)
    b = predict_logits(tiny_model, x.flip(-1)).flip(-1)
    merged = predict_logits(tiny_model, x, flip=True, flip_merge="probs")
    torch.testing.assert_close(merged.softmax(1), (a.softmax(1) + b.softmax(1)) / 2)
    torch.testing.assert_close(predict_logits(tiny_model, x, flip=True), (a + b) / 2)


def test_inference_bad_arguments():
    with pytest.raises(UserError, match="crop_size"):
        predict_logits(PixelModel(), torch.randn(1, 3, 8, 8), mode="slide")
    with pytest.raises(UserError, match="mode"):
        predict_logits(PixelModel(), torch.randn(1, 3, 8, 8), mode="tiles")


@pytest.mark.parametrize("name", ["daformer_tiny", "segformer_tiny", "deeplabv2_tiny"])
def test_bf16_autocast_and_channels_last_forward(name):
    torch.manual_seed(0)
    model = build_model(name, 3).eval()  # eval: no dropout / drop-path randomness between the runs
    x = torch.randn(2, 3, 40, 56)
    reference = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, taps=("decoder", "enc_fused"))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    out.logits.float().sum().backward()
    model.zero_grad()
    cl_model = model.to(memory_format=torch.channels_last)
    cl_out = cl_model(x.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(cl_out, reference, rtol=1e-4, atol=1e-4)


def test_torch_compile_traces_without_graph_breaks():
    # The inductor backend takes minutes on a small shared CPU; benchmarks/models.py measures it.
    # Here dynamo must capture the whole segmentor (fullgraph) and give the eager result.
    model = build_model("segformer_tiny", 3).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 36, 52)
    with torch.no_grad():
        out = compiled(x, taps=("decoder",))
    torch.testing.assert_close(out.logits, model(x).logits)
    assert out.features["decoder"].shape == (1, 64, 9, 13)


# ---------------------------------------------------------------------------------- projection
def test_sepico_projection_unit_norm_and_non_negative():
    head = SePiCoProjectionHead(32, out_channels=16).train()
    z = head(torch.randn(2, 32, 5, 7))
    assert z.shape == (2, 16, 5, 7)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 5, 7))
    assert (z >= 0).all()
    assert head.convs[0].conv.bias is None and head.convs[0].conv.out_channels == 32


def test_conv_projection_final_act_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 6, 6)
    with_act = ConvProjectionHead(12, 8, 8).train()(x)
    without = ConvProjectionHead(12, 8, 8, final_act=False).train()(x)
    assert (with_act >= 0).all() and (without < 0).any()
    torch.testing.assert_close(without.norm(dim=1), torch.ones(2, 6, 6))
    assert ConvProjectionHead(12).convs[0].conv.kernel_size == (3, 3)


def test_mlp_projection_matches_formula():
    torch.manual_seed(0)
    head = MLPProjectionHead(10, 6, 4)
    x = torch.randn(1, 10, 3, 3)
    hidden = F.relu(F.conv2d(x, head.convs[0].weight, head.convs[0].bias))
    raw = F.conv2d(hidden, head.convs[2].weight, head.convs[2].bias)
    torch.testing.assert_close(head(x), raw / raw.norm(dim=1, keepdim=True))
    head.normalize = False
    torch.testing.assert_close(head(x), raw)


def test_projection_tap_through_registry():
    model = build_model("daformer_tiny", 5, projection="sepico").eval()
    assert model.proj_input == "enc_fused" and model.proj_head.convs[0].conv.out_channels == 240 // 4
    out = model(torch.randn(1, 3, 33, 47), taps=("proj",))
    assert list(out.features) == ["proj"]
    assert out.features["proj"].shape == (1, 512, 9, 12)
    assert model.tap_channels("proj") == 512 and model.tap_stride("proj") == 4
    dl = build_model("deeplabv2_tiny", 5, projection="mlp", projection_options={"hidden_channels": 16, "out_channels": 8})
    assert dl.proj_input == "enc_last" and dl.tap_channels("proj") == 8 and dl.tap_stride("proj") == 8
    with pytest.raises(UserError, match="unknown projection head"):
        build_model("daformer_tiny", 5, projection="byol")
    with pytest.raises(UserError, match="projection_input"):
        build_model("daformer_tiny", 5, projection="conv", projection_input="enc9")
    assert isinstance(build_projection_head("conv", 8), ConvProjectionHead)
