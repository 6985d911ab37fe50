import pytest
import torch

from udaseg.errors import UserError
from udaseg.models import build_model


@pytest.mark.parametrize("stride", [8, 4])
def test_deeplabv2_tiny_output_stride(stride):
    model = build_model("deeplabv2_tiny", 11, output_stride=stride, base_width=16)
    out = model(torch.randn(1, 3, 64, 64), taps=("enc4", "enc1"))
    assert model.output_stride == stride and model.tap_stride("enc4") == stride
    assert out.logits.shape == (1, 11, 64 // stride, 64 // stride)
    assert out.features["enc4"].shape[1] == model.tap_channels("enc4") == 16 * 8


def test_unsupported_output_stride_is_a_user_error():
    with pytest.raises(UserError, match="output_stride"):
        build_model("deeplabv2_tiny", 11, output_stride=16)


def test_deeplabv2_tiny_head_dilations_option():
    from udaseg.errors import UserError

    model = build_model("deeplabv2_tiny", 3, output_stride=4, head_dilations=[1, 2, 4, 6])
    assert [branch.conv.dilation[0] for branch in model.decode_head.aspp_modules] == [1, 2, 4, 6]
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3, 8, 8)
    with pytest.raises(UserError, match="head_dilations"):
        build_model("deeplabv2_tiny", 3, head_dilations=[0])
