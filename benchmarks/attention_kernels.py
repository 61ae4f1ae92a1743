"""Fused SDPA vs explicit matmul attention on this machine's CPU, per sequence length, dtype, grad mode.

The cases are the attention shapes T2T-ViT runs: backbone blocks (6 heads of width 64 at 65, 197
and 577 tokens; 32 heads of 12 and 8 heads of 96 for the ResNeXt-style and ViT-S variants at 197)
and the single-head T2T layers (width 64 at 784, 1,024 and 3,136 tokens). Each pair is timed
interleaved (fused, math, fused, ...) so load drifts hit both alike; medians are reported.

Prints a table, writes ``benchmarks/results-attention-kernels.json`` and, from it, the crossover
lengths that ``t2t_vit.switchboard.auto_kernel`` encodes: per (dtype, grad), the shortest length
from which the fused kernel was faster in every measured case of that length and above, except that in
training at 2,048 tokens or more a fused kernel at most 10% slower counts: it does not store the N×N
attention matrix for the backward pass (what the T2T layer at 3,136 tokens would otherwise hold).

    nice -n 10 python benchmarks/attention_kernels.py [--repeats 7] [--batch 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (heads, head_dim, tokens)
    (6, 64, 65), (6, 64, 197), (6, 64, 577), (32, 12, 197), (8, 96, 197),
    (1, 64, 784), (1, 64, 1024), (1, 64, 3136),
]
NEVER = 1 << 30  # "fused is never used": longer than any sequence


def attention(q, k, v, kernel: str):
    scale = q.shape[-1] ** -0.5
    if kernel == "fused":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def make_call(kernel: str, shape: tuple[int, int, int], batch: int, dtype: torch.dtype, grad: bool):
    heads, dim, tokens = shape
    q, k, v = (torch.randn(batch, heads, tokens, dim, dtype=dtype, requires_grad=grad) for _ in range(3))
    if not grad:
        def infer():
            with torch.inference_mode():
                attention(q, k, v, kernel)
        return infer

    def train():
        attention(q, k, v, kernel).float().square().mean().backward()
        for t in (q, k, v):
            t.grad = None
    return train


def time_pair(calls: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per call, the calls interleaved after one warm-up round."""
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(batch: int, repeats: int) -> list[dict]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for grad in (False, True):
            for shape in SHAPES:
                calls = {kernel: make_call(kernel, shape, batch, dtype, grad) for kernel in ("fused", "math")}
                ms = time_pair(calls, repeats if shape[2] < 3000 else max(3, repeats // 2))
                case = dict(dtype=str(dtype).removeprefix("torch."), grad=grad, batch=batch, heads=shape[0],
                            head_dim=shape[1], tokens=shape[2], fused_ms=round(ms["fused"], 3),
                            math_ms=round(ms["math"], 3))
                cases.append(case)
                print(format_row(case), flush=True)
    return cases


def format_row(case: dict) -> str:
    ratio = case["math_ms"] / case["fused_ms"]
    return (f"{case['dtype']:>8} {'train' if case['grad'] else 'infer':>5} {case['heads']:>3}x{case['head_dim']:<3}"
            f" {case['tokens']:>5} tokens  fused {case['fused_ms']:9.3f} ms  math {case['math_ms']:9.3f} ms"
            f"  math/fused {ratio:5.2f}")


# When training at long sequences the math path stores the N×N attention matrix for the backward pass
# (3,136 tokens: 39 MB per image and head in bf16); the fused kernel stores one value per row. There,
# a fused kernel within MEMORY_SLACK of math's time is preferred for the memory it saves.
MEMORY_RULE = dict(min_tokens=2048, slack=1.10)


def fused_acceptable(case: dict) -> bool:
    """Fused is chosen for this case: it is faster, or nearly as fast and saves a long sequence's memory."""
    if case["fused_ms"] <= case["math_ms"]:
        return True
    long_training = case["grad"] and case["tokens"] >= MEMORY_RULE["min_tokens"]
    return long_training and case["fused_ms"] <= MEMORY_RULE["slack"] * case["math_ms"]


def crossovers(cases: list[dict]) -> dict[str, int]:
    """Per "dtype/infer|train": the shortest length from which fused was acceptable in every measured case."""
    rule = {}
    for dtype in ("float32", "bfloat16"):
        for grad in (False, True):
            mine = [c for c in cases if c["dtype"] == dtype and c["grad"] == grad]
            start = NEVER
            for tokens in sorted({c["tokens"] for c in mine}, reverse=True):
                if all(fused_acceptable(c) for c in mine if c["tokens"] >= tokens):
                    start = tokens
            rule[f"{dtype}/{'train' if grad else 'infer'}"] = start
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default=str(Path(__file__).with_name("results-attention-kernels.json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    cases = measure(args.batch, args.repeats)
    rule = crossovers(cases)
    print("fused from (tokens):", json.dumps(rule))
    result = dict(
        command=f"python benchmarks/attention_kernels.py --batch {args.batch} --repeats {args.repeats} "
                f"--threads {args.threads}",
        device="cpu", processor=platform.processor() or platform.machine(), threads=args.threads,
        torch=torch.__version__, measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-min, at start and end
        note="interleaved medians of fused and math per case",
        cases=cases, fused_from=rule, memory_rule=MEMORY_RULE,
    )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
