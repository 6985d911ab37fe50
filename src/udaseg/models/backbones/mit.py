"""Mix Transformer (MiT-B0 … B5), the SegFormer encoder (Xie et al., NeurIPS 2021).

Four stages at strides 4/8/16/32. Each stage starts with an *overlapping* patch embedding (a strided
conv: 7×7/4 for stage 1, 3×3/2 afterwards, followed by LayerNorm) and stacks transformer blocks:

    x = x + DropPath(EfficientAttention(LN(x)))
    x = x + DropPath(MixFFN(LN(x)))

*Efficient self-attention* computes keys and values on a sequence shortened by the reduction ratio
``R`` (a ``R×R``/``R`` conv + LayerNorm on the token map), so attention costs ``N·N/R²`` instead of ``N²``.
*Mix-FFN* is ``fc1 → 3×3 depth-wise conv → GELU → fc2``; the depth-wise conv supplies the positional
information, so no position embeddings exist and any input size works. Stochastic-depth rates rise
linearly from 0 to ``drop_path_rate`` over all blocks. Each stage ends with a LayerNorm.

Parameter names follow SegFormer's released ``mit_b*.pth`` (``patch_embed1.proj``, ``block1.0.attn.q``,
``block1.0.attn.kv``, ``block1.0.attn.sr``, ``block1.0.attn.norm``, ``block1.0.mlp.dwconv.dwconv``,
``norm1`` …), so those files load without renaming. As in the official code, block and stage norms use
``eps=1e-6`` while the patch-embedding and spatial-reduction norms keep PyTorch's default ``1e-5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import DropPath

BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: Tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: float = 4.0


_WIDE = (64, 128, 320, 512)
MIT_CONFIGS: Dict[str, MiTConfig] = {
    "mit_b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTConfig(_WIDE, (2, 2, 2, 2)),
    "mit_b2": MiTConfig(_WIDE, (3, 4, 6, 3)),
    "mit_b3": MiTConfig(_WIDE, (3, 4, 18, 3)),
    "mit_b4": MiTConfig(_WIDE, (3, 8, 27, 3)),
    "mit_b5": MiTConfig(_WIDE, (3, 6, 40, 3)),
    # CPU-sized variant for tests and the digits benchmark.
    "mit_tiny": MiTConfig((16, 32, 64, 128), (1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
}


class OverlapPatchEmbed(nn.Module):
    """Strided conv with ``kernel > stride`` (so patches overlap) then LayerNorm over channels."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the token map reduced ``sr_ratio`` times."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(batch, dim, height, width)
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale head_dim^-1/2, as the original
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DepthwiseConv(nn.Module):
    """3×3 depth-wise conv applied to a token sequence laid out as an ``H×W`` map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, _, dim = x.shape
        grid = x.transpose(1, 2).reshape(batch, dim, height, width)
        return self.dwconv(grid).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixTransformer(nn.Module):
    """MiT encoder returning its four stage outputs ``[B×C_i×ceil(H/s_i)×ceil(W/s_i)]``, ``s=(4,8,16,32)``.

    Args:
        config: a :class:`MiTConfig` or a name from :data:`MIT_CONFIGS` (``mit_b0`` … ``mit_b5``, ``mit_tiny``).
        drop_path_rate: stochastic-depth rate of the last block (0.1 in SegFormer/DAFormer).
    """

    def __init__(self, config: MiTConfig | str = "mit_b5", in_channels: int = 3, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in MIT_CONFIGS:
                raise ValueError(f"unknown MiT config {config!r}; valid: {sorted(MIT_CONFIGS)}")
            config = MIT_CONFIGS[config]
        self.config = config
        rates = torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu").tolist()
        previous, first = in_channels, 0
        for i, (dim, depth) in enumerate(zip(config.embed_dims, config.depths)):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(previous, dim, patch, stride))
            blocks = [
                MiTBlock(dim, config.num_heads[i], config.sr_ratios[i], config.mlp_ratio, rates[first + j])
                for j in range(depth)
            ]
            self.add_module(f"block{i + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            previous, first = dim, first + depth
        self.out_channels: Tuple[int, ...] = tuple(config.embed_dims)
        self.out_strides: Tuple[int, ...] = (4, 8, 16, 32)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> List[Tensor]:
        batch = x.shape[0]
        outs = []
        for i in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(batch, -1, height, width)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal (std 0.02) for linears, He-normal (fan-out) for convs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
