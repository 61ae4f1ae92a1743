"""The training loop: single process or DDP under torchrun, resumable at any optimizer step.

Read top to bottom: :func:`train` locks the run directory and builds the parts
(:mod:`t2t_vit.train.build`); :class:`Run` then loops over epochs (:meth:`Run.train_epoch`, one
optimizer step per ``accum_steps`` micro-batches), evaluates the model and its EMA once per epoch
(:meth:`Run.end_epoch`) and writes checkpoints that resume exactly (:mod:`t2t_vit.train.state`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2t_vit.errors import MissingDependency, T2TViTError, require
from t2t_vit.metadata import checkpoint_metadata
from t2t_vit.storage import atomic_write
from t2t_vit.table import is_t2t_vit
from t2t_vit.train import preempt, recipe, report, rundir, state as ckpt
from t2t_vit.train.build import Parts, build
from t2t_vit.train.config import TrainConfig
from t2t_vit.train.distributed import World, all_reduce_sum, barrier, broadcast_flag, close_world, init_world
from t2t_vit.precision import autocast
from t2t_vit.train.evaluate import evaluate


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the dict also written to ``<output>/metrics.json``.

    Works in one process and under ``torchrun`` (DDP; rank 0 writes every file). A plain
    :class:`TrainConfig` is validated here; a :class:`~t2t_vit.train.config.ValidConfig` (from
    :func:`~t2t_vit.train.config.load_config` or the command line) was validated when it was built.
    """
    cfg = cfg.validate()
    world = init_world(cfg.device)
    try:
        log = report.Progress(world.is_main, cfg.log_every)
        out = rundir.shared_output(cfg, world)
        with contextlib.ExitStack() as stack:  # holds the run directory's lock until the run ends
            stem = rundir.claim(cfg, world, out, stack)
            parts = build(cfg, world, log.line)
            return Run(cfg, world, parts, out, log).run(stem)
    finally:
        close_world(world)


@dataclass
class Counters:
    """Where the run stands; saved in every training-state file and restored on resume."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # micro-batches consumed in the current epoch
    history: list = field(default_factory=list)  # one row per evaluation
    best: dict = field(default_factory=lambda: dict(top1=-1.0, epoch=-1))
    train_seconds: float = 0.0
    train_images: int = 0
    skipped: int = 0  # updates skipped for non-finite losses or gradients
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0])  # (loss sum, steps) of the current epoch


class Run:
    def __init__(self, cfg: TrainConfig, world: World, parts: Parts, out: str, log: report.Progress) -> None:
        self.cfg, self.world, self.parts, self.out, self.log = cfg, world, parts, out, log
        self.counters = Counters()
        self.tb = None  # the TensorBoard writer (rank 0), opened in run()
        self.stop = preempt.StopRequest(preempt.parse_signals(cfg.preempt_signals), announce=world.is_main)

    # ---- the run --------------------------------------------------------------------------------
    def run(self, stem: str | None) -> dict[str, Any]:
        cfg, parts = self.cfg, self.parts
        if stem:
            self.resume(stem)
        elif cfg.resume == "auto":
            self.log.line(f"no checkpoint in {self.out}; starting a new run")
        self.open_outputs()
        n_params = sum(p.numel() for p in parts.net.parameters()) / 1e6
        self.log.line(f"training {cfg.model} ({n_params:.2f}M params, {_size_text(cfg.img_size)} px) on {cfg.data}: "
                      f"{parts.num_classes} classes, {parts.steps_per_epoch} steps/epoch × {cfg.epochs} epochs, "
                      f"{self.world.size} process(es), output {self.out}")
        c = self.counters
        try:
            with self.stop:  # a stop signal ends the run after a step, with checkpoint-last saved
                while c.epoch < cfg.epochs and not self.done():
                    self.train_epoch()
                    if self.stop.agreed(self.world):
                        self.save("checkpoint-last")
                        raise self.stop.error(self.out, c.step, self.world)
                    # whole accumulation windows only: leftover micro-batches never make a step
                    if c.position >= parts.steps_per_epoch * cfg.accum_steps or self.done():
                        self.end_epoch()
                if not c.history or c.history[-1]["step"] != c.step:
                    # resumed from a checkpoint written just before a final evaluation that never finished
                    self.log.line(f"the evaluation after step {c.step} did not complete before the run stopped; "
                                  "evaluating now")
                    self.end_epoch()
        finally:
            if self.tb is not None:
                with contextlib.suppress(OSError):  # its folder may be gone (check_output says so)
                    self.tb.close()
        return self.finish()

    def open_outputs(self) -> None:
        self.out_id = rundir.identity(self.out)
        if not self.world.is_main:
            return
        import yaml

        config_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(os.path.join(self.out, "config.yaml"), config_text.encode())
        try:
            require("tensorboard", "tensorboard", "TensorBoard logging")
        except MissingDependency as err:  # optional: the run goes on with its CSV/JSON/plot outputs
            self.log.line(f"no TensorBoard events: {err}")
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.out, "tensorboard"))

    def done(self) -> bool:
        return self.cfg.max_steps is not None and self.counters.step >= self.cfg.max_steps

    # ---- one epoch ------------------------------------------------------------------------------
    def train_epoch(self) -> None:
        cfg, world, parts, c = self.cfg, self.world, self.parts, self.counters
        parts.model.train()
        parts.sampler.set_epoch(c.epoch, c.position)
        self.log.start_epoch(c.epoch, cfg.epochs, parts.steps_per_epoch, c.position // cfg.accum_steps)
        micro, bad_losses, consecutive = 0, False, 0
        start, images = time.perf_counter(), 0
        for images_cpu, target in parts.train_loader:
            if c.position >= parts.steps_per_epoch * cfg.accum_steps:
                break  # leftover micro-batches that cannot fill an accumulation window
            micro += 1
            sync = micro % cfg.accum_steps == 0
            loss_value = self.forward_backward(images_cpu, target, sync)
            bad_losses |= not np.isfinite(loss_value)
            c.position += 1
            images += images_cpu.shape[0] * world.size
            if not sync:
                continue
            consecutive = self.after_update(self.optimizer_step(bad_losses), loss_value, consecutive)
            bad_losses = False
            self.log.step(c.step, loss_value, recipe.lr_now(parts.optimizer), images / max(time.perf_counter() - start, 1e-9))
            if cfg.save_every_steps and c.step % cfg.save_every_steps == 0:
                self.account(start, images)
                start, images = time.perf_counter(), 0
                self.save("checkpoint-last")
            if self.done() or self.stop.agreed(world):
                break
        self.account(start, images)
        self.log.end_epoch()

    def forward_backward(self, images_cpu: torch.Tensor, target: torch.Tensor, sync: bool) -> float:
        """One micro-batch: loss (scaled by 1/accum_steps) backpropagated; DDP syncs on the last one."""
        cfg, world, parts = self.cfg, self.world, self.parts
        x, y = images_cpu.to(world.device, non_blocking=True), target.to(world.device, non_blocking=True)
        if parts.mixup is not None:
            x, y = parts.mixup(x, y)
        no_sync = world.distributed and not sync
        with parts.model.no_sync() if no_sync else contextlib.nullcontext(), autocast(world.device, cfg.precision):
            logits = parts.model(x)
            loss = parts.teacher(x, logits, y) if parts.teacher else parts.criterion(logits, y)
        parts.scaler.scale(loss / cfg.accum_steps).backward()
        return loss.item()

    def optimizer_step(self, bad_losses: bool) -> bool:
        """Clip, check and apply the accumulated gradients; False when the update was skipped."""
        cfg, parts, c = self.cfg, self.parts, self.counters
        parts.scaler.unscale_(parts.optimizer)
        params = [p for g in parts.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad or float("inf"))
        bad = bad_losses or not bool(torch.isfinite(norm))
        if self.world.distributed:
            bad = broadcast_flag(bad, self.world)
        if cfg.precision == "fp16" and not bad_losses:
            bad = False  # GradScaler skips overflowing fp16 steps and lowers its scale by itself
        if bad:
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scaler.update()
            return False
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        c.step += 1
        parts.scheduler.step_update(c.step)
        if parts.ema is not None:
            parts.ema.update(parts.net, step=c.step)
        return True

    def after_update(self, applied: bool, loss_value: float, consecutive: int) -> int:
        """Book-keeping after an optimizer step; returns the new count of consecutive skipped steps."""
        cfg, c = self.cfg, self.counters
        if applied:
            c.epoch_sums[0] += loss_value
            c.epoch_sums[1] += 1
            if self.tb is not None and c.step % cfg.log_every == 0:
                self.tb.add_scalar("train/loss", loss_value, c.step)
                self.tb.add_scalar("train/lr", recipe.lr_now(self.parts.optimizer), c.step)
            return 0
        consecutive += 1
        c.skipped += 1
        self.log.line(f"step {c.step + 1}: non-finite loss or gradients, update skipped "
                      f"({consecutive}/{cfg.nonfinite_patience})")
        if consecutive >= cfg.nonfinite_patience:
            self.log.end_epoch()
            last = os.path.join(self.out, "checkpoint-last.safetensors")
            kept = f"the last good checkpoint {last} is kept" if os.path.isfile(last) else "no checkpoint was written yet"
            raise T2TViTError(f"training stopped: the loss or gradients were not finite for {consecutive} steps in a "
                              f"row after step {c.step}; {kept}; try a lower --lr, --clip-grad 1.0 or "
                              "--precision fp32/bf16")
        return consecutive

    def account(self, start: float, images: int) -> None:
        self.counters.train_seconds += time.perf_counter() - start
        self.counters.train_images += images

    # ---- evaluation -----------------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Evaluate the model and its EMA once, log a history row, checkpoint (last, and best)."""
        cfg, world, parts, c = self.cfg, self.world, self.parts, self.counters
        self.check_output()
        raw = evaluate(parts.net, parts.val_loader, world.device, cfg.precision, world)
        ema = evaluate(parts.ema.module, parts.val_loader, world.device, cfg.precision, world) if parts.ema else None
        done_fraction = c.position / max(1, parts.steps_per_epoch * cfg.accum_steps)
        loss_sum, count = all_reduce_sum(list(c.epoch_sums), world)  # train loss over all ranks
        row = dict(epoch=round(c.epoch + min(1.0, done_fraction), 4), step=c.step, lr=recipe.lr_now(parts.optimizer),
                   train_loss=loss_sum / max(1, count), val_loss=raw["loss"], val_top1=raw["top1"], val_top5=raw["top5"],
                   ema_val_loss=ema and ema["loss"], ema_val_top1=ema and ema["top1"], ema_val_top5=ema and ema["top5"],
                   train_seconds=round(c.train_seconds, 3))
        c.history.append(row)
        ema_text = f"  EMA top-1 {ema['top1']:.2f}%" if ema else ""
        self.log.line(f"epoch {row['epoch']:g}/{cfg.epochs}  step {c.step}  train loss {row['train_loss']:.4f}  "
                      f"val loss {raw['loss']:.4f}  top-1 {raw['top1']:.2f}%  top-5 {raw['top5']:.2f}%{ema_text}")
        self.write_epoch_files(row)
        if c.position >= parts.batches or done_fraction >= 1:
            c.epoch, c.position, c.epoch_sums = c.epoch + 1, 0, [0.0, 0.0]
        best_now = max(raw["top1"], ema["top1"] if ema else -1.0)
        is_best = best_now > c.best["top1"]
        if is_best:
            c.best = dict(top1=best_now, epoch=row["epoch"])
        self.save("checkpoint-last")
        if is_best:
            self.save("checkpoint-best", with_state=False)

    def write_epoch_files(self, row: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        if self.tb is not None:  # TensorBoard is optional; history.csv and curves.png are not
            for key in ("train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
                if row[key] is not None:
                    self.tb.add_scalar(key.replace("_", "/", 1), row[key], self.counters.step)
        report.write_history(self.out, self.counters.history)
        report.plot_curves(self.out, self.counters.history)

    def preferred(self) -> str:
        last = self.counters.history[-1] if self.counters.history else {}
        ema_top1 = last.get("ema_val_top1")
        return "ema" if ema_top1 is not None and ema_top1 > last.get("val_top1", 0.0) else "model"

    # ---- checkpoints ---------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        cfg, parts = self.cfg, self.parts
        return checkpoint_metadata(model=cfg.model, model_kwargs=cfg.model_kwargs, num_classes=parts.num_classes,
                                   img_size=cfg.img_size, stem=cfg.stem if is_t2t_vit(cfg.model) else "",
                                   class_names=parts.class_names, preferred=self.preferred(),
                                   step=self.counters.step, data_config=parts.data_config, dataset=str(cfg.data))

    def check_output(self) -> None:
        """Stop (every rank) when the run directory was deleted or replaced: writing on would create a
        new one without its lock and config, and TensorBoard would fail with a traceback."""
        gone = self.world.is_main and rundir.identity(self.out) != self.out_id
        if broadcast_flag(gone, self.world):
            raise T2TViTError(f"the output directory {self.out} was deleted or replaced during the run; stopping "
                              f"at step {self.counters.step} (restore it and --resume auto, or start a new --output)")

    def save(self, name: str, with_state: bool = True) -> None:
        """Every rank calls this (RNG states are gathered); rank 0 writes."""
        self.check_output()
        rng = ckpt.rng_state()
        rng_all = [rng]
        if self.world.distributed:
            rng_all = [None] * self.world.size
            torch.distributed.all_gather_object(rng_all, rng)
        if self.world.is_main:
            parts = self.parts
            st = None
            if with_state:
                st = dict(dataclasses.asdict(self.counters), optimizer=parts.optimizer.state_dict(),
                          scheduler=parts.scheduler.state_dict(), scaler=parts.scaler.state_dict(), rng=rng_all,
                          config=self.cfg.to_dict())
            ckpt.save_checkpoint(os.path.join(self.out, name), parts.net, parts.ema.module if parts.ema else None,
                                 self.meta(), st)
        barrier(self.world)

    def resume(self, stem: str) -> None:
        parts = self.parts
        weights, ema_weights, st = ckpt.load_resume(stem)
        ckpt.check_state(st, stem)
        ckpt.load_weights_for_resume(parts.net, weights, stem)
        if parts.ema is not None and ema_weights:
            ckpt.load_weights_for_resume(parts.ema.module, ema_weights, stem, "EMA")
        try:
            parts.optimizer.load_state_dict(st["optimizer"])
            parts.scheduler.load_state_dict(st["scheduler"])
            parts.scaler.load_state_dict(st["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise T2TViTError(f"cannot resume from {stem}: its optimizer state does not fit this run "
                              f"({' '.join(str(err).split())[:200]}); resume with the run's own config.yaml") from err
        restored = Counters(**{f.name: st[f.name] for f in dataclasses.fields(Counters)})
        restored.history, restored.best, restored.epoch_sums = list(st["history"]), dict(st["best"]), list(st["epoch_sums"])
        for f in dataclasses.fields(Counters):  # in place: the loop holds this object
            setattr(self.counters, f.name, getattr(restored, f.name))
        rank = self.world.rank
        ckpt.set_rng_state(st["rng"][rank] if rank < len(st["rng"]) else st["rng"][0])
        c = self.counters
        self.log.line(f"resumed from {stem} at step {c.step} (epoch {c.epoch + 1}, batch {c.position})")
        changes = rundir.resume_changes(self.cfg, stem)
        if changes:
            self.log.line(f"resuming with {', '.join(changes)}")

    # ---- the end ------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        c = self.counters
        last = c.history[-1] if c.history else {}
        prefix = "ema_val_" if self.preferred() == "ema" else "val_"
        metrics = dict(
            val_top1=last.get(prefix + "top1"), val_top5=last.get(prefix + "top5"), val_loss=last.get(prefix + "loss"),
            preferred=self.preferred(),
            val_top1_raw=last.get("val_top1"), val_top5_raw=last.get("val_top5"),
            val_top1_ema=last.get("ema_val_top1"), val_top5_ema=last.get("ema_val_top5"),
            best_val_top1=c.best["top1"], best_epoch=c.best["epoch"],
            epochs=last.get("epoch", 0), steps=c.step, skipped_steps=c.skipped, skipped_files=self.parts.skipped_files,
            train_seconds=round(c.train_seconds, 3), train_images_per_s=c.train_images / max(c.train_seconds, 1e-9),
            world_size=self.world.size, model=self.cfg.model, data=self.cfg.data, output=self.out,
        )
        if self.world.is_main:
            report.write_json(os.path.join(self.out, "metrics.json"), metrics)
            self.log.line(
                f"done: {metrics['steps']} steps, {metrics['epochs']:g} epochs, val top-1 {metrics['val_top1']:.2f}% "
                f"top-5 {metrics['val_top5']:.2f}% ({metrics['preferred']} weights), "
                f"{metrics['train_images_per_s']:.0f} train img/s; files in {self.out}")
        return metrics


def _size_text(img_size: Any) -> str:
    return "×".join(str(v) for v in img_size) if isinstance(img_size, (list, tuple)) else str(img_size)
