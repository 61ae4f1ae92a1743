"""`t2t-vit train` beside timm's own train.py: same model, ImageFolder, batch, augmentation, precision,
threads and loader workers; training images/s per step, the two trainers interleaved.

    git -C /path/to/pytorch-image-models show HEAD:train.py > /tmp/timm_train/train.py   # outside this repo
    PYTHONPATH=src python benchmarks/vs_timm_train.py --timm-train /tmp/timm_train/train.py

Each run is a subprocess timed from its own per-step log lines (ours: ``--log-every 1``; timm:
``--log-interval 1``), stamped as they arrive; the median interval between steps after the first
``warmup`` steps gives images/s (both include the wait for the loader). A run is stopped once it
has logged its steps, before any evaluation. Cases: T2T-ViT-7 at 224 px on 500×375 JPEGs
(benchmarks/input_pipeline.py's photographs) and the digits demo model at 32 px on the digits as an
ImageFolder of PNGs; the paper's augmentation (RandomResizedCrop with random interpolation, flip,
RandAugment m9, erasing 0.25 pixel mode, mixup 0.8 / cutmix 1.0, smoothing 0.1, drop path 0.1),
AdamW, EMA, fp32, one thread, one loader worker.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
OURS_STEP = re.compile(r"^step (\d+) ")
TIMM_STEP = re.compile(r"Train: \d+ \[\s*(\d+)/")
DEMO_KWARGS = dict(embed_dim=128, depth=3, num_heads=4, token_dim=16)


def cases(root: Path) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from data_formats import write_digits
    from gpu_train import image_folder

    photos, digits = root / "photos", root / "digits"
    if not (photos / "train").is_dir():
        image_folder(photos, (500, 375), 16, 2)
    if not (digits / "imagefolder").is_dir():
        write_digits(str(digits))
    return [dict(name="T2T-ViT-7, 224 px, 500×375 JPEGs", data=photos, model_kwargs={}, img_size=224, stem="imagenet",
                 batch=16, steps=8, warmup=2),
            dict(name="demo model (0.44M), 32 px, digits PNGs", data=digits / "imagefolder", model_kwargs=DEMO_KWARGS,
                 img_size=32, stem="small", batch=64, steps=20, warmup=4)]


def ours(case: dict, out: Path) -> list[str]:
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in case["model_kwargs"].items()) + "}"
    return [sys.executable, "-m", "t2t_vit", "train", "--config", "imagenet_t2t_vit_7", "--data", str(case["data"]),
            "--model-kwargs", kwargs, "--img-size", str(case["img_size"]), "--stem", case["stem"],
            "--batch-size", str(case["batch"]), "--precision", "fp32", "--workers", "1", "--threads", "1",
            "--log-every", "1", "--warmup-epochs", "0", "--output", str(out)]


def timm(case: dict, out: Path, train_py: str) -> list[str]:
    kwargs = [f"{k}={v}" for k, v in {**case["model_kwargs"], "img_size": case["img_size"], "stem": case["stem"]}.items()]
    argv = ["train.py", "--data-dir", str(case["data"]), "--train-split", "train", "--val-split", "val",
            "--model", "t2t_vit_7", "--model-kwargs", *kwargs, "--img-size", str(case["img_size"]),
            "--num-classes", "10", "-b", str(case["batch"]), "--device", "cpu", "--no-prefetcher", "-j", "1",
            "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.03", "--sched", "cosine", "--warmup-epochs", "0",
            "--epochs", "1", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel",
            "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--drop-path", "0.1",
            "--train-interpolation", "random", "--crop-pct", "0.9", "--model-ema", "--model-ema-decay", "0.99996",
            "--log-interval", "1", "--output", str(out), "--checkpoint-hist", "1"]
    # our models register with timm when t2t_vit is imported; train.py itself runs unchanged
    code = (f"import sys, runpy, t2t_vit; sys.argv = {argv!r}; "
            f"runpy.run_path({train_py!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def step_times(cmd: list[str], pattern: re.Pattern, steps: int) -> list[float]:
    """Arrival times of the first ``steps`` step lines of ``cmd``'s output; the run is then killed."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps, tail = [], []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            if pattern.search(line):
                stamps.append(time.perf_counter())
                if len(stamps) >= steps:
                    break
    finally:
        proc.kill()
        proc.wait()
    if len(stamps) < steps:
        raise RuntimeError(f"{cmd[:6]} logged {len(stamps)} of {steps} steps:\n{''.join(tail)}")
    return stamps


def rate(stamps: list[float], batch: int, warmup: int) -> float:
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return batch / statistics.median(intervals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", required=True, help="timm's train.py, outside this repository")
    parser.add_argument("--root", default="/tmp/t2t-vs-timm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", type=int, nargs="+", default=None, help="indices of the cases to run (default all)")
    parser.add_argument("--json", default="benchmarks/results-vs-timm-train.json")
    args = parser.parse_args()
    root = Path(args.root)
    rows = []
    for n, case in enumerate(cases(root)):
        if args.cases is not None and n not in args.cases:
            continue
        rates = {"ours": [], "timm": []}
        for round_ in range(args.rounds):
            for who in ("ours", "timm")[:: 1 if round_ % 2 == 0 else -1]:  # ABBA: load drift hits both alike
                out = root / "runs" / f"{who}-{case['img_size']}-{round_}-{time.time_ns()}"
                cmd = ours(case, out) if who == "ours" else timm(case, out, args.timm_train)
                stamps = step_times(cmd, OURS_STEP if who == "ours" else TIMM_STEP, case["steps"])
                rates[who].append(rate(stamps, case["batch"], case["warmup"]))
                print(f"{case['name']}: round {round_ + 1} {who} {rates[who][-1]:.1f} img/s", flush=True)
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["timm"])
        rows.append(dict(case=case["name"], batch=case["batch"], steps=case["steps"], warmup=case["warmup"],
                         ours=rates["ours"], timm=rates["timm"], ratio=ratio))
    print("\n| case | batch | t2t-vit train img/s | timm train.py img/s | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {' / '.join(f'{v:.1f}' for v in r['ours'])} | "
              f"{' / '.join(f'{v:.1f}' for v in r['timm'])} | {r['ratio']:.2f}× |")
    with open(args.json, "w") as f:
        json.dump(dict(rows=rows, command=" ".join(sys.argv), load_average=os.getloadavg()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
