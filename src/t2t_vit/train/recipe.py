"""The paper's recipe as timm parts: model, AdamW/SGD param groups, cosine schedule, EMA, mixup, loss."""
from __future__ import annotations


import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

import t2t_vit
from t2t_vit.errors import T2TViTError
from t2t_vit.table import is_t2t_vit
from t2t_vit.train.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int, name: str | None = None, kwargs: dict | None = None,
                pretrained: str | None = None) -> nn.Module:
    """The model ``cfg`` names, exactly as registered plus what ``cfg`` changes on purpose.

    T2T-ViT models get ``img_size``/``stem`` and the model kwargs through :func:`t2t_vit.create_model`
    (with ``pretrained``, a tag such as ``t2t_vit_14.in1k``, that function loads the tag's weights);
    any other timm model gets its kwargs, the drop-path rate, and ``img_size`` only where its
    registration says the input size is fixed (ViTs; a ResNet takes any size as it is).
    """
    name = name or cfg.model
    kwargs = dict(cfg.model_kwargs if kwargs is None else kwargs)
    if cfg.drop_path:
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
    if is_t2t_vit(name):
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
        if cfg.stem is not None:
            kwargs.setdefault("stem", cfg.stem)
        if cfg.img_size is not None:
            kwargs.setdefault("img_size", cfg.img_size)
        try:
            return t2t_vit.create_model(pretrained or name, pretrained=bool(pretrained), num_classes=num_classes,
                                        **kwargs)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. {num_heads: 7} on a width of 256
            raise T2TViTError(f"cannot build {name} with {kwargs}: {' '.join(str(err).split())}") from err
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if cfg.img_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs.setdefault("img_size", cfg.img_size)
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise T2TViTError(f"cannot build {name} with {kwargs}: {err}") from err


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four groups: {body, head} × {decay, no decay}.

    No weight decay on biases, norm weights (all 1-d tensors), the model's ``no_weight_decay()``
    names (cls token, position table) and frozen tensors (which are left out altogether). The
    body's lr is ``lr × body_lr_scale`` through timm's ``lr_scale`` group key, which every timm
    scheduler honours, so the paper's transfer recipe (head lr ×100 the body) needs no extra code.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    head_ids = set()
    if hasattr(model, "get_classifier"):
        head_ids = {id(p) for p in model.get_classifier().parameters()}
    tokenizer_ids = set()
    if (cfg.t2t_lr_scale != 1.0 or cfg.t2t_warmup_epochs > 0) and hasattr(model, "tokens_to_token"):
        tokenizer_ids = {id(p) for p in model.tokens_to_token.parameters()}
    groups: dict[tuple[bool, bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        groups.setdefault((id(param) in head_ids, no_decay, id(param) in tokenizer_ids), []).append(param)
    return [
        dict(params=params, weight_decay=0.0 if no_decay else cfg.weight_decay,
             lr_scale=(1.0 if is_head else cfg.body_lr_scale) * (cfg.t2t_lr_scale if tokenizer else 1.0),
             **({"ramp_epochs": cfg.t2t_warmup_epochs} if tokenizer else {}))
        for (is_head, no_decay, tokenizer), params in sorted(groups.items())
    ]


FUSED_OPTIMIZERS = ("adam", "adamw")  # timm names of torch optimizers with a fused CPU and CUDA kernel


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for group in groups:  # the scheduler multiplies by lr_scale itself, on its first update
        group["lr"] = cfg.lr
    kwargs = dict(momentum=cfg.momentum) if cfg.opt in ("sgd", "momentum") else {}
    if cfg.opt in FUSED_OPTIMIZERS and all(p.device.type in ("cpu", "cuda") for p in model.parameters()):
        # torch's fused kernel updates every tensor in one pass; the default loops per tensor, which
        # on a small model costs more than the update itself (benchmarks: docs/benchmarks.md)
        kwargs["fused"] = True
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """(warmup, cosine, cooldown) optimizer steps; ``epochs`` counts all three."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total // 2)
    cooldown = min(int(round(cfg.cooldown_epochs * steps_per_epoch)), (total - warmup) // 2)
    return warmup, max(1, total - warmup - cooldown), cooldown


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Cosine from ``lr`` to ``min_lr`` after a linear warmup from ``warmup_lr``; the cooldown
    holds ``min_lr`` (timm's scheduler stays at the minimum after its single cycle). Stepped per update."""
    warmup, cosine, _ = schedule_steps(cfg, steps_per_epoch)
    scheduler = RampedCosine(
        optimizer, t_initial=cosine, lr_min=cfg.min_lr, warmup_t=warmup, warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True, cycle_limit=1, t_in_epochs=False,
    )
    scheduler.steps_per_epoch = steps_per_epoch
    scheduler.step_update(0)
    return scheduler


class RampedCosine(CosineLRScheduler):
    """timm's cosine schedule, plus a linear ramp from 0 over ``ramp_epochs`` for the param groups
    that ask for one (the tokenizer with ``t2t_warmup_epochs``)."""

    steps_per_epoch: int = 1

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        super().step_update(num_updates, metric)
        for group in self.optimizer.param_groups:
            ramp_steps = group.get("ramp_epochs", 0) * self.steps_per_epoch
            if ramp_steps > 0:
                group["lr"] *= min(1.0, num_updates / ramp_steps)


def build_ema(model: nn.Module, cfg: TrainConfig) -> ModelEmaV3 | None:
    """EMA of the weights; with ``ema_warmup`` the decay rises as 1 - (1 + step)^(-2/3) up to ``ema_decay``."""
    if not cfg.ema:
        return None
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)


def build_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    if not cfg.augment or (cfg.mixup <= 0 and cfg.cutmix <= 0):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def build_criterion(cfg: TrainConfig, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    if cfg.augment and cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing)
    return nn.CrossEntropyLoss()


def augment_options(cfg: TrainConfig) -> dict | None:
    """The data module's timm ``create_transform`` options, or None for deterministic transforms."""
    if not cfg.augment:
        return None
    options = dict(auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, interpolation=cfg.train_interpolation,
                   color_jitter=cfg.color_jitter)
    for name in ("scale", "ratio", "hflip"):  # None: the data set's default
        value = getattr(cfg, name)
        if value is not None:
            options[name] = tuple(value) if isinstance(value, list) else value
    return options


def lr_now(optimizer: torch.optim.Optimizer) -> float:
    """The head's (largest) learning rate, for logs."""
    return max(group["lr"] for group in optimizer.param_groups)

