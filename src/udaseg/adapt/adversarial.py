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

Example::

    d = nn.Conv2d(19, 1, 4, stride=2, padding=1)
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
