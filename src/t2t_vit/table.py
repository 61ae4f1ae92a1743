"""The model table: every model of the paper as one row (core: imports only the core).

A row holds the architecture (keyword arguments of :class:`t2t_vit.model.T2TViT`), the figures
the paper reports, and — for the models the authors released — the params/MACs their code
measures (counted with ``torch.utils.flop_counter``). The README's model table, the profiler,
the loading guard (:mod:`t2t_vit.modelguard`) and the timm registration
(:mod:`t2t_vit.variants`) read this table; nothing else repeats these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figures:
    """Params (millions), GMACs and ImageNet top-1 (%) at 224 px; None where not reported."""

    params_m: float | None = None
    gmacs: float | None = None
    top1: float | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    arch: dict[str, Any]
    paper: Figures
    reference: Figures | None = None  # measured on the authors' implementation
    note: str = ""
    released: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


def _t2t(layer: str, depth: int, dim: int, heads: int, mlp_ratio: float, **extra) -> dict[str, Any]:
    return dict(tokenizer=layer, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, **extra)


def _vit(depth: int = 8, dim: int = 768, heads: int = 8, mlp_hidden: int = 2304, **extra) -> dict[str, Any]:
    """The paper's ViT-S/16 family: 16×16 patches, fixed sinusoid table, T2T-ViT's block."""
    return dict(tokenizer="patch", patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_hidden_dim=mlp_hidden, **extra)


_DENSE_T2T = dict(dense_stages=(3, 6, 6, 4), growth=64, embed_dim=128, num_heads=8, mlp_ratio=2.0)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        # ---- Table 1: the T2T-ViT family ------------------------------------------------------
        Variant("t2t_vit_7", _t2t("performer", 7, 256, 4, 2.0), Figures(4.3, 1.1, 71.7), Figures(4.310, 1.147),
                note="Table 1 lists 8 layers / 4.2M; the released code and checkpoint use 7.", released=True),
        Variant("t2t_vit_10", _t2t("performer", 10, 256, 4, 2.0), Figures(5.9, 1.5, 75.2), Figures(5.889, 1.516),
                released=True),
        Variant("t2t_vit_12", _t2t("performer", 12, 256, 4, 2.0), Figures(6.9, 1.8, 76.5), Figures(6.942, 1.763),
                released=True),
        Variant("t2t_vit_14", _t2t("performer", 14, 384, 6, 3.0), Figures(21.5, 4.8, 81.5), Figures(21.546, 4.783),
                released=True),
        Variant("t2t_vit_19", _t2t("performer", 19, 448, 7, 3.0), Figures(39.2, 8.5, 81.9), Figures(39.177, 8.480),
                released=True),
        Variant("t2t_vit_24", _t2t("performer", 24, 512, 8, 3.0), Figures(64.1, 13.8, 82.3), Figures(64.106, 13.662),
                released=True),
        Variant("t2t_vit_t_14", _t2t("transformer", 14, 384, 6, 3.0), Figures(21.5, 6.1, 81.7),
                Figures(21.541, 6.089), released=True),
        Variant("t2t_vit_t_19", _t2t("transformer", 19, 448, 7, 3.0), Figures(39.2, 9.8, 82.4),
                Figures(39.173, 9.785), released=True),
        Variant("t2t_vit_t_24", _t2t("transformer", 24, 512, 8, 3.0), Figures(64.1, 15.0, 82.6),
                Figures(64.101, 14.967), released=True),
        # ---- Table 6: CNN designs transferred to T2T-ViT --------------------------------------
        Variant("t2t_vit_14_resnext", _t2t("performer", 14, 384, 32, 3.0), Figures(21.5, 4.8, 81.5),
                Figures(21.546, 4.783), note="32 heads of width 12."),
        Variant("t2t_vit_14_wide", _t2t("performer", 4, 768, 12, 3.0), Figures(25.0, 5.4, 78.8),
                Figures(25.156, 5.229), note="T2T-ViT-d768-4 of Table 7 (Table 6: 25.1M / 5.0G / 77.9)."),
        Variant("t2t_vit_14_se", _t2t("performer", 14, 384, 6, 3.0, block="se"), Figures(21.9, 4.9, 81.6),
                Figures(21.804, 4.784), note="SE (reduction 16, no bias) after the attention projection."),
        Variant("t2t_vit_16_ghost", _t2t("performer", 16, 384, 6, 3.0, block="ghost"), Figures(16.3, 3.7, 79.5),
                Figures(16.253, 3.802), note="Depth 16; half-width q/k/v and MLP completed by depthwise 1×1 ops."),
        Variant("t2t_vit_dense", dict(tokenizer="performer", depth=19, **_DENSE_T2T), Figures(23.7, 5.5, 80.6),
                Figures(23.647, 5.276), note="Stages 3/6/6/4, base width 128, growth 64, halving transitions."),
        # ---- Table 7: ablations of the T2T module ---------------------------------------------
        Variant("t2t_vit_14_wo_t2t", _t2t("patch", 14, 384, 6, 3.0), Figures(21.1, 4.2, 79.5),
                note="T2T module replaced by a 16×16 patch split (a strided convolution)."),
        Variant("t2t_vit_c_14", _t2t("conv", 14, 384, 6, 3.0), Figures(21.3, 4.6, 80.8),
                note="T2T module replaced by convolutions 7/4 → 3/2 → 3/2 (widths 64, 64, 384, GELU between)."),
        # ---- Table 6: the ViT baselines -------------------------------------------------------
        Variant("vit_s16", _vit(), Figures(48.6, 10.1, 78.1), note="Depth 8, width 768, MLP 2304, 8 heads."),
        Variant("vit_s16_dn", _vit(depth=16, dim=384, heads=6, mlp_hidden=1152), Figures(24.5, 5.5, 79.0),
                note="Deep-narrow: depth 16, width 384 (MLP ratio 3, 6 heads)."),
        Variant("vit_s16_sw", _vit(depth=4, dim=1024, heads=16, mlp_hidden=3584), Figures(47.9, 9.9, 69.9),
                note="Shallow-wide: depth 4, width 1024; MLP 3584 chosen to match the paper's budget."),
        Variant("vit_s16_dense", _vit(depth=19, dim=128, heads=8, dense_stages=(2, 7, 6, 4), growth=80,
                                      mlp_ratio=3.0, mlp_hidden=None),
                Figures(46.7, 9.7, 76.8),
                note="Dense stages 2/7/6/4 from width 128, growth 80, MLP ratio 3: ends at 736 as in the paper."),
        Variant("vit_s16_se", _vit(block="se"), Figures(49.2, 10.2, 78.4), note="SE after the attention projection."),
        Variant("vit_s16_resnext", _vit(heads=32), Figures(48.6, 10.1, 78.0), note="32 heads of width 24."),
        Variant("vit_s16_ghost", _vit(block="ghost"), Figures(32.1, 6.9, 73.7),
                note="Ghost attention and MLP as in T2T-ViT-Ghost."),
    ]
}


def is_t2t_vit(name: object) -> bool:
    """Whether ``name`` is one of this table's models (exactly: ``t2t_vit_14``, not ``t2t_vit_14.in1k``).

    The one test of "is this a T2T-ViT name" (built by :func:`t2t_vit.create_model`, not by timm's
    other families); a pretrained tag is told apart by :class:`t2t_vit.modelsource.ModelSource`.
    """
    return isinstance(name, str) and name in VARIANTS
