"""Block masks of MIC: block size and grid exactly, the masked ratio statistically, bad input."""

import pytest
import torch

from udaseg.adapt.masking import block_mask, check_block_size, mask_images
from udaseg.config import load_config
from udaseg.errors import UserError


def test_every_block_is_constant_and_follows_its_own_uniform():
    height, width, block = 48, 80, 16
    mask = block_mask(3, height, width, block, 0.7, torch.Generator().manual_seed(5))
    assert mask.shape == (3, 1, height, width) and mask.dtype == torch.float32
    uniforms = torch.rand(3, 1, height // block, width // block, generator=torch.Generator().manual_seed(5))
    for b in range(3):
        for m in range(height // block):
            for n in range(width // block):
                cell = mask[b, 0, m * block:(m + 1) * block, n * block:(n + 1) * block]
                expected = 1.0 if uniforms[b, 0, m, n] > 0.7 else 0.0
                assert torch.all(cell == expected), (b, m, n)


def test_masked_fraction_matches_the_ratio():
    # 400 images x 64 blocks: the masked fraction's std is sqrt(0.21 / 25600) ~ 0.003.
    for ratio in (0.3, 0.7, 0.9):
        mask = block_mask(400, 64, 64, 8, ratio, torch.Generator().manual_seed(1))
        assert abs(float(1 - mask.mean()) - ratio) < 0.015
        per_image = 1 - mask.mean(dim=(1, 2, 3))
        assert float(per_image.std()) > 0  # Bernoulli per block, not an exact count per image
    assert bool((block_mask(4, 32, 32, 8, 0.0, torch.Generator().manual_seed(0)) == 1).all())


def test_masking_acts_on_the_normalised_image_and_shares_channels():
    images = torch.randn(2, 3, 32, 32) + 3.0  # no pixel is 0 by chance
    masked, mask = mask_images(images, 8, 0.7, torch.Generator().manual_seed(2))
    kept = mask.expand_as(images).bool()
    assert torch.equal(masked[kept], images[kept])
    assert bool((masked[~kept] == 0).all())  # the dataset mean colour, not black
    assert bool(((masked == 0).all(dim=1) == ~mask[:, 0].bool()).all())


@pytest.mark.parametrize("height, width, block", [(512, 512, 48), (512, 1024, 96), (100, 64, 32)])
def test_a_block_that_does_not_divide_the_crop_is_a_one_line_error(height, width, block):
    with pytest.raises(UserError) as info:
        check_block_size(height, width, block, "method.mic.block_size")
    message = str(info.value)
    assert "method.mic.block_size" in message and str(block) in message and len(message.splitlines()) == 1
    with pytest.raises(UserError, match="method.mic.block_size"):
        mask_images(torch.zeros(1, 3, height, width), block, 0.7, key="method.mic.block_size")


def test_config_values_out_of_range_name_the_key():
    with pytest.raises(UserError, match="method.mic.mask_ratio"):
        load_config("digits_mic", ["method.mic.mask_ratio=1.0"])
    with pytest.raises(UserError, match="method.mic.block_size"):
        load_config("digits_mic", ["method.mic.block_size=0"])
    with pytest.raises(UserError, match="method.mic.base"):
        load_config("digits_mic", ["method.mic.base=advseg"])
