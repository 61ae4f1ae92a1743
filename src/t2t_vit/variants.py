"""The model table (:mod:`t2t_vit.table`) registered with timm, and loading released weights.

Every row of :data:`t2t_vit.table.VARIANTS` becomes a timm model; :data:`RELEASES` lists the
authors' published checkpoints as timm pretrained tags (``t2t_vit_14.in1k`` ...), downloaded
through :mod:`t2t_vit.hub`; :func:`checkpoint_filter_fn` adapts a file to a model for timm's loader.
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from t2t_vit.adapting import LoadReport, adapt_state_dict, check_finite, check_fit
from t2t_vit.errors import T2TViTError
from t2t_vit.hub import load_released
from t2t_vit.interop import checkpoint_defaults
from t2t_vit.model import T2TViT
from t2t_vit.modelguard import check_budget, names_a_source, screen_arguments
from t2t_vit.reading import is_safetensors, read_checkpoint, read_metadata, resolve_path, select_state_dict
from t2t_vit.table import VARIANTS


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
    digest: str | None = None  # "algorithm:hex", where a public source lists it
    eval: dict[str, Any] = field(default_factory=dict)


_CIFAR_EVAL = dict(crop_pct=1.0, interpolation="bilinear", mean=CIFAR_MEAN, std=CIFAR_STD)
RELEASES: dict[str, Release] = {r.tag: r for r in [
    Release("t2t_vit_7.in1k", "71.7_T2T_ViT_7.pth.tar", 71.7),
    Release("t2t_vit_10.in1k", "75.2_T2T_ViT_10.pth.tar", 75.2),
    Release("t2t_vit_12.in1k", "76.5_T2T_ViT_12.pth.tar", 76.5),
    Release("t2t_vit_14.in1k", "81.5_T2T_ViT_14.pth.tar", 81.5, size=86_212_823,  # OpenVINO model zoo's model.yml
            digest="sha384:98c8ae06a1e9997f3e83ad2dfbac49985bf7bd7723eb64e4b8462338163be026"
                   "57998f0bd9f8997367417003caeaf7a1"),
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


def checkpoint_filter_fn(state_dict: dict, model: nn.Module, meta: Mapping[str, Any] | None = None) -> dict:
    """Adapt a state dict (authors' layout or ours) to ``model`` for timm's pretrained loader.

    timm has already read the file weights-only (EMA preferred, ``module.`` stripped); this unwraps
    the CIFAR ``net`` layout and our ``ema.`` keys (following the file's ``preferred`` metadata),
    resamples the position table, keeps the model's head on a class-count change, and raises
    :class:`T2TViTError` with the same one-line message as :func:`t2t_vit.load_checkpoint` otherwise.
    ``meta``: the file's metadata when the caller has read it already (else read here).
    """
    file = getattr(model, "pretrained_cfg", {}).get("file")
    if meta is None:
        meta = {}
        if file:
            path = resolve_path(file)
            meta = read_metadata(path) if is_safetensors(path) else {}
    where = str(file or "<state dict>")
    chosen, source = select_state_dict(state_dict, None, where, preferred=meta.get("preferred", "ema"))
    check_finite(chosen, where)
    adapted, report = adapt_state_dict(chosen, model, meta, LoadReport(path=where, source=source))
    check_fit(report, adapted, model, strict=True, new_head=True, guess=likely_variants)
    return adapted


def _source_is_url(cfg: Mapping[str, Any]) -> bool:
    """True when timm would fetch ``cfg``'s ``url`` (no file, state dict, hub or local-dir source)."""
    return bool(cfg.get("url")) and not (cfg.get("file") or cfg.get("state_dict") or cfg.get("hf_hub_id")
                                         or cfg.get("source") in ("hf-hub", "local-dir"))


def _screen_local_source(variant: str, cfg: Mapping[str, Any], kwargs: Mapping[str, Any], pretrained: bool,
                         meta: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A folder or file timm hands us (``local-dir:``, ``pretrained_cfg_overlay=dict(file=...)``)
    is checked as :func:`t2t_vit.model_from_checkpoint` checks one: the arguments its config.json
    gave (timm passes them as ``pretrained_model_args``) and its metadata's ``model_kwargs`` may
    not choose a source, a file or a device, nor a model over the size limit. Returns the file's
    validated metadata: ``meta`` when the file was read already, else read (and validated) here."""
    stored = kwargs.get("pretrained_model_args")
    where = cfg.get("file") or "config.json"
    if isinstance(stored, Mapping):
        screen_arguments(variant, stored, where)
    if isinstance(stored, Mapping) or cfg.get("file"):  # a file's own arguments are among kwargs by now
        check_budget(variant, {k: v for k, v in kwargs.items() if not names_a_source(k)}, where)
    if pretrained and cfg.get("file") and meta is None:
        meta = read_metadata(resolve_path(cfg["file"]))  # validates (and screens) before timm reads the weights
    return meta


def _with_file_defaults(variant: str, tag: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """(``kwargs`` over what a local ``file`` in the overlay says about its model, the file's
    validated metadata or None when there is no such file): the class count (timm then keeps a head
    that fits instead of dropping it), the preprocessing, and the architecture arguments of a file
    that names this variant. The file is read once here; the screen and the filter reuse its metadata."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=tag, pretrained_cfg_overlay=overlay).to_dict()
    if not cfg.get("file") or cfg.get("source") == "local-dir":  # local-dir: config.json already says it all
        return kwargs, None
    state_dict, _, meta = read_checkpoint(cfg["file"])
    arch, fields = checkpoint_defaults(variant, state_dict, meta)
    return {**arch, **kwargs, "pretrained_cfg_overlay": {**fields, **overlay}}, meta


def _pyramid_levels(arch: Mapping[str, Any]) -> tuple[int, ...]:
    """``features_only``'s default levels: with a T2T module its two re-structurized maps, the
    last block and the pooled level (strides 4, 8, 16, 32 with the ImageNet stem); else the last
    two blocks and the pooled level."""
    return (0, 1, -2, -1) if arch.get("tokenizer") in ("performer", "transformer") else (-3, -2, -1)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str) and tag.startswith("tl_") and "token_label_head" in inspect.signature(T2TViT).parameters:
        kwargs.setdefault("token_label_head", True)  # Token Labeling checkpoints carry an aux head
    meta = None
    if pretrained:
        kwargs, meta = _with_file_defaults(variant, tag, kwargs)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=tag, pretrained_cfg_overlay=kwargs.get(
        "pretrained_cfg_overlay")).to_dict()
    meta = _screen_local_source(variant, cfg, kwargs, pretrained, meta)
    download = pretrained and _source_is_url(cfg)
    if pretrained and not download and not cfg.get("url") and not (cfg.get("file") or cfg.get("state_dict")):
        raise T2TViTError(f"no released weights for {variant}; use a local checkpoint (--checkpoint FILE on the "
                          "command line; checkpoint_path= or pretrained_cfg_overlay=dict(file=...) in Python), "
                          f"or choose one of {', '.join(RELEASES)}")
    arch = {**VARIANTS[variant].arch, **kwargs}
    model = build_model_with_cfg(
        T2TViT, variant, pretrained and not download, pretrained_filter_fn=partial(checkpoint_filter_fn, meta=meta),
        feature_cfg=dict(out_indices=_pyramid_levels(arch), feature_cls="getter"), **arch,
    )
    target = getattr(model, "model", model)  # (a features_only wrapper keeps the net elsewhere)
    # resolve_data_config reads input_size from here: make it the size the model was built for
    model.pretrained_cfg["input_size"] = (model.pretrained_cfg.get("input_size", (3,))[0], *target.img_size)
    if download:
        release = RELEASES.get(f"{variant}.{cfg.get('tag')}")
        load_released(target, model.pretrained_cfg, guess=likely_variants, size=release.size if release else None,
                      digest=release.digest if release else None, folder=kwargs.get("cache_dir"))
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
