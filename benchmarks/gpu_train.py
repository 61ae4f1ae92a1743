"""T2T-ViT-14 training throughput on a GPU through the real trainer: images/s, MFU, peak memory and
the share of each step spent waiting for the loader.

    python benchmarks/gpu_train.py --steps 300 --batch 128 --workers 14             # on a GPU machine
    python benchmarks/gpu_train.py --steps 300 --batch 128 --workers 14 --compile
    python benchmarks/gpu_train.py --dry-run     # CPU, tiny model, a few steps: the same code path (tests)

The run is ``t2t_vit.train`` with the paper's recipe (configs/imagenet_t2t_vit_14.yaml: bf16
autocast, AdamW, RandAugment, random erasing, mixup/cutmix, EMA) on an ImageFolder of real 500×375
JPEGs (benchmarks/input_pipeline.py's photographs, 10 classes), plus fused AdamW on the device and
optionally ``torch.compile``. The loader is wrapped to time how long each step waits for its batch;
images/s and the loader share are taken over steady steps (the first ``--warmup`` steps and the
first step of every epoch are left out: compilation, worker start). MFU = 3 × forward FLOPs per
image (every matmul and convolution counted) × images/s ÷ the device's dense bf16 peak
(``--peak-tflops``, or a table of known GPUs); the measured bf16 matmul rate is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import build_jpegs  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
TINY = dict(model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, token_dim=16), img_size=32, stem="small")


class TimedLoader:
    """Iterates a DataLoader, recording per epoch when each batch arrived and how long it was waited for."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.epochs: list[list[tuple[float, float]]] = []  # per epoch: (arrival time, wait) per batch

    def __iter__(self):
        marks: list[tuple[float, float]] = []
        self.epochs.append(marks)
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            marks.append((now, now - start))
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def steady(self, warmup: int) -> tuple[int, float, float]:
        """(batches, seconds, seconds waited) between batch arrivals, skipping the first ``warmup``
        batches of the run and the first batch of every epoch."""
        batches, seconds, waited, seen = 0, 0.0, 0.0, 0
        for marks in self.epochs:
            for (t0, _), (t1, wait) in zip(marks, marks[1:]):
                seen += 1
                if seen > warmup:
                    batches, seconds, waited = batches + 1, seconds + (t1 - t0), waited + wait
            seen += 1 if marks else 0
        return batches, seconds, waited


def image_folder(root: Path, size: tuple[int, int], train_per_class: int, val_per_class: int) -> Path:
    """``root/train/<photo>/*.jpg`` and ``root/val/<photo>/*.jpg`` from input_pipeline's photographs."""
    for split, count, seed in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        flat = build_jpegs(root / f"{split}-flat", size, per_photo=count, seed=seed)
        for path in flat:
            folder = root / split / path.name.split("-")[0]
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / path.name)
        (root / f"{split}-flat").rmdir()
    return root


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run(args: argparse.Namespace) -> dict:
    from t2t_vit.bench.measure import forward_flops, matmul_rate
    from t2t_vit.train import load_config
    from t2t_vit.train.build import build
    from t2t_vit.train.distributed import close_world, init_world
    from t2t_vit.train.engine import Run
    from t2t_vit.train.report import Progress

    work = Path(args.folder or tempfile.mkdtemp(prefix="t2t-gpu-train-"))
    size = (64, 48) if args.dry_run else (500, 375)
    if not (work / "data" / "train").is_dir():
        image_folder(work / "data", size, 2 if args.dry_run else 128, 1 if args.dry_run else 10)
    overrides = dict(data=str(work / "data"), batch_size=args.batch, max_steps=args.steps, epochs=10_000,
                     workers=args.workers, compile=args.compile, output=str(work / f"run-{time.time_ns()}"),
                     log_every=50, device="cpu" if args.dry_run else "auto", **(TINY if args.dry_run else {}))
    cfg = load_config("imagenet_t2t_vit_14", overrides)
    world = init_world(cfg.device)
    try:
        log = Progress(world.is_main, cfg.log_every)
        parts = build(cfg, world, log.line)
        fused = _fuse_adamw(parts.optimizer)
        parts.train_loader = loader = TimedLoader(parts.train_loader)
        if world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(world.device)
        os.makedirs(cfg.output, exist_ok=True)
        metrics = Run(cfg, world, parts, cfg.output, log).run(None)
        peak_mb = torch.cuda.max_memory_allocated(world.device) / 2**20 if world.device.type == "cuda" else None
    finally:
        close_world(world)
    batches, seconds, waited = loader.steady(args.warmup)
    images_per_s = batches * args.batch * world.size / seconds if seconds else None
    flops = 3 * forward_flops(cfg.model, cfg.img_size, model=parts.net)
    peak = peak_tflops(world.device, args.peak_tflops)
    mm = matmul_rate(torch.bfloat16, world.device, size=256 if args.dry_run else None, repeats=3) / 1e3
    return dict(model=cfg.model, img_size=cfg.img_size, batch=args.batch, steps=metrics["steps"],
                steady_steps=batches, images_per_s=images_per_s, loader_share=waited / seconds if seconds else None,
                train_flops_per_image=flops, peak_tflops=peak,
                mfu=flops * images_per_s / (peak * 1e12) if peak and images_per_s else None,
                bf16_matmul_tflops=mm, of_matmul_rate=flops * images_per_s / (mm * 1e12) if images_per_s else None,
                peak_memory_mb=peak_mb, fused_adamw=fused, compile=args.compile, workers=cfg.workers,
                device=torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
                dry_run=args.dry_run, torch=torch.__version__, command=" ".join(sys.argv))


def _fuse_adamw(optimizer: torch.optim.Optimizer) -> bool:
    """Switch torch's AdamW to its fused kernel (one launch for all parameters): the trainer builds it
    through timm, which leaves torch's default (foreach); bf16 autocast keeps fp32 parameters and no
    GradScaler, which is what the fused kernel needs."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    return True


def summary(r: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rate = "n/a" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
    memory = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f} MB"
    return (f"{r['model']} {r['img_size']} px, batch {r['batch']}, {r['device']}: {rate} img/s over "
            f"{r['steady_steps']} steady steps, MFU {pct(r['mfu'])} ({pct(r['of_matmul_rate'])} of the measured "
            f"bf16 matmul rate), loader wait {pct(r['loader_share'])} of the step, peak memory {memory}, "
            f"fused AdamW {r['fused_adamw']}, compile {r['compile']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="images per step (one GPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's 8)")
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the steady figures")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--folder", default=None, help="where the JPEGs and the run go (default: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model and images, a few steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.dry_run:
        args.steps, args.batch, args.warmup = min(args.steps, 6), min(args.batch, 4), min(args.warmup, 1)
        args.workers = 1 if args.workers is None else args.workers
    result = run(args)
    print(summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
