"""Train/eval transforms: thin glue around timm's ``create_transform`` with per-data-set defaults."""
from __future__ import annotations

from typing import Any, Callable

from timm.data import create_transform

from t2t_vit.errors import T2TViTError


# The options an ``augment`` dict may carry: timm ``create_transform`` training arguments.
AUGMENT_KEYS = (
    "scale", "ratio", "hflip", "vflip", "auto_augment", "re_prob", "re_mode", "re_count",
    "interpolation", "color_jitter", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob",
    "train_crop_mode",
)

# The paper's ImageNet recipe (the authors' training defaults): RandomResizedCrop with random interpolation, flip,
# RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode, as in DeiT).
IMAGENET_AUGMENT: dict[str, Any] = dict(
    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25, re_mode="pixel", re_count=1, interpolation="random", color_jitter=0.4,
)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")

# Per-data-set values that a user's ``augment`` dict is merged over. Digits are never flipped
# (a mirrored 2 is not a 2) and are only 8x8 pixels of signal, so crops stay large.
DATASET_AUGMENT: dict[str, dict[str, Any]] = {
    "digits": dict(scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.0, vflip=0.0, color_jitter=0.0),
    "cifar": dict(scale=(0.5, 1.0)),
    "imagefolder": {},
}

# Eval crop fraction when the caller passes ``crop_pct=None``: the paper evaluates ImageNet at
# 0.9; digits and CIFAR objects fill the frame, so nothing is cut away.
DEFAULT_CROP_PCT = {"digits": 1.0, "cifar": 1.0, "imagefolder": 0.9}


def default_augment(kind: str = "imagefolder") -> dict[str, Any]:
    """The recommended ``augment`` dict for a data-set kind ("digits", "cifar", "imagefolder")."""
    if kind == "digits":
        return dict(DATASET_AUGMENT["digits"], interpolation="random", auto_augment="rand-m5-mstd0.5-inc1",
                    re_prob=0.1, re_mode="pixel")
    return dict(IMAGENET_AUGMENT, **DATASET_AUGMENT.get(kind, {}))


def _to_size(img_size: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2 or min(img_size) <= 0:
            raise T2TViTError(f"img_size must be a positive int or (height, width), got {img_size!r}.")
        return (int(img_size[0]), int(img_size[1]))
    if int(img_size) <= 0:
        raise T2TViTError(f"img_size must be positive, got {img_size!r}.")
    return int(img_size)


def resolve_augment(kind: str, augment: dict[str, Any] | None) -> dict[str, Any] | None:
    """Merge a user's ``augment`` dict over the data set's defaults; ``None`` stays ``None``."""
    if augment is None:
        return None
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise T2TViTError(f"unknown augment option(s) {', '.join(unknown)}; valid: {', '.join(AUGMENT_KEYS)}.")
    opts = dict(DATASET_AUGMENT.get(kind, {}), **augment)
    # timm's own default is "const" (erase to zeros); the paper's recipe (DeiT's) fills with noise
    opts.setdefault("re_mode", IMAGENET_AUGMENT["re_mode"])
    for key in ("scale", "ratio"):  # YAML gives lists, timm wants tuples
        if opts.get(key) is not None:
            opts[key] = tuple(float(v) for v in opts[key])
    opts.setdefault("interpolation", "random")
    if opts["interpolation"] not in INTERPOLATIONS + ("random",):
        raise T2TViTError(f"unknown augment interpolation {opts['interpolation']!r}; "
                          f"valid: random, {', '.join(INTERPOLATIONS)}.")
    return opts


def build_transforms(
    kind: str,
    img_size: int | tuple[int, int],
    augment: dict[str, Any] | None,
    crop_pct: float | None,
    interpolation: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[Callable, Callable, dict[str, Any] | None, float]:
    """Return ``(train_tf, eval_tf, resolved_augment, crop_pct)`` for PIL RGB input.

    ``augment=None`` gives the deterministic eval transform for training too (``--no-augment``).
    """
    size = _to_size(img_size)
    if interpolation not in INTERPOLATIONS:
        raise T2TViTError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}.")
    crop_pct = DEFAULT_CROP_PCT.get(kind, 0.9) if crop_pct is None else float(crop_pct)
    if not 0.0 < crop_pct <= 1.0:
        raise T2TViTError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    eval_tf = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                               mean=mean, std=std)
    opts = resolve_augment(kind, augment)
    if opts is None:
        return eval_tf, eval_tf, None, crop_pct
    # timm's own RandAugment, unpatched: the pinned Pillow accepts posterize's 0 bits (tests/test_timm_scripts.py)
    train_tf = create_transform(size, is_training=True, mean=mean, std=std, **opts)
    return train_tf, eval_tf, opts, crop_pct
