"""Building blocks shared by the T2T module and the backbone.

Attention has two paths that compute the same function: the fused
``F.scaled_dot_product_attention`` (default; no N×N matrix in memory) and a plain softmax path
(``fused_attn = False``) that tests and the reference benchmark compare against. ``Linear`` is
``nn.Linear`` plus a cache of its autocast weight copy for inference (see its docstring).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class Linear(nn.Linear):
    """``nn.Linear`` that keeps its low-precision weight copy between inference calls.

    Autocast casts every fp32 weight to bf16/fp16 on every call and, under ``inference_mode``,
    never reuses the copy, so each batch re-reads and re-writes all weights (8-9 ms of a ~110 ms
    bf16 T2T-ViT-14 forward at batch 8 on the development CPU). With gradients off and autocast on, this layer keeps one
    copy and makes it again whenever the weights change: in-place updates (optimizer steps, EMA,
    ``load_state_dict``) bump the version counters, moves change the storage. It computes
    exactly what autocast computes; with gradients on, or when compiling, it is plain
    ``nn.Linear`` (autocast's own per-forward cache serves training). Set ``cache_cast = False``
    (on the class or one layer) to trade the speed for the copy's memory (half the fp32 weights).

    Writes through ``weight.data`` bypass the version counter (PyTorch's documented hazard of
    ``.data``) and are not seen: update weights in place under ``torch.no_grad()`` as optimizers,
    EMA helpers and ``load_state_dict`` do, or switch the cache off.
    """

    cache_cast: bool = True
    _cast: tuple | None = None  # (key, weight, bias in the autocast dtype, weak refs to the sources)

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if (
            not self.cache_cast
            or torch.is_grad_enabled()
            or not torch.amp.is_autocast_available(device)  # e.g. "meta", used to count MACs
            or not torch.is_autocast_enabled(device)
            or torch.compiler.is_compiling()
            or self.weight.is_inference()  # built under inference_mode: no version counter to watch
            or not isinstance(self.weight, nn.Parameter)  # e.g. parametrized: recomputed on every access
        ):
            return super().forward(x)
        _, weight, bias, _ = self._autocast_copy(torch.get_autocast_dtype(device))
        return F.linear(x, weight, bias)

    def _apply(self, fn, recurse: bool = True):
        self._cast = None  # .to() / .cuda() / .half(): the old copy would only hold memory
        return super()._apply(fn, recurse)

    def _autocast_copy(self, dtype: torch.dtype) -> tuple:
        tensors = [t for t in (self.weight, self.bias) if t is not None]
        key = (dtype, *((t.device, t.data_ptr(), t._version) for t in tensors))
        # Same tensor objects too (weak references): a replaced Parameter can reuse the old one's
        # address with a fresh version counter.
        if self._cast is None or self._cast[0] != key or any(r() is not t for r, t in zip(self._cast[3], tensors)):
            bias = self.bias.to(dtype) if self.bias is not None else None
            self._cast = (key, self.weight.to(dtype), bias, [weakref.ref(t) for t in tensors])
        return self._cast


class Mlp(nn.Module):
    """Linear → activation → dropout → Linear → dropout, with timm's ``fc1`` / ``fc2`` names."""

    def __init__(
        self, dim: int, hidden_dim: int, out_dim: int | None = None, act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, out_dim or dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SqueezeExcite(nn.Module):
    """Channel attention over tokens: mean over the token axis → bottleneck → sigmoid gate."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            Linear(dim // reduction, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C)
        return x * self.fc(x.mean(dim=1, keepdim=True))


class CheapOperation(nn.Conv1d):
    """GhostNet's cheap operation on tokens: a per-channel (depthwise 1×1) scaling of (B, N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, kernel_size=1, groups=dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with an explicit softmax scale.

    ``out_dim`` lets the T2T transformer layer map its wide input (147 or 576 features) to the
    narrow token width; with ``value_residual`` the layer adds the values, not the input, as the
    residual (the reference T2T layer does this because input and output widths differ).
    """

    fused_attn: bool = True

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
    ) -> None:
        super().__init__()
        out_dim = out_dim or dim
        if out_dim % num_heads:
            raise ValueError(f"width {out_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.scale = scale if scale is not None else (out_dim // num_heads) ** -0.5
        self.value_residual = value_residual
        self.qkv = Linear(dim, out_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(out_dim, out_dim)
        self.se_layer = SqueezeExcite(out_dim, se_reduction) if se_reduction else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each (B, N, out_dim)."""
        return self.qkv(x).chunk(3, dim=-1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q·kᵀ·scale)·v over heads of shape (B, heads, N, head_dim)."""
        if self.fused_attn:
            drop = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.project_qkv(x)
        heads = [t.view(batch, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v)]
        y = self.attend(*heads).transpose(1, 2).reshape(batch, tokens, self.out_dim)
        y = self.proj_drop(self.se_layer(self.proj(y)))
        return v + y if self.value_residual else y


class GhostAttention(Attention):
    """Attention whose q, k, v are half-width projections completed by cheap operations."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, **kwargs)
        del self.qkv
        half = dim // 2
        self.q = Linear(dim, half, bias=qkv_bias)
        self.k = Linear(dim, half, bias=qkv_bias)
        self.v = Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = CheapOperation(half)
        self.cheap_operation_k = CheapOperation(half)
        self.cheap_operation_v = CheapOperation(half)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = []
        for linear, cheap in (
            (self.q, self.cheap_operation_q),
            (self.k, self.cheap_operation_k),
            (self.v, self.cheap_operation_v),
        ):
            primary = linear(x)
            out.append(torch.cat([primary, cheap(primary)], dim=-1))
        return out[0], out[1], out[2]


class GhostMlp(nn.Module):
    """MLP whose hidden features are one linear map plus cheap copies of it (GhostNet style)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        copies = hidden_dim // dim
        if copies < 1 or hidden_dim % dim:
            raise ValueError(f"Ghost MLP needs a hidden width that is a multiple of {dim}, got {hidden_dim}")
        self.fc1 = Linear(dim, dim)
        self.act = act_layer()
        # Named cheap_operation2, 3, ... as in the reference layout.
        self.num_cheap = copies - 1
        for index in range(self.num_cheap):
            self.add_module(f"cheap_operation{index + 2}", CheapOperation(dim))
        self.drop = nn.Dropout(drop)
        self.fc2 = Linear(dim * copies, dim)

    def forward(self, x: Tensor) -> Tensor:
        primary = self.act(self.fc1(x))
        cheap = [self.act(getattr(self, f"cheap_operation{i + 2}")(primary)) for i in range(self.num_cheap)]
        return self.drop(self.fc2(self.drop(torch.cat([primary, *cheap], dim=-1))))
