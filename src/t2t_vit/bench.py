"""Benchmarks of the fast paths against the reference formulation (also `t2t-vit bench`).

The *reference formulation* is the model with every fast path off: plain softmax attention, the
Performer as the paper's code writes it (einsums, normaliser repeated over the width), soft
splits by ``nn.Unfold``, fp32, no compile. Each fast path is measured against it in the same run:
``fp32`` (fused attention, the matmul-form Performer and the strided soft split: the library
defaults), ``bf16`` (the defaults under CPU/GPU bf16 autocast), ``compile`` (the defaults under
``torch.compile``) and ``compile-bf16`` (both). Cases are timed in alternation (A, B, C, A, B, C,
...) and medians reported, because absolute times on a shared machine are noise. ``--gpu`` runs
the GPU preset: large batches, every mode compiled, peak memory from
``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import t2t_vit
from t2t_vit.agreement import digits_agreement
from t2t_vit.errors import T2TViTError
from t2t_vit.runtime import keep_freed_memory, malloc_tuned
from t2t_vit.t2t import SoftSplit, TokenPerformer
from t2t_vit.train.evaluate import autocast

MODELS = ("t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24")
QUICK_MODELS = ("t2t_vit_14", "t2t_vit_t_14")
# Inductor compiles C++ for minutes per graph on a small CPU: compile only these by default.
COMPILE_MODELS = ("t2t_vit_7",)
COMPILE_BATCH = 8
AGREEMENT_MODEL = "t2t_vit_14"
MODES = ("reference", "fp32", "bf16", "compile", "compile-bf16")
DEFAULT_MODES = ("reference", "fp32", "bf16", "compile")
# The GPU preset: the issue's training table (batch 64-256, bf16 + compile) plus fp32 inference.
GPU_MODELS = ("t2t_vit_14", "t2t_vit_t_14")
GPU_TASKS = (("infer", 256), ("train", 64), ("train", 128), ("train", 256))


# ---- formulations ---------------------------------------------------------------------------
def reference_formulation(model: nn.Module, enable: bool = True) -> nn.Module:
    """Turn every fast path of ``model`` off (``enable=False`` turns them back on); returns it.

    Plain softmax attention instead of the fused kernel, the einsum Performer instead of the
    matmul form, and ``nn.Unfold`` + transpose instead of the strided soft split. Weights and
    state-dict layout are untouched; precision and compile are up to the caller (the reference
    runs in fp32, eager).
    """
    t2t_vit.set_fused_attn(model, not enable)
    for module in model.modules():
        if isinstance(module, TokenPerformer):
            module.fused = not enable
        elif isinstance(module, SoftSplit):
            module.strided = not enable
    return model


def build_case(name: str, mode: str, state: dict | None = None, **model_kwargs) -> nn.Module:
    """The model ``name`` set up for ``mode`` (one of :data:`MODES`), optionally with given weights."""
    if mode not in MODES:
        raise T2TViTError(f"unknown benchmark mode {mode!r}; choose one of {', '.join(MODES)}")
    model = t2t_vit.create_model(name, **model_kwargs)
    if state is not None:
        model.load_state_dict(state)
    if mode == "reference":
        reference_formulation(model)
    if mode.startswith("compile"):
        model = torch.compile(model, backend="inductor")
    return model


def make_step(model: nn.Module, mode: str, task: str, images: Tensor, labels: Tensor) -> Callable[[], None]:
    """A closure running one inference forward or one SGD training step of ``model``."""
    precision = "bf16" if mode.endswith("bf16") else "fp32"
    device = images.device
    if task == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, precision):
                model(images)

        return infer
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


# ---- measuring ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device, warm_up: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each step, interleaved so that load drifts hit every case alike."""
    for step in steps.values() if warm_up else ():  # (and compile)
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int | None = None, repeats: int = 5) -> float:
    """Measured GFLOP/s of a square matmul (1024 on a CPU, 8192 on a GPU): the best of ``repeats``."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 4
    seconds = time_alternating({"mm": lambda: [a @ b for _ in range(calls)]}, repeats, device)["mm"]
    return 2 * size**3 * calls / min(seconds) / 1e9


def forward_flops(name: str, img_size: int = 224) -> float:
    """FLOPs of one image's forward pass, every matmul counted (attention included)."""
    from t2t_vit.profile import count_macs

    macs, _ = count_macs(t2t_vit.create_model(name, img_size=img_size), (3, img_size, img_size))
    return 2 * macs


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
    code = f"from t2t_vit.bench import _memory_child; _memory_child({name!r}, {mode!r}, {batch}, {img_size}, {torch.get_num_threads()}, {malloc_tuned()})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise T2TViTError(f"memory measurement of {name} ({mode}) failed: {done.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["step_mb"] = figures["peak_mb"] - figures["baseline_mb"]
    return figures


# ---- the suite ------------------------------------------------------------------------------
def bench_model(
    name: str, modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int, device: torch.device,
    img_size: int = 224, compile_batches: Iterable[int] | None = (COMPILE_BATCH,), log: Callable[[str], None] = print,
) -> list[dict]:
    """Time every (task, batch) of ``name`` in every mode, alternating; rows with ratios to the reference.

    Compiled modes run only at ``compile_batches`` (None: every batch). On a GPU each row also has
    ``peak_mb``: the most memory the case allocated while it was built and warmed up (weights,
    gradients, optimizer state, activations), from ``torch.cuda.max_memory_allocated``; a case that
    runs out of memory is reported as such and the others go on.
    """
    torch.manual_seed(0)
    state = t2t_vit.create_model(name, img_size=img_size).state_dict()
    flops = forward_flops(name, img_size)
    rows = []
    for task, batch in tasks:
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        steps, peaks = {}, {}
        for mode in modes:
            if mode.startswith("compile") and compile_batches is not None and batch not in compile_batches:
                continue
            try:
                steps[mode], peaks[mode] = _warm_case(name, mode, task, state, images, labels, img_size)
                continue
            except torch.OutOfMemoryError:
                pass  # released only once the traceback (and the half-built case it holds) is gone
            log(f"{name} {task} batch {batch} {mode}: out of memory")
            rows.append(dict(model=name, task=task, batch=batch, mode=mode, out_of_memory=True))
            _release(device)
        times = time_alternating(steps, repeats, device, warm_up=False)
        ref = statistics.median(times["reference"]) if "reference" in times else float("nan")
        for mode, seconds in times.items():
            median = statistics.median(seconds)
            step_flops = flops * batch * (3 if task == "train" else 1)  # backward ≈ 2× forward
            rows.append(dict(model=name, task=task, batch=batch, mode=mode, seconds=median, times=seconds,
                             images_per_s=batch / median, speedup=ref / median, gflops=step_flops / median / 1e9,
                             peak_mb=peaks[mode]))
        del steps
        _release(device)
    return rows


def _warm_case(
    name: str, mode: str, task: str, state: dict, images: Tensor, labels: Tensor, img_size: int
) -> tuple[Callable[[], None], float | None]:
    """Build one case, run it once (warm-up, compilation, optimizer state); its step and GPU peak MB."""
    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)  # the cases built before this one
        torch.cuda.reset_peak_memory_stats(device)
    model = build_case(name, mode, state, img_size=img_size).to(device)  # load_state_dict copies
    step = make_step(model, mode, task, images, labels)
    step()
    if device.type != "cuda":
        return step, None
    torch.cuda.synchronize(device)
    return step, (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(
    models: Iterable[str], modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int,
    memory_batch: int | None, device: torch.device, log: Callable[[str], None] = print,
    compile_models: Iterable[str] = COMPILE_MODELS, agreement_steps: int = 0,
    compile_batches: Iterable[int] | None = (COMPILE_BATCH,),
) -> dict:
    """The whole benchmark: matmul rates, timing rows and (CPU) training-memory rows, as one dict."""
    modes = list(modes)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rates = {str(dtype).split(".")[-1]: matmul_rate(dtype, device) for dtype in (torch.float32, torch.bfloat16)}
    log(f"matmul rate: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s")
    rows, memory = [], []
    for name in models:
        start = time.perf_counter()
        model_modes = [m for m in modes if not m.startswith("compile") or name in compile_models]
        new_rows = bench_model(name, model_modes, tasks, repeats, device, compile_batches=compile_batches, log=log)
        rows += new_rows
        if memory_batch and device.type == "cpu":
            for mode in (m for m in modes if not m.startswith("compile")):  # compile time would dominate a fresh process
                memory.append(dict(model=name, mode=mode, batch=memory_batch, **training_memory(name, mode, memory_batch)))
            ref = next(m["step_mb"] for m in memory if m["model"] == name and m["mode"] == "reference")
            for m in memory:
                if m["model"] == name:
                    m["ratio"] = m["step_mb"] / ref
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    for dtype, key in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):  # best of start and end
        rates[key] = max(rates[key], matmul_rate(dtype, device))
    for row in rows:
        if "gflops" in row:
            row["of_peak"] = row["gflops"] / rates["bfloat16" if row["mode"].endswith("bf16") else "float32"]
    agreement = digits_agreement(AGREEMENT_MODEL, agreement_steps) if agreement_steps else None
    if agreement:
        log(f"bf16 vs fp32 top-1 agreement: {agreement}")
    return dict(meta=dict(started=started, **_meta(device)), matmul_gflops=rates, rows=rows, memory=memory, agreement=agreement)


def _meta(device: torch.device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv),
                torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), device=str(device),
                processor=platform.processor() or platform.machine(), loadavg=load, malloc_tuned=malloc_tuned(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def format_table(result: dict) -> str:
    """Markdown tables of the timing rows and the memory rows."""
    gpu = any(r.get("peak_mb") is not None for r in result["rows"])
    lines = ["| model | task | batch | mode | s/step | images/s | × reference | GFLOP/s | % of matmul rate |"
             + (" peak MB |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in result["rows"]:
        if r.get("out_of_memory"):
            lines.append(f"| {r['model']} | {r['task']} | {r['batch']} | {r['mode']} | out of memory |||||" + ("|" if gpu else ""))
            continue
        lines.append(f"| {r['model']} | {r['task']} | {r['batch']} | {r['mode']} | {r['seconds']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup']:.2f} | {r['gflops']:.0f} | {100 * r['of_peak']:.0f} |"
                     + (f" {r['peak_mb']:.0f} |" if gpu else ""))
    if result["memory"]:
        lines += ["", "| model | train batch | mode | peak RSS MB | step MB | × reference |", "|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['model']} | {m['batch']} | {m['mode']} | {m['peak_mb']:.0f} | {m['step_mb']:.0f} | {m['ratio']:.2f} |")
    agreement = result.get("agreement")
    if agreement:
        lines += ["", f"bf16 vs fp32 top-1 agreement, {agreement['model']} trained {agreement['steps']} steps on digits at "
                  f"{agreement['img_size']} px, {agreement['images']} held-out images: {100 * agreement['agreement']:.1f}% "
                  f"(accuracy fp32 {100 * agreement['accuracy_fp32']:.1f}%, bf16 {100 * agreement['accuracy_bf16']:.1f}%; "
                  f"max |Δlogit| {agreement['max_logit_diff']:.3f}, median top-2 margin {agreement['median_margin']:.2f})"]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)}, batch 8 only, 2 repeats")
    parser.add_argument("--gpu", action="store_true",
                        help=f"the GPU preset on cuda: {', '.join(GPU_MODELS)}, inference at batch 256 and training at "
                        "64/128/256, every mode (compiled ones too), GPU peak memory")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to measure (default: all four)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help=f"default: {' '.join(DEFAULT_MODES)} (--gpu: all); reference is always added")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 3, quick 2, gpu 5)")
    parser.add_argument("--compile-models", nargs="*", default=None, choices=MODELS,
                        help=f"models also measured compiled (default {' '.join(COMPILE_MODELS)}, at batch "
                        f"{COMPILE_BATCH}; --gpu: every model and batch); inductor is slow to compile on a CPU")
    parser.add_argument("--agreement-steps", type=int, default=None,
                        help=f"train {AGREEMENT_MODEL} this many steps on digits, then bf16-vs-fp32 top-1 agreement "
                        "on the held-out 20%% (default 120, quick and gpu 0 = skip)")
    parser.add_argument("--tasks", nargs="+", type=_task, default=None, metavar="TASK:BATCH",
                        help="e.g. train:64 infer:256 (default: infer:1 infer:8 infer:32 train:8; quick: infer:8 "
                        "train:8; gpu: " + " ".join(f"{t}:{b}" for t, b in GPU_TASKS) + ")")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu; --gpu: cuda)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the results")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise T2TViTError(f"{'--gpu' if args.gpu else '--device cuda'} was given but no CUDA device is available")
    modes = ["reference", *(m for m in args.modes or (MODES if args.gpu else DEFAULT_MODES) if m != "reference")]
    compile_models, compile_batches = args.compile_models, (COMPILE_BATCH,)
    if args.gpu:
        models, tasks, repeats = args.models or GPU_MODELS, list(GPU_TASKS), args.repeats or 5
        compile_models, compile_batches = compile_models if compile_models is not None else models, None
    elif args.quick:
        models, tasks, repeats = args.models or QUICK_MODELS, [("infer", 8), ("train", 8)], args.repeats or 2
    else:
        models, tasks, repeats = args.models or MODELS, [("infer", 1), ("infer", 8), ("infer", 32), ("train", 8)], args.repeats or 3
    tasks = args.tasks or tasks
    agreement_steps = args.agreement_steps if args.agreement_steps is not None else (0 if args.quick or args.gpu else 120)
    result = run_suite(models, modes, tasks, repeats, memory_batch=8, device=device,
                       log=lambda s: print(s, flush=True), compile_models=COMPILE_MODELS if compile_models is None else compile_models,
                       agreement_steps=agreement_steps, compile_batches=compile_batches)
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.json}")
    return 0


def _task(text: str) -> tuple[str, int]:
    task, _, batch = text.partition(":")
    if task not in ("infer", "train") or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK:BATCH with TASK infer or train, e.g. train:64")
    return task, int(batch)


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the fast paths against the reference formulation")
    add_arguments(parser)
    parser.set_defaults(func=run)
