"""The Tokens-to-Token module (paper §3.1, Eq. 1–4) and the tokenizers the ablations swap in.

One T2T step: re-structurize the tokens into an image (Eq. 2), soft split it into overlapping
k×k patches (Eq. 3), and let a narrow transformer layer model the new, longer tokens (Eq. 1).
The module does this ``len(stem) - 1`` times and projects the final soft split to the backbone
width (Eq. 4).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.layers import Attention, Linear, Mlp

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


def side_after_splits(size: int, specs: Sequence[SoftSplitSpec]) -> int | None:
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
    below = [s for s in range(size - 1, 0, -1) if side_after_splits(s, specs)][:count]
    above = [s for s in range(size + 1, size + 64) if side_after_splits(s, specs)][:count]
    return sorted(below + above)


def token_grid(img_size: tuple[int, int], specs: Sequence[SoftSplitSpec]) -> tuple[int, int]:
    """The (h, w) token grid after all soft splits; a clear error for sizes they cannot tile."""
    grid = []
    for side in img_size:
        tokens = side_after_splits(int(side), specs)
        if tokens is None:
            schedule = ", ".join(f"{k}/{s}" for k, s, _ in specs)
            working = sizes_that_work(int(side), specs)
            problem = "is too small" if int(side) < working[0] else "would lose pixels"
            raise T2TViTError(
                f"image size {img_size[0]}x{img_size[1]} cannot be tiled by the soft splits "
                f"(kernel/stride {schedule}): a side of {side} px {problem}; "
                f"sides that work near it: {', '.join(map(str, working))}"
            )
        grid.append(tokens)
    return grid[0], grid[1]


def restructurize(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h·w, C) tokens → (B, C, h, w) image, row-major (paper Eq. 2)."""
    batch, length, channels = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])


class SoftSplit(nn.Module):
    """Overlapping k×k patches flattened into tokens: (B, C, H, W) → (B, L, C·k·k), channel-major.

    ``strided = True`` (default) gathers the patches from a channels-last view in one copy, so
    tokens that were just re-structurized are split without a transpose and come out contiguous
    for the LayerNorm that follows. ``strided = False`` is ``nn.Unfold`` followed by a transpose,
    as the paper's code has it (the reference formulation). Both give the same tokens.
    """

    strided: bool = True

    def __init__(self, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, image: Tensor) -> Tensor:
        if not self.strided:
            patches = F.unfold(image, kernel_size=self.kernel, stride=self.stride, padding=self.padding)
            return patches.transpose(1, 2)
        k, s, p = self.kernel, self.stride, self.padding
        pixels = F.pad(image.permute(0, 2, 3, 1), (0, 0, p, p, p, p))  # (B, H+2p, W+2p, C)
        patches = pixels.unfold(1, k, s).unfold(2, k, s)  # view (B, h, w, C, k, k)
        return patches.reshape(image.shape[0], -1, image.shape[1] * k * k).contiguous()  # no-op unless k = 1

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class TokenTransformer(nn.Module):
    """T2T layer with softmax attention: one head, width dim → out_dim, value residual.

    The softmax scale is dim^-0.5 (the input width, 147 or 576), as in the released checkpoints.
    """

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=1, out_dim=out_dim, scale=dim**-0.5, value_residual=True)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _autocast_device(tensor: Tensor) -> str:
    # "meta" (used for MAC counting) has no autocast state of its own; the CPU's stands in for it.
    return "cuda" if tensor.is_cuda else "cpu"


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A region computed in full precision even inside an autocast block."""
    return torch.autocast(device_type=_autocast_device(tensor), enabled=False)


class TokenPerformer(nn.Module):
    """T2T layer with Performer attention (linear in the token count), as the reference has it.

    φ(t) = exp(t·wᵀ − ‖t‖²/2)/√m with a fixed orthogonal w (m × out_dim, scaled by √m), drawn once
    and kept frozen in the state dict; y = φ(q)·(φ(k)ᵀ·v) / (φ(q)·Σφ(k) + ε); out = v + proj(y).
    Feature maps and the normaliser run in float32: under bf16/fp16 the exponentials overflow.

    ``fused = True`` (default) computes this as plain matmuls; ``fused = False`` is the reference
    formulation the benchmark compares against: einsums, with the normaliser repeated over the
    width before the division, as the paper's code writes it. Both give the same function.
    """

    epsilon = 1e-8
    fused: bool = True

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.num_features = int(out_dim * kernel_ratio)
        self.kqv = Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop)
        self.proj = Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(
            Linear(out_dim, out_dim), nn.GELU(), Linear(out_dim, out_dim), nn.Dropout(drop)
        )
        w = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.w = nn.Parameter(w, requires_grad=False)

    def feature_map(self, x: Tensor) -> Tensor:
        x = x.float()
        # exp(t·wᵀ − ‖t‖²/2) / √m written as one exponent, updated in place: no (B, N, m) temporaries.
        offset = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / 2 + math.log(self.num_features) / 2
        return (x @ self.w.float().t()).sub_(offset).exp_()

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Linear-time attention in float32, (B, N, out_dim)."""
        if not self.fused:
            return self.attend_reference(q, k, v)
        with autocast_off(q):
            qp, kp = self.feature_map(q), self.feature_map(k)
            kv = kp.transpose(1, 2) @ v.float()  # (B, m, out_dim): never an N×N matrix
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
            return (qp @ kv) / (normaliser + self.epsilon)

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The same attention as einsums with a width-repeated normaliser (slower, for comparison)."""
        with autocast_off(q):
            qp, kp = self.feature_map_reference(q), self.feature_map_reference(k)
            normaliser = torch.einsum("bnm,bm->bn", qp, kp.sum(dim=1)).unsqueeze(-1)
            kv = torch.einsum("bnd,bnm->bdm", v.float(), kp)
            y = torch.einsum("bnm,bdm->bnd", qp, kv)
            return y / (normaliser.repeat(1, 1, self.out_dim) + self.epsilon)

    def feature_map_reference(self, x: Tensor) -> Tensor:
        x = x.float()
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, self.num_features) / 2
        projected = torch.einsum("bnd,md->bnm", x, self.w.float())
        return torch.exp(projected - half_sq_norm) / math.sqrt(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.out_dim, dim=-1)
        y = self.attend(q, k, v).to(v.dtype)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


T2T_LAYERS = {"performer": TokenPerformer, "transformer": TokenTransformer}


def resolve_stem(stem: str | Sequence[SoftSplitSpec]) -> tuple[SoftSplitSpec, ...]:
    if isinstance(stem, str):
        if stem not in STEMS:
            raise T2TViTError(f"unknown stem {stem!r}; choose one of {sorted(STEMS)}")
        return STEMS[stem]
    return tuple(tuple(int(v) for v in spec) for spec in stem)  # type: ignore[misc]


class T2TModule(nn.Module):
    """Soft split → [T2T layer → re-structurize → soft split] × (len(stem) − 1) → projection."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
        layer: str = "performer",
        stem: str | Sequence[SoftSplitSpec] = "imagenet",
        kernel_ratio: float = 0.5,
        drop_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if layer not in T2T_LAYERS:
            raise T2TViTError(f"unknown T2T layer {layer!r}; choose one of {sorted(T2T_LAYERS)}")
        self.specs = resolve_stem(stem)
        width = in_chans
        for index, (kernel, stride, padding) in enumerate(self.specs):
            self.add_module(f"soft_split{index}", SoftSplit(kernel, stride, padding))
            width = width * kernel * kernel
            if index < len(self.specs) - 1:
                performer = dict(kernel_ratio=kernel_ratio, drop=drop_rate) if layer == "performer" else {}
                self.add_module(f"attention{index + 1}", T2T_LAYERS[layer](width, token_dim, **performer))
                width = token_dim
        self.project = Linear(width, embed_dim)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, self.specs)

    def forward(self, image: Tensor, return_stages: bool = False):
        """(B, C, H, W) → (B, h·w, embed_dim); with ``return_stages`` also each T2T layer's image."""
        h, w = image.shape[-2:]
        device = _autocast_device(image)
        if torch.is_autocast_enabled(device):
            # Split in the autocast dtype: the first split and its LayerNorm touch the most bytes
            # (e.g. 3136 tokens × 147) and would otherwise run in fp32 and be cast for the Linear.
            image = image.to(torch.get_autocast_dtype(device))
        tokens = self.soft_split0(image)
        stages = []
        for index in range(1, len(self.specs)):
            kernel, stride, padding = self.specs[index - 1]
            h, w = split_size(h, kernel, stride, padding), split_size(w, kernel, stride, padding)
            restructured = restructurize(getattr(self, f"attention{index}")(tokens), (h, w))
            stages.append(restructured)
            tokens = getattr(self, f"soft_split{index}")(restructured)
        tokens = self.project(tokens)
        return (tokens, stages) if return_stages else tokens


class PatchTokenizer(nn.Module):
    """Ablation "wo T2T": ViT's plain non-overlapping patch split and linear projection."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 384, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, [(self.patch_size, self.patch_size, 0)])

    def forward(self, image: Tensor) -> Tensor:
        return self.proj(image).flatten(2).transpose(1, 2)


class ConvTokenizer(nn.Module):
    """Ablation T2T-ViTc: the T2T module replaced by convolutions with the stem's kernels/strides.

    Widths follow the T2T module (token_dim between stages, embed_dim at the end) and GELU sits
    between convolutions, so the only change is learned filters instead of soft split + attention.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 384,
        token_dim: int = 64,
        stem: str | Sequence[SoftSplitSpec] = "imagenet",
    ) -> None:
        super().__init__()
        self.specs = resolve_stem(stem)
        layers: list[nn.Module] = []
        width = in_chans
        for index, (kernel, stride, padding) in enumerate(self.specs):
            last = index == len(self.specs) - 1
            out = embed_dim if last else token_dim
            layers.append(nn.Conv2d(width, out, kernel, stride, padding))
            if not last:
                layers.append(nn.GELU())
            width = out
        self.convs = nn.Sequential(*layers)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, self.specs)

    def forward(self, image: Tensor) -> Tensor:
        return self.convs(image).flatten(2).transpose(1, 2)


def build_tokenizer(
    kind: str,
    in_chans: int,
    embed_dim: int,
    token_dim: int = 64,
    stem: str | Sequence[SoftSplitSpec] = "imagenet",
    patch_size: int = 16,
    kernel_ratio: float = 0.5,
    drop_rate: float = 0.1,
) -> nn.Module:
    """``kind``: "performer" or "transformer" (the T2T module), "conv" (T2T-ViTc) or "patch" (ViT).

    ``kernel_ratio`` (random features per token width) and ``drop_rate`` configure the Performer
    T2T layer only; the authors use 0.5 and 0.1.
    """
    if kind in T2T_LAYERS:
        return T2TModule(in_chans, embed_dim, token_dim, layer=kind, stem=stem,
                         kernel_ratio=kernel_ratio, drop_rate=drop_rate)
    if kind == "conv":
        return ConvTokenizer(in_chans, embed_dim, token_dim, stem=stem)
    if kind == "patch":
        return PatchTokenizer(in_chans, embed_dim, patch_size)
    raise T2TViTError(f"unknown tokenizer {kind!r}; choose performer, transformer, conv or patch")
