"""How many images/s one loader worker makes with the paper's training transform, and how many
workers a GPU step rate needs.

    python benchmarks/input_pipeline.py                                   # ~2 minutes on 2 cores
    python benchmarks/input_pipeline.py --workers 1 2 4 --step-rate 3 --batch 128 --json out.json
    python benchmarks/input_pipeline.py --size 1000x750 --json out-large.json  # where draft() can act

Real JPEGs at ImageNet size: scikit-image's photographs, scaled to cover 500×375, cut at several
positions (and mirrored), saved at quality 90. The transform is the paper's (DeiT's) recipe through
timm's ``create_transform``: RandomResizedCrop 224 (bicubic), flip 0.5, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode), ImageNet normalisation. Variants:

- ``float``: what the trainer does today: PIL decode → transform → normalised float32 CHW tensor.
- ``draft``: the same with ``Image.draft`` (JPEG decoded at 1/2, 1/4 or 1/8 scale when the image
  is at least twice the size the crop needs).
- ``uint8``: timm's prefetcher form: the worker stops at a uint8 tensor (4× fewer bytes through
  the worker queue, pinned memory and the host-to-device copy); normalisation and random erasing
  run on the device, batched (their CPU cost per image is measured separately, as ``device part``).

Per-worker rates are measured in the main process with one thread (what one worker process does),
then a DataLoader with N workers (started fresh per round, pin_memory where CUDA exists) gives the end-to-end
rate. Prints a table, the workers a given step rate needs, and writes JSON with the CPU's ISA
flags and the load average (timings from a shared machine are noisy: compare rows, not machines).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = (500, 375)
RECIPE = dict(input_size=224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
              interpolation="bicubic", hflip=0.5)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def build_jpegs(folder: Path, size: tuple[int, int] = SIZE, per_photo: int = 8, quality: int = 90,
                seed: int = 0) -> list[Path]:
    """``per_photo`` JPEGs of ``size`` cut from each of scikit-image's photographs (data/photos.py's list)."""
    from t2t_vit.data.photos import PHOTOS, _photograph

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in PHOTOS:
        photo = Image.fromarray(_photograph(name))
        scale = max(size[0] / photo.width, size[1] / photo.height) * 1.3  # room to move the window
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
        for k in range(per_photo):
            x, y = rng.integers(0, photo.width - size[0] + 1), rng.integers(0, photo.height - size[1] + 1)
            image = photo.crop((int(x), int(y), int(x) + size[0], int(y) + size[1]))
            if k % 2:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = folder / f"{name}-{size[0]}x{size[1]}-{k}.jpg"
            image.save(path, quality=quality)
            paths.append(path)
    return paths


class Files(torch.utils.data.Dataset):
    """Image files through a transform; ``draft`` decodes JPEGs at a reduced scale where it can."""

    def __init__(self, paths: list[Path], transform, draft: int | None = None, repeat: int = 1) -> None:
        self.paths, self.transform, self.draft, self.repeat = paths, transform, draft, repeat

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, index: int):
        with open(self.paths[index % len(self.paths)], "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            if self.draft:
                # the smallest JPEG scale whose short side still covers the crop's output size
                image.draft("RGB", (self.draft, self.draft))
            image = image.convert("RGB")
        return self.transform(image), 0


def transforms():
    """``{variant: (transform, draft)}`` and the batched device part of the uint8 variant."""
    from timm.data import create_transform

    floats = create_transform(**RECIPE)
    uint8 = create_transform(**RECIPE, use_prefetcher=True)  # stops at uint8; no normalise, no erasing
    return {"float": (floats, None), "draft": (floats, 224), "uint8": (uint8, None)}


def device_part(batch: torch.Tensor) -> torch.Tensor:
    """What the uint8 variant leaves for the device: normalise + random erasing, on a whole batch."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.random_erasing import RandomErasing

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=batch.device).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return RandomErasing(0.25, mode="pixel", device=str(batch.device))(x)


def to_tensor(item) -> torch.Tensor:
    return item if isinstance(item, torch.Tensor) else torch.from_numpy(np.asarray(item))


def per_worker_rates(datasets: dict[str, Files], seconds: float, rounds: int) -> dict[str, list[float]]:
    """Images/s of one process with one thread (what one loader worker does), the variants
    interleaved in ``rounds`` so that a load change on a shared machine hits them alike."""
    torch.set_num_threads(1)
    for data in datasets.values():
        for i in range(5):  # warm-up: imports, first-call caches
            data[i]
    rates: dict[str, list[float]] = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, data in datasets.items():
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                to_tensor(data[count % len(data)][0])
                count += 1
            rates[name].append(count / (time.perf_counter() - start))
    return rates


def decoded_size(path: Path, draft: int | None) -> tuple[int, int]:
    """The size PIL decodes ``path`` at (smaller than the file's where ``draft`` applies)."""
    with Image.open(path) as image:
        if draft:
            image.draft("RGB", (draft, draft))
        return image.size


def collate(batch):
    return torch.stack([to_tensor(x) for x, _ in batch]), torch.tensor([y for _, y in batch])


def loader_rates(datasets: dict[str, Files], workers: int, batch: int, batches: int, rounds: int) -> dict[str, float]:
    """End-to-end images/s of a DataLoader with ``workers`` processes: per round and variant a fresh
    loader is timed from ``iter()`` to its ``batches``-th batch (worker start-up included, as at the
    start of a run; a fork takes well under a second), variants interleaved; the median round."""
    rates: dict[str, list[float]] = {name: [] for name in datasets}
    for _ in range(rounds):
        for name, data in datasets.items():
            loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, shuffle=True,
                                                 pin_memory=torch.cuda.is_available(), collate_fn=collate,
                                                 drop_last=True)
            start = time.perf_counter()
            it = iter(loader)
            for _ in range(batches):
                next(it)
            rates[name].append(batches * batch / (time.perf_counter() - start))
            del it  # shuts the workers down before the next loader starts
    return {name: float(np.median(r)) for name, r in rates.items()}


def cpu_info() -> dict:
    flags, model = set(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return dict(model=model, cores=os.cpu_count(), isa={flag: flag in flags for flag in ISA_FLAGS},
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                torch=torch.__version__, pillow=Image.__version__, simd_pillow="post" in Image.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/t2t-input-pipeline", help="where the JPEGs are written")
    parser.add_argument("--size", default="500x375", help="JPEG width x height (ImageNet's average is about 400x350)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=12.0, help="per-worker measurement time per variant")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds the time is split into")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="loader batches per round")
    parser.add_argument("--loader-rounds", type=int, default=3, help="interleaved loader rounds per worker count")
    parser.add_argument("--step-rate", type=float, default=3.0, help="training steps/s to feed (per GPU)")
    parser.add_argument("--json", default="benchmarks/results-input-pipeline.json")
    args = parser.parse_args()

    size = tuple(int(v) for v in args.size.lower().split("x"))
    paths = build_jpegs(Path(args.folder), size)
    kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    print(f"{len(paths)} JPEGs of {size[0]}×{size[1]}, {kb:.0f} KiB on average, in {args.folder}")
    rows, need = [], args.step_rate * args.batch
    x = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8)
    torch.set_num_threads(1)
    device_part(x)
    start = time.perf_counter()
    for _ in range(3):
        device_part(x)
    device_cpu = 3 * args.batch / (time.perf_counter() - start)
    repeat = max(1, 2 * args.batch * args.batches // len(paths))
    datasets = {name: Files(paths, tf, draft, repeat) for name, (tf, draft) in transforms().items()}
    single = per_worker_rates(datasets, args.seconds * len(datasets), args.rounds)
    loaders = {n: loader_rates(datasets, n, args.batch, args.batches, args.loader_rounds) for n in args.workers}
    for name, data in datasets.items():
        sample = to_tensor(data[0][0])
        row = dict(variant=name, per_worker=float(np.median(single[name])), per_worker_rounds=single[name],
                   bytes_per_image=sample.numel() * sample.element_size(), decoded=decoded_size(paths[0], data.draft))
        row.update({f"workers_{n}": loaders[n][name] for n in args.workers})
        row["workers_needed"] = need / row["per_worker"]
        rows.append(row)
    print_table(rows, args, need, device_cpu)
    result = dict(cpu=cpu_info(), recipe=RECIPE, image_size=size, jpeg_kib=kb, batch=args.batch,
                  step_rate=args.step_rate, rows=rows, device_part_cpu_images_per_s=device_cpu,
                  command=" ".join(sys.argv))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def print_table(rows: list[dict], args, need: float, device_cpu: float) -> None:
    heads = " | ".join(f"{n} workers img/s" for n in args.workers)
    print(f"\n| variant | decoded at | 1 worker (1 thread) img/s, median [min–max] | {heads} | "
          f"bytes/image to the main process | workers for {args.step_rate:g} steps/s × {args.batch} |")
    print("|---" * (5 + len(args.workers)) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f'workers_{n}']:.1f}" for n in args.workers)
        spread = f"{min(r['per_worker_rounds']):.0f}–{max(r['per_worker_rounds']):.0f}"
        print(f"| {r['variant']} | {r['decoded'][0]}×{r['decoded'][1]} | {r['per_worker']:.1f} [{spread}] | {cells} | "
              f"{r['bytes_per_image'] / 1024:.0f} KiB | {math.ceil(r['workers_needed'])} |")
    print(f"\nuint8's device part (normalise + erasing) on this CPU, 1 thread: {device_cpu:.0f} img/s "
          f"(on a GPU it is a few batched kernels). {need:.0f} img/s are needed per GPU.")


if __name__ == "__main__":
    sys.exit(main())
