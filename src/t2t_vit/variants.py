"""Every model of the paper as one row of a table, registered with timm.

A row holds the architecture (keyword arguments of :class:`T2TViT`), the figures the paper
reports, and — for the models the authors released — the params/MACs their code measures
(the authors' code counted with ``torch.utils.flop_counter``). The README's model table and the
profiler read this table; nothing else repeats these numbers. :data:`RELEASES` lists the
authors' published checkpoints as timm pretrained tags (``t2t_vit_14.in1k`` ...).
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from t2t_vit.adapting import LoadReport, adapt_state_dict, check_fit
from t2t_vit.errors import T2TViTError
from t2t_vit.hub import load_released
from t2t_vit.interop import checkpoint_defaults
from t2t_vit.model import T2TViT
from t2t_vit.reading import is_safetensors, read_metadata, resolve_path, select_state_dict


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


_FIRST_LAYER = {  # the first layer that reads the image, per tokenizer (timm's ``first_conv``)
    "performer": "tokens_to_token.attention1.kqv", "transformer": "tokens_to_token.attention1.attn.qkv",
    "conv": "tokens_to_token.convs.0", "patch": "tokens_to_token.proj",
}
RELEASE_URL = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the authors' transfer script


@dataclass(frozen=True)
class Release:
    """A checkpoint the authors published: its file, their top-1, how they evaluated it."""

    tag: str
    file: str
    top1: float
    dataset: str = "ImageNet-1k"
    img_size: int = 224
    num_classes: int = 1000
    size: int | None = None  # bytes, where a public source lists it
    eval: dict[str, Any] = field(default_factory=dict)


_CIFAR_EVAL = dict(crop_pct=1.0, interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD)
RELEASES: dict[str, Release] = {r.tag: r for r in [
    Release("t2t_vit_7.in1k", "71.7_T2T_ViT_7.pth.tar", 71.7),
    Release("t2t_vit_10.in1k", "75.2_T2T_ViT_10.pth.tar", 75.2),
    Release("t2t_vit_12.in1k", "76.5_T2T_ViT_12.pth.tar", 76.5),
    Release("t2t_vit_14.in1k", "81.5_T2T_ViT_14.pth.tar", 81.5, size=86_212_823),  # OpenVINO model zoo
    Release("t2t_vit_14.in1k_384", "83.3_T2T_ViT_14.pth.tar", 83.3, img_size=384),
    Release("t2t_vit_19.in1k", "81.9_T2T_ViT_19.pth.tar", 81.9),
    Release("t2t_vit_24.in1k", "82.3_T2T_ViT_24.pth.tar", 82.3),
    Release("t2t_vit_24.tl_in1k", "84.2_T2T_ViT_24.pth.tar", 84.2),
    Release("t2t_vit_t_14.in1k", "81.7_T2T_ViTt_14.pth.tar", 81.7),
    Release("t2t_vit_t_19.in1k", "82.4_T2T_ViTt_19.pth.tar", 82.4),
    Release("t2t_vit_t_24.in1k", "82.6_T2T_ViTt_24.pth.tar", 82.6),
    Release("t2t_vit_14.in1k_ft_cifar10", "cifar10_t2t-vit_14_98.3.pth", 98.3, "CIFAR-10", num_classes=10,
            eval=_CIFAR_EVAL),
    Release("t2t_vit_14.in1k_ft_cifar100", "cirfar100_t2t-vit-14_88.4.pth", 88.4, "CIFAR-100", num_classes=100,
            eval=_CIFAR_EVAL),  # the file name's spelling is the authors'
    Release("t2t_vit_19.in1k_ft_cifar10", "cifar10_t2t-vit_19_98.4.pth", 98.4, "CIFAR-10", num_classes=10,
            eval=_CIFAR_EVAL),
    Release("t2t_vit_19.in1k_ft_cifar100", "cifar100_t2t-vit-19_89.0.pth", 89.0, "CIFAR-100", num_classes=100,
            eval=_CIFAR_EVAL),
]}


def _cfg(variant: str, **overrides: Any) -> dict[str, Any]:
    cfg = dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation="bicubic",
        fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=_FIRST_LAYER[VARIANTS[variant].arch["tokenizer"]], classifier="head",
        paper_ids="arXiv:2101.11986",
        paper_name="Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
    )
    cfg.update(overrides)
    return cfg


def _release_cfg(release: Release) -> dict[str, Any]:
    variant = release.tag.split(".")[0]
    return _cfg(
        variant, url=RELEASE_URL + release.file, num_classes=release.num_classes,
        input_size=(3, release.img_size, release.img_size), origin_url="https://github.com/yitu-opensource/T2T-ViT",
        license="bsd-3-clause-clear", notes=(f"authors' top-1 {release.top1} on {release.dataset}",), **release.eval,
    )


def _default_cfgs() -> dict[str, dict[str, Any]]:
    cfgs = {tag: _release_cfg(r) for tag, r in RELEASES.items()}
    released = {tag.split(".")[0] for tag in RELEASES}
    cfgs.update({name: _cfg(name) for name in VARIANTS if name not in released})
    return cfgs


# timm looks this up by module when a model is registered, so it must exist before registration.
default_cfgs = generate_default_cfgs(_default_cfgs())


def likely_variants(desc: Mapping[str, Any]) -> list[str]:
    """Names of the variants whose shapes match ``desc`` (from :func:`describe_state_dict`)."""
    return [
        name for name, v in VARIANTS.items()
        if not v.arch.get("dense_stages") and v.arch.get("embed_dim") == desc.get("width")
        and v.arch.get("depth") == desc.get("depth") and v.arch.get("tokenizer") == desc.get("T2T layer")
        and v.arch.get("block", "standard") == desc.get("block")
    ]


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Adapt a state dict (authors' layout or ours) to ``model`` for timm's pretrained loader.

    timm has already read the file weights-only (EMA preferred, ``module.`` stripped); this unwraps
    the CIFAR ``net`` layout and our ``ema.`` keys (following the file's ``preferred`` metadata),
    resamples the position table, keeps the model's head on a class-count change, and raises
    :class:`T2TViTError` with the same one-line message as :func:`t2t_vit.load_checkpoint` otherwise.
    """
    file = getattr(model, "pretrained_cfg", {}).get("file")
    meta: dict[str, Any] = {}
    if file:
        path = resolve_path(file)
        meta = read_metadata(path) if is_safetensors(path) else {}
    where = str(file or "<state dict>")
    chosen, source = select_state_dict(state_dict, None, where, preferred=meta.get("preferred", "ema"))
    adapted, report = adapt_state_dict(chosen, model, meta, LoadReport(path=where, source=source))
    check_fit(report, adapted, model, strict=True, new_head=True, guess=_guess)
    return adapted


def _guess(desc: Mapping[str, Any]) -> list[str]:
    return likely_variants(desc)


def _source_is_url(cfg: Mapping[str, Any]) -> bool:
    """True when timm would fetch ``cfg``'s ``url`` (no file, state dict, hub or local-dir source)."""
    return bool(cfg.get("url")) and not (cfg.get("file") or cfg.get("state_dict") or cfg.get("hf_hub_id")
                                         or cfg.get("source") in ("hf-hub", "local-dir"))


def _with_file_defaults(variant: str, tag: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` over what a local ``file`` in the overlay says about its model: the class count
    (timm then keeps a head that fits instead of dropping it), the preprocessing, and the
    architecture arguments of a file that names this variant."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=tag, pretrained_cfg_overlay=overlay).to_dict()
    if not cfg.get("file") or cfg.get("source") == "local-dir":  # local-dir: config.json already says it all
        return kwargs
    arch, fields = checkpoint_defaults(variant, cfg["file"])
    return {**arch, **kwargs, "pretrained_cfg_overlay": {**fields, **overlay}}


def _pyramid_levels(arch: Mapping[str, Any]) -> tuple[int, ...]:
    """``features_only``'s default levels: with a T2T module its two re-structurized maps, the
    last block and the pooled level (strides 4, 8, 16, 32 with the ImageNet stem); else the last
    two blocks and the pooled level."""
    return (0, 1, -2, -1) if arch.get("tokenizer") in ("performer", "transformer") else (-3, -2, -1)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str) and tag.startswith("tl_") and "token_label_head" in inspect.signature(T2TViT).parameters:
        kwargs.setdefault("token_label_head", True)  # Token Labeling checkpoints carry an aux head
    if pretrained:
        kwargs = _with_file_defaults(variant, tag, kwargs)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=tag, pretrained_cfg_overlay=kwargs.get(
        "pretrained_cfg_overlay")).to_dict()
    download = pretrained and _source_is_url(cfg)
    if pretrained and not download and not cfg.get("url") and not (cfg.get("file") or cfg.get("state_dict")):
        raise T2TViTError(f"no released weights for {variant}; use a local checkpoint (--checkpoint FILE on the "
                          "command line; checkpoint_path= or pretrained_cfg_overlay=dict(file=...) in Python), "
                          f"or choose one of {', '.join(RELEASES)}")
    arch = {**VARIANTS[variant].arch, **kwargs}
    model = build_model_with_cfg(
        T2TViT, variant, pretrained and not download, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=_pyramid_levels(arch), feature_cls="getter"), **arch,
    )
    target = getattr(model, "model", model)  # (a features_only wrapper keeps the net elsewhere)
    # resolve_data_config reads input_size from here: make it the size the model was built for
    model.pretrained_cfg["input_size"] = (model.pretrained_cfg.get("input_size", (3,))[0], *target.img_size)
    if download:
        release = RELEASES.get(f"{variant}.{cfg.get('tag')}")
        load_released(target, model.pretrained_cfg, guess=_guess, size=release.size if release else None,
                      folder=kwargs.get("cache_dir"))
    return model


def _register(variant: Variant) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> T2TViT:
        return _create(variant.name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant.name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{variant.name}: {variant.note or 'see the T2T-ViT paper.'}"
    globals()[variant.name] = register_model(entrypoint)


for _variant in VARIANTS.values():
    _register(_variant)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered T2T-ViT models, optionally filtered by a shell-style pattern."""
    names = list(VARIANTS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names
