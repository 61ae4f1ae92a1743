"""The tokenizers a T2T-ViT can start with: the T2T module (:mod:`t2t_vit.t2t`) and the two the
paper's ablations swap in for it (Table 7): ViT's plain patch split and convolutions."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from t2t_vit.errors import T2TViTError
from t2t_vit.t2t import SoftSplitSpec, T2TModule, resolve_stem, token_grid
from t2t_vit.t2t_layers import T2T_LAYERS


class PatchTokenizer(nn.Module):
    """Ablation "wo T2T": ViT's plain non-overlapping patch split and linear projection."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 384, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.specs = [(patch_size, patch_size, 0)]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return token_grid(img_size, self.specs)

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
    pixel_norm: str = "layernorm",
) -> nn.Module:
    """``kind``: "performer" or "transformer" (the T2T module), "conv" (T2T-ViTc) or "patch" (ViT).

    ``kernel_ratio`` (random features per token width) and ``drop_rate`` configure the Performer
    T2T layer only; the authors use 0.5 and 0.1. ``pixel_norm`` is how the first T2T layer
    normalises raw-pixel patches (:func:`pixel_norm`; the paper's "layernorm").
    """
    if kind in T2T_LAYERS:
        return T2TModule(in_chans, embed_dim, token_dim, layer=kind, stem=stem,
                         kernel_ratio=kernel_ratio, drop_rate=drop_rate, pixel_norm=pixel_norm)
    if kind == "conv":
        return ConvTokenizer(in_chans, embed_dim, token_dim, stem=stem)
    if kind == "patch":
        return PatchTokenizer(in_chans, embed_dim, patch_size)
    raise T2TViTError(f"unknown tokenizer {kind!r}; choose performer, transformer, conv or patch")
