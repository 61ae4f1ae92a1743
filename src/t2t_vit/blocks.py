"""Backbone blocks (paper Eq. 5 and the CNN-inspired designs of §3.2 / Table 6).

A block is pre-norm: x += DropPath(MSA(LN(x))); x += DropPath(MLP(LN(x))). The ``kind`` picks
the design: "standard", "se" (channel attention after the attention projection) or "ghost"
(half-width projections completed by cheap operations). Dense connectivity is a stage layout:
each dense block appends ``growth`` new channels to its input, transitions halve the width.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from timm.layers import DropPath

from t2t_vit.layers import Attention, GhostAttention, GhostMlp, Mlp

BLOCK_KINDS = ("standard", "se", "ghost")


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        kind: str = "standard",
        mlp_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {kind!r}; choose one of {BLOCK_KINDS}")
        hidden = mlp_hidden_dim or int(dim * mlp_ratio)
        attn_cls = GhostAttention if kind == "ghost" else Attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_cls(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            se_reduction=16 if kind == "se" else 0,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GhostMlp(dim, hidden, drop=drop) if kind == "ghost" else Mlp(dim, hidden, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.residual_branches(x)

    def residual_branches(self, x: Tensor) -> Tensor:
        """x + DropPath(MSA(LN(x))), then + DropPath(MLP(LN(·))) (paper Eq. 5)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DenseBlock(Block):
    """A block whose output is squeezed to ``growth`` channels and concatenated to its input."""

    def __init__(self, dim: int, growth: int, **kwargs) -> None:
        super().__init__(dim, **kwargs)
        self.dense_linear = nn.Linear(dim, growth)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.dense_linear(self.residual_branches(x))], dim=-1)


class Transition(nn.Module):
    """Between dense stages: a linear map that halves the width, then GELU."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


def drop_path_rates(depth: int, rate: float) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to ``rate`` at the last."""
    return [float(r) for r in torch.linspace(0, rate, depth)] if depth else []


def build_blocks(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
    kind: str = "standard",
    mlp_hidden_dim: int | None = None,
    dense_stages: Sequence[int] | None = None,
    growth: int = 0,
) -> tuple[nn.Sequential, int]:
    """The backbone's block sequence and its output width."""
    common = dict(
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
        kind=kind, mlp_hidden_dim=mlp_hidden_dim,
    )
    if not dense_stages:
        rates = drop_path_rates(depth, drop_path_rate)
        return nn.Sequential(*(Block(embed_dim, drop_path=r, **common) for r in rates)), embed_dim
    rates = iter(drop_path_rates(sum(dense_stages), drop_path_rate))
    layers: list[nn.Module] = []
    width = embed_dim
    for stage, blocks_in_stage in enumerate(dense_stages):
        for _ in range(blocks_in_stage):
            layers.append(DenseBlock(width, growth, drop_path=next(rates), **common))
            width += growth
        if stage < len(dense_stages) - 1:
            layers.append(Transition(width, width // 2))
            width //= 2
    return nn.Sequential(*layers), width
