"""One optimizer step and one EMA update, as `t2t-vit train` runs them, beside torch's other AdamW kernels.

    PYTHONPATH=src python benchmarks/optimizer_step.py            # ~1 minute; JSON: benchmarks/results-optimizer-step.json

For the demo model (0.44M params, 64 tensors) and T2T-ViT-7 (4.3M, 108 tensors), with random
gradients, timm's ``create_optimizer_v2("adamw")`` as timm's train.py builds it (torch's default:
a loop over tensors on the CPU), with ``foreach=True``, and with ``fused=True`` (what the trainer
uses since the fused kernel exists on the CPU and CUDA); plus timm's ``ModelEmaV3`` update. One
thread (as in the trainer comparison); kernels alternate over rounds, median of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import t2t_vit  # noqa: E402
from t2t_vit.bench.measure import cpu_isa  # noqa: E402

MODELS = {
    "demo model (0.44M)": dict(embed_dim=128, depth=3, num_heads=4, token_dim=16, img_size=32, stem="small",
                               num_classes=10),
    "T2T-ViT-7 (4.3M)": {},
}
KERNELS = {"loop (torch default, timm train.py)": {}, "foreach": dict(foreach=True), "fused (t2t-vit train)": dict(fused=True)}


def median_ms(step, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(kwargs: dict, rounds: int, repeats: int) -> dict[str, float]:
    model = t2t_vit.create_model("t2t_vit_7", **kwargs)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {name: create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, **extra)
                  for name, extra in KERNELS.items()}
    ema = ModelEmaV3(model, decay=0.998)
    samples: dict[str, list[float]] = {name: [] for name in [*KERNELS, "EMA update"]}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            samples[name].append(median_ms(opt.step, repeats))
        samples["EMA update"].append(median_ms(lambda: ema.update(model, step=100), repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results-optimizer-step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    print("| model | " + " | ".join(f"{name} ms" for name in [*KERNELS, "EMA update"]) + " | loop ÷ fused |")
    print("|---" * (len(KERNELS) + 3) + "|")
    for label, kwargs in MODELS.items():
        times = measure(kwargs, args.rounds, args.repeats)
        results[label] = times
        ratio = times[next(iter(KERNELS))] / times["fused (t2t-vit train)"]
        print(f"| {label} | " + " | ".join(f"{t:.2f}" for t in times.values()) + f" | {ratio:.1f}× |")
    record = dict(results=results, torch=torch.__version__, threads=1, cpu_isa=cpu_isa(), loadavg=os.getloadavg())
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
