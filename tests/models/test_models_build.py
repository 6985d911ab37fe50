"""Shapes, strides, taps and parameter counts of every registered model."""

import math

import pytest
import torch
import torch.nn.functional as F

from udaseg.errors import UserError
from udaseg.models import build_model, count_parameters, list_models
from udaseg.models.backbones import MixTransformer, ResNet
from udaseg.models.backbones.mit import EfficientSelfAttention
from udaseg.models.heads import DeepLabV2Head
from udaseg.models.layers import DropPath

H, W = 33, 49  # not multiples of 32 (nor of 8)


def _out(size, stride):
    return math.ceil(size / stride)


@pytest.mark.parametrize("name", [m for m in list_models() if not m.startswith("hrda_")])  # HRDA: tests/hrda
def test_every_model_logit_and_tap_shapes(name):
    tiny = "tiny" in name
    device = "cpu" if tiny else "meta"
    with torch.device(device):
        model = build_model(name, 7)
        x = torch.randn(2, 3, H, W)
    model.eval()
    taps = ("enc1", "enc2", "enc3", "enc4", "enc_last", "enc_fused", "decoder")
    with torch.no_grad():
        out = model(x, taps=taps)
    s = model.output_stride
    assert s == (8 if name.startswith("deeplabv2") else 4)
    assert out.logits.shape == (2, 7, _out(H, s), _out(W, s))
    assert set(out.features) == set(taps)
    for tap in taps:
        stride = model.tap_stride(tap)
        assert out.features[tap].shape == (2, model.tap_channels(tap), _out(H, stride), _out(W, stride)), tap
    assert out.features["enc_last"] is out.features["enc4"]
    assert model.name == name and model.num_classes == 7


def test_encoder_runs_once_per_call():
    model = build_model("daformer_tiny", 3).eval()
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randn(1, 3, 32, 32), taps=("enc1", "enc_fused", "decoder"))
    assert len(calls) == 1


def test_enc_fused_is_resize_concat_of_stages():
    model = build_model("segformer_tiny", 3).eval()
    out = model(torch.randn(1, 3, 40, 56), taps=("enc1", "enc2", "enc3", "enc4", "enc_fused"))
    size = out.features["enc1"].shape[-2:]
    expected = torch.cat(
        [F.interpolate(out.features[f"enc{i}"], size=size, mode="bilinear", align_corners=False) if i > 1
         else out.features["enc1"] for i in range(1, 5)], dim=1)
    torch.testing.assert_close(out.features["enc_fused"], expected)


def test_unknown_tap_lists_valid_ones():
    model = build_model("deeplabv2_tiny", 3)
    with pytest.raises(ValueError, match="enc_fused"):
        model(torch.randn(1, 3, 32, 32), taps=("encoder",))
    with pytest.raises(ValueError, match="decoder"):
        model.tap_channels("proj")


def test_deeplab_decoder_tap_is_last_stage_and_head_sums_dilated_convs():
    model = build_model("deeplabv2_tiny", 4).eval()
    out = model(torch.randn(1, 3, 48, 40), taps=("decoder", "enc_last"))
    assert torch.equal(out.features["decoder"], out.features["enc_last"])
    x = out.features["enc_last"]
    expected = sum(F.conv2d(x, b.conv.weight, b.conv.bias, padding=d, dilation=d)
                   for b, d in zip(model.decode_head.aspp_modules, (6, 12, 18, 24)))
    torch.testing.assert_close(out.logits, expected)


def test_deeplab_head_init_std():
    torch.manual_seed(0)
    head = DeepLabV2Head([2048], 19, [8])
    w = head.aspp_modules[0].conv.weight
    assert abs(w.std().item() - 0.01) < 0.001


# ------------------------------------------------------------------------------ parameter counts
# Official figures: torchvision ResNet-101 has 44,549,160 parameters, of which fc 2,049,000; SegFormer
# reports MiT-B5 = 81.4M and SegFormer-B5 = 84.7M (150 ADE classes); DAFormer (MiT-B5) = 85.2M.
PARAMETER_COUNTS = {
    "deeplabv2_r101": (42_500_160, None),
    "deeplabv2_r101_v1c": (42_519_392, None),
    "daformer_mitb5": (81_443_008, 85_155_283),
    "segformer_mitb5": (81_443_008, 84_607_955),
}


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_pinned(name):
    backbone_count, total = PARAMETER_COUNTS[name]
    with torch.device("meta"):
        model = build_model(name, 19)
    assert count_parameters(model.backbone) == backbone_count
    if total is not None:
        assert count_parameters(model) == total
    if name.startswith("deeplabv2"):
        assert count_parameters(model.decode_head) == 4 * (2048 * 9 * 19 + 19)


def test_parameter_counts_match_papers():
    with torch.device("meta"):
        daformer = build_model("daformer_mitb5", 19)
        segformer_ade = build_model("segformer_mitb5", 150)
    assert round(count_parameters(daformer.backbone) / 1e6, 1) == 81.4
    assert round(count_parameters(daformer) / 1e6, 1) == 85.2
    assert round(count_parameters(segformer_ade) / 1e6, 1) == 84.7
    # torchvision's ResNet-101 total including its 1000-way classifier
    with torch.device("meta"):
        r101 = ResNet(101, stem="plain")
    assert count_parameters(r101) + 2048 * 1000 + 1000 == 44_549_160


# ------------------------------------------------------------------------------------- backbones
def test_resnet_contract_dilation_and_stride():
    with torch.device("meta"):
        net = ResNet(50, stem="v1c")
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[2].conv2.dilation == (4, 4)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # pytorch style
    assert net.out_strides == (4, 8, 8, 8) and net.out_channels == (256, 512, 1024, 2048)
    with torch.device("meta"):
        plain = ResNet(50, stem="plain", contract_dilation=False)
    assert plain.layer4[0].conv2.dilation == (4, 4)


def test_v1c_stem_layout():
    net = ResNet(18, stem="v1c", base_width=8)
    convs = [(i, m) for i, m in enumerate(net.stem) if isinstance(m, torch.nn.Conv2d)]
    assert [i for i, _ in convs] == [0, 3, 6]
    assert [(m.in_channels, m.out_channels, m.stride[0]) for _, m in convs] == [(3, 4, 2), (4, 4, 1), (4, 8, 1)]


def test_frozen_bn_keeps_statistics_and_blocks_gradients():
    net = ResNet(18, base_width=4, frozen_bn=True).train()
    bn = net.layer1[0].bn1
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 32, 32)).__len__()
    assert torch.equal(before, bn.running_mean) and not bn.training
    assert not bn.weight.requires_grad and net.layer1[0].conv1.weight.requires_grad

    affine = ResNet(18, base_width=4, freeze_bn_affine=True).train()
    before = affine.layer1[0].bn1.running_mean.clone()
    affine(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, affine.layer1[0].bn1.running_mean)
    assert not affine.layer1[0].bn1.weight.requires_grad


def test_efficient_attention_matches_plain_formula():
    torch.manual_seed(0)
    attn = EfficientSelfAttention(16, num_heads=2, sr_ratio=2).eval()
    h, w = 6, 8
    x = torch.randn(3, h * w, 16)
    grid = x.transpose(1, 2).reshape(3, 16, h, w)
    reduced = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))
    q = attn.q(x)
    k, v = attn.kv(reduced).chunk(2, dim=-1)
    heads = []
    for i in range(2):
        sl = slice(8 * i, 8 * (i + 1))
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), dim=-1)
        heads.append(weights @ v[..., sl])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-5)


def test_mit_norm_eps_and_drop_path_schedule():
    net = MixTransformer("mit_tiny", drop_path_rate=0.3)
    assert net.block1[0].norm1.eps == 1e-6 and net.norm4.eps == 1e-6
    rates = [net.block1[0].drop_path, net.block4[0].drop_path]
    assert isinstance(rates[0], torch.nn.Identity) and rates[1].p == pytest.approx(0.3)
    with torch.device("meta"):
        b5 = MixTransformer("mit_b5")
    assert b5.block3[39].drop_path.p == pytest.approx(0.1 * 48 / 51)  # block 3+6+39 of 52
    assert b5.block4[2].drop_path.p == pytest.approx(0.1)


def test_drop_path_identity_in_eval_and_unbiased_in_train():
    layer = DropPath(0.5)
    x = torch.ones(4000, 1)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.1


# -------------------------------------------------------------------------------------- registry
def test_unknown_model_suggests_closest():
    with pytest.raises(UserError, match="daformer_mitb5"):
        build_model("daformer_mit_b5", 19)


def test_unknown_option_and_bad_class_count():
    with pytest.raises(UserError, match="drop_path_rate"):
        build_model("daformer_tiny", 19, drop_path=0.2)
    with pytest.raises(UserError, match="num_classes"):
        build_model("daformer_tiny", 0)


def test_heads_live_in_modules_named_head():
    model = build_model("daformer_tiny", 5, projection="sepico")
    names = [n for n, _ in model.named_parameters() if not n.startswith("backbone.")]
    assert names and all("head" in n.split(".")[0] for n in names)
