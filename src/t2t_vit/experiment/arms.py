"""The ablation's arms and presets, and arm variants written ``ARM:key=value:...`` on the command line."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from t2t_vit.errors import T2TViTError
from t2t_vit.profile import count_macs
from t2t_vit.t2t_layers import PIXEL_NORMS
from t2t_vit.table import is_t2t_vit

IMG_SIZE = 32


@dataclass(frozen=True)
class Arm:
    """One model of the ablation: a model name, the keyword arguments that shape it, and per-arm
    training overrides (``train``: TrainConfig fields, the T2T module's lr multiplier and extra
    warm-up among them)."""

    name: str
    label: str
    model: str
    model_kwargs: dict[str, Any]
    role: str
    train: dict[str, Any] = field(default_factory=dict)
    base: str = ""  # the arm a variant derives from ("" for the arms themselves)

    @property
    def family(self) -> str:
        """The base arm's name: runs of every variant live under it, told apart by their budget."""
        return self.base or self.name

    @property
    def is_t2t(self) -> bool:
        return is_t2t_vit(self.model)

    @property
    def has_t2t_module(self) -> bool:
        """A T2T-ViT whose tokenizer is a T2T module (performer or transformer soft-split layers)."""
        return self.is_t2t and self.model_kwargs.get("tokenizer") in ("performer", "transformer")


@dataclass(frozen=True)
class Preset:
    """Arm widths and the shared recipe. ``width`` is the T2T-ViT's embedding width; ``config`` a
    training recipe (a shipped name or a YAML path) whose training keys every arm shares and whose
    ``t2t_*`` model arguments every arm with a T2T module takes (a preset for a small-data recipe)."""

    width: int
    depth: int
    token_dim: int
    epochs: int
    batch_size: int
    lr: float
    resnet_channels: tuple[int, ...]
    description: str
    config: str | None = None


PRESETS: dict[str, Preset] = {
    # Sized so that 7 arms × 3 seeds fit in 30 minutes on a 2-core CPU (docs/experiments.md).
    "digits": Preset(64, 7, 32, 10, 32, 1e-3, (16, 32, 64, 128), "≈0.3M-param arms for the 2-core CPU run",
                     config="ablation_small"),
    # The same arms with the small-data recipe: the T2T module's lr at 0.1× (docs/experiments.md).
    "small_data": Preset(64, 7, 32, 10, 32, 1e-3, (16, 32, 64, 128), "digits-preset arms, T2T module at 0.1× lr",
                         config="small_data"),
    # The small-data recipe over a long schedule with strong augmentation (configs/small_data_long.yaml).
    "small_data_long": Preset(64, 7, 32, 50, 32, 1e-3, (16, 32, 64, 128),
                              "digits-preset arms, 50 epochs, RandAugment, mixup/cutmix", config="small_data_long"),
    # T2T-ViT-7 widths (≈1M-params arms at 32 px): for CIFAR-sized folders on a GPU.
    "cifar": Preset(256, 7, 64, 100, 128, 1e-3, (32, 64, 128, 256), "T2T-ViT-7-wide arms for CIFAR-sized data on a GPU"),
}


def ablation_arms(preset: Preset) -> list[Arm]:
    """The seven arms for a preset; every T2T-ViT arm shares depth/width/heads except shallow_wide."""
    d, depth, tdim = preset.width, preset.depth, preset.token_dim
    heads = max(1, d // 32)  # head width 32 everywhere
    backbone = dict(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=2.0, token_dim=tdim)
    # Paper Table 7: d768-4 vs d384-14, i.e. 2× width and 3.5× fewer blocks at a similar parameter count.
    wide = dict(backbone, embed_dim=2 * d, depth=max(1, round(depth / 3.5)), num_heads=2 * heads)
    # A DeiT-shaped ViT (MLP ratio 4, qkv bias, learned positions) with as many blocks as match the params.
    vit_depth = max(1, round(depth * 8 / 12))
    vit = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=d, depth=vit_depth, num_heads=heads)
    c = preset.resnet_channels
    resnet = dict(channels=c, stem_width=c[0])
    return [
        Arm("t2t", "T2T-ViT", "t2t_vit_7", dict(backbone, tokenizer="performer"), "T2T module, deep-narrow"),
        Arm("t2tt", "T2T-ViTt (transformer T2T)", "t2t_vit_7", dict(backbone, tokenizer="transformer"),
            "T2T module with exact softmax attention"),
        Arm("no_t2t", "T2T-ViT w/o T2T (patch 4)", "t2t_vit_7", dict(backbone, tokenizer="patch", patch_size=4),
            "claim 1: plain patch split"),
        Arm("t2t_conv", "T2T-ViTc (conv tokens)", "t2t_vit_7", dict(backbone, tokenizer="conv"),
            "T2T module replaced by convolutions"),
        Arm("shallow_wide", f"T2T-ViT shallow-wide (d{2 * d}-{wide['depth']})", "t2t_vit_7",
            dict(wide, tokenizer="performer"), "claim 2: shallow-wide backbone"),
        Arm("vit", f"ViT (timm, d{d}-{vit_depth}, patch 4)", "vit_tiny_patch16_224", vit, "ViT of similar size"),
        Arm("resnet", "ResNet-10-T (timm, narrow)", "resnet10t", resnet, "CNN reference"),
    ]


# ---- arm variants ------------------------------------------------------------------------------

# key: (kind, target, type). "model": a model argument of arms with a T2T module; "train": a
# TrainConfig field of any arm; "t2t": a TrainConfig field of the T2T module's optimiser settings.
OPTIONS: dict[str, tuple[str, str, type]] = {
    "kernel_ratio": ("model", "t2t_kernel_ratio", float),  # Performer random features per token width
    "t2t_drop": ("model", "t2t_drop_rate", float),  # dropout inside the Performer T2T layers
    "t2t_norm1": ("model", "t2t_pixel_norm", str),  # the first T2T layer's norm over raw pixels
    "t2t_lr": ("t2t", "t2t_lr_scale", float),  # lr multiplier of the T2T module's parameters
    "t2t_warmup": ("t2t", "t2t_warmup_epochs", float),  # extra linear warm-up (epochs) of its lr
    "epochs": ("train", "epochs", int),
    "lr": ("train", "lr", float),
    "warmup": ("train", "warmup_epochs", float),
    "drop_path": ("train", "drop_path", float),
}


def _number(key: str, text: str, kind_type: type) -> float | int:
    try:
        value = kind_type(text)
    except ValueError as err:
        raise T2TViTError(f"arm option {key} needs a {kind_type.__name__}, got {text!r}") from err
    if not value >= 0 or (kind_type is int and value == 0) or value == float("inf"):
        raise T2TViTError(f"arm option {key} must be a finite {'positive' if kind_type is int else 'non-negative'} "
                          f"number, got {text!r}")
    return value


def arm_variant(base: Arm, options: dict[str, str]) -> Arm:
    """``base`` with ``options`` (``OPTIONS`` keys → value strings) applied; its name encodes them."""
    model_kwargs, train = dict(base.model_kwargs), dict(base.train)
    for key, text in options.items():
        if key not in OPTIONS:
            raise T2TViTError(f"unknown arm option {key!r} in {base.name}:{key}={text}; "
                              f"choose from {', '.join(OPTIONS)}")
        kind, target, kind_type = OPTIONS[key]
        if kind_type is str:
            if text not in PIXEL_NORMS:
                raise T2TViTError(f"arm option {key} must be one of {', '.join(PIXEL_NORMS)}, got {text!r}")
            value = text
        else:
            value = _number(key, text, kind_type)
        if kind != "train" and not base.has_t2t_module:
            raise T2TViTError(f"arm option {key} needs an arm with a T2T module (t2t, t2tt, shallow_wide), "
                              f"not {base.name}")
        (model_kwargs if kind == "model" else train)[target] = value
    suffix = "".join(f"-{k}{v}" for k, v in options.items())
    note = ", ".join(f"{k}={v}" for k, v in options.items())
    label = f"{base.label} [{note}]" if note else base.label
    return replace(base, name=base.name + suffix, base=base.family, label=label, model_kwargs=model_kwargs,
                   train=train)


def parse_arm(spec: str, by_name: dict[str, Arm]) -> Arm:
    """``NAME`` or ``NAME:key=value:key=value`` (e.g. ``t2t:kernel_ratio=2:t2t_drop=0``)."""
    name, *parts = spec.strip().split(":")
    if name not in by_name:
        raise T2TViTError(f"unknown arm(s) {name}; choose from {', '.join(by_name)}")
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise T2TViTError(f"arm option {part!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return arm_variant(by_name[name], options)


def select_arms(all_arms: list[Arm], specs: list[str] | None) -> list[Arm]:
    """All arms, or the ones ``specs`` name (each may carry options); duplicates refused."""
    if not specs:
        return all_arms
    by_name = {a.name: a for a in all_arms}
    unknown = [s.split(":")[0] for s in specs if s.split(":")[0] not in by_name]
    if unknown:
        raise T2TViTError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    arms = [parse_arm(s, by_name) for s in specs]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise T2TViTError(f"arm listed twice in --arms: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return arms


# ---- size ---------------------------------------------------------------------------------------

def build_arm_model(arm: Arm, num_classes: int, img_size: int = IMG_SIZE):
    """The very model the trainer builds for ``arm`` (its own factory), for params/MACs."""
    from t2t_vit.train import TrainConfig
    from t2t_vit.train.recipe import build_model

    cfg = TrainConfig(model=arm.model, model_kwargs=dict(arm.model_kwargs), img_size=img_size, stem="small")
    return build_model(cfg, num_classes)


def profile_arm(arm: Arm, num_classes: int) -> dict[str, int]:
    model = build_arm_model(arm, num_classes)
    params = sum(p.numel() for p in model.parameters())
    macs, _ = count_macs(model, (3, IMG_SIZE, IMG_SIZE))
    return dict(params=params, macs=int(macs))
