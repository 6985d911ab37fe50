"""Projection heads that map encoder features to the embedding space of a contrastive loss.

They run on a segmentor tap (see :class:`udaseg.models.Segmentor`) and only during training; the
test-time model never uses them. Every head returns per-pixel embeddings of unit L2 norm over channels
(``B×D×h×w``), except :class:`MLPProjectionHead` with ``normalize=False``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import ConvBNReLU


class SePiCoProjectionHead(nn.Module):
    """SePiCo's ``ProjHead`` Θ_p (sepico.md §1.1.3, code-faithful).

    ``conv1×1(C_in→C_mid, no bias) → BN → ReLU → conv1×1(C_mid→D, no bias) → BN → ReLU → L2-normalise``.

    The paper describes "two 1×1 conv layers with ReLU"; the official code has BN after both convs and
    a ReLU after the last, so every embedding is non-negative and all cosine similarities lie in [0, 1].
    Settings used by the paper: DeepLab-V2 on ``layer4`` ``2048→2048→512``; MiT-B5 on the resize-concat
    of the four stages (tap ``enc_fused``) ``1024→256→512``. PGPC (pgpc.md §1.2) reuses it with ``D=256``.
    Keys ``convs.0.conv``, ``convs.0.bn``, ``convs.1.*`` match the released checkpoints' ``auxiliary_head``.

    Shapes: ``B×C_in×h×w -> B×D×h×w``, ``‖z[b,:,i,j]‖₂ = 1``, ``z ≥ 0``.
    """

    def __init__(self, in_channels: int, hidden_channels: int | None = None, out_channels: int = 512) -> None:
        super().__init__()
        hidden_channels = hidden_channels or in_channels
        self.out_channels = out_channels
        self.convs = nn.Sequential(ConvBNReLU(in_channels, hidden_channels, 1), ConvBNReLU(hidden_channels, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.convs(x), p=2, dim=1)


class ConvProjectionHead(nn.Module):
    """T2S-DA's projector g (t2sda.md §1.4), also usable for PGPC-style heads.

    ``Conv k×k(C_in→C_mid) → BN → ReLU → Conv1×1(C_mid→D) → BN → [ReLU if final_act] → L2-normalise``,
    defaults ``k=3``, ``C_mid=D=256``, ``final_act=True`` ("two Conv-BN-ReLU blocks"). With the final ReLU
    every cosine similarity is ≥ 0; ``final_act=False`` removes it.

    Shapes: ``B×C_in×h×w -> B×D×h×w`` with unit-norm pixels.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 256, out_channels: int = 256,
                 kernel_size: int = 3, final_act: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.convs = nn.Sequential(
            ConvBNReLU(in_channels, hidden_channels, kernel_size),
            ConvBNReLU(hidden_channels, out_channels, 1, activation=final_act),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.convs(x), p=2, dim=1)


class MLPProjectionHead(nn.Module):
    """RCCR's momentum projector F_proj (rccr.md §2.3): ``Conv1×1(C_in→C_mid) → ReLU → Conv1×1(C_mid→D)``.

    Defaults ``2048 → 2048 → 128``; convs with bias, no BN, no final activation, PyTorch default init.
    RCCR normalises only inside its similarity function; ``normalize=True`` (default) L2-normalises the
    output here, which leaves every cosine similarity unchanged.
    """

    def __init__(self, in_channels: int = 2048, hidden_channels: int = 2048, out_channels: int = 128,
                 normalize: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.normalize = normalize
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_channels, out_channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs(x)
        return F.normalize(out, p=2, dim=1) if self.normalize else out


PROJECTION_HEADS = {
    "sepico": SePiCoProjectionHead,
    "conv": ConvProjectionHead,
    "mlp": MLPProjectionHead,
}


def build_projection_head(kind: str, in_channels: int, **options) -> nn.Module:
    """Build a projection head by kind: ``"sepico"``, ``"conv"`` (T2S-DA/PGPC) or ``"mlp"`` (RCCR)."""
    from ...errors import UserError

    if kind not in PROJECTION_HEADS:
        raise UserError(f"unknown projection head {kind!r}; valid: {', '.join(sorted(PROJECTION_HEADS))}")
    try:
        return PROJECTION_HEADS[kind](in_channels, **options)
    except TypeError as error:
        raise UserError(f"bad options for projection head {kind!r}: {error}") from None
