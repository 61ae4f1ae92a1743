"""What a file may ask of the model factory: its arguments screened, its size bounded.

A checkpoint's metadata or a pretrained folder's ``config.json`` names a model and keyword
arguments for it. timm's factory also takes arguments that choose where weights come from
(``pretrained``, ``pretrained_cfg``/``pretrained_cfg_overlay`` with a ``url`` or ``file``,
``checkpoint_path``, ``cache_dir``), what is returned (``features_only``) and where it lives
(``device``, ``dtype``). Those are the caller's choice, never a file's: :func:`screen_arguments`
refuses them for every model name, tagged (``t2t_vit_7.in1k``) or not (``resnet18``).
:func:`check_budget` estimates the parameter count before anything is allocated — from the
table for a T2T-ViT, by building on the meta device for another timm model — and refuses a
model over :data:`MAX_PARAMS`, or a T2T-ViT whose image size makes one forward pass cost over
:data:`MAX_GMACS`.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Mapping

from t2t_vit.errors import T2TViTError
from t2t_vit.model import T2TViT
from t2t_vit.t2t import resolve_stem
from t2t_vit.table import VARIANTS

# 4 GB of float32 weights: about 15x T2T-ViT-24 (64.1M), room for the largest timm teachers
# (ViT-H/14 has 0.63e9), far below what would exhaust a workstation.
MAX_PARAMS = 1_000_000_000
# One image's forward pass, estimated by :func:`t2t_gmacs`: ~70x T2T-ViT-24 at 224 px (13.8),
# reached by T2T-ViT-t-14 near 1100 px; the quadratic attention of a file's img_size of 4096 px
# (197,000 GMACs) kept predict on one small image running for minutes.
MAX_GMACS = 1000.0
# Arguments of timm's factory (and of our entry points) that pick a source, a file, the kind of
# object returned, or a device: a file never sets them.
CALLER_ONLY = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "pretrained_strict",
    "checkpoint_path", "cache_dir", "features_only", "feature_cfg", "feature_cls", "device", "dtype",
})
# Any other argument whose name says it points somewhere (``hf_hub_id``, ``weights_url``, ``model_dir``...).
_SOURCE_WORDS = frozenset({"url", "uri", "file", "filename", "hub", "pretrained", "checkpoint", "cache",
                           "download", "source", "repo", "weights"})
_SOURCE_ENDINGS = frozenset({"path", "dir", "root", "location"})


def base_name(name: str) -> str:
    """``t2t_vit_7.in1k`` → ``t2t_vit_7`` (timm's :func:`split_model_name_tag`)."""
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)[0]


def names_a_source(key: str) -> bool:
    """Whether an argument or config field named ``key`` points at weights, a file or a device."""
    words = re.split(r"[_\W]+", key.lower())
    return key in CALLER_ONLY or bool(_SOURCE_WORDS.intersection(words)) or words[-1] in _SOURCE_ENDINGS


def screen_arguments(name: str | None, kwargs: Mapping[str, Any], path: Any = "<checkpoint>") -> None:
    """Refuse stored model arguments that select a source, a file, a device or the returned
    object (for any ``name``), and arguments a T2T-ViT does not take (``name`` may carry a tag)."""
    for key in kwargs:
        if names_a_source(str(key)):
            raise T2TViTError(
                f"{path}: model arguments may not set {key!r}: a file never chooses a download, a file, a "
                "device or what is built; pass such options to create_model yourself")
    if name is not None and base_name(name) in VARIANTS:
        unknown = sorted(set(kwargs) - set(inspect.signature(T2TViT).parameters))
        if unknown:
            raise T2TViTError(f"{path}: model_kwargs has arguments {base_name(name)} does not take: "
                              f"{', '.join(unknown)}")


def _side(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if not isinstance(size, (list, tuple)) else (int(size[0]), int(size[-1]))


def t2t_params(variant: str, kwargs: Mapping[str, Any]) -> int:
    """An upper-range parameter count of a T2T-ViT row of the table under ``kwargs``, computed
    from the arguments alone (the Performer's random features cannot be built on the meta device)."""
    arch = {**VARIANTS[variant].arch, **kwargs}
    dim, depth = int(arch.get("embed_dim", 384)), int(arch.get("depth", 14))
    if arch.get("dense_stages"):
        dim += int(arch.get("growth") or 0) * int(sum(arch["dense_stages"]))
    hidden = int(arch.get("mlp_hidden_dim") or dim * float(arch.get("mlp_ratio", 3.0)))
    height, width = _side(arch.get("img_size", 224))
    tokens = (height // 4 + 1) * (width // 4 + 1)  # the finest grid any stem gives
    return depth * (4 * dim * dim + 2 * dim * hidden) + int(arch.get("num_classes", 1000)) * dim + tokens * dim


def t2t_gmacs(variant: str, kwargs: Mapping[str, Any]) -> float:
    """An upper-range estimate of one image's forward pass (GMACs) through a T2T-ViT row of the
    table under ``kwargs``, from the arguments alone: projections per token, plus the quadratic
    attention of the backbone and of a Transformer T2T module (the Performer's is linear)."""
    arch = {**VARIANTS[variant].arch, **kwargs}
    height, width = _side(arch.get("img_size", 224))
    dim, depth, channels = int(arch.get("embed_dim", 384)), int(arch.get("depth", 14)), int(arch.get("in_chans", 3))
    if arch.get("dense_stages"):
        dim += int(arch.get("growth") or 0) * int(sum(arch["dense_stages"]))
    hidden = int(arch.get("mlp_hidden_dim") or dim * float(arch.get("mlp_ratio", 3.0)))
    if arch["tokenizer"] == "patch":
        patch = int(arch.get("patch_size", 16))
        tokens, macs = (height // patch) * (width // patch), height * width * channels * dim
    else:
        token_dim, specs = int(arch.get("token_dim", 64)), resolve_stem(arch.get("stem", "imagenet"))
        macs, tokens = 0, 0
        for i, (kernel, stride, padding) in enumerate(specs):
            height, width = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
            tokens, last = max(height, 0) * max(width, 0), i == len(specs) - 1
            macs += 4 * tokens * channels * kernel * kernel * (dim if last else token_dim)  # q/k/v, MLP or conv
            if not last and arch["tokenizer"] == "transformer":
                macs += 2 * tokens * tokens * token_dim
            channels = token_dim
    macs += depth * (tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim)
    return macs / 1e9


def _meta_params(name: str, kwargs: Mapping[str, Any], path: Any) -> int:
    """Parameters and buffers of a timm model built on the meta device (no memory allocated)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # noqa: BLE001 (any failure of a foreign constructor is one line here)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise T2TViTError(f"{path}: cannot build {name} with {sorted(kwargs)} ({first})") from err
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def check_budget(name: str, kwargs: Mapping[str, Any], path: Any = "<checkpoint>") -> int:
    """The estimated parameter count of ``name(**kwargs)``; refuses one over :data:`MAX_PARAMS`, or
    a T2T-ViT whose forward pass would cost over :data:`MAX_GMACS` per image, before any weight
    is allocated (tagged names included)."""
    variant = base_name(name)
    try:
        count = t2t_params(variant, kwargs) if variant in VARIANTS else _meta_params(name, kwargs, path)
        cost = t2t_gmacs(variant, kwargs) if variant in VARIANTS else 0.0
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise T2TViTError(f"{path}: cannot size {name} from its arguments ({err})") from err
    if count > MAX_PARAMS:
        raise T2TViTError(f"{path}: the model it describes would have about {count:,} parameters, "
                          f"over the {MAX_PARAMS:,} limit")
    if cost > MAX_GMACS:
        raise T2TViTError(f"{path}: the model it describes (img_size {kwargs.get('img_size', 224)}) would cost about "
                          f"{cost:,.0f} GMACs per image, over the {MAX_GMACS:,.0f} limit; pass a smaller img_size")
    return count
