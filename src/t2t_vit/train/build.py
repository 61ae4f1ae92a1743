"""The build step: from a validated config to the parts a training loop needs, in one small object.

Order matters for exact resumption: data and loaders first (they own their RNG), then the model
from ``torch.manual_seed(seed)`` (identical weights on every rank), then everything that wraps it,
then the per-rank seeds that drop path and mixup draw from.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from t2t_vit.errors import T2TViTError
from t2t_vit.train import recipe
from t2t_vit.train.config import TrainConfig, ValidConfig
from t2t_vit.train.distributed import ShardedSampler, World
from t2t_vit.train.preempt import quiet_worker
from t2t_vit.train.sampling import EpochKeys, SeededDataset


@dataclass
class Parts:
    """Everything built once per run; the loop reads these and changes only their internal state."""

    net: nn.Module  # the bare model (checkpoints, EMA, evaluation)
    model: nn.Module  # what the loop calls: ``net`` under DDP and/or torch.compile
    ema: Any  # timm ModelEmaV3 or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module  # (logits, target) -> loss
    teacher: nn.Module | None  # a DistillationLoss: (images, logits, target) -> loss
    mixup: Callable | None
    sampler: ShardedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    batches: int  # micro-batches per epoch
    steps_per_epoch: int  # optimizer steps per epoch
    num_classes: int
    class_names: list[str]
    skipped_files: int
    data_config: dict[str, Any]  # the eval transform's input size, mean, std, crop, interpolation


def build(cfg: ValidConfig, world: World, log: Callable[[str], None]) -> Parts:
    """Data, loaders, model, EMA, optimizer, schedule, scaler, loss (and teacher), seeded as documented."""
    bundle, workers = load_data(cfg, log)
    set_threads(cfg, world, workers)
    sampler = ShardedSampler(len(bundle.train), world, cfg.batch_size, cfg.seed)
    batches = sampler.batches_per_epoch()
    steps_per_epoch = batches // cfg.accum_steps
    if steps_per_epoch == 0:
        raise T2TViTError(f"the training set has {len(bundle.train)} images, fewer than one optimizer step needs "
                          f"({cfg.batch_size} × {world.size} processes × {cfg.accum_steps} accumulation steps)")
    num_classes = cfg.num_classes or bundle.num_classes
    if num_classes < bundle.num_classes:
        raise T2TViTError(f"--num-classes {num_classes} is fewer than the {bundle.num_classes} classes of {cfg.data}")
    mixup = recipe.build_mixup(cfg, num_classes)
    if mixup is not None and cfg.batch_size % 2:
        raise T2TViTError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
    train_loader, val_loader = make_loaders(cfg, world, bundle, sampler, workers)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = make_model(cfg, num_classes, log).to(world.device)
    ema = recipe.build_ema(net, cfg)
    optimizer = recipe.build_optimizer(net, cfg)
    scheduler = recipe.build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(world.device.type, enabled=cfg.precision == "fp16")
    criterion = recipe.build_criterion(cfg, mixup)
    teacher = make_teacher(cfg, criterion, num_classes, world, log)
    model = wrap_model(cfg, net, world, log)
    torch.manual_seed(cfg.seed + world.rank)  # drop path / mixup differ per rank, as in timm
    np.random.seed((cfg.seed + world.rank) % 2**32)
    random.seed(cfg.seed + world.rank)
    return Parts(net, model, ema, optimizer, scheduler, scaler, criterion, teacher, mixup, sampler, train_loader,
                 val_loader, batches, steps_per_epoch, num_classes, list(bundle.class_names), len(bundle.skipped),
                 data_config(cfg, bundle))


def set_threads(cfg: TrainConfig, world: World, workers: int) -> None:
    """Intra-op threads: ``--threads``, or on CPU the cores the loader workers leave free (threads
    that compete with workers for the same cores spin and stall both)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world.device.type == "cpu" and not world.distributed:
        from t2t_vit.data import available_cores

        free = available_cores() - max(1, workers)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def load_data(cfg: TrainConfig, log: Callable[[str], None]):
    """The data bundle and the loader worker count (``--workers``, capped at the CPU count)."""
    from t2t_vit.data import create_datasets, resolve_workers

    bundle = create_datasets(cfg.data, cfg.img_size, recipe.augment_options(cfg), crop_pct=cfg.crop_pct,
                             interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
    if bundle.skipped:
        log(f"data: skipped {len(bundle.skipped)} unusable file(s) (each named above); "
            f"using {len(bundle.train)} train / {len(bundle.val)} val images")
    workers, note = resolve_workers(cfg.workers, bundle, training=True)
    if note:
        log(f"data: {note}")
    return bundle, workers


def make_loaders(cfg: TrainConfig, world: World, bundle, sampler: ShardedSampler, workers: int):
    """Train loader keyed by (epoch, index) so augmentation is reproducible; sharded val loader.

    Each loader has its own generator: creating an iterator must not draw from the global RNG, or a
    resumed run's drop path / mixup stream would be shifted by one draw.
    """
    args = dict(num_workers=workers, pin_memory=world.device.type == "cuda", persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=quiet_worker)
    train_set = SeededDataset(bundle.train, cfg.seed, seeded=cfg.augment)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=EpochKeys(sampler), **args)
    val_sampler = ShardedSampler(len(bundle.val), world, cfg.batch_size, cfg.seed, shuffle=False, drop_last=False)
    val_loader = DataLoader(bundle.val, batch_size=cfg.batch_size * 2, sampler=val_sampler, **args)
    return train_loader, val_loader


def make_model(cfg: ValidConfig, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """The named model; ``--finetune`` loads a checkpoint file into it (a new head where the class
    count differs) or builds it from a pretrained tag."""
    source = cfg.finetune_source
    if source is not None and source.kind == "tag":
        net = recipe.build_model(cfg, num_classes, pretrained=cfg.finetune)
        log(f"fine-tuning from the pretrained weights {cfg.finetune}")
    else:
        net = recipe.build_model(cfg, num_classes)
    if source is not None and source.kind == "file":
        from t2t_vit.checkpoint import load_checkpoint

        report = load_checkpoint(net, cfg.finetune)
        new_head = f" (new head: {report.replaced_head[0]} → {report.replaced_head[1]} classes)" \
            if report.replaced_head else ""
        log(f"fine-tuning from {cfg.finetune}{new_head}")
    if cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    return net


def make_teacher(cfg: ValidConfig, criterion: nn.Module, num_classes: int, world: World,
                 log: Callable[[str], None]) -> nn.Module | None:
    if not cfg.teacher:
        return None
    from t2t_vit.train.distill import DistillationLoss, build_teacher

    teacher = build_teacher(cfg, num_classes, world.device)
    log(f"distillation on: teacher {cfg.teacher}, {cfg.distill} targets, alpha {cfg.distill_alpha:g}"
        + (f", tau {cfg.distill_tau:g}" if cfg.distill == "soft" else ""))
    return DistillationLoss(criterion, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau)


def wrap_model(cfg: TrainConfig, net: nn.Module, world: World, log: Callable[[str], None]) -> nn.Module:
    model: nn.Module = net
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    if cfg.compile:
        log("compiling the model with torch.compile: the first steps and the first evaluation take "
            "longer while it compiles")
        model = torch.compile(model)
    return model


def data_config(cfg: TrainConfig, bundle) -> dict[str, Any]:
    """What a checkpoint stores so inference preprocesses as this run's evaluation did."""
    from t2t_vit.model import to_2tuple_size

    height, width = to_2tuple_size(cfg.img_size)
    return dict(input_size=[3, height, width], mean=[float(v) for v in bundle.mean],
                std=[float(v) for v in bundle.std], crop_pct=float(bundle.crop_pct), interpolation=cfg.interpolation)
