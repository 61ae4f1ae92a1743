"""The training loop: single process or DDP under torchrun, resumable at any optimizer step."""
from __future__ import annotations

import contextlib
import glob
import os
import random
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from t2t_vit.errors import T2TViTError
from t2t_vit.storage import atomic_write
from t2t_vit.train import recipe, report, state as ckpt
from t2t_vit.train.config import TrainConfig
from t2t_vit.train.distributed import (ShardedSampler, World, all_reduce_sum, barrier, broadcast_flag, close_world,
                                      init_world)
from t2t_vit.train.evaluate import autocast, evaluate, load_weights


class SeededDataset(Dataset):
    """Train-set wrapper whose augmentation randomness depends only on (seed, epoch, index), so a
    resumed run, any worker count and any number of processes see the same augmented images.
    The sampler yields (epoch, index) keys, which lets loader workers persist across epochs."""

    def __init__(self, dataset: Dataset, seed: int, seeded: bool) -> None:
        self.dataset, self.seed, self.seeded = dataset, seed, seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.seeded:
            return self.dataset[index]
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        in_worker = torch.utils.data.get_worker_info() is not None
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            py_state, np_state = (None, None) if in_worker else (random.getstate(), np.random.get_state())
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            item = self.dataset[index]
            if not in_worker:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return item


class EpochKeys(torch.utils.data.Sampler):
    def __init__(self, sampler: ShardedSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        return ((self.sampler.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the dict also written to ``<output>/metrics.json``.

    Works in one process and under ``torchrun`` (DDP; rank 0 writes every file).
    """
    cfg.validate()
    world = init_world(cfg.device)
    owns_group = world.distributed
    try:
        return Run(cfg, world).run()
    finally:
        if owns_group:
            close_world(world)


class Run:
    def __init__(self, cfg: TrainConfig, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.out = _shared_output(cfg, world)
        self.log = report.Progress(world.is_main, cfg.log_every)

    # ---- set-up ---------------------------------------------------------------------------
    def prepare_output(self) -> str | None:
        """Create the output dir, check it is writable, and return the checkpoint stem to resume."""
        cfg, last = self.cfg, os.path.join(self.out, "checkpoint-last")
        if self.world.is_main:
            try:
                os.makedirs(self.out, exist_ok=True)
                tempfile.TemporaryFile(dir=self.out).close()
            except OSError as err:
                raise T2TViTError(f"cannot write to output directory {self.out}: {err.strerror or err}") from None
        if cfg.resume == "auto":
            return last if os.path.isfile(last + ".safetensors") else None
        if cfg.resume:
            return ckpt.checkpoint_stem(cfg.resume)
        if os.path.isfile(last + ".safetensors"):
            raise T2TViTError(f"{self.out} already holds a run; pass --resume auto to continue it or choose another --output")
        return None

    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif world.device.type == "cpu" and not world.distributed:
            # Intra-op threads competing with loader workers for the same cores spin and stall
            # (measured: 20× slower with 2 threads + 1 worker on a busy 2-core machine).
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - max(1, cfg.workers))))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        from t2t_vit.data import create_datasets

        bundle = create_datasets(cfg.data, cfg.img_size, recipe.augment_options(cfg), crop_pct=cfg.crop_pct,
                                 interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
        self.skipped_files = len(bundle.skipped)
        if bundle.skipped:
            self.log.line(f"data: skipped {len(bundle.skipped)} unusable file(s) (each named above); "
                          f"using {len(bundle.train)} train / {len(bundle.val)} val images")
        self.class_names = list(bundle.class_names)
        self.num_classes = cfg.num_classes or bundle.num_classes
        self.sampler = ShardedSampler(len(bundle.train), world, cfg.batch_size, cfg.seed)
        self.batches = self.sampler.batches_per_epoch()
        self.steps_per_epoch = self.batches // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise T2TViTError(f"the training set has {len(bundle.train)} images, fewer than one optimizer step needs "
                              f"({cfg.batch_size} × {world.size} processes × {cfg.accum_steps} accumulation steps)")
        self.mixup = recipe.build_mixup(cfg, self.num_classes)
        if self.mixup is not None and cfg.batch_size % 2:
            raise T2TViTError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
        pin = world.device.type == "cuda"
        # Own generators: creating a loader iterator must not draw from the global RNG, or a resumed
        # run's drop path / mixup stream would be shifted by one draw.
        loader_args = dict(num_workers=cfg.workers, pin_memory=pin, persistent_workers=cfg.workers > 0,
                           generator=torch.Generator().manual_seed(cfg.seed))
        train_set = SeededDataset(bundle.train, cfg.seed, seeded=cfg.augment)
        self.train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=EpochKeys(self.sampler), **loader_args)
        val_sampler = ShardedSampler(len(bundle.val), world, cfg.batch_size, cfg.seed, shuffle=False, drop_last=False)
        self.val_loader = DataLoader(bundle.val, batch_size=cfg.batch_size * 2, sampler=val_sampler, **loader_args)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = recipe.build_model(cfg, self.num_classes)
        if cfg.finetune:
            info = load_weights(net, cfg.finetune, drop_head=True)
            self.log.line(f"fine-tuning from {cfg.finetune}" + (f" (new head: {', '.join(info['skipped'])})" if info["skipped"] else ""))
        if cfg.grad_checkpointing:
            net.set_grad_checkpointing(True)
        self.net = net.to(world.device)
        self.ema = recipe.build_ema(self.net, cfg)
        self.optimizer = recipe.build_optimizer(self.net, cfg)
        self.scheduler = recipe.build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=cfg.precision == "fp16")
        self.criterion = recipe.build_criterion(cfg, self.mixup)
        self.teacher = None
        if cfg.teacher:
            from t2t_vit.train.distill import DistillationLoss, build_teacher

            self.teacher = DistillationLoss(self.criterion, build_teacher(cfg, self.num_classes, world.device),
                                            cfg.distill, cfg.distill_alpha, cfg.distill_tau)
        model: nn.Module = self.net
        if world.distributed:
            model = DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
        self.model = torch.compile(model) if cfg.compile else model
        torch.manual_seed(cfg.seed + world.rank)  # drop path / mixup differ per rank, as in timm
        np.random.seed((cfg.seed + world.rank) % 2**32)
        random.seed(cfg.seed + world.rank)
        self.step, self.epoch, self.position = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best = dict(top1=-1.0, epoch=-1)
        self.train_seconds, self.train_images, self.skipped = 0.0, 0, 0

    def resume(self, stem: str) -> None:
        weights, ema_weights, st = ckpt.load_resume(stem)
        load = self.net.load_state_dict(weights, strict=True)
        del load
        if self.ema is not None and ema_weights:
            self.ema.module.load_state_dict(ema_weights)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        self.step, self.epoch, self.position = st["step"], st["epoch"], st["position"]
        self.history, self.best = list(st["history"]), dict(st["best"])
        self.train_seconds, self.train_images, self.skipped = st["train_seconds"], st["train_images"], st["skipped"]
        self.epoch_sums = list(st["epoch_sums"])
        ckpt.set_rng_state(st["rng"][self.world.rank] if self.world.rank < len(st["rng"]) else st["rng"][0])
        self.log.line(f"resumed from {stem} at step {self.step} (epoch {self.epoch + 1}, batch {self.position})")

    # ---- checkpoints ---------------------------------------------------------------------------
    def meta(self, preferred: str) -> dict[str, Any]:
        cfg = self.cfg
        is_t2t = cfg.model in __import__("t2t_vit").list_models()
        return dict(model=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=str(self.num_classes),
                    img_size=cfg.img_size, stem=cfg.stem if is_t2t else "", class_names=self.class_names,
                    preferred=preferred, step=str(self.step))

    def save(self, name: str, with_state: bool = True) -> None:
        """Every rank calls this (RNG states are gathered); rank 0 writes."""
        rng = ckpt.rng_state()
        if self.world.distributed:
            gathered: list[Any] = [None] * self.world.size
            torch.distributed.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        if self.world.is_main:
            st = None
            if with_state:
                st = dict(step=self.step, epoch=self.epoch, position=self.position, optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), rng=rng_all,
                          history=self.history, best=self.best, train_seconds=self.train_seconds,
                          train_images=self.train_images, skipped=self.skipped, epoch_sums=self.epoch_sums,
                          config=self.cfg.to_dict())
            ckpt.save_checkpoint(os.path.join(self.out, name), self.net, self.ema.module if self.ema else None,
                                 self.meta(self.preferred()), st)
        barrier(self.world)

    def preferred(self) -> str:
        last = self.history[-1] if self.history else {}
        ema_top1 = last.get("ema_val_top1")
        return "ema" if ema_top1 is not None and ema_top1 > last.get("val_top1", 0.0) else "model"

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        stem = self.prepare_output()
        self.setup()
        self.epoch_sums = [0.0, 0.0]  # (loss sum, batches) of the current epoch
        if stem:
            self.resume(stem)
        elif cfg.resume == "auto":
            self.log.line(f"no checkpoint in {self.out}; starting a new run")
        if self.world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            import yaml

            config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            atomic_write(os.path.join(self.out, "config.yaml"), config_text.encode())
            self.tb = SummaryWriter(os.path.join(self.out, "tensorboard"))
        n_params = sum(p.numel() for p in self.net.parameters()) / 1e6
        self.log.line(f"training {cfg.model} ({n_params:.2f}M params) on {cfg.data}: {self.num_classes} classes, "
                      f"{self.steps_per_epoch} steps/epoch × {cfg.epochs} epochs, {self.world.size} process(es), "
                      f"output {self.out}")
        try:
            while self.epoch < cfg.epochs and not self.done():
                self.train_epoch()
                if self.position >= self.batches or self.done():
                    self.end_epoch()
        finally:
            if self.world.is_main:
                self.tb.close()
        return self.finish()

    def done(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def train_epoch(self) -> None:
        cfg, world = self.cfg, self.world
        self.model.train()
        self.sampler.set_epoch(self.epoch, self.position)
        self.log.start_epoch(self.epoch, cfg.epochs, self.steps_per_epoch, self.position // cfg.accum_steps)
        micro, bad_losses, consecutive = 0, False, 0
        start, images = time.perf_counter(), 0
        for images_cpu, target in self.train_loader:
            if self.position >= self.steps_per_epoch * cfg.accum_steps:
                break  # leftover micro-batches that cannot fill an accumulation window
            x, y = images_cpu.to(world.device, non_blocking=True), target.to(world.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            micro += 1
            sync = micro % cfg.accum_steps == 0
            context = self.model.no_sync() if (world.distributed and not sync) else contextlib.nullcontext()
            with context, autocast(world.device, cfg.precision):
                logits = self.model(x)
                loss = self.teacher(x, logits, y) if self.teacher else self.criterion(logits, y)
            loss_value = loss.item()
            bad_losses |= not np.isfinite(loss_value)
            self.scaler.scale(loss / cfg.accum_steps).backward()
            self.position += 1
            images += x.shape[0] * world.size
            if not sync:
                continue
            if self.optimizer_step(bad_losses):
                consecutive = 0
                self.epoch_sums[0] += loss_value
                self.epoch_sums[1] += 1
            else:
                consecutive += 1
                self.skipped += 1
                self.log.line(f"step {self.step + 1}: non-finite loss or gradients, update skipped ({consecutive}/{cfg.nonfinite_patience})")
                if consecutive >= cfg.nonfinite_patience:
                    self.log.end_epoch()
                    raise T2TViTError(self.nonfinite_message(consecutive))
            bad_losses = False
            elapsed = time.perf_counter() - start
            self.log.step(self.step, loss_value, recipe.lr_now(self.optimizer), images / max(elapsed, 1e-9))
            if world.is_main and self.step % cfg.log_every == 0:
                self.tb.add_scalar("train/loss", loss_value, self.step)
                self.tb.add_scalar("train/lr", recipe.lr_now(self.optimizer), self.step)
            if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                self.account(start, images)
                start, images = time.perf_counter(), 0
                self.save("checkpoint-last")
            if self.done():
                break
        self.account(start, images)
        self.log.end_epoch()

    def account(self, start: float, images: int) -> None:
        self.train_seconds += time.perf_counter() - start
        self.train_images += images

    def optimizer_step(self, bad_losses: bool) -> bool:
        """Clip, check and apply the accumulated gradients; False when the update was skipped."""
        cfg = self.cfg
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
        bad = bad_losses or not bool(torch.isfinite(norm))
        if self.world.distributed:
            bad = broadcast_flag(bad, self.world)
        if cfg.precision == "fp16" and not bad_losses:
            bad = False  # GradScaler skips overflowing fp16 steps and lowers its scale by itself
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.net, step=self.step)
        return True

    def nonfinite_message(self, count: int) -> str:
        last = os.path.join(self.out, "checkpoint-last.safetensors")
        kept = f"the last good checkpoint {last} is kept" if os.path.isfile(last) else "no checkpoint was written yet"
        return (f"training stopped: the loss or gradients were not finite for {count} steps in a row after step "
                f"{self.step}; {kept}; try a lower --lr, --clip-grad 1.0 or --precision fp32/bf16")

    def end_epoch(self) -> None:
        cfg, world = self.cfg, self.world
        raw = evaluate(self.net, self.val_loader, world.device, cfg.precision, world)
        ema = evaluate(self.ema.module, self.val_loader, world.device, cfg.precision, world) if self.ema else None
        done_fraction = self.position / max(1, self.steps_per_epoch * cfg.accum_steps)
        loss_sum, count = all_reduce_sum(list(self.epoch_sums), world)  # train loss over all ranks
        row = dict(epoch=round(self.epoch + min(1.0, done_fraction), 4), step=self.step, lr=recipe.lr_now(self.optimizer),
                   train_loss=loss_sum / max(1, count), val_loss=raw["loss"], val_top1=raw["top1"], val_top5=raw["top5"],
                   ema_val_loss=ema and ema["loss"], ema_val_top1=ema and ema["top1"], ema_val_top5=ema and ema["top5"],
                   train_seconds=round(self.train_seconds, 3))
        self.history.append(row)
        ema_text = f"  EMA top-1 {ema['top1']:.2f}%" if ema else ""
        self.log.line(f"epoch {row['epoch']:g}/{cfg.epochs}  step {self.step}  train loss {row['train_loss']:.4f}  "
                      f"val loss {raw['loss']:.4f}  top-1 {raw['top1']:.2f}%  top-5 {raw['top5']:.2f}%{ema_text}")
        if world.is_main:
            for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
                if row[key] is not None:
                    self.tb.add_scalar(key.replace("_", "/", 1), row[key], self.step)
            report.write_history(self.out, self.history)
            report.plot_curves(self.out, self.history)
        if self.position >= self.batches or done_fraction >= 1:
            self.epoch, self.position, self.epoch_sums = self.epoch + 1, 0, [0.0, 0.0]
        best_now = max(raw["top1"], ema["top1"] if ema else -1.0)
        is_best = best_now > self.best["top1"]
        if is_best:
            self.best = dict(top1=best_now, epoch=row["epoch"])
        self.save("checkpoint-last")
        if is_best:
            self.save("checkpoint-best", with_state=False)

    def finish(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        use_ema = self.preferred() == "ema"
        metrics = dict(
            val_top1=last.get("ema_val_top1" if use_ema else "val_top1"),
            val_top5=last.get("ema_val_top5" if use_ema else "val_top5"),
            val_loss=last.get("ema_val_loss" if use_ema else "val_loss"),
            preferred=self.preferred(),
            val_top1_raw=last.get("val_top1"), val_top5_raw=last.get("val_top5"),
            val_top1_ema=last.get("ema_val_top1"), val_top5_ema=last.get("ema_val_top5"),
            best_val_top1=self.best["top1"], best_epoch=self.best["epoch"],
            epochs=last.get("epoch", 0), steps=self.step, skipped_steps=self.skipped, skipped_files=self.skipped_files,
            train_seconds=round(self.train_seconds, 3),
            train_images_per_s=self.train_images / max(self.train_seconds, 1e-9),
            world_size=self.world.size, model=self.cfg.model, data=self.cfg.data, output=self.out,
        )
        if self.world.is_main:
            report.write_json(os.path.join(self.out, "metrics.json"), metrics)
            self.log.line(
                f"done: {metrics['steps']} steps, {metrics['epochs']:g} epochs, val top-1 {metrics['val_top1']:.2f}% "
                f"top-5 {metrics['val_top5']:.2f}% ({metrics['preferred']} weights), "
                f"{metrics['train_images_per_s']:.0f} train img/s; files in {self.out}")
        return metrics


def _shared_output(cfg: TrainConfig, world: World) -> str:
    """The output dir, decided once by rank 0 (timestamps could differ between ranks)."""
    if cfg.output:
        out = cfg.output
    elif cfg.resume == "auto":
        pattern = cfg.resolved_output().rsplit("-", 2)[0] + "-*"
        found = sorted(p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "checkpoint-last.safetensors")))
        out = found[-1] if found else cfg.resolved_output()
    else:
        out = cfg.resolved_output()
    if world.distributed:
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        out = box[0]
    return out
