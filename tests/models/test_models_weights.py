"""Checkpoint formats: official key names written out from the official layouts, loaded with no leftovers."""

import pytest
import torch

from udaseg.errors import UserError
from udaseg.models import build_model, detect_format, load_pretrained
from udaseg.models.backbones import ResNet

MIT_TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), sr=(8, 4, 2, 1))


def _rand(*shape):
    return torch.randn(*shape)


def official_mit_keys(dims, depths, sr, in_ch=3, with_head=True):
    """SegFormer ``mit_b*.pth`` layout (NVlabs/SegFormer mix_transformer.py)."""
    sd = {}
    prev = in_ch
    for i, (d, n, r) in enumerate(zip(dims, depths, sr), start=1):
        k = 7 if i == 1 else 3
        sd[f"patch_embed{i}.proj.weight"] = _rand(d, prev, k, k)
        sd[f"patch_embed{i}.proj.bias"] = _rand(d)
        sd[f"patch_embed{i}.norm.weight"] = _rand(d)
        sd[f"patch_embed{i}.norm.bias"] = _rand(d)
        for j in range(n):
            b = f"block{i}.{j}."
            for name in ("norm1", "norm2"):
                sd[b + name + ".weight"] = _rand(d)
                sd[b + name + ".bias"] = _rand(d)
            sd[b + "attn.q.weight"], sd[b + "attn.q.bias"] = _rand(d, d), _rand(d)
            sd[b + "attn.kv.weight"], sd[b + "attn.kv.bias"] = _rand(2 * d, d), _rand(2 * d)
            sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _rand(d, d), _rand(d)
            if r > 1:
                sd[b + "attn.sr.weight"], sd[b + "attn.sr.bias"] = _rand(d, d, r, r), _rand(d)
                sd[b + "attn.norm.weight"], sd[b + "attn.norm.bias"] = _rand(d), _rand(d)
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _rand(4 * d, d), _rand(4 * d)
            sd[b + "mlp.dwconv.dwconv.weight"], sd[b + "mlp.dwconv.dwconv.bias"] = _rand(4 * d, 1, 3, 3), _rand(4 * d)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _rand(d, 4 * d), _rand(d)
        sd[f"norm{i}.weight"], sd[f"norm{i}.bias"] = _rand(d), _rand(d)
        prev = d
    if with_head:
        sd["head.weight"], sd["head.bias"] = _rand(1000, dims[-1]), _rand(1000)
    return sd


def _bn(sd, prefix, c, tracked=True):
    sd[prefix + ".weight"], sd[prefix + ".bias"] = _rand(c), _rand(c)
    sd[prefix + ".running_mean"], sd[prefix + ".running_var"] = _rand(c), torch.rand(c) + 0.5
    if tracked:
        sd[prefix + ".num_batches_tracked"] = torch.tensor(7)


def official_resnet_keys(depth, width, stem, tracked=True):
    """torchvision ``resnet*.pth`` (stem='plain') or OpenMMLab ``resnet*_v1c`` (stem='v1c') layout."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth >= 50
    sd = {}
    if stem == "plain":
        sd["conv1.weight"] = _rand(width, 3, 7, 7)
        _bn(sd, "bn1", width, tracked)
    else:
        half = width // 2
        sd["stem.0.weight"] = _rand(half, 3, 3, 3)
        _bn(sd, "stem.1", half, tracked)
        sd["stem.3.weight"] = _rand(half, half, 3, 3)
        _bn(sd, "stem.4", half, tracked)
        sd["stem.6.weight"] = _rand(width, half, 3, 3)
        _bn(sd, "stem.7", width, tracked)
    inplanes = width
    for i, n in enumerate(blocks):
        planes = width * 2 ** i
        out = planes * (4 if bottleneck else 1)
        for j in range(n):
            p = f"layer{i + 1}.{j}."
            c_in = inplanes if j == 0 else out
            if bottleneck:
                sd[p + "conv1.weight"] = _rand(planes, c_in, 1, 1)
                _bn(sd, p + "bn1", planes, tracked)
                sd[p + "conv2.weight"] = _rand(planes, planes, 3, 3)
                _bn(sd, p + "bn2", planes, tracked)
                sd[p + "conv3.weight"] = _rand(out, planes, 1, 1)
                _bn(sd, p + "bn3", out, tracked)
            else:
                sd[p + "conv1.weight"] = _rand(planes, c_in, 3, 3)
                _bn(sd, p + "bn1", planes, tracked)
                sd[p + "conv2.weight"] = _rand(planes, planes, 3, 3)
                _bn(sd, p + "bn2", planes, tracked)
            if j == 0 and (i > 0 or c_in != out):
                sd[p + "downsample.0.weight"] = _rand(out, c_in, 1, 1)
                _bn(sd, p + "downsample.1", out, tracked)
        inplanes = out
    sd["fc.weight"], sd["fc.bias"] = _rand(1000, inplanes), _rand(1000)
    return sd


def official_daformer_head_keys(in_dims, embed, channels, num_classes):
    """mmseg ``DAFormerHead`` with ``aspp`` fusion (sep=True, dilations 1/6/12/18, pool=False)."""
    sd = {}
    for i, c in enumerate(in_dims):
        sd[f"embed_layers.{i}.proj.weight"], sd[f"embed_layers.{i}.proj.bias"] = _rand(embed, c), _rand(embed)
    cat = embed * len(in_dims)
    sd["fuse_layer.aspp_modules.0.conv.weight"] = _rand(channels, cat, 1, 1)
    _bn(sd, "fuse_layer.aspp_modules.0.bn", channels)
    for j in (1, 2, 3):
        p = f"fuse_layer.aspp_modules.{j}."
        sd[p + "depthwise_conv.conv.weight"] = _rand(cat, 1, 3, 3)
        _bn(sd, p + "depthwise_conv.bn", cat)
        sd[p + "pointwise_conv.conv.weight"] = _rand(channels, cat, 1, 1)
        _bn(sd, p + "pointwise_conv.bn", channels)
    sd["fuse_layer.bottleneck.conv.weight"] = _rand(channels, 4 * channels, 3, 3)
    _bn(sd, "fuse_layer.bottleneck.bn", channels)
    sd["conv_seg.weight"], sd["conv_seg.bias"] = _rand(num_classes, channels, 1, 1), _rand(num_classes)
    return sd


def official_dlv2_head_keys(in_ch, num_classes):
    sd = {}
    for i in range(4):
        sd[f"aspp_modules.{i}.conv.weight"] = _rand(num_classes, in_ch, 3, 3)
        sd[f"aspp_modules.{i}.conv.bias"] = _rand(num_classes)
    return sd


def official_sepico_proj_keys(in_ch, mid, out):
    sd = {"convs.0.conv.weight": _rand(mid, in_ch, 1, 1), "convs.1.conv.weight": _rand(out, mid, 1, 1)}
    _bn(sd, "convs.0.bn", mid)
    _bn(sd, "convs.1.bn", out)
    return sd


def _prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def uda_checkpoint(backbone, head, proj=None):
    state = {}
    for model in ("model.", "ema_model."):
        parts = _prefixed("backbone.", {k: v.clone() + (1 if model == "ema_model." else 0) if v.is_floating_point() else v
                                       for k, v in backbone.items()})
        parts.update(_prefixed("decode_head.", head))
        if proj is not None:
            parts.update(_prefixed("auxiliary_head.", proj))
        state.update(_prefixed(model, parts))
    state.update(_prefixed("imnet_model.backbone.", backbone))
    return {"meta": {"iter": 40000}, "state_dict": state}


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("wrap", ["plain", "state_dict"])
def test_segformer_mit_checkpoint_loads_with_no_leftovers(tmp_path, wrap):
    sd = official_mit_keys(**MIT_TINY)
    path = _save(tmp_path, sd if wrap == "plain" else {"state_dict": sd})
    model = build_model("daformer_tiny", 19)
    report = load_pretrained(model, path, strict=True)
    assert report.format == "mit" and report.ok
    assert report.ignored == ["head.bias", "head.weight"]
    assert len(report.loaded) == len(sd) - 2
    assert torch.equal(model.backbone.block2[0].attn.kv.weight, sd["block2.0.attn.kv.weight"])
    assert torch.equal(model.backbone.block1[0].mlp.dwconv.dwconv.weight, sd["block1.0.mlp.dwconv.dwconv.weight"])


def test_torchvision_resnet_checkpoint_onto_plain_stem(tmp_path):
    sd = official_resnet_keys(50, 4, "plain", tracked=False)  # old torchvision files have no num_batches_tracked
    path = _save(tmp_path, sd)
    backbone = ResNet(50, stem="plain", base_width=4)
    report = load_pretrained(backbone, path, strict=True)
    assert report.format == "torchvision_resnet" and report.ok
    assert report.ignored == ["fc.bias", "fc.weight"]
    assert torch.equal(backbone.layer3[2].conv3.weight, sd["layer3.2.conv3.weight"])
    assert torch.equal(backbone.bn1.running_var, sd["bn1.running_var"])


@pytest.mark.parametrize("prefix", ["", "backbone."])
def test_mmcv_v1c_checkpoint_onto_deep_stem(tmp_path, prefix):
    sd = official_resnet_keys(18, 8, "v1c")
    path = _save(tmp_path, {"state_dict": _prefixed(prefix, sd), "meta": {}})
    model = build_model("deeplabv2_tiny", 19)
    report = load_pretrained(model, path, strict=True)
    assert report.format == "mmcv_resnet" and report.ok
    assert len(report.loaded) == len(sd) - 2
    assert torch.equal(model.backbone.stem[6].weight, sd["stem.6.weight"])
    assert torch.equal(model.backbone.layer2[0].downsample[1].running_mean, sd["layer2.0.downsample.1.running_mean"])


def test_released_daformer_sepico_checkpoint(tmp_path):
    backbone = official_mit_keys(**MIT_TINY, with_head=False)
    head = official_daformer_head_keys(MIT_TINY["dims"], 64, 64, 19)
    proj = official_sepico_proj_keys(240, 60, 512)
    path = _save(tmp_path, uda_checkpoint(backbone, head, proj))
    model = build_model("daformer_tiny", 19, projection="sepico")
    report = load_pretrained(model, path, strict=True)
    assert report.format == "uda" and report.ok
    assert all(k.startswith(("ema_model.", "imnet_model.")) for k in report.ignored)
    assert torch.equal(model.decode_head.fuse_layer.aspp_modules[2].depthwise_conv.conv.weight,
                       head["fuse_layer.aspp_modules.2.depthwise_conv.conv.weight"])
    assert torch.equal(model.proj_head.convs[1].bn.running_var, proj["convs.1.bn.running_var"])
    assert torch.equal(model.backbone.norm3.weight, backbone["norm3.weight"])

    teacher = build_model("daformer_tiny", 19)
    report = load_pretrained(teacher, path, use_ema=True)
    assert report.missing == [] and report.unexpected == []
    assert any(k.startswith("auxiliary_head") for k in report.ignored)  # no projection head to take them
    torch.testing.assert_close(teacher.backbone.norm3.weight, backbone["norm3.weight"] + 1)


def test_released_dlv2_checkpoint_and_backbone_only_target(tmp_path):
    backbone = official_resnet_keys(18, 8, "v1c")
    del backbone["fc.weight"], backbone["fc.bias"]
    head = official_dlv2_head_keys(64, 19)
    path = _save(tmp_path, uda_checkpoint(backbone, head))
    model = build_model("deeplabv2_tiny", 19)
    assert load_pretrained(model, path, strict=True).ok
    assert torch.equal(model.decode_head.aspp_modules[3].conv.bias, head["aspp_modules.3.conv.bias"])
    bare = ResNet(18, stem="v1c", base_width=8)
    assert load_pretrained(bare, path, strict=True).ok


def test_detect_format():
    assert detect_format({"backbone.patch_embed1.proj.weight": torch.zeros(1)}) == "mit"
    assert detect_format({"decode_head.conv_seg.weight": torch.zeros(1)}) == "mmseg"
    assert detect_format({"foo": torch.zeros(1)}) is None


# ------------------------------------------------------------------------------------ errors
def test_wrong_architecture_strict_error(tmp_path):
    path = _save(tmp_path, official_mit_keys(**MIT_TINY))
    model = build_model("deeplabv2_tiny", 19)
    report = load_pretrained(model, path)
    assert report.missing and report.unexpected and not report.loaded
    with pytest.raises(UserError, match="does not fit the architecture of deeplabv2_tiny"):
        load_pretrained(model, path, strict=True)


def test_torchvision_checkpoint_into_v1c_model_names_the_stem(tmp_path):
    path = _save(tmp_path, official_resnet_keys(18, 8, "plain"))
    report = load_pretrained(build_model("deeplabv2_tiny", 19), path)
    assert "backbone.stem.0.weight" in report.missing and "backbone.conv1.weight" in report.unexpected


def test_wrong_class_count_strict_error_and_lenient_skip(tmp_path):
    backbone = official_mit_keys(**MIT_TINY, with_head=False)
    head = official_daformer_head_keys(MIT_TINY["dims"], 64, 64, 19)
    path = _save(tmp_path, uda_checkpoint(backbone, head))
    model = build_model("daformer_tiny", 10)
    with pytest.raises(UserError, match="predicts 19 classes but the model has 10"):
        load_pretrained(model, path, strict=True)
    before = model.decode_head.conv_seg.weight.clone()
    report = load_pretrained(model, path)
    assert {k for k, _, _ in report.mismatched} == {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert torch.equal(model.decode_head.conv_seg.weight, before)
    assert torch.equal(model.backbone.norm1.bias, backbone["norm1.bias"])


def test_missing_and_corrupt_files(tmp_path):
    model = build_model("daformer_tiny", 19)
    with pytest.raises(UserError, match="not found: .*nothing.pth"):
        load_pretrained(model, tmp_path / "nothing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt.pth"):
        load_pretrained(model, bad)
    empty = _save(tmp_path, {"meta": 1}, "empty.pth")
    with pytest.raises(UserError, match="no tensors"):
        load_pretrained(model, empty)
    with pytest.raises(UserError, match="no EMA teacher"):
        load_pretrained(model, _save(tmp_path, {"state_dict": {"model.backbone.x": torch.zeros(1)}}, "s.pth"), use_ema=True)


def test_build_model_pretrained_option(tmp_path):
    sd = official_mit_keys(**MIT_TINY)
    path = _save(tmp_path, sd)
    model = build_model("segformer_tiny", 3, pretrained=str(path))
    assert torch.equal(model.backbone.patch_embed1.proj.weight, sd["patch_embed1.proj.weight"])


def official_segformer_head_keys(in_dims, embed, num_classes):
    """DAFormer's port of the SegFormer head (``linear_c``, ``linear_fuse`` ConvModule, ``linear_pred``);
    its base class also builds an unused ``conv_seg``."""
    sd = {}
    for i, c in enumerate(in_dims):
        sd[f"linear_c.{i}.proj.weight"], sd[f"linear_c.{i}.proj.bias"] = _rand(embed, c), _rand(embed)
    sd["linear_fuse.conv.weight"] = _rand(embed, 4 * embed, 1, 1)
    _bn(sd, "linear_fuse.bn", embed)
    sd["linear_pred.weight"], sd["linear_pred.bias"] = _rand(num_classes, embed, 1, 1), _rand(num_classes)
    sd["conv_seg.weight"], sd["conv_seg.bias"] = _rand(num_classes, embed, 1, 1), _rand(num_classes)
    return sd


def test_mmseg_segformer_checkpoint(tmp_path):
    backbone = official_mit_keys(**MIT_TINY, with_head=False)
    head = official_segformer_head_keys(MIT_TINY["dims"], 64, 19)
    sd = {**_prefixed("backbone.", backbone), **_prefixed("decode_head.", head)}
    path = _save(tmp_path, {"state_dict": sd})
    model = build_model("segformer_tiny", 19)
    report = load_pretrained(model, path, strict=True)
    assert report.format == "mmseg" and report.ok
    assert report.ignored == ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]
    assert torch.equal(model.decode_head.linear_fuse.bn.running_mean, head["linear_fuse.bn.running_mean"])
