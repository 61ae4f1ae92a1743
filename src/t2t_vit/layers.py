"""Building blocks shared by the T2T module and the backbone.

Softmax attention keeps its core — softmax(q·kᵀ·scale)·v — in a parameter-free submodule,
:class:`AttentionCore`, whose ``attention_kernel`` (see :mod:`t2t_vit.switchboard`) picks the fused
``F.scaled_dot_product_attention``, the explicit matmul formulation of the paper's code, or the
measured rule between them. Every module here is scriptable and traceable by ``torch.fx``; the core
function is an fx leaf, so a traced graph still picks its kernel per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor, nn

from t2t_vit import switchboard


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sinusoid position table of shape (1, num_positions, dim).

    angle(pos, j) = pos / 10000^(2·floor(j/2)/dim); even j take sin, odd j take cos.
    Computed in float64 so the table does not depend on the default dtype.
    """
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponents = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = positions / torch.pow(10000.0, exponents)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table[None].float()


@register_notrace_function
@torch.fx.wrap
def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float, kernel: str) -> Tensor:
    """softmax(q·kᵀ·scale)·v over (B, heads, N, head_dim); ``kernel`` is "fused", "math" or "auto"."""
    if kernel == "auto":
        if torch.jit.is_scripting():  # a scripted model keeps the shipped rule
            kernel = switchboard.auto_kernel(q.device.type, q.dtype, q.shape[-2], torch.is_grad_enabled())
        else:
            kernel = switchboard.calibrated_kernel(q, k, v, scale, torch.is_grad_enabled(), softmax_attention)
    if kernel == "fused":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    if dropout > 0.0:
        attn = F.dropout(attn, p=dropout)
    return attn @ v


class AttentionCore(nn.Module):
    """The attention matrix and its product with the values; no parameters."""

    def __init__(self, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.dropout = dropout
        self.attention_kernel = switchboard.default("attention")

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        return softmax_attention(q, k, v, self.scale, dropout, self.attention_kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.attention_kernel}, scale={self.scale:.4g}"


class Mlp(nn.Module):
    """Linear → activation → dropout → Linear → dropout, with timm's ``fc1`` / ``fc2`` names."""

    def __init__(
        self, dim: int, hidden_dim: int, out_dim: int | None = None, act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SqueezeExcite(nn.Module):
    """Channel attention over tokens: mean over the token axis → bottleneck → sigmoid gate."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C)
        return x * self.fc(x.mean(dim=1, keepdim=True))


class CheapOperation(nn.Conv1d):
    """GhostNet's cheap operation on tokens: a per-channel (depthwise 1×1) scaling of (B, N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, kernel_size=1, groups=dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x.transpose(1, 2), self.weight, self.bias).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with an explicit softmax scale.

    ``out_dim`` lets the T2T transformer layer map its wide input (147 or 576 features) to the
    narrow token width; with ``value_residual`` the layer adds the values, not the input, as the
    residual (the reference T2T layer does this because input and output widths differ).
    ``joint_qkv=False`` leaves the q/k/v projections to a subclass (:class:`GhostAttention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        out_dim: int | None = None,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        value_residual: bool = False,
        se_reduction: int = 0,
        joint_qkv: bool = True,
    ) -> None:
        super().__init__()
        out_dim = out_dim or dim
        if out_dim % num_heads:
            raise ValueError(f"width {out_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.scale = scale if scale is not None else (out_dim // num_heads) ** -0.5
        self.value_residual = value_residual
        if joint_qkv:
            self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.core = AttentionCore(self.scale, attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.se_layer = SqueezeExcite(out_dim, se_reduction) if se_reduction else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each (B, N, out_dim)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return q, k, v

    def split_heads(self, t: Tensor) -> Tensor:
        """(B, N, out_dim) → (B, heads, N, head_dim)."""
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.out_dim // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.project_qkv(x)
        return self.attend(q, k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The layer's output from its queries, keys and values, each (B, N, out_dim)."""
        batch, tokens = q.shape[0], q.shape[1]
        y = self.core(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        y = self.proj(y.transpose(1, 2).reshape(batch, tokens, self.out_dim))
        y = self.proj_drop(self.se_layer(y))
        return v + y if self.value_residual else y


class GhostAttention(Attention):
    """Attention whose q, k, v are half-width projections completed by cheap operations."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, joint_qkv=False, **kwargs)
        half = dim // 2
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = CheapOperation(half)
        self.cheap_operation_k = CheapOperation(half)
        self.cheap_operation_v = CheapOperation(half)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return (
            torch.cat([q, self.cheap_operation_q(q)], dim=-1),
            torch.cat([k, self.cheap_operation_k(k)], dim=-1),
            torch.cat([v, self.cheap_operation_v(v)], dim=-1),
        )


class GhostMlp(nn.Module):
    """MLP whose hidden features are one linear map plus cheap copies of it (GhostNet style)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        copies = hidden_dim // dim
        if copies < 1 or hidden_dim % dim:
            raise ValueError(f"Ghost MLP needs a hidden width that is a multiple of {dim}, got {hidden_dim}")
        self.fc1 = nn.Linear(dim, dim)
        self.act = act_layer()
        # Named cheap_operation2, 3, ... as in the reference layout.
        for index in range(copies - 1):
            self.add_module(f"cheap_operation{index + 2}", CheapOperation(dim))
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(dim * copies, dim)

    def forward(self, x: Tensor) -> Tensor:
        primary = self.act(self.fc1(x))
        parts = [primary]
        # Children in registration order; iterating them by name keeps the loop scriptable.
        for name, child in self.named_children():
            if name.startswith("cheap_operation"):
                parts.append(self.act(child(primary)))
        return self.drop(self.fc2(self.drop(torch.cat(parts, dim=-1))))
