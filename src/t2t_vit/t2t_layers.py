"""The T2T layers (paper Eq. 1): a narrow transformer layer over the soft split's tokens, with
softmax attention (T2T-ViTt) or the Performer's linear attention (T2T-ViT).

The layers take the soft split's tokens in either feature order (see
:meth:`t2t_vit.t2t.SoftSplit.split`): their first norm and Linear read their parameters in the
tokens' order, so the function and the state dict are those of channel-major tokens (see
:class:`T2TLayer` for when they put the tokens back in order instead).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor, nn

from t2t_vit import switchboard
from t2t_vit.errors import T2TViTError
from t2t_vit.layers import Attention, Mlp


def linear_in_order(x: Tensor, weight: Tensor, bias: Optional[Tensor], order: Tensor) -> Tensor:
    """A Linear of channel-major tokens applied to tokens whose features come in ``order``: the
    same function, with the weight's columns read in that order."""
    return F.linear(x, weight[:, order], bias)


def _in_order(parameter: Optional[Tensor], order: Tensor) -> Optional[Tensor]:
    return None if parameter is None else parameter[order]


PIXEL_NORMS = ("layernorm", "rmsnorm", "none")


def pixel_norm(kind: str, dim: int) -> nn.Module:
    """``norm1`` of the first T2T layer, which sees raw-pixel soft-split patches (issue 24).

    "layernorm" is the paper's: it removes each patch's mean and scale, so a flat patch becomes
    zeros whatever its brightness. "rmsnorm" keeps the mean (divides by the root mean square
    only); "none" passes the pixels as the data transform left them.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-5)
    if kind == "none":
        return nn.Identity()
    raise T2TViTError(f"unknown pixel norm {kind!r}; choose one of {', '.join(PIXEL_NORMS)}")


PLAIN_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.Identity)


def reads_in_order(layer: "T2TLayer") -> bool:
    """Whether ``layer`` can read pixel-major tokens through its parameters (see :class:`T2TLayer`)."""
    plain = type(layer.norm1) in PLAIN_NORMS and type(layer.first_projection()) is nn.Linear
    return plain and not any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules_read_in_order())


class T2TLayer(nn.Module):
    """What both T2T layers share: reading the soft split's tokens in either feature order.

    Pixel-major tokens (``order`` given, see :meth:`t2t_vit.t2t.SoftSplit.split`) go through
    ``norm1`` and the first projection as functions of their parameters read in ``order``. That is
    the modules' function only while they are torch's own modules without hooks; otherwise (a LoRA
    or quantization wrapper, a forward hook) the tokens are put back in channel-major order first
    and every module runs as a module.
    """

    def first_projection(self) -> nn.Module:
        raise NotImplementedError

    def modules_read_in_order(self) -> List[nn.Module]:
        """The modules whose forward the pixel-major path does not call."""
        return [self.norm1, self.first_projection()]

    def channel_major_unless_read_in_order(self, x: Tensor, order: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():  # (the branches below are not compiled: a scripted model has no hooks)
            return x, order
        elif order is None or reads_in_order(self):
            return x, order
        else:
            return x[..., torch.argsort(order)], None

    def norm1_in_order(self, x: Tensor, order: Tensor) -> Tensor:
        """``norm1`` (LayerNorm, RMSNorm or Identity) of tokens whose features come in ``order``."""
        # hasattr, unlike isinstance, is resolved when scripting
        if hasattr(self.norm1, "bias"):  # LayerNorm
            weight, bias = _in_order(self.norm1.weight, order), _in_order(self.norm1.bias, order)
            return F.layer_norm(x, [x.shape[-1]], weight, bias, self.norm1.eps)
        elif hasattr(self.norm1, "eps"):  # RMSNorm
            return F.rms_norm(x, [x.shape[-1]], _in_order(self.norm1.weight, order), self.norm1.eps)
        else:
            return x


class TokenTransformer(T2TLayer):
    """T2T layer with softmax attention: one head, width dim → out_dim, value residual.

    The softmax scale is dim^-0.5 (the input width, 147 or 576), as in the released checkpoints.
    """

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, norm1: str = "layernorm") -> None:
        super().__init__()
        self.norm1 = pixel_norm(norm1, dim)
        self.attn = Attention(dim, num_heads=1, out_dim=out_dim, scale=dim**-0.5, value_residual=True)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim)

    def first_projection(self) -> nn.Module:
        return self.attn.qkv

    def modules_read_in_order(self) -> List[nn.Module]:
        return [self.norm1, self.attn, self.attn.qkv]

    def forward(self, x: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """``order``: the channel-major index of each feature of pixel-major tokens (SoftSplit.split)."""
        x, order = self.channel_major_unless_read_in_order(x, order)
        if order is None:
            x = self.attn(self.norm1(x))
        else:
            qkv = self.attn.qkv
            q, k, v = linear_in_order(self.norm1_in_order(x, order), qkv.weight, qkv.bias, order).chunk(3, dim=-1)
            x = self.attn.attend(q, k, v)
        return x + self.mlp(self.norm2(x))


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A region computed in full precision even inside an autocast block."""
    # "meta" (used for MAC counting) has no autocast state of its own; the CPU's stands in for it.
    return torch.autocast(device_type="cuda" if tensor.is_cuda else "cpu", enabled=False)


def performer_features(x: Tensor, w: Tensor) -> Tensor:
    """φ(t) = exp(t·wᵀ − ‖t‖²/2)/√m in float32, as one exponent updated in place (no temporaries)."""
    x = x.float()
    offset = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / 2 + math.log(w.shape[0]) / 2
    return (x @ w.float().t()).sub_(offset).exp_()


def performer_features_reference(x: Tensor, w: Tensor) -> Tensor:
    """φ as the paper's code writes it: einsum projection, width-repeated squared norm."""
    x = x.float()
    half_sq_norm = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, w.shape[0]) / 2
    projected = torch.einsum("bnd,md->bnm", x, w.float())
    return torch.exp(projected - half_sq_norm) / math.sqrt(w.shape[0])


def _performer_fp32(q: Tensor, k: Tensor, v: Tensor, w: Tensor, epsilon: float, formulation: str) -> Tensor:
    if formulation == "einsum":
        qp, kp = performer_features_reference(q, w), performer_features_reference(k, w)
        normaliser = torch.einsum("bnm,bm->bn", qp, kp.sum(dim=1)).unsqueeze(-1)
        kv = torch.einsum("bnd,bnm->bdm", v.float(), kp)
        y = torch.einsum("bnm,bdm->bnd", qp, kv)
        return y / (normaliser.repeat(1, 1, v.shape[-1]) + epsilon)
    qp, kp = performer_features(q, w), performer_features(k, w)
    kv = kp.transpose(1, 2) @ v.float()  # (B, m, out_dim): never an N×N matrix
    normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
    return (qp @ kv) / (normaliser + epsilon)


@register_notrace_function
@torch.fx.wrap
def performer_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, epsilon: float, formulation: str) -> Tensor:
    """y = φ(q)·(φ(k)ᵀ·v) / (φ(q)·Σφ(k) + ε), (B, N, out_dim), always in float32.

    Under bf16/fp16 the exponentials would overflow, so autocast is switched off for this region.
    """
    if torch.jit.is_scripting():
        return _performer_fp32(q, k, v, w, epsilon, formulation)
    else:
        with autocast_off(q):
            return _performer_fp32(q, k, v, w, epsilon, formulation)


class PerformerCore(nn.Module):
    """The Performer's feature maps, products and normaliser; no parameters (w is the layer's)."""

    def __init__(self, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.performer_formulation = switchboard.default("performer")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, w: Tensor) -> Tensor:
        return performer_attention(q, k, v, w, self.epsilon, self.performer_formulation)

    def extra_repr(self) -> str:
        return f"formulation={self.performer_formulation}"


class TokenPerformer(T2TLayer):
    """T2T layer with Performer attention (linear in the token count), as the reference has it.

    φ(t) = exp(t·wᵀ − ‖t‖²/2)/√m with a fixed orthogonal w (m × out_dim, scaled by √m), drawn once
    and kept in the state dict as a buffer (key ``w``); y = φ(q)·(φ(k)ᵀ·v) / (φ(q)·Σφ(k) + ε);
    out = v + proj(y). ``core.performer_formulation`` picks plain matmuls ("matmul") or the
    paper's einsums ("einsum"); both compute the same function in float32.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1,
                 norm1: str = "layernorm") -> None:
        super().__init__()
        self.out_dim = out_dim
        self.num_features = int(out_dim * kernel_ratio)
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = pixel_norm(norm1, dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(drop)
        )
        self.core = PerformerCore()
        w = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.register_buffer("w", w)
        self.fp32_buffers = ("w",)  # kept in float32 by precision.for_inference

    @property
    def epsilon(self) -> float:
        return self.core.epsilon

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Linear-time attention in float32, (B, N, out_dim)."""
        return self.core(q, k, v, self.w)

    def first_projection(self) -> nn.Module:
        return self.kqv

    def forward(self, x: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """``order``: the channel-major index of each feature of pixel-major tokens (SoftSplit.split)."""
        x, order = self.channel_major_unless_read_in_order(x, order)
        if order is None:
            kqv = self.kqv(self.norm1(x))
        else:
            kqv = linear_in_order(self.norm1_in_order(x, order), self.kqv.weight, self.kqv.bias, order)
        k, q, v = kqv[..., : self.out_dim], kqv[..., self.out_dim : 2 * self.out_dim], kqv[..., 2 * self.out_dim :]
        y = self.core(q, k, v, self.w).to(v.dtype)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


T2T_LAYERS = {"performer": TokenPerformer, "transformer": TokenTransformer}
