"""Alternating generator / discriminator updates inside one training step.

Output-space adversarial alignment (AdaptSegNet, SPCL's warm-up) trains a domain discriminator
``D`` against the segmentor ``G`` with two losses per iteration:

    L_G = BCE(D(p_t), y_src)                                  (D frozen: gradients reach G only)
    L_D = ½ BCE(D(p_s.detach()), y_src) + ½ BCE(D(p_t.detach()), y_tgt)   (detached: D only)

with ``p = softmax(logits)`` and BCE-with-logits averaged over D's patch map. Freezing D while L_G
is formed (``requires_grad=False`` on its parameters) and detaching its inputs for L_D means both
losses can be back-propagated in the same backward sweep: G's gradients come from L_G alone, D's
from L_D alone, exactly as the alternating update of the official code. ``D`` is owned by its
objective and stepped by its own optimiser (:class:`udaseg.adapt.step.OwnedOptimizer`).

:class:`FCDiscriminator` is AdaptSegNet's fully-convolutional discriminator on softmax maps.

Example::

    d = FCDiscriminator(19)
    g_loss, d_loss = adversarial_losses(d, source_probs, target_probs)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE_DOMAIN, TARGET_DOMAIN = 0.0, 1.0


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` do not require gradients inside the block (restored afterwards)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def domain_bce(domain_logits: Tensor, domain: float) -> Tensor:
    """BCE-with-logits of D's patch map against a constant domain label, averaged over the map."""
    return F.binary_cross_entropy_with_logits(domain_logits, torch.full_like(domain_logits, domain))


def adversarial_losses(discriminator: nn.Module, source_input: Tensor, target_input: Tensor,
                       source_domain: float = SOURCE_DOMAIN,
                       target_domain: float = TARGET_DOMAIN) -> tuple[Tensor, Tensor]:
    """``(L_G, L_D)`` of the module docstring; inputs are D's inputs (softmax maps), B×C×H×W."""
    with frozen(discriminator):
        generator = domain_bce(discriminator(target_input), source_domain)
    discriminator_loss = 0.5 * (domain_bce(discriminator(source_input.detach()), source_domain)
                                + domain_bce(discriminator(target_input.detach()), target_domain))
    return generator, discriminator_loss


class FCDiscriminator(nn.Module):
    """AdaptSegNet's output-space discriminator: five 4×4 convolutions with stride 2 and padding 1,
    ``K → w → 2w → 4w → 8w → 1`` channels, LeakyReLU(0.2) after the first four, no normalisation,
    no sigmoid. Input ``B×K×H×W`` (softmax maps), output ``B×1×H'×W'`` domain logits, one per patch
    (``H' ≈ H/32``: 16×32 for a 512×1024 input).
    """

    def __init__(self, num_classes: int, width: int = 64, slope: float = 0.2) -> None:
        super().__init__()
        channels = [num_classes, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(slope, inplace=True)]
        layers.append(nn.Conv2d(channels[-1], 1, 4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
