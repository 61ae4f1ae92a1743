"""Benchmarks of the fast paths against the reference formulation (also `t2t-vit bench`).

The *reference formulation* is the model with every fast path off: plain softmax attention, the
Performer as the paper's code writes it (einsums, normaliser repeated over the width), fp32, no
compile. Each fast path is measured against it in the same run: ``fp32`` (fused attention and
the matmul-form Performer, the library defaults), ``bf16`` (the defaults under CPU/GPU bf16
autocast) and ``compile`` (the defaults under ``torch.compile``). Cases are timed in alternation
(A, B, C, A, B, C, ...) and medians reported, because absolute times on a shared machine are noise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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
from t2t_vit.errors import T2TViTError
from t2t_vit.t2t import SoftSplit, TokenPerformer

MODELS = ("t2t_vit_7", "t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24")
QUICK_MODELS = ("t2t_vit_14", "t2t_vit_t_14")
# Inductor compiles C++ for minutes per graph on a small CPU: compile only these by default.
COMPILE_MODELS = ("t2t_vit_7",)
COMPILE_BATCH = 8
AGREEMENT_MODEL = "t2t_vit_14"
MODES = ("reference", "fp32", "bf16", "compile")


# ---- formulations ---------------------------------------------------------------------------
def reference_formulation(model: nn.Module, enable: bool = True) -> nn.Module:
    """Turn every fast path of ``model`` off (``enable=False`` turns them back on); returns it.

    Plain softmax attention instead of the fused kernel, the einsum Performer instead of the
    matmul form, and ``nn.Unfold`` + transpose instead of the strided soft split. Weights and state-dict layout are untouched; precision and compile are up to
    the caller (the reference runs in fp32, eager).
    """
    t2t_vit.set_fused_attn(model, not enable)
    for module in model.modules():
        if isinstance(module, TokenPerformer):
            module.fused = not enable
        elif isinstance(module, SoftSplit):
            module.strided = not enable
    return model


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (a no-op context when not ``enabled``)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def build_case(name: str, mode: str, state: dict | None = None, **model_kwargs) -> nn.Module:
    """The model ``name`` set up for ``mode`` (one of :data:`MODES`), optionally with given weights."""
    if mode not in MODES:
        raise T2TViTError(f"unknown benchmark mode {mode!r}; choose one of {', '.join(MODES)}")
    model = t2t_vit.create_model(name, **model_kwargs)
    if state is not None:
        model.load_state_dict(state)
    if mode == "reference":
        reference_formulation(model)
    if mode == "compile":
        model = torch.compile(model, backend="inductor")
    return model


def make_step(model: nn.Module, mode: str, task: str, images: Tensor, labels: Tensor) -> Callable[[], None]:
    """A closure running one inference forward or one SGD training step of ``model``."""
    use_bf16 = mode == "bf16"
    device = images.device
    if task == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, use_bf16):
                model(images)

        return infer
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train() -> None:
        with autocast(device, use_bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


# ---- measuring ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, interleaved so that load drifts hit every case alike."""
    for step in steps.values():  # warm-up (and compile)
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


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Measured GFLOP/s of a square ``size``×``size`` matmul: the best of ``repeats``, the machine's limit."""
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


def _memory_child(name: str, mode: str, batch: int, img_size: int, threads: int) -> None:
    """Runs in a fresh interpreter: build, one training step, print RSS figures as JSON."""
    torch.set_num_threads(threads)
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
    code = f"from t2t_vit.bench import _memory_child; _memory_child({name!r}, {mode!r}, {batch}, {img_size}, {torch.get_num_threads()})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise T2TViTError(f"memory measurement of {name} ({mode}) failed: {done.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["step_mb"] = figures["peak_mb"] - figures["baseline_mb"]
    return figures


# ---- bf16 agreement on a held-out set ---------------------------------------------------------
def digits_data(img_size: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits data set of ``t2t-vit train`` (its train/val split, no augmentation) as tensors:
    train x, y and held-out x, y."""
    from t2t_vit.data import create_datasets

    bundle = create_datasets("digits", img_size, None)

    def stack(dataset) -> tuple[Tensor, Tensor]:
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images), torch.tensor(labels)

    return (*stack(bundle.train), *stack(bundle.val))


def train_briefly(model: nn.Module, images: Tensor, labels: Tensor, steps: int, batch: int = 64, lr: float = 2e-3) -> nn.Module:
    """A few AdamW steps in fp32 with the default fast paths, so that logits mean something."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Linear warm-up over the first quarter: deep post-init transformers stall without it.
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 4)))
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
    return model.eval()


@torch.inference_mode()
def bf16_agreement(model: nn.Module, images: Tensor, labels: Tensor | None = None, batch: int = 128) -> dict[str, float]:
    """Top-1 agreement of bf16 autocast with fp32 on ``images`` (and each one's accuracy if labelled)."""
    model.eval()
    fp32, bf16 = [], []
    for chunk in images.split(batch):
        fp32.append(model(chunk))
        with autocast(chunk.device, True):
            bf16.append(model(chunk).float())
    fp32_logits, bf16_logits = torch.cat(fp32), torch.cat(bf16)
    result = dict(images=len(images), agreement=(fp32_logits.argmax(1) == bf16_logits.argmax(1)).float().mean().item(),
                  max_logit_diff=(fp32_logits - bf16_logits).abs().max().item(),
                  median_margin=_top2_margin(fp32_logits).median().item())
    if labels is not None:
        result["accuracy_fp32"] = (fp32_logits.argmax(1) == labels).float().mean().item()
        result["accuracy_bf16"] = (bf16_logits.argmax(1) == labels).float().mean().item()
    return result


def _top2_margin(logits: Tensor) -> Tensor:
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def digits_agreement(
    name: str, steps: int, img_size: int = 16, batch: int = 32, lr: float = 1e-3, **model_kwargs
) -> dict[str, float]:
    """Train ``name`` briefly on digits at ``img_size`` px (small stem), then bf16-vs-fp32 agreement held out."""
    torch.manual_seed(0)
    model = t2t_vit.create_model(name, img_size=img_size, stem="small", num_classes=10, **model_kwargs)
    train_x, train_y, test_x, test_y = digits_data(img_size)
    train_briefly(model, train_x, train_y, steps, batch=batch, lr=lr)
    return dict(model=name, img_size=img_size, steps=steps, **bf16_agreement(model, test_x, test_y))


# ---- the suite ------------------------------------------------------------------------------
def bench_model(
    name: str, modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int, device: torch.device,
    img_size: int = 224, compile_batches: Iterable[int] = (COMPILE_BATCH,),
) -> list[dict]:
    """Time every (task, batch) of ``name`` in every mode, alternating; rows with ratios to the reference."""
    torch.manual_seed(0)
    state = t2t_vit.create_model(name, img_size=img_size).state_dict()
    flops = forward_flops(name, img_size)
    rows = []
    for task, batch in tasks:
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        steps = {}
        for mode in modes:
            if mode == "compile" and batch not in compile_batches:
                continue
            model = build_case(name, mode, copy.deepcopy(state), img_size=img_size).to(device)
            steps[mode] = make_step(model, mode, task, images, labels)
        times = time_alternating(steps, repeats, device)
        ref = statistics.median(times["reference"]) if "reference" in times else float("nan")
        for mode, seconds in times.items():
            median = statistics.median(seconds)
            step_flops = flops * batch * (3 if task == "train" else 1)  # backward ≈ 2× forward
            rows.append(dict(model=name, task=task, batch=batch, mode=mode, seconds=median, times=seconds,
                             images_per_s=batch / median, speedup=ref / median, gflops=step_flops / median / 1e9))
    return rows


def run_suite(
    models: Iterable[str], modes: Iterable[str], tasks: Iterable[tuple[str, int]], repeats: int,
    memory_batch: int | None, device: torch.device, log: Callable[[str], None] = print,
    compile_models: Iterable[str] = COMPILE_MODELS, agreement_steps: int = 0,
) -> dict:
    """The whole benchmark: matmul rates, timing rows and (CPU) training-memory rows, as one dict."""
    modes = list(modes)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rates = {str(dtype).split(".")[-1]: matmul_rate(dtype, device) for dtype in (torch.float32, torch.bfloat16)}
    log(f"matmul rate: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s")
    rows, memory = [], []
    for name in models:
        start = time.perf_counter()
        model_modes = [m for m in modes if m != "compile" or name in compile_models]
        new_rows = bench_model(name, model_modes, tasks, repeats, device)
        rows += new_rows
        if memory_batch and device.type == "cpu":
            for mode in (m for m in modes if m != "compile"):  # compile time would dominate a fresh process
                memory.append(dict(model=name, mode=mode, batch=memory_batch, **training_memory(name, mode, memory_batch)))
            ref = next(m["step_mb"] for m in memory if m["model"] == name and m["mode"] == "reference")
            for m in memory:
                if m["model"] == name:
                    m["ratio"] = m["step_mb"] / ref
        log(f"{name}: {time.perf_counter() - start:.0f} s")
    for dtype, key in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):  # best of start and end
        rates[key] = max(rates[key], matmul_rate(dtype, device))
    for row in rows:
        row["of_peak"] = row["gflops"] / rates["bfloat16" if row["mode"] == "bf16" else "float32"]
    agreement = digits_agreement(AGREEMENT_MODEL, agreement_steps) if agreement_steps else None
    if agreement:
        log(f"bf16 vs fp32 top-1 agreement: {agreement}")
    return dict(meta=dict(started=started, **_meta(device)), matmul_gflops=rates, rows=rows, memory=memory, agreement=agreement)


def _meta(device: torch.device) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv),
                torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), device=str(device),
                processor=platform.processor() or platform.machine(), loadavg=load)


def format_table(result: dict) -> str:
    """Markdown tables of the timing rows and the memory rows."""
    lines = ["| model | task | batch | mode | s/step | images/s | × reference | GFLOP/s | % of matmul rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['task']} | {r['batch']} | {r['mode']} | {r['seconds']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup']:.2f} | {r['gflops']:.0f} | {100 * r['of_peak']:.0f} |")
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
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to measure (default: all four)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="reference is always added")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 3, quick 2)")
    parser.add_argument("--compile-models", nargs="*", default=list(COMPILE_MODELS), choices=MODELS,
                        help=f"models also measured compiled, at batch {COMPILE_BATCH} (inductor; slow to compile)")
    parser.add_argument("--agreement-steps", type=int, default=None,
                        help=f"train {AGREEMENT_MODEL} this many steps on digits, then bf16-vs-fp32 top-1 agreement "
                        "on the held-out 20%% (default 120, quick 0 = skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the results")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise T2TViTError("--device cuda was given but no CUDA device is available")
    modes = ["reference", *(m for m in args.modes if m != "reference")]
    if args.quick:
        models, tasks, repeats = args.models or QUICK_MODELS, [("infer", 8), ("train", 8)], args.repeats or 2
    else:
        models, tasks, repeats = args.models or MODELS, [("infer", 1), ("infer", 8), ("infer", 32), ("train", 8)], args.repeats or 3
    result = run_suite(models, modes, tasks, repeats, memory_batch=8, device=device,
                       log=lambda s: print(s, flush=True), compile_models=args.compile_models,
                       agreement_steps=args.agreement_steps if args.agreement_steps is not None else (0 if args.quick else 120))
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the fast paths against the reference formulation")
    add_arguments(parser)
    parser.set_defaults(func=run)
