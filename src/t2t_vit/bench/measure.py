"""Timing, compute floors, profiles and training memory of benchmark cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch

import t2t_vit
from t2t_vit.bench.cases import OTHERS, build_case, build_other, make_step
from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import keep_freed_memory, malloc_tuned


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device, warm_up: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each step, interleaved so that load drifts hit every case alike."""
    for step in steps.values() if warm_up else ():  # (and compile)
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_ in range(repeats):
        started = time.perf_counter()
        for key, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[key].append(time.perf_counter() - start)
        if log:
            log(f"  round {round_ + 1}/{repeats}: {time.perf_counter() - started:.1f} s")
    return times


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int | None = None, repeats: int = 5) -> float:
    """Measured GFLOP/s of a square matmul (1024 on a CPU, 8192 on a GPU): the best of ``repeats``."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 4
    seconds = time_alternating({"mm": lambda: [a @ b for _ in range(calls)]}, repeats, device)["mm"]
    return 2 * size**3 * calls / min(seconds) / 1e9


def forward_flops(name: str, img_size: int = 224, model: torch.nn.Module | None = None) -> float:
    """FLOPs of one image's forward pass of ``name`` (or of ``model``, built as ``name``), every
    matmul and convolution counted (attention included)."""
    from t2t_vit.profile import count_macs

    if model is None:
        model = build_other(name, img_size) if name in OTHERS else t2t_vit.create_model(name, img_size=img_size)
    macs, _ = count_macs(model, (3, img_size, img_size))
    return 2 * macs


_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
               "aten::mkldnn_convolution", "aten::convolution_backward", "aten::mkldnn_linear")


def _bucket(op: str) -> str:
    if op in _MATMUL_OPS or "conv" in op:
        return "matmul"
    if "scaled_dot_product" in op or "flash" in op or "softmax" in op:
        return "attention"
    if op in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous", "aten::im2col",
              "aten::col2im", "aten::fill_", "aten::zero_"):
        return "copies"
    return "elementwise"


def profile_bound(step: Callable[[], None], flops: float, rate_gflops: float) -> dict:
    """One call of ``step`` under ``torch.profiler``: the share of wall time per kind of op, the rate
    its matmuls reached and, in words, what bounds it (matmul kernels, attention kernel, memory
    traffic of elementwise ops and copies, or Python/dispatch overhead outside any op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    shares = dict.fromkeys(("matmul", "attention", "copies", "elementwise"), 0.0)
    for event in prof.key_averages():
        shares[_bucket(event.key)] += event.self_cpu_time_total / 1e6
    shares = {k: v / wall for k, v in shares.items()}
    shares["overhead"] = max(0.0, 1.0 - sum(shares.values()))
    matmul_rate_reached = flops / max(shares["matmul"] * wall, 1e-9) / 1e9
    top = max((k for k in shares if k != "matmul"), key=shares.get)
    words = {"attention": "attention kernel", "copies": "memory traffic (copies, casts)",
             "elementwise": "memory traffic (elementwise ops, norms)", "overhead": "Python/dispatch overhead"}
    if shares["matmul"] >= 0.6:
        bound = f"matmul kernels at {matmul_rate_reached:.0f} GFLOP/s ({100 * matmul_rate_reached / rate_gflops:.0f}% of the square-matmul rate)"
    else:
        bound = f"{words[top]}: {100 * shares[top]:.0f}% of the step; matmuls {100 * shares['matmul']:.0f}%"
    return dict(shares={k: round(v, 3) for k, v in shares.items()}, matmul_gflops=matmul_rate_reached, bound=bound)


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa() -> dict:
    """The CPU's model name and whether it has each instruction set in :data:`ISA_FLAGS` (from
    /proc/cpuinfo; empty where there is none): what bf16 and int8 speed depends on."""
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return dict(model=fields.get("model name"), **{flag: flag in flags for flag in ISA_FLAGS})


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def _memory_child(name: str, mode: str, batch: int, img_size: int, threads: int, tuned: bool = False) -> None:
    """Runs in a fresh interpreter: build, one training step, print RSS figures as JSON."""
    torch.set_num_threads(threads)
    if tuned:  # the same allocator settings as the parent
        keep_freed_memory()
    images, labels = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))
    baseline, _ = rss_mb()
    model = build_case(name, mode, img_size=img_size)
    make_step(model, mode, "train", images, labels)()
    _, peak = rss_mb()
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak}))


def training_memory(name: str, mode: str, batch: int, img_size: int = 224) -> dict[str, float]:
    """Peak RSS of one training step of a fresh model, in a fresh subprocess (CPU).

    ``step_mb`` is the peak minus the RSS before the model was built: weights, gradients,
    optimizer state and activations, without the interpreter and libraries.
    """
    code = f"from t2t_vit.bench.measure import _memory_child; _memory_child({name!r}, {mode!r}, {batch}, {img_size}, {torch.get_num_threads()}, {malloc_tuned()})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise T2TViTError(f"memory measurement of {name} ({mode}) failed: {done.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["step_mb"] = figures["peak_mb"] - figures["baseline_mb"]
    return figures
