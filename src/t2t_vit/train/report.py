"""What a run leaves behind besides checkpoints: history.csv, curves.png, TensorBoard, metrics.json,
and the progress shown while it runs (tqdm on a terminal, plain periodic lines otherwise)."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from typing import Any

from t2t_vit.storage import atomic_write

HISTORY_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5",
                  "ema_val_loss", "ema_val_top1", "ema_val_top5", "train_seconds"]


def write_history(folder: str, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(folder, "history.csv"), text.getvalue().encode())


def write_json(path: str, values: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(values, indent=2) + "\n").encode())


def plot_curves(folder: str, rows: list[dict[str, Any]]) -> None:
    """curves.png: train/val loss and val top-1 (raw and EMA) per epoch."""
    from t2t_vit.plotting import pyplot, save_figure

    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["val_top1"] for r in rows], label="val top-1")
    if any(r.get("ema_val_top1") is not None for r in rows):
        ax_acc.plot(epochs, [r.get("ema_val_top1") for r in rows], label="EMA val top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(folder, "curves.png"), dpi=100)


class Progress:
    """A tqdm bar per epoch on a terminal; otherwise one line every ``every`` steps."""

    def __init__(self, enabled: bool, every: int) -> None:
        self.enabled, self.every = enabled, max(1, every)
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.last = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            dynamic_ncols=True, leave=False)

    def step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif step % self.every == 0:
            print(f"step {step}  loss {loss:.4f}  lr {lr:.2e}  {images_per_s:.0f} img/s", flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)
