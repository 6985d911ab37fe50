"""The networks of Style Augmentation (Jackson et al., CVPR-W 2019), with the layout of their release.

Style Augmentation restyles an image with a **random style embedding** ``z`` (100 numbers):

    z = α · z_random + (1 − α) · z_image,     z_random ~ N(μ, Σ)
    output = StyleTransformer(image, z)

``μ, Σ`` are the mean and covariance of the embeddings of the Painter-by-Numbers paintings,
``z_image`` is the embedding of the image's own style (from :class:`InceptionStylePredictor`, or the
mean ImageNet embedding) and α = 0.5 in the GtA augmentor that T2S-DA uses. Only the colours and
textures change; the layout stays, so the label map of the image still holds.

- :class:`StyleTransformer` is the arbitrary-style network of Ghiasi et al. (BMVC 2017): a 9×9 conv,
  two stride-2 3×3 convs, five residual blocks, two ×2 nearest-upsampling convs and a 9×9 conv to
  RGB, each conv followed by instance normalisation. From the fourth layer on the normalised maps
  are scaled and shifted per channel by ``γ(z), β(z)``, both linear in ``z``. A sigmoid maps the
  output to [0, 1].
- :class:`InceptionStylePredictor` is Inception-v3 up to ``Mixed_6e``, averaged over space, then a
  linear map 768 → 100.

The attribute names follow the released files, so they load without renaming (one folder):

- ``checkpoint_transformer.pth``: ``{"state_dict_ghiasi": state dict of StyleTransformer}``
- ``checkpoint_stylepredictor.pth``: ``{"state_dict_stylepredictor": state dict of the predictor}``
- ``checkpoint_embeddings.pth``: ``pbn_embedding_mean`` (1×100), ``pbn_embedding_covariance``
  (100×100) and ``imagenet_embedding_mean`` (1×100).

Example (random weights)::

    >>> net = StyleTransformer()
    >>> net(torch.rand(1, 3, 32, 48), torch.zeros(1, STYLE_DIM)).shape
    torch.Size([1, 3, 32, 48])
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STYLE_DIM = 100
RELEASE_FILES = {
    "transformer": ("checkpoint_transformer.pth", "state_dict_ghiasi"),
    "predictor": ("checkpoint_stylepredictor.pth", "state_dict_stylepredictor"),
    "embeddings": ("checkpoint_embeddings.pth", None),
}
EMBEDDING_KEYS = ("pbn_embedding_mean", "pbn_embedding_covariance", "imagenet_embedding_mean")


# --------------------------------------------------------------------------------------------
# Style transformer (Ghiasi et al. 2017)
# --------------------------------------------------------------------------------------------

def _modulate(x: Tensor, style: Tensor, gamma: nn.Linear, beta: nn.Linear) -> Tensor:
    """Instance-normalise ``x`` (B x C x H x W), then ``γ(z) · x + β(z)`` per channel."""
    return gamma(style)[..., None, None] * F.instance_norm(x) + beta(style)[..., None, None]


class ConvNormReLU(nn.Module):
    """Reflection pad, conv, instance norm, ReLU; not conditioned on the style."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: Tensor, style: Optional[Tensor] = None) -> Tensor:
        return F.relu(F.instance_norm(self.conv(self.pad(x))))


class StyleResidualBlock(nn.Module):
    """``x + modulate(conv2(relu(modulate(conv1(x)))))`` with reflection padding (Johnson et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        self.fc_gamma1, self.fc_beta1 = nn.Linear(STYLE_DIM, channels), nn.Linear(STYLE_DIM, channels)
        self.fc_gamma2, self.fc_beta2 = nn.Linear(STYLE_DIM, channels), nn.Linear(STYLE_DIM, channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        y = F.relu(_modulate(self.conv1(self.pad(x)), style, self.fc_gamma1, self.fc_beta1))
        return x + _modulate(self.conv2(self.pad(y)), style, self.fc_gamma2, self.fc_beta2)


class StyleUpConv(nn.Module):
    """Optional ×``upsample`` nearest upsampling, reflection pad, conv, style modulation, optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, upsample: int = 1, relu: bool = True):
        super().__init__()
        self.upsample = upsample
        self.relu = relu
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.fc_gamma, self.fc_beta = nn.Linear(STYLE_DIM, out_channels), nn.Linear(STYLE_DIM, out_channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="nearest")
        x = _modulate(self.conv(self.pad(x)), style, self.fc_gamma, self.fc_beta)
        return F.relu(x) if self.relu else x


class StyleTransformer(nn.Module):
    """Image (B x 3 x H x W in [0, 1]) and style embedding (B x 100) -> restyled image in [0, 1].

    With H and W multiples of 4 the output has the input size; otherwise it is up to 3 pixels larger.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.layers = nn.ModuleList(
            [ConvNormReLU(3, w, 9), ConvNormReLU(w, 2 * w, 3, stride=2), ConvNormReLU(2 * w, 4 * w, 3, stride=2)]
            + [StyleResidualBlock(4 * w) for _ in range(5)]
            + [StyleUpConv(4 * w, 2 * w, 3, upsample=2), StyleUpConv(2 * w, w, 3, upsample=2),
               StyleUpConv(w, 3, 9, relu=False)])

    def forward(self, image: Tensor, style: Tensor) -> Tensor:
        x = image
        for layer in self.layers:
            x = layer(x, style)
        return torch.sigmoid(x)


# --------------------------------------------------------------------------------------------
# Style predictor (Inception-v3 up to Mixed_6e)
# --------------------------------------------------------------------------------------------

Kernel = Union[int, tuple[int, int]]


class ConvBNReLU(nn.Module):
    """Bias-free conv, batch norm (eps 1e-3, as in Inception-v3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Kernel, stride: int = 1,
                 padding: Kernel = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


# A branch is a chain of convs ``(name, in, out, kernel[, stride[, padding]])``, optionally opened by
# a 3x3 pooling: "avg" (stride 1, padding 1) or "max" (stride 2, and then it is the whole branch).
Branch = Sequence[Union[str, tuple]]


class InceptionBlock(nn.Module):
    """Parallel branches whose outputs are concatenated along channels."""

    def __init__(self, branches: Sequence[Branch]):
        super().__init__()
        self.branches = [[step if isinstance(step, str) else step[0] for step in branch] for branch in branches]
        for branch in branches:
            for step in branch:
                if not isinstance(step, str):
                    name, *args = step
                    self.add_module(name, ConvBNReLU(*args))

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if step == "avg":
                    y = F.avg_pool2d(y, 3, stride=1, padding=1)
                elif step == "max":
                    y = F.max_pool2d(y, 3, stride=2)
                else:
                    y = getattr(self, step)(y)
            outputs.append(y)
        return torch.cat(outputs, 1)


def inception_a(cin: int, pool_features: int) -> InceptionBlock:
    return InceptionBlock([
        [("branch1x1", cin, 64, 1)],
        [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
        [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 1, 1)],
        ["avg", ("branch_pool", cin, pool_features, 1)],
    ])


def inception_b(cin: int) -> InceptionBlock:
    return InceptionBlock([
        [("branch3x3", cin, 384, 3, 2)],
        [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 2)],
        ["max"],
    ])


def inception_c(cin: int, c7: int) -> InceptionBlock:
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return InceptionBlock([
        [("branch1x1", cin, 192, 1)],
        [("branch7x7_1", cin, c7, 1), ("branch7x7_2", c7, c7, *row), ("branch7x7_3", c7, 192, *col)],
        [("branch7x7dbl_1", cin, c7, 1), ("branch7x7dbl_2", c7, c7, *col), ("branch7x7dbl_3", c7, c7, *row),
         ("branch7x7dbl_4", c7, c7, *col), ("branch7x7dbl_5", c7, 192, *row)],
        ["avg", ("branch_pool", cin, 192, 1)],
    ])


class InceptionStylePredictor(nn.Module):
    """Image (B x 3 x H x W in [0, 1], H, W >= 75) -> its style embedding (B x 100)."""

    MIN_SIZE = 75

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.Mixed_5b = inception_a(192, 32)
        self.Mixed_5c = inception_a(256, 64)
        self.Mixed_5d = inception_a(288, 64)
        self.Mixed_6a = inception_b(288)
        self.Mixed_6b = inception_c(768, 128)
        self.Mixed_6c = inception_c(768, 160)
        self.Mixed_6d = inception_c(768, 160)
        self.Mixed_6e = inception_c(768, 192)
        self.fc = nn.Linear(768, STYLE_DIM)

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """[0, 1] RGB -> the Inception input range, as the release computes it.

        The release first normalises with ImageNet statistics, where the blue std reads 0.255 instead of
        0.225, and then maps to Inception's [-1, 1]. Red and green end up exactly at ``2x - 1``; blue is
        slightly compressed. The released predictor is used with this input, so it is kept.
        """
        mean = x.new_tensor([0.485, 0.456, 0.406])[:, None, None]
        first_std = x.new_tensor([0.229, 0.224, 0.255])[:, None, None]
        second_std = x.new_tensor([0.229, 0.224, 0.225])[:, None, None]
        return (x - mean) / first_std * (second_std / 0.5) + (mean - 0.5) / 0.5

    def forward(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------------
# Random style embeddings
# --------------------------------------------------------------------------------------------

class StyleEmbeddingDistribution:
    """``N(mean, covariance)`` over 100-d style embeddings, sampled as ``mean + A ε`` with ``A Aᵀ = Σ``.

    ``A = V diag(√λ)`` from the eigen-decomposition of the (symmetric, positive semi-definite)
    covariance; small negative eigenvalues from round-off are clipped to 0.
    """

    def __init__(self, mean: Tensor, covariance: Tensor):
        mean = mean.reshape(-1).double()
        covariance = covariance.double()
        if covariance.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"covariance of shape {tuple(covariance.shape)} does not match a mean of {mean.numel()}")
        eigenvalues, eigenvectors = torch.linalg.eigh((covariance + covariance.T) / 2)
        self.mean = mean.float()
        self.factor = (eigenvectors * eigenvalues.clamp(min=0).sqrt()).float()

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n x dim`` embeddings on the generator's device (CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(n, self.mean.numel(), generator=generator, device=device)
        return self.mean.to(device) + noise @ self.factor.to(device).T
