"""Photometric image translations for T2S-DA's domain-generalisation setting.

Without target images, T2S-DA turns each source image into a stylised copy with an augmentor (the
GtA augmentor of Kundu et al. 2021 has five kinds: FDA with a random style reference, Style
Augmentation, AdaIN, weather corruptions and cartoonisation) and pulls the features of the copy to
the source prototypes. Every translation here is **photometric only**: it never moves pixels, so
the copy keeps the source label map.

A translator is any callable ``(image, generator) -> image`` (:class:`Translator`) where ``image``
is either a ``uint8 H x W x 3`` numpy array or a float tensor ``3 x H x W`` in 0-255 (RGB, before
normalisation); the result has the same type, shape, dtype and range. All randomness comes from
the given ``torch.Generator``, so a seeded generator gives the same output.

Built in (no pretrained network needed):

- :class:`FDATranslator` - FDA with a random reference image from a folder (GtA kind A).
- :class:`WeatherTranslator` - procedural fog, frost, snow, rain streaks and brightness, simple
  versions of the Michaelis et al. (2019) corruptions (GtA kind D).
- :class:`CartoonTranslator` - edge-preserving smoothing, colour quantisation and dark edges
  (GtA kind E).
- :class:`StyleStatisticsTranslator` - random per-channel mean/std in a decorrelated colour space
  (in the spirit of MixStyle / random style statistics).

:class:`AdaINTranslator` and :class:`StyleAugmentationTranslator` (GtA kinds C and B) run the released
networks from a folder of weights (``t2sda.dg_weights``); without one, constructing them raises
:class:`TranslationUnavailable` (a :class:`UserError`), which :func:`build_translations` reports as a
skipped translation.

Example::

    >>> import numpy as np
    >>> image = np.zeros((32, 48, 3), dtype=np.uint8)
    >>> pick = RandomTranslation([WeatherTranslator(), CartoonTranslator()])
    >>> pick(image, torch.Generator().manual_seed(0)).shape
    (32, 48, 3)
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from udaseg.adapt.fda import Window, fda_translate, window_half_sizes
from udaseg.errors import UserError

Image = Union[np.ndarray, Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class Translator(Protocol):
    """``(image uint8 HxWx3 array or float 3xHxW tensor in 0-255, generator) -> same type``."""

    def __call__(self, image: Image, generator: Optional[torch.Generator] = None) -> Image:
        ...


class _UnitRangeTranslator:
    """Base class: converts to a float ``1 x 3 x H x W`` tensor in [0, 1] and back."""

    def __call__(self, image: Image, generator: Optional[torch.Generator] = None) -> Image:
        unit, restore = _to_unit(image)
        return restore(self.apply(unit, generator).clamp(0, 1))

    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# FDA with a random reference
# --------------------------------------------------------------------------------------------

class FDATranslator(_UnitRangeTranslator):
    """FDA (:func:`udaseg.adapt.fda.fda_translate`) with a reference drawn uniformly from a folder.

    The reference is resized (bilinear) to the image size. Images are found recursively by suffix.
    """

    def __init__(self, reference_dir: Union[str, Path], beta: float = 0.01, window: Window = "official"):
        self.references = reference_images(reference_dir)
        if not 0 < beta < 0.5:
            raise UserError(f"t2sda.fda_beta: {beta} is out of range (expected 0 < beta < 0.5)")
        window_half_sizes(1, 1, beta, window)  # validates the window name
        self.beta = beta
        self.window = window

    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        index = int(torch.randint(len(self.references), (1,), generator=generator))
        reference = _load_rgb(self.references[index], size=(x.shape[-2], x.shape[-1])).to(x.device)
        return fda_translate(x * 255, reference.unsqueeze(0), self.beta, self.window) / 255


def reference_images(reference_dir: Union[str, Path]) -> list[Path]:
    """The images under ``reference_dir`` (recursively, by suffix), sorted; a missing or empty folder is an error."""
    folder = Path(reference_dir)
    if not str(reference_dir) or not folder.is_dir():
        raise UserError(f"t2sda.dg_reference_dir: folder {str(reference_dir)!r} does not exist")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"t2sda.dg_reference_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def _load_rgb(path: Path, size: tuple[int, int]) -> Tensor:
    """Float ``3 x H x W`` in 0-255, resized to ``size`` (H, W)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            im = im.convert("RGB").resize((size[1], size[0]), PILImage.BILINEAR)
            array = np.asarray(im, dtype=np.float32)
    except OSError as error:
        raise UserError(f"cannot read reference image {path}: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Weather
# --------------------------------------------------------------------------------------------

class WeatherTranslator(_UnitRangeTranslator):
    """Procedural weather: fog, frost, snow, rain streaks or brightness, chosen uniformly.

    Simple stand-ins for the corruptions of Michaelis et al. (2019), built from random noise only
    (no texture files). ``severity`` is 1-5 or an inclusive range drawn uniformly per image.

    - fog: ``x <- (x + a * fractal) * max(x) / (max(x) + a)`` with multi-octave noise;
    - frost: ``x <- c0 * x + c1 * ice`` with a crystalline pale-blue noise texture;
    - snow: thresholded noise, motion-blurred along a random direction, over a brightened image;
    - rain: sparse drops smeared into slanted streaks, over a slightly darkened image;
    - brightness: HSV value shift (hue and saturation kept).
    """

    KINDS = ("fog", "frost", "snow", "rain", "brightness")

    def __init__(self, severity: Union[int, tuple[int, int]] = (1, 5), kinds: Sequence[str] = KINDS):
        low, high = (severity, severity) if isinstance(severity, int) else tuple(severity)
        if not 1 <= low <= high <= 5:
            raise UserError(f"weather severity: expected 1-5 or a range within 1-5, got {severity}")
        unknown = [k for k in kinds if k not in self.KINDS]
        if unknown or not kinds:
            raise UserError(f"weather kinds: unknown {unknown or 'empty list'} (choose from {', '.join(self.KINDS)})")
        self.severity_range = (low, high)
        self.kinds = tuple(kinds)

    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        kind = self.kinds[int(torch.randint(len(self.kinds), (1,), generator=generator))]
        low, high = self.severity_range
        severity = int(torch.randint(low, high + 1, (1,), generator=generator))
        return getattr(self, f"_{kind}")(x, severity, generator)

    def _fog(self, x: Tensor, severity: int, generator: Optional[torch.Generator]) -> Tensor:
        strength = (1.5, 2.0, 2.5, 2.5, 3.0)[severity - 1]
        decay = (2.0, 2.0, 1.7, 1.5, 1.4)[severity - 1]
        fog = _fractal_noise(x.shape[-2:], decay, generator).to(x)
        peak = x.max()
        return (x + strength * fog) * peak / (peak + strength)

    def _frost(self, x: Tensor, severity: int, generator: Optional[torch.Generator]) -> Tensor:
        keep, ice_weight = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
        height, width = x.shape[-2:]
        fine = _gaussian_blur(_rand((1, 1, height, width), generator).to(x), 0.8)
        fine = (fine - fine.min()) / (fine.max() - fine.min()).clamp(min=1e-6)
        patches = _fractal_noise((height, width), 1.6, generator).to(x)
        ice = (0.6 * patches + 0.4 * fine.pow(3) * 2).clamp(0, 1)
        tint = x.new_tensor([0.85, 0.92, 1.0]).view(1, 3, 1, 1)
        return keep * x + ice_weight * ice * tint

    def _snow(self, x: Tensor, severity: int, generator: Optional[torch.Generator]) -> Tensor:
        loc, scale, threshold, length, blend = ((0.1, 0.3, 0.5, 11, 0.8), (0.2, 0.3, 0.5, 13, 0.7),
                                                (0.55, 0.3, 0.9, 13, 0.7), (0.55, 0.3, 0.85, 15, 0.65),
                                                (0.55, 0.3, 0.85, 17, 0.55))[severity - 1]
        height, width = x.shape[-2:]
        flakes = _randn((1, 1, height, width), generator).to(x) * scale + loc
        flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
        angle = float(torch.empty(1).uniform_(-135, -45, generator=generator))
        flakes = _line_blur(flakes, length, angle)
        gray = x.mean(dim=1, keepdim=True)
        x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
        return x + flakes + torch.flip(flakes, dims=(-2, -1))

    def _rain(self, x: Tensor, severity: int, generator: Optional[torch.Generator]) -> Tensor:
        density, length, darken = ((0.002, 9, 0.05), (0.004, 13, 0.1), (0.006, 17, 0.15), (0.008, 21, 0.2),
                                   (0.01, 25, 0.25))[severity - 1]
        height, width = x.shape[-2:]
        drops = (_rand((1, 1, height, width), generator) < density).float() * (
            0.5 + 0.5 * _rand((1, 1, height, width), generator))
        angle = 90.0 + float(torch.empty(1).uniform_(-20, 20, generator=generator))
        streaks = _line_blur(drops.to(x), length, angle) * length * 0.35
        return x * (1 - darken) + streaks.clamp(0, 1) * 0.8

    def _brightness(self, x: Tensor, severity: int, generator: Optional[torch.Generator]) -> Tensor:
        shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
        value = x.max(dim=1, keepdim=True).values
        new_value = (value + shift).clamp(0, 1)
        scaled = x * new_value / value.clamp(min=1e-6)
        return torch.where(value > 1e-6, scaled, new_value.expand_as(x))


# --------------------------------------------------------------------------------------------
# Cartoon
# --------------------------------------------------------------------------------------------

class CartoonTranslator(_UnitRangeTranslator):
    """Cartoonisation: bilateral smoothing, saturation boost, colour quantisation, dark edges.

    A plain-torch version of the imgaug ``Cartoon`` augmenter (Jung et al. 2020). Per image, the
    colour sigma, number of colour levels and saturation factor are drawn from the given ranges.
    Edges are the pixels whose Sobel magnitude on the smoothed grey image lies in the top
    ``edge_fraction`` of the image.
    """

    def __init__(self, iterations: int = 3, radius: int = 2, color_sigma: tuple[float, float] = (0.05, 0.15),
                 levels: tuple[int, int] = (4, 8), saturation: tuple[float, float] = (1.2, 1.6),
                 edge_fraction: float = 0.08, edge_darkness: float = 0.85):
        if iterations < 1 or radius < 1:
            raise UserError(f"cartoon: iterations and radius must be >= 1, got {iterations} and {radius}")
        if not 2 <= levels[0] <= levels[1]:
            raise UserError(f"cartoon levels: expected a range with 2 <= low <= high, got {levels}")
        if not 0 <= edge_fraction < 1:
            raise UserError(f"cartoon edge_fraction: expected a value in [0, 1), got {edge_fraction}")
        self.iterations = iterations
        self.radius = radius
        self.color_sigma = color_sigma
        self.levels = levels
        self.saturation = saturation
        self.edge_fraction = edge_fraction
        self.edge_darkness = edge_darkness

    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        color_sigma = _uniform(*self.color_sigma, generator)
        levels = int(torch.randint(self.levels[0], self.levels[1] + 1, (1,), generator=generator))
        saturation = _uniform(*self.saturation, generator)
        smooth = x
        for _ in range(self.iterations):
            smooth = _bilateral(smooth, self.radius, self.radius, color_sigma)
        gray = smooth.mean(dim=1, keepdim=True)
        vivid = (gray + saturation * (smooth - gray)).clamp(0, 1)
        flat = torch.round(vivid * (levels - 1)) / (levels - 1)
        edges = _edge_mask(gray, self.edge_fraction)
        return flat * (1 - self.edge_darkness * edges)


def _bilateral(x: Tensor, radius: int, space_sigma: float, color_sigma: float) -> Tensor:
    """Bilateral filter over a ``(2r+1)^2`` window, one shifted copy at a time (memory O(HW))."""
    height, width = x.shape[-2:]
    pad = F.pad(x, (radius,) * 4, mode="replicate")
    total = torch.zeros_like(x)
    norm = torch.zeros_like(x[:, :1])
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = pad[..., radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            colour_dist = (shifted - x).pow(2).sum(dim=1, keepdim=True)
            weight = math.exp(-(dy * dy + dx * dx) / (2 * space_sigma ** 2)) * torch.exp(
                -colour_dist / (2 * color_sigma ** 2))
            total += weight * shifted
            norm += weight
    return total / norm


def _edge_mask(gray: Tensor, fraction: float) -> Tensor:
    """1 where the Sobel magnitude is in the top ``fraction`` of the image (and not flat), else 0."""
    if fraction == 0:
        return torch.zeros_like(gray)
    sobel_x = gray.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel_x)
    gy = F.conv2d(padded, sobel_x.transpose(-1, -2))
    magnitude = (gx.pow(2) + gy.pow(2)).sqrt()
    threshold = torch.quantile(magnitude.flatten().float(), 1 - fraction).to(magnitude)
    return ((magnitude >= threshold) & (magnitude > 0.05)).to(gray)


# --------------------------------------------------------------------------------------------
# Random style statistics
# --------------------------------------------------------------------------------------------

# Orthonormal opponent-colour basis (rows): red-green, yellow-blue, luminance.
_OPPONENT = torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                          [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
                          [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)]])


class StyleStatisticsTranslator(_UnitRangeTranslator):
    """Random style statistics in a decorrelated (opponent) colour space.

    With ``y = O x`` per pixel (``O`` orthonormal: red-green, yellow-blue, luminance), each channel's
    mean ``mu`` and std ``sigma`` over the image are replaced by

        mu' = mu + mean_sigma * N(0, 1),      sigma' = sigma * exp(std_sigma * N(0, 1))

    and ``x' = O^T [ (y - mu) / sigma * sigma' + mu' ]``, clipped to [0, 1] (0-255 outside).
    """

    def __init__(self, mean_sigma: float = 0.1, std_sigma: float = 0.3):
        if mean_sigma < 0 or std_sigma < 0:
            raise UserError(f"style statistics: sigmas must be >= 0, got {mean_sigma} and {std_sigma}")
        self.mean_sigma = mean_sigma
        self.std_sigma = std_sigma

    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        basis = _OPPONENT.to(x)
        y = torch.einsum("kc,bchw->bkhw", basis, x)
        mean = y.mean(dim=(-2, -1), keepdim=True)
        std = y.std(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        new_mean = mean + self.mean_sigma * _randn(mean.shape, generator).to(x)
        new_std = std * torch.exp(self.std_sigma * _randn(std.shape, generator).to(x))
        y = (y - mean) / std * new_std + new_mean
        return torch.einsum("kc,bkhw->bchw", basis, y)


# --------------------------------------------------------------------------------------------
# Translations that need networks
# --------------------------------------------------------------------------------------------

class TranslationUnavailable(UserError):
    """A translation that cannot run with the given settings (no weights or no reference images)."""


# The AdaIN networks (Huang & Belongie, ICCV 2017) as nn.Sequential built from layer plans, so that
# the parameter names are the module indices of the released `vgg_normalised.pth` / `decoder.pth`.
# An int pair is a reflection-padded 3x3 conv (+ ReLU), "M" a 2x2 max-pool, "U" a 2x nearest upsample.
_ADAIN_ENCODER_PLAN = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256),
                       (256, 256), "M", (256, 512)]  # up to relu4_1
_ADAIN_DECODER_PLAN = [(512, 256), "U", (256, 256), (256, 256), (256, 256), (256, 128), "U", (128, 128), (128, 64),
                       "U", (64, 64), (64, 3)]
ADAIN_WEIGHT_FILES = ("vgg_normalised.pth", "decoder.pth")


def adain_encoder() -> torch.nn.Sequential:
    """VGG-19 (normalised) up to relu4_1, preceded by the fixed 1x1 colour conv of the release."""
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, 3, 1)]
    for item in _ADAIN_ENCODER_PLAN:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(*item, 3), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def adain_decoder() -> torch.nn.Sequential:
    """The mirror of the encoder; no ReLU after the last conv."""
    layers: list[torch.nn.Module] = []
    for item in _ADAIN_DECODER_PLAN:
        if item == "U":
            layers.append(torch.nn.Upsample(scale_factor=2, mode="nearest"))
        else:
            layers += [torch.nn.ReflectionPad2d(1), torch.nn.Conv2d(*item, 3), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def adaptive_instance_norm(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN(x, y) = σ(y) (x − μ(x)) / σ(x) + μ(y), with per-sample, per-channel spatial statistics."""
    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


def _load_network(module: torch.nn.Module, path: Path, network: str, allow_extra: bool = False,
                  inner_key: Optional[str] = None) -> None:
    """Load ``path`` into ``module``; every parameter must be there with its shape (``UserError`` otherwise)."""
    from udaseg.models.weights import read_state_dict

    if inner_key is None:
        state = read_state_dict(path)
    else:
        content = _read_torch_file(path)
        state = content.get(inner_key) if isinstance(content, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"t2sda.dg_weights: {path} has no {inner_key!r} entry; it does not hold {network}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    extra = [k for k in state if k not in own]
    if missing or wrong or (extra and not allow_extra):
        first = (missing or wrong or extra)[0]
        raise UserError(f"t2sda.dg_weights: {path} does not hold {network} "
                        f"({len(missing)} missing, {len(wrong)} mis-shaped, {len(extra)} unexpected keys; first: {first})")
    module.load_state_dict({k: state[k] for k in own})


def _read_torch_file(path: Path) -> object:
    if not path.is_file():
        raise UserError(f"t2sda.dg_weights: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a torch file
        raise UserError(f"t2sda.dg_weights: cannot read {path}: {type(error).__name__}") from None


def _weights_folder(weights_dir: Union[str, Path, None], name: str, files: Sequence[str]) -> Path:
    """The folder holding ``files``; no folder given makes the translation unavailable (skipped)."""
    listing = " and ".join(files)
    if not weights_dir:
        raise TranslationUnavailable(f"{name} needs weights ({listing}); set t2sda.dg_weights to the folder holding them")
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise UserError(f"t2sda.dg_weights: folder {str(weights_dir)!r} does not exist (it should hold {listing})")
    return folder


class AdaINTranslator(_UnitRangeTranslator):
    """AdaIN style transfer with a random style reference (GtA kind C).

    ``weights_dir`` holds the released ``vgg_normalised.pth`` and ``decoder.pth``; style images are drawn
    uniformly from ``reference_dir``. The output is ``decoder(α·AdaIN(f(x), f(s)) + (1 − α)·f(x))``.
    Without weights (or style images) the translation is unavailable and the caller skips it.
    """

    name = "adain"

    def __init__(self, weights_dir: Union[str, Path, None] = None, reference_dir: Union[str, Path, None] = None,
                 alpha: float = 1.0):
        folder = _weights_folder(weights_dir, self.name, ADAIN_WEIGHT_FILES)
        if not reference_dir:
            raise TranslationUnavailable("adain needs style images; set t2sda.dg_reference_dir")
        self.styles = reference_images(reference_dir)
        self.alpha = alpha
        self.encoder, self.decoder = adain_encoder().eval(), adain_decoder().eval()
        _load_network(self.encoder, folder / ADAIN_WEIGHT_FILES[0], "the AdaIN network",
                      allow_extra=True)  # the release goes on to relu5_4
        _load_network(self.decoder, folder / ADAIN_WEIGHT_FILES[1], "the AdaIN network")
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            p.requires_grad_(False)

    @torch.no_grad()
    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        index = int(torch.randint(len(self.styles), (1,), generator=generator))
        style = _load_rgb(self.styles[index], size=(x.shape[-2], x.shape[-1])).to(x.device).unsqueeze(0) / 255
        self.encoder.to(x.device), self.decoder.to(x.device)
        content = self.encoder(x)
        mixed = adaptive_instance_norm(content, self.encoder(style))
        out = self.decoder(self.alpha * mixed + (1 - self.alpha) * content)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class StyleAugmentationTranslator(_UnitRangeTranslator):
    """Style Augmentation (Jackson et al. 2019; GtA kind B): restyle with a random style embedding.

    ``weights_dir`` holds the three release files (:data:`udaseg.adapt.style_augmentation.RELEASE_FILES`).
    The embedding is ``α · z_random + (1 − α) · z_image`` with ``z_random`` drawn from the
    Painter-by-Numbers Gaussian and ``z_image`` the predicted style of the image
    (``use_style_predictor``) or the mean ImageNet embedding; α = 0.5 as in the GtA augmentor.
    ``downsamples`` halves the image that many times before the transformer (faster, blurrier).
    """

    name = "style_augmentation"

    def __init__(self, weights_dir: Union[str, Path, None] = None, alpha: float = 0.5,
                 use_style_predictor: bool = True, downsamples: int = 0):
        from udaseg.adapt import style_augmentation as sa

        files = [file for file, _ in sa.RELEASE_FILES.values()]
        folder = _weights_folder(weights_dir, self.name, files)
        if not 0 <= alpha <= 1:
            raise UserError(f"style_augmentation: alpha must be in [0, 1], got {alpha}")
        self.alpha, self.use_style_predictor, self.downsamples = alpha, use_style_predictor, downsamples
        self.transformer = sa.StyleTransformer().eval()
        self.predictor = sa.InceptionStylePredictor().eval()
        for key, network in (("transformer", self.transformer), ("predictor", self.predictor)):
            file, inner = sa.RELEASE_FILES[key]
            # every parameter must be there; extra entries are tolerated, as the release loads non-strictly
            _load_network(network, folder / file, f"the style-augmentation {key}", allow_extra=True, inner_key=inner)
            network.requires_grad_(False)
        embeddings_path = folder / sa.RELEASE_FILES["embeddings"][0]
        embeddings = _read_torch_file(embeddings_path)
        missing = [k for k in sa.EMBEDDING_KEYS if not (isinstance(embeddings, dict) and isinstance(embeddings.get(k), Tensor))]
        if missing:
            raise UserError(f"t2sda.dg_weights: {embeddings_path} has no {missing[0]!r} tensor")
        try:
            self.styles = sa.StyleEmbeddingDistribution(embeddings["pbn_embedding_mean"],
                                                        embeddings["pbn_embedding_covariance"])
        except ValueError as error:
            raise UserError(f"t2sda.dg_weights: {embeddings_path}: {error}") from None
        self.imagenet_style = embeddings["imagenet_embedding_mean"].reshape(1, -1).float()

    @torch.no_grad()
    def apply(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        self.transformer.to(x.device), self.predictor.to(x.device)
        if self.use_style_predictor:
            height, width = x.shape[-2:]
            scale = max(1.0, self.predictor.MIN_SIZE / min(height, width))
            probe = x if scale == 1 else F.interpolate(x, size=(math.ceil(height * scale), math.ceil(width * scale)),
                                                       mode="bilinear", align_corners=False)
            own_style = self.predictor(probe)
        else:
            own_style = self.imagenet_style.to(x.device)
        style = self.alpha * self.styles.sample(1, generator).to(x.device) + (1 - self.alpha) * own_style
        content = x
        for _ in range(self.downsamples):
            content = F.avg_pool2d(content, 2, ceil_mode=True)
        out = self.transformer(content, style)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


# --------------------------------------------------------------------------------------------
# Choosing translations
# --------------------------------------------------------------------------------------------

class RandomTranslation:
    """Applies one of ``translators``, chosen uniformly per image (the spec's default for DG)."""

    def __init__(self, translators: Sequence[Callable[..., Image]], generator: Optional[torch.Generator] = None):
        if not translators:
            raise UserError("t2sda.dg_translations: no translation is available (all were skipped or the list is empty)")
        self.translators = list(translators)
        self.generator = generator

    def __call__(self, image: Image, generator: Optional[torch.Generator] = None) -> Image:
        generator = generator if generator is not None else self.generator
        index = int(torch.randint(len(self.translators), (1,), generator=generator))
        return self.translators[index](image, generator)


TRANSLATION_NAMES = ("fda", "weather", "cartoon", "style_stats", "adain", "style_augmentation")


def build_translations(names: Sequence[str], reference_dir: str = "", weights: str = "", fda_beta: float = 0.01,
                       fda_window: Window = "official") -> tuple[list[Translator], list[tuple[str, str]]]:
    """Build the named translations.

    Returns ``(translators, skipped)`` where ``skipped`` lists ``(name, reason)`` for the
    translations that cannot run here: ``fda`` without a reference folder (``reference_dir=""``),
    and the network translations without a weights folder (``adain`` also without reference images).
    A folder that is given but missing or empty, weights files that do not hold the network, and
    unknown names raise :class:`UserError`.
    """
    translators: list[Translator] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        if name not in TRANSLATION_NAMES:
            close = difflib.get_close_matches(name, TRANSLATION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"t2sda.dg_translations: unknown translation {name!r}{hint} "
                            f"(choose from {', '.join(TRANSLATION_NAMES)})")
        if name == "fda":
            if not reference_dir:
                skipped.append((name, "skipped: needs a folder of reference images (t2sda.dg_reference_dir)"))
                continue
            translators.append(FDATranslator(reference_dir, fda_beta, fda_window))
        elif name == "weather":
            translators.append(WeatherTranslator())
        elif name == "cartoon":
            translators.append(CartoonTranslator())
        elif name == "style_stats":
            translators.append(StyleStatisticsTranslator())
        else:
            try:
                if name == "adain":
                    translators.append(AdaINTranslator(weights or None, reference_dir or None))
                else:
                    translators.append(StyleAugmentationTranslator(weights or None))
            except TranslationUnavailable as error:
                skipped.append((name, f"skipped: {error}"))
    return translators, skipped


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _to_unit(image: Image) -> tuple[Tensor, Callable[[Tensor], Image]]:
    """Image -> float ``1 x 3 x H x W`` in [0, 1], and the function that converts back."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 array, got {image.dtype} {image.shape}")
        unit = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)

        def restore_array(x: Tensor) -> np.ndarray:
            return (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()

        return unit, restore_array
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW tensor, got {tuple(image.shape)}")
        dtype = image.dtype
        unit = image.float().unsqueeze(0) / 255.0

        def restore_tensor(x: Tensor) -> Tensor:
            out = x[0] * 255
            return out.round().to(dtype) if not dtype.is_floating_point else out.to(dtype)

        return unit, restore_tensor
    raise ValueError(f"expected a numpy array or a tensor, got {type(image).__name__}")


def _draw_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: Sequence[int], generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, device=_draw_device(generator))


def _randn(shape: Sequence[int], generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=_draw_device(generator))


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * float(_rand((1,), generator))


def _fractal_noise(size: Sequence[int], decay: float, generator: Optional[torch.Generator]) -> Tensor:
    """Multi-octave value noise in [0, 1], shape ``1 x 1 x H x W``; larger ``decay`` = smoother."""
    height, width = int(size[0]), int(size[1])
    noise = torch.zeros(1, 1, height, width)
    octaves = max(1, int(math.log2(max(height, width))) - 1)
    for octave in range(octaves):
        cell = 2 ** (octave + 1)
        coarse = _randn((1, 1, math.ceil(height / cell) + 1, math.ceil(width / cell) + 1), generator).cpu()
        up = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise += up * (1.0 / decay) ** (octaves - 1 - octave)
    return (noise - noise.min()) / (noise.max() - noise.min()).clamp(min=1e-6)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _line_blur(x: Tensor, length: int, angle_degrees: float) -> Tensor:
    """Average along a line of ``length`` pixels at ``angle_degrees`` (motion blur), ``1 x 1 x H x W``."""
    size = length if length % 2 else length + 1
    centre = size // 2
    kernel = torch.zeros(size, size, dtype=x.dtype, device=x.device)
    angle = math.radians(angle_degrees)
    for t in torch.linspace(-centre, centre, size).tolist():
        row = centre + int(round(t * math.sin(angle)))
        col = centre + int(round(t * math.cos(angle)))
        kernel[row, col] = 1.0
    kernel = kernel / kernel.sum()
    return F.conv2d(F.pad(x, (centre,) * 4), kernel.view(1, 1, size, size))
