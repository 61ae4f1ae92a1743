"""The Tokens-to-Token module (paper §3.1, Eq. 1–4); the ablations' tokenizers are in ``tokenizers.py``.

One T2T step: re-structurize the tokens into an image (Eq. 2), soft split it into overlapping
k×k patches (Eq. 3), and let a narrow transformer layer model the new, longer tokens (Eq. 1).
The module does this ``len(stem) - 1`` times and projects the final soft split to the backbone
width (Eq. 4).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from timm.layers import register_notrace_function

from t2t_vit import switchboard
from t2t_vit.layers import Attention, Mlp

# (kernel, stride, padding) of each soft split.
SoftSplitSpec = tuple[int, int, int]
STEMS: dict[str, tuple[SoftSplitSpec, ...]] = {
    # 224 px → 56 → 28 → 14: 196 tokens, as in the paper.
    "imagenet": ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
    # 32 px → 32 → 16 → 8: 64 tokens, for CIFAR-sized images.
    "small": ((3, 1, 1), (3, 2, 1), (3, 2, 1)),
}


def split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one side of a soft split (paper Eq. 3)."""
    return (size + 2 * padding - kernel) // stride + 1


def side_after_splits(size: int, specs: List[Tuple[int, int, int]]) -> Optional[int]:
    """Tokens along one side after every soft split, or None if a split would drop input pixels.

    A split drops pixels when its last window ends before the last real (unpadded) pixel; unfold
    would silently crop them, so such sizes are refused rather than half-used.
    """
    for kernel, stride, padding in specs:
        if size + 2 * padding < kernel:
            return None
        out = split_size(size, kernel, stride, padding)
        if (out - 1) * stride + kernel < size + padding:
            return None
        size = out
    return size


def sizes_that_work(size: int, specs: Sequence[SoftSplitSpec], count: int = 2) -> list[int]:
    """The closest side lengths below and above ``size`` that the soft splits accept."""
    specs = [tuple(s) for s in specs]
    below = [s for s in range(size - 1, 0, -1) if side_after_splits(s, specs)][:count]
    above = [s for s in range(size + 1, size + 64) if side_after_splits(s, specs)][:count]
    return sorted(below + above)


def _untileable(img_size: Tuple[int, int], side: int, specs: Sequence[SoftSplitSpec]) -> T2TViTError:
    schedule = ", ".join(f"{k}/{s}" for k, s, _ in specs)
    working = sizes_that_work(side, specs)
    problem = "is too small" if side < working[0] else "would lose pixels"
    return T2TViTError(
        f"image size {img_size[0]}x{img_size[1]} cannot be tiled by the soft splits "
        f"(kernel/stride {schedule}): a side of {side} px {problem}; "
        f"sides that work near it: {', '.join(map(str, working))}"
    )


def token_grid(img_size: Tuple[int, int], specs: List[Tuple[int, int, int]]) -> Tuple[int, int]:
    """The (h, w) token grid after all soft splits; a clear error for sizes they cannot tile."""
    height, width = int(img_size[0]), int(img_size[1])
    rows, cols = side_after_splits(height, specs), side_after_splits(width, specs)
    if rows is None or cols is None:
        if torch.jit.is_scripting():
            raise RuntimeError("the image size cannot be tiled by the soft splits")
        else:
            raise _untileable((height, width), height if rows is None else width, specs)
    return rows, cols


def restructurize(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, h·w, C) tokens → (B, C, h, w) image, row-major (paper Eq. 2)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def pixel_major_windows(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The soft split's k×k windows of (B, C, H, W) as a (B, h, w, k, k, C) view of the padded
    channels-last pixels: each window's features pixel-major, runs of k·C contiguous values."""
    k, s, p = kernel, stride, padding
    pixels = F.pad(image.permute(0, 2, 3, 1), [0, 0, p, p, p, p])  # (B, H+2p, W+2p, C)
    return pixels.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3)


def pixel_major_patches(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """Soft split (B, C, H, W) → (B, L, k·k·C), each patch's features pixel-major."""
    windows = pixel_major_windows(image, kernel, stride, padding)
    return windows.reshape(image.shape[0], -1, image.shape[1] * kernel * kernel)


@torch.library.custom_op("t2t_vit::pixel_major_patches", mutates_args=())
def _pixel_major_patches_op(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    windows = pixel_major_windows(image, kernel, stride, padding).clone(memory_format=torch.contiguous_format)
    return windows.view(image.shape[0], -1, image.shape[1] * kernel * kernel)  # one copy, never the input


@_pixel_major_patches_op.register_fake
def _(image: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    rows = split_size(image.shape[2], kernel, stride, padding)
    cols = split_size(image.shape[3], kernel, stride, padding)
    return image.new_empty(image.shape[0], rows * cols, image.shape[1] * kernel * kernel)


class SoftSplit(nn.Module):
    """Overlapping k×k patches flattened into tokens: (B, C, H, W) → (B, L, C·k·k), channel-major.

    ``soft_split_method`` (see :mod:`t2t_vit.switchboard`): "strided" gathers the patches from a
    channels-last view in one copy, so tokens that were just re-structurized are split without a
    transpose and come out contiguous for the LayerNorm that follows; "unfold" is ``nn.Unfold``
    followed by a transpose, as the paper's code has it. Both give the same tokens.

    With ``pixel_major``, :meth:`split` (which the T2T module calls) returns the same features in
    pixel-major order (k·k positions × C channels) with ``order``, the channel-major index of each:
    from channels-last pixels that gather copies runs of k·C contiguous values, where the
    channel-major one reads every value C apart (4–25× slower here), and the next T2T layer reads
    its parameters in ``order`` instead.
    """

    def __init__(self, kernel: int, stride: int, padding: int, channels: int = 1, pixel_major: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.soft_split_method = switchboard.default("soft_split")
        self.pixel_major = pixel_major
        order = torch.arange(channels * kernel * kernel).view(channels, kernel, kernel).permute(1, 2, 0).reshape(-1)
        self.register_buffer("order", order, persistent=False)  # derived from the shape, never saved

    def forward(self, image: Tensor) -> Tensor:
        k, s, p = self.kernel, self.stride, self.padding
        if self.soft_split_method == "unfold":
            return F.unfold(image, kernel_size=k, stride=s, padding=p).transpose(1, 2)
        windows = pixel_major_windows(image, k, s, p).permute(0, 1, 2, 5, 3, 4)  # (B, h, w, C, k, k)
        return windows.reshape(image.shape[0], -1, image.shape[1] * k * k).contiguous()  # no-op unless k = 1

    def split(self, image: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The tokens and, where they are pixel-major, the channel-major index of each feature."""
        if self.soft_split_method != "strided" or not self.pixel_major:
            return self(image), None
        if torch.jit.is_scripting():
            return pixel_major_patches(image, self.kernel, self.stride, self.padding), self.order
        elif torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not image.requires_grad:
            # inductor would fuse the gather into the LayerNorm that follows as scalar index
            # arithmetic (18 ms a batch of 8 against 2 ms eager); as an opaque op it stays one copy
            return torch.ops.t2t_vit.pixel_major_patches(image, self.kernel, self.stride, self.padding), self.order
        else:
            return pixel_major_patches(image, self.kernel, self.stride, self.padding), self.order

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


def linear_in_order(x: Tensor, weight: Tensor, bias: Optional[Tensor], order: Optional[Tensor]) -> Tensor:
    """A Linear of channel-major tokens applied to tokens whose features come in ``order`` (None:
    channel-major): the same function, with the weight's columns read in that order."""
    return F.linear(x, weight if order is None else weight[:, order], bias)


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


class T2TLayer(nn.Module):
    """What both T2T layers share: ``norm1`` of tokens in channel-major or pixel-major order."""

    def norm1_in_order(self, x: Tensor, order: Optional[Tensor]) -> Tensor:
        """``norm1`` (LayerNorm, RMSNorm or Identity) of tokens whose features come in ``order``
        (see :meth:`SoftSplit.split`), its per-feature parameters read in that order."""
        if order is None:
            return self.norm1(x)
        # hasattr, unlike isinstance, is resolved when scripting
        if hasattr(self.norm1, "bias"):  # LayerNorm
            return F.layer_norm(x, [x.shape[-1]], self.norm1.weight[order], self.norm1.bias[order], self.norm1.eps)
        elif hasattr(self.norm1, "weight"):  # RMSNorm
            return F.rms_norm(x, [x.shape[-1]], self.norm1.weight[order], self.norm1.eps)
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

    def forward(self, x: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """``order``: the channel-major index of each feature of pixel-major tokens (SoftSplit.split)."""
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

    def forward(self, x: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """``order``: the channel-major index of each feature of pixel-major tokens (SoftSplit.split)."""
        kqv = linear_in_order(self.norm1_in_order(x, order), self.kqv.weight, self.kqv.bias, order)
        k, q, v = kqv[..., : self.out_dim], kqv[..., self.out_dim : 2 * self.out_dim], kqv[..., 2 * self.out_dim :]
        y = self.core(q, k, v, self.w).to(v.dtype)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


T2T_LAYERS = {"performer": TokenPerformer, "transformer": TokenTransformer}


def resolve_stem(stem: str | Sequence[SoftSplitSpec]) -> list[SoftSplitSpec]:
    if isinstance(stem, str):
        if stem not in STEMS:
            raise T2TViTError(f"unknown stem {stem!r}; choose one of {sorted(STEMS)}")
        return list(STEMS[stem])
    return [tuple(int(v) for v in spec) for spec in stem]  # type: ignore[misc]


@register_notrace_function
@torch.fx.wrap
def cast_for_autocast(image: Tensor) -> Tensor:
    """The image in the autocast dtype when autocast is on (else as it is).

    The first soft split and its LayerNorm touch the most bytes (e.g. 3136 tokens × 147): splitting
    in the autocast dtype saves running them in fp32 only to cast for the next Linear.
    """
    if torch.jit.is_scripting():
        return image
    else:
        device = "cuda" if image.is_cuda else "cpu"
        if torch.is_autocast_enabled(device):
            return image.to(torch.get_autocast_dtype(device))
        return image


class T2TModule(nn.Module):
    """Soft split → [T2T layer → re-structurize → soft split] × (len(stem) − 1) → projection.

    Children are registered in the order they run (soft_split0, attention1, soft_split1, ...,
    project), which is how the forward walks them.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
        layer: str = "performer",
        stem: str | Sequence[SoftSplitSpec] = "imagenet",
        kernel_ratio: float = 0.5,
        drop_rate: float = 0.1,
        pixel_norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if layer not in T2T_LAYERS:
            raise T2TViTError(f"unknown T2T layer {layer!r}; choose one of {sorted(T2T_LAYERS)}")
        self.specs = resolve_stem(stem)
        width = in_chans
        for index, (kernel, stride, padding) in enumerate(self.specs):
            # the last split stays channel-major: `project` then runs as the module users hook and pick
            pixel_major = index < len(self.specs) - 1
            self.add_module(f"soft_split{index}", SoftSplit(kernel, stride, padding, width, pixel_major))
            width = width * kernel * kernel
            if index < len(self.specs) - 1:
                options = dict(kernel_ratio=kernel_ratio, drop=drop_rate) if layer == "performer" else {}
                norm1 = pixel_norm if index == 0 else "layernorm"  # only the first layer sees raw pixels
                self.add_module(f"attention{index + 1}", T2T_LAYERS[layer](width, token_dim, norm1=norm1, **options))
                width = token_dim
        self.project = nn.Linear(width, embed_dim)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, self.specs)

    def forward(self, image: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, embed_dim)."""
        return self.forward_stages(image)[0]

    def forward_stages(self, image: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The tokens, and each T2T layer's re-structurized output image (B, token_dim, h, w)."""
        image = cast_for_autocast(image)
        tokens = image
        height, width = image.shape[-2], image.shape[-1]
        stages: List[Tensor] = []
        order: Optional[Tensor] = None  # the feature order of pixel-major tokens, None when channel-major
        for child in self.children():  # in the order they run
            if isinstance(child, SoftSplit):
                kernel, stride, padding = child.kernel, child.stride, child.padding
                height, width = split_size(height, kernel, stride, padding), split_size(width, kernel, stride, padding)
                tokens, order = child.split(image)
            elif hasattr(child, "norm1"):  # a T2T layer (hasattr, unlike isinstance, is resolved when scripting)
                image = restructurize(child(tokens, order), height, width)
                stages.append(image)
            else:  # the projection to the backbone width (Eq. 4)
                tokens = child(tokens)
        return tokens, stages

